"""Measurement: parameters, MACs, activation memory and latency per layer; example inputs;
snapshots of module state taken around measurement runs."""
