"""How long ``lwcompile.lighten`` takes, next to one torch.fx trace + one forward.

    python -m benchmarks.compile_time                    # ESRGAN RRDBNet (23 blocks) + 4 examples
    python -m benchmarks.compile_time --only DnCNN-17 --repeats 5
    python -m benchmarks.compile_time --only RRDBNet --profile   # + where lighten's time goes

The reference is the least any graph compiler must do: ``torch.fx.symbolic_trace(model)``
plus one forward on the example input; the issue's target is lighten <= 2x that. Both are
timed alternately ``--repeats`` times after one warm-up lighten of a small model (one-time
import and dispatcher costs), as ``timeit`` times (collected before, no cyclic collection
during), medians. Writes benchmarks/results/compile_time.json; with
``--profile`` also the cProfile summary of one lighten (results/compile_profile.txt).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lwcompile
from benchmarks.speed import CASES, RESULTS, THREADS, machine, table, write_json
from examples import dncnn

#: the issue's target: lighten(RRDBNet) <= 2x one trace + one forward (the small examples
#: are timed alongside, without a target: fixed costs dominate their sub-second totals)
TARGETS = {"RRDBNet": 2.0}


def models() -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]]:
    from examples.zoo import rrdbnet_full

    def rrdbnet_input() -> tuple:
        return (torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)

    return {"RRDBNet": (rrdbnet_full, rrdbnet_input),
            **{name: (c.build, c.example_inputs) for name, c in CASES.items()}}


def trace_and_forward(model: nn.Module, inputs: tuple) -> None:
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        traced(*inputs)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time and result of ``fn()``, timed the way ``timeit`` does: garbage collected
    before, the cyclic collector off during (else whichever side trips it pays for the
    other's garbage: each lighten result is a cycle of GraphModule and graph)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        if enabled:
            gc.enable()


def bench(name: str, repeats: int) -> dict:
    build, make_inputs = models()[name]
    model, inputs = build(), make_inputs()
    baseline, light, phases = [], [], []
    for _ in range(repeats):
        baseline.append(timed(lambda: trace_and_forward(model, inputs))[0])
        seconds, result = timed(lambda: lwcompile.lighten(model, inputs))
        light.append(seconds)
        phases.append(result.lwcompile_report.notes["seconds"])
    ratio = statistics.median(light) / statistics.median(baseline)
    return {"network": name, "input": [list(a.shape) for a in inputs],
            "convs": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
            "trace_forward_s": baseline, "lighten_s": light,
            "median_trace_forward_s": statistics.median(baseline),
            "median_lighten_s": statistics.median(light), "ratio": ratio,
            "target": TARGETS.get(name),
            "target_met": ratio <= TARGETS[name] if name in TARGETS else None,
            # lighten's own account of its time (report.notes["seconds"]), medians
            "median_phase_s": {phase: statistics.median(p.get(phase, 0.0) for p in phases)
                               for phase in phases[0]}}


def profile_lighten(name: str, top: int = 30) -> str:
    build, make_inputs = models()[name]
    model, inputs = build(), make_inputs()
    profiler = cProfile.Profile()
    profiler.runcall(lwcompile.lighten, model, inputs)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
    stats.print_stats(r"lwcompile|rules", top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _verdict(result: dict) -> str:
    if result["target"] is None:
        return "-"
    return f"<= {result['target']:.0f}x {'met' if result['target_met'] else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    info = machine()
    lwcompile.lighten(dncnn.DnCNN(features=32, depth=4), (torch.rand(1, 1, 32, 32),))  # warm-up
    results = []
    for name in args.only or list(models()):
        print(f"{name} ...", flush=True)
        results.append(bench(name, args.repeats))
        write_json("compile_time", {"machine": info, "repeats": args.repeats,
                                    "results": results})
    rows = [[r["network"], str(r["convs"]), f"{r['median_trace_forward_s']:.2f}",
             f"{r['median_lighten_s']:.2f}", f"{r['ratio']:.1f}x",
             _verdict(r)] for r in results]
    print(f"\nmedian of {args.repeats}, alternating, {THREADS} threads")
    print(table(rows, ["network", "convs", "trace+forward s", "lighten s", "ratio",
                       "target"]))
    phases = list(results[0]["median_phase_s"])
    print("\nwhere lighten's time goes (its report's notes['seconds'], medians)")
    print(table([[r["network"], *(f"{r['median_phase_s'].get(p, 0.0):.2f}" for p in phases)]
                 for r in results], ["network", *phases]))
    if args.profile:
        for name in args.only or ["RRDBNet"]:
            text = profile_lighten(name)
            path = RESULTS / "compile_profile.txt"
            path.write_text(text)
            print(f"\ncProfile of lighten({name}) written to {path}")
            print("\n".join(text.splitlines()[:60]))


if __name__ == "__main__":
    main()
