"""Where a model's cost goes: parameters, MACs, peak activation memory and latency per layer.

Counts come from the same authorities as the compiler's report (``torch.utils.flop_counter``
and the ``CostMode`` of ``lwcompile.measure.cost``), so a profile and a report agree. Latency
is wall time: the median of ``runs`` forwards after ``warmup`` (medians resist the odd slow
run). Timings from different processes are not comparable; to compare models, time them in
one process, interleaved (``time_interleaved``), so machine load hits them all alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import arguments as check
from ..report import short_number
from .cost import count_params, measure
from .inputs import blamed_on_inputs
from .snapshot import preserved_state


@dataclass
class LayerProfile:
    """One leaf module's share of a forward: its counts and the time spent inside it."""

    name: str
    kind: str
    params: int
    macs: int
    calls: int
    latency_ms: float  # median over runs of this layer's summed time in one forward


@dataclass
class Profile:
    """A whole model's counts and latency, and the leaf layers they come from; ``str()`` is
    the table the ``lwcompile profile`` command prints."""

    params: int
    macs: int
    peak_bytes: int
    latency_ms: float  # median of the timed runs, without the per-layer hooks
    runs_ms: list[float]
    layers: list[LayerProfile] = field(default_factory=list)
    #: time spent outside leaf layers (functional ops, concats, Python), median ms
    other_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rows = [("layer", "kind", "params", "MACs", "calls", "ms", "%")]
        total = sum(layer.latency_ms for layer in self.layers) + self.other_ms or 1.0
        for layer in self.layers:
            rows.append((layer.name, layer.kind, short_number(layer.params),
                         short_number(layer.macs), str(layer.calls), f"{layer.latency_ms:.2f}",
                         f"{100 * layer.latency_ms / total:.1f}"))
        rows.append(("(outside leaf layers)", "", "", "", "", f"{self.other_ms:.2f}",
                     f"{100 * self.other_ms / total:.1f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(f"params {short_number(self.params)} | MACs {short_number(self.macs)} | "
                     f"peak activations {self.peak_bytes / 2**20:.1f} MiB | "
                     f"latency {self.latency_ms:.2f} ms (median of {len(self.runs_ms)})")
        return "\n".join(lines)


def time_runs(fn: Callable[[], Any], runs: int = 7, warmup: int = 2) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], runs: int = 7, warmup: int = 2,
                     clock: Callable[[], float] = time.perf_counter,
                     pause: float = 0.0) -> dict[str, list[float]]:
    """Time several callables round-robin, so machine load hits them all alike.

    ``clock=time.thread_time`` counts this thread's CPU time instead of wall time: with one
    compute thread it barely moves when other processes load the machine. ``pause`` seconds
    of idling before each timed call let a runtime's spin-waiting threads from the previous
    call go to sleep, so that they do not take the CPU from the next one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            if pause:
                time.sleep(pause)
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def _leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if not list(m.children()) and name}


def _macs_per_module(model: nn.Module, args: Sequence[Any]) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    with preserved_state(model), counter, torch.no_grad():
        model(*args)
    prefix = type(model).__name__ + "."
    return {k[len(prefix):]: sum(v.values()) // 2 for k, v in counter.get_flop_counts().items()
            if k.startswith(prefix)}


def _layer_times(model: nn.Module, args: Sequence[Any], runs: int, warmup: int,
                 ) -> tuple[dict[str, list[float]], dict[str, int], list[float]]:
    """Per-leaf summed seconds per forward (forward hooks), call counts, hooked totals."""
    leaves = _leaves(model)
    started: dict[str, list[float]] = {name: [] for name in leaves}
    spent = dict.fromkeys(leaves, 0.0)
    calls = dict.fromkeys(leaves, 0)

    def pre(name: str) -> Callable:
        return lambda _m, _a: started[name].append(time.perf_counter())

    def post(name: str) -> Callable:
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            spent[name] += time.perf_counter() - started[name].pop()
            calls[name] += 1
        return hook

    handles = [h for name, m in leaves.items()
               for h in (m.register_forward_pre_hook(pre(name)),
                         m.register_forward_hook(post(name)))]
    per_run: dict[str, list[float]] = {name: [] for name in leaves}
    totals: list[float] = []
    n_calls: dict[str, int] = {}
    try:
        with torch.no_grad():
            for i in range(warmup + runs):
                for name in leaves:
                    spent[name], calls[name] = 0.0, 0
                start = time.perf_counter()
                model(*args)
                if i >= warmup:
                    totals.append(time.perf_counter() - start)
                    for name in leaves:
                        per_run[name].append(spent[name])
                n_calls = dict(calls)
    finally:
        for h in handles:
            h.remove()
    return per_run, n_calls, totals


def profile(model: nn.Module, example_inputs: Sequence[Any], runs: int = 7,
            warmup: int = 2) -> Profile:
    """Profile one forward of ``model`` on ``example_inputs`` (no grad, model as given).

    Totals are measured without hooks; per-layer times come from a second series of runs
    with forward hooks on every leaf module. Leaves that never run are left out.
    """
    check.module("profile", "model", model)
    args = check.inputs("profile", "example_inputs", example_inputs)
    check.integer("profile", "runs", runs, minimum=1)
    check.integer("profile", "warmup", warmup, minimum=0)
    with blamed_on_inputs("profile", model, args):
        measured = measure(model, args)
    with torch.no_grad():
        runs_s = time_runs(lambda: model(*args), runs, warmup)
    macs = _macs_per_module(model, args)
    per_run, calls, hooked = _layer_times(model, args, runs, warmup)
    leaves = _leaves(model)
    layers = [LayerProfile(name, type(m).__name__, count_params(m), macs.get(name, 0),
                           calls[name], 1000 * statistics.median(per_run[name]))
              for name, m in leaves.items() if calls[name]]
    inside = [sum(per_run[name][i] for name in leaves) for i in range(runs)]
    other = statistics.median(t - s for t, s in zip(hooked, inside, strict=True))
    return Profile(count_params(model), measured.macs, measured.peak_bytes,
                   1000 * statistics.median(runs_s), [1000 * t for t in runs_s], layers,
                   max(0.0, 1000 * other))
