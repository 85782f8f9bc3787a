"""Does lighten stay as fast with the low-rank and unpadded-LIST rules? Old vs new rule set.

For each zoo network (``examples/zoo.py``) ``lwcompile.lighten`` runs with the rule set
before issue 23 (``default_rules(without=NEW_RULES)``) and with today's defaults, alternately
``--repeats`` times, one torch thread; medians of the CPU time of this process
(``time.process_time``: robust to other processes on a shared machine) and of wall time.
The goal: no network above 2x its old lighten time. Writes
benchmarks/results/compile_time_rules.json.

    python -m benchmarks.compile_time_rules --only SwinIR NAFNet RealCUGAN_2x --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

import lwcompile
from benchmarks.speed import RESULTS, machine
from examples.zoo import ZOO

NEW_RULES = ("list-unpadded", "low-rank-1x1", "low-rank-linear")


def timed(name: str, rules: list) -> tuple[float, float, float]:
    """(CPU s, wall s, MAC reduction) of one lighten of a fresh ``name``."""
    entry = ZOO[name]
    torch.manual_seed(0)
    model, inputs = entry.build(), entry.example_inputs()
    c0, t0 = time.process_time(), time.perf_counter()
    light = lwcompile.lighten(model, inputs, rules=rules)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    s = light.lwcompile_report.summary
    return cpu, wall, s.macs_before / max(s.macs_after, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="network names (default: all)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    variants = {"old": lwcompile.default_rules(without=NEW_RULES),
                "new": lwcompile.default_rules()}
    rows = []
    print(f"{'network':18s} {'old CPU s':>9} {'new CPU s':>9} {'ratio':>6} "
          f"{'old MACx':>8} {'new MACx':>8}")
    for name in args.only or list(ZOO):
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in variants}
        for _ in range(args.repeats):
            for key, rules in variants.items():  # interleaved: load hits both alike
                runs[key].append(timed(name, rules))
        row = {"network": name}
        for key in variants:
            row[f"{key}_cpu_s"] = round(statistics.median(r[0] for r in runs[key]), 3)
            row[f"{key}_wall_s"] = round(statistics.median(r[1] for r in runs[key]), 3)
            row[f"{key}_mac_reduction"] = round(runs[key][0][2], 3)
        row["cpu_ratio"] = round(row["new_cpu_s"] / max(row["old_cpu_s"], 1e-9), 2)
        rows.append(row)
        print(f"{name:18s} {row['old_cpu_s']:9.2f} {row['new_cpu_s']:9.2f} "
              f"{row['cpu_ratio']:6.2f} {row['old_mac_reduction']:8.2f} "
              f"{row['new_mac_reduction']:8.2f}", flush=True)
    out = RESULTS / "compile_time_rules.json"
    out.write_text(json.dumps({"repeats": args.repeats, "threads": 1, "rows": rows,
                               "machine": machine()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
