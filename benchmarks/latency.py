"""Latency of each reference network against its lightened form, each in its fastest runtime.

    python -m benchmarks.latency                      # all networks + SRResNet variants (minutes)
    python -m benchmarks.latency --only DnCNN-17 --runs 9

Per network, the original and the lightened model run side by side in one process, every
runtime of both interleaved round-robin (2 warm-up + ``--runs`` timed runs, medians,
``torch.set_num_threads(2)``):

  eager          the model as built (original) or as ``lighten`` returns it (light)
  channels_last  the same model in NHWC, inputs converted
  emitted        ``emit_fast(model, channels_last=False)``: BN folded, LIST merged, ...
  emitted CL     ``emit_fast(model, channels_last=True)``
  onnxruntime    the emitted (NCHW) model exported to ONNX opset 17, CPUExecutionProvider,
                 intra_op_num_threads=2

``--cpu-time`` measures this thread's CPU time with one thread everywhere instead: not the
issue's protocol, but nearly immune to other processes loading the machine.

Best-vs-best ratio: the original's fastest runtime over the light model's fastest. Peak
activation memory is ``lwcompile.cost.measure`` (bytes created by the forward and alive
at once; weights and inputs excluded). Writes benchmarks/results/latency.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.speed import (
    CASES,
    RESULTS,
    THREADS,
    VARIANTS,
    channels_last,
    eager,
    machine,
    merge_rows,
    onnxruntime_session,
    table,
    write_json,
)
from lwcompile.deploy.emit import emit_fast
from lwcompile.measure.cost import count_params, measure
from lwcompile.measure.profile import time_interleaved

#: best-vs-best speed-up the issue asks for (U-Net has none)
TARGETS = {"DnCNN-17": 6.0, "SRResNet x4": 4.0, "SRResNet x4 +squeeze": 4.0,
           "SRResNet x4 +squeeze/8": 4.0, "GLCIC": 4.0}
RUNTIMES = ["eager", "channels_last", "emitted", "emitted CL", "onnxruntime"]


def runtimes(model: torch.nn.Module, inputs: tuple, threads: int) -> dict:
    emitted = emit_fast(model, inputs, channels_last=False)
    fns = {"eager": eager(model, inputs), "channels_last": channels_last(model, inputs),
           "emitted": eager(emitted, inputs),
           "emitted CL": eager(emit_fast(model, inputs, channels_last=True), inputs)}
    try:
        fns["onnxruntime"] = onnxruntime_session(model, inputs, threads)  # its own fast form
    except ImportError as exc:
        print(f"  onnxruntime skipped: {exc}")
    return {"fns": fns, "emitted": emitted}


def bench(name: str, runs: int, cpu_time: bool = False) -> dict:
    case = {**CASES, **VARIANTS}[name]
    original = case.build()
    light = case.lighten(original)
    inputs = case.bench_inputs()
    models = {"original": original, "light": light}
    rows: dict[str, dict] = {}
    fns = {}
    for kind, model in models.items():
        made = runtimes(model, inputs, torch.get_num_threads())
        plain, emitted = measure(model, inputs), measure(made["emitted"], inputs)
        rows[kind] = {"params": count_params(model), "macs": plain.macs,
                      "peak_bytes": plain.peak_bytes, "peak_bytes_emitted": emitted.peak_bytes}
        fns |= {(kind, rt): fn for rt, fn in made["fns"].items()}
    with torch.no_grad():
        times = time_interleaved(fns, runs=runs, warmup=2,
                                 clock=time.thread_time if cpu_time else time.perf_counter)
    for (kind, rt), t in times.items():
        rows[kind].setdefault("runs_ms", {})[rt] = [1000 * s for s in t]
        rows[kind].setdefault("median_ms", {})[rt] = 1000 * statistics.median(t)
    for row in rows.values():
        row["best"] = min(row["median_ms"], key=row["median_ms"].get)
    best = {k: rows[k]["median_ms"][rows[k]["best"]] for k in rows}
    result = {"network": name, "input": [list(a.shape) for a in inputs], **rows,
              "speedup_best_vs_best": best["original"] / best["light"],
              "speedup_eager_vs_eager": (rows["original"]["median_ms"]["eager"]
                                         / rows["light"]["median_ms"]["eager"]),
              "target": TARGETS.get(name),
              "light_peak_not_above_original": (rows["light"]["peak_bytes_emitted"]
                                                <= rows["original"]["peak_bytes"])}
    result["target_met"] = (None if result["target"] is None
                            else result["speedup_best_vs_best"] >= result["target"])
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report(results: list[dict], runs: int, cpu_time: bool) -> str:
    header = ["network", "model", "params", "GMACs", "peak MiB", "emitted peak",
              *[f"{r} ms" for r in RUNTIMES], "best"]
    rows = []
    for res in results:
        for kind in ("original", "light"):
            r = res[kind]
            rows.append([res["network"] if kind == "original" else "", kind,
                         f"{r['params']:,}", f"{r['macs'] / 1e9:.2f}", _mib(r["peak_bytes"]),
                         _mib(r["peak_bytes_emitted"]),
                         *[f"{r['median_ms'][k]:.1f}" if k in r["median_ms"] else "-"
                           for k in RUNTIMES], r["best"]])
    how = ("CPU time of 1 thread" if cpu_time else f"wall time, {torch.get_num_threads()} threads")
    lines = [f"median of {runs} runs after 2 warm-up, {how}, all interleaved", "",
             table(rows, header), ""]
    ratios = [[res["network"], f"{res['speedup_best_vs_best']:.2f}x",
               f"{res['speedup_eager_vs_eager']:.2f}x",
               "-" if res["target"] is None else f">= {res['target']:.0f}x",
               "-" if res["target_met"] is None else ("met" if res["target_met"] else "NOT met"),
               "yes" if res["light_peak_not_above_original"] else "NO"] for res in results]
    lines.append(table(ratios, ["network", "best vs best", "eager vs eager", "target",
                                "speed target", "light peak <= original"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=[*CASES, *VARIANTS], default=None)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1 if args.cpu_time else THREADS)
    data = {"machine": machine(), "runs": args.runs,
            "clock": "thread_time, 1 thread" if args.cpu_time else "wall", "results": []}
    name_json = "latency_cpu_time" if args.cpu_time else "latency"
    fresh: list[dict] = []
    for name in args.only or [*CASES, *VARIANTS]:
        print(f"{name} ...", flush=True)
        fresh.append(bench(name, args.runs, args.cpu_time) | {"machine": data["machine"]})
        data["results"] = merge_rows(fresh, RESULTS / f"{name_json}.json", "results",
                                     [*CASES, *VARIANTS])
        path = write_json(name_json, data)
    print(report(data["results"], args.runs, args.cpu_time))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
