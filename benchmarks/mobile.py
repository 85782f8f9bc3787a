"""Original vs lightened networks as XNNPACK-delegated ExecuTorch programs (.pte).

    python -m benchmarks.mobile                    # all four networks (several minutes)
    python -m benchmarks.mobile --only dncnn --rounds 5

Each network is lightened with its small example input (the light model is size-generic),
then original and light are both exported at the benchmark size with
``lwcompile.mobile.export_mobile`` and run by the ExecuTorch runtime with the same XNNPACK
thread count. Timed runs are interleaved (original, light, ... alternating which goes
first) so load from other processes hits both alike; we report medians and the ratio of
medians. For DnCNN the paper's hand-made cheap DnCNN runs in the same rounds as a reference.
Writes benchmarks/results/mobile.json and prints (and writes) a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

import lwcompile
from benchmarks.speed import cpu_model_and_flags, merge_rows
from examples import dncnn, glcic, srresnet, unet
from lwcompile.deploy.mobile import MobileExport, export_mobile, load_pte

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]  # small input, for lighten
    bench_inputs: Callable[[], tuple]  # benchmark size, for export and timing
    target: float  # speed-up the issue asks for
    reference: Callable[[], nn.Module] | None = None  # a hand-made light model, if any
    #: a default rule left out as one more variant ("light-without"), e.g. for SRResNet the
    #: squeeze of its 9x9 output conv (what keeping it standard, as the paper does, costs)
    without: str | None = None


def _glcic_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, size, size)
    mask[:, :, size // 4: size // 4 + size * 3 // 8, size // 4: size * 3 // 4] = 1.0
    return image, mask


def _rand(*shape: int) -> tuple[torch.Tensor]:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(0)),)


CASES = {
    "dncnn": Case("DnCNN-17", dncnn.build, dncnn.example_inputs,
                  lambda: _rand(1, 1, 256, 256), 12.0, reference=dncnn.cheap_dncnn),
    "srresnet": Case("SRResNet x4", srresnet.build, srresnet.example_inputs,
                     lambda: _rand(1, 3, 128, 128), 8.0, without="image-output-squeeze"),
    "glcic": Case("GLCIC", glcic.build, glcic.example_inputs, lambda: _glcic_inputs(256), 8.0),
    "unet": Case("U-Net", unet.build, unet.example_inputs, lambda: _rand(1, 3, 256, 256), 0.0),
}


def set_threads(threads: int) -> None:
    """The same thread count for eager torch and for ExecuTorch's XNNPACK threadpool."""
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(threads)
    # ExecuTorch's only Python hook for its threadpool; it must not run during inference
    portable_lib._unsafe_reset_threadpool(threads)


def export_variants(case: Case, folder: Path) -> dict[str, tuple[nn.Module, MobileExport]]:
    """original and light as export_mobile writes them; light also without the XNNPACK
    forms (what they contribute); the paper's hand-made model when there is one."""
    torch.manual_seed(0)
    original = case.build().eval()
    light = lwcompile.lighten(original, case.example_inputs()).eval()
    variants = {"original": (original, True), "light": (light, True),
                "light_no_forms": (light, False)}
    if case.reference is not None:
        torch.manual_seed(0)
        variants["paper"] = (case.reference().eval(), True)
    if case.without is not None:
        rules = lwcompile.default_rules(without=[case.without])
        variants["light-without"] = (
            lwcompile.lighten(original, case.example_inputs(), rules=rules).eval(), True)
    out = {}
    for variant, (model, optimize) in variants.items():
        start = time.perf_counter()
        export = export_mobile(model, case.bench_inputs(), folder / f"{case.name}-{variant}.pte",
                               optimize=optimize)
        print(f"  exported {case.name} {variant} in {time.perf_counter() - start:.0f} s: "
              f"{export.report.op_share:.1%} of ops delegated", flush=True)
        out[variant] = (model, export)
    return out


def time_interleaved(programs: dict[str, Callable], inputs: list[torch.Tensor], rounds: int,
                     warmup: int) -> dict[str, list[float]]:
    """Seconds per run of each program; every round runs each once, in rotating order."""
    names = list(programs)
    for _ in range(warmup):
        for name in names:
            programs[name](*inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            programs[name](*inputs)
            times[name].append(time.perf_counter() - start)
    return times


def describe(model: nn.Module, export: MobileExport, seconds: list[float]) -> dict:
    report = export.report
    return {
        "params": lwcompile.count_params(model),
        "macs": report.delegated_macs + report.portable_macs,
        "latency_ms": round(1000 * statistics.median(seconds), 2),
        "latency_ms_runs": [round(1000 * s, 2) for s in seconds],
        "delegated_op_share": round(report.op_share, 4),
        "delegated_mac_share": round(report.mac_share, 4),
        "partitions": report.partitions,
        "portable_ops": report.portable,
        "pte_bytes": export.size_bytes,
        "max_abs_error_vs_eager": export.max_abs_error,
        "xnnpack_forms": export.forms,
    }


def run_case(key: str, rounds: int, warmup: int, folder: Path) -> dict:
    case = CASES[key]
    print(f"{case.name}: exporting", flush=True)
    variants = export_variants(case, folder)
    inputs = [t for t in case.bench_inputs() if isinstance(t, torch.Tensor)]
    programs = {v: load_pte(export.path) for v, (_, export) in variants.items()}
    times = time_interleaved(programs, inputs, rounds, warmup)
    row = {"network": case.name, "input": " + ".join("x".join(map(str, t.shape)) for t in inputs),
           "target_speedup": case.target or None,
           "without": case.without}
    for variant, (model, export) in variants.items():
        row[variant] = describe(model, export, times[variant])
    for variant in variants:
        if variant != "original":
            row[f"{variant}_speedup"] = round(
                row["original"]["latency_ms"] / row[variant]["latency_ms"], 2)
    print(f"  {row['light_speedup']}x faster on XNNPACK "
          f"({row['original']['latency_ms']} -> {row['light']['latency_ms']} ms)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"

    lines = [
        "| network | input | params orig -> light | MACs orig -> light | XNNPACK ms orig | "
        "ms light | speed-up (target) | without forms | delegated ops orig / light |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, li = r["original"], r["light"]
        target = f" (>= {r['target_speedup']:g}x)" if r["target_speedup"] else ""
        lines.append(
            f"| {r['network']} | {r['input']} | {o['params']:,} -> {li['params']:,} "
            f"({o['params'] / li['params']:.1f}x) | {fmt(o['macs'])} -> {fmt(li['macs'])} "
            f"({o['macs'] / li['macs']:.1f}x) | {o['latency_ms']:.1f} | {li['latency_ms']:.1f} | "
            f"**{r['light_speedup']:.2f}x**{target} | "
            f"{r['light_no_forms_speedup']:.2f}x ({r['light_no_forms']['latency_ms']:.1f} ms) | "
            f"{o['delegated_op_share']:.0%} / {li['delegated_op_share']:.0%} |")
        if "paper" in r:
            p = r["paper"]
            lines.append(
                f"| (paper's cheap {r['network']}) | {r['input']} | {p['params']:,} | "
                f"{fmt(p['macs'])} | | {p['latency_ms']:.1f} | {r['paper_speedup']:.2f}x | | "
                f"{p['delegated_op_share']:.0%} |")
        if "light-without" in r:
            p = r["light-without"]
            lines.append(
                f"| ({r['network']} without {r['without']}) | {r['input']} | {p['params']:,} | "
                f"{fmt(p['macs'])} | | {p['latency_ms']:.1f} | {r['light-without_speedup']:.2f}x "
                f"| | {p['delegated_op_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    # ExecuTorch's lowering repeats one deprecation warning per node
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    set_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        rows = [run_case(key, args.rounds, args.warmup, Path(folder)) for key in args.only]
    settings = {
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "torch": torch.__version__, "executorch": version("executorch"),
        "machine": cpu_model_and_flags()[0], "isa": cpu_model_and_flags()[1],
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": "medians of interleaved runs; ratios are from the same rounds. Other "
                "processes' load (loadavg) makes absolute times and ratios less reliable",
    }
    RESULTS.mkdir(exist_ok=True)
    for row in rows:  # each row keeps the settings it was measured with
        row["settings"] = settings
    rows = merge_rows(rows, RESULTS / "mobile.json", "networks",
                      [c.name for c in CASES.values()])
    (RESULTS / "mobile.json").write_text(
        json.dumps({"settings": settings, "networks": rows}, indent=2) + "\n")
    text = table(rows)
    (RESULTS / "mobile.md").write_text(
        f"{text}\n\n{args.threads} XNNPACK threads, medians of {args.rounds} interleaved runs; "
        f"load average {settings['loadavg_before'][0]} -> {settings['loadavg_after'][0]} "
        f"on {os.cpu_count()} CPUs.\n")
    print(text)


if __name__ == "__main__":
    main()
