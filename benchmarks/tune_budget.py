"""What ``lwcompile.tune(..., budget_ms=)`` gives the trained light DnCNN-17: latency, width,
parameters and, after the same training, PSNR.

    python -m benchmarks.tune_budget [--target onnxruntime] [--precision fp32]
        [--fractions 1.3 0.9 0.8] [--seconds 300] [--out tune_budget]

The committed trained DnCNN-17 (sigma 25) is lightened; its latency at 1x1x256x256 on the
target (2 threads, interleaved rounds, medians) is measured by ``tune`` with an unbounded
budget (which also shows what the widest squeeze costs), then ``tune`` is asked for each
fraction of it. Each model (the light one as given, and each budget's) is then trained by
the quality benchmark's recipe (``init_layerwise`` from the teacher + ``distill`` for
``--seconds`` CPU seconds) and scored on the held-out images, so the table shows what a
budget costs in PSNR. JSON in benchmarks/results/ with the CPU and runtime versions.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from torch import nn

import lwcompile
from benchmarks.common import DENOISE, held_out, load_teacher, score
from benchmarks.deploy import trained
from benchmarks.speed import THREADS, hardware_label, machine, table, write_json
from examples import dncnn


def _trained(model: nn.Module, teacher: nn.Module, seconds: float) -> nn.Module:
    """A copy of ``model`` trained by the quality recipe (``benchmarks.deploy.trained``)."""
    torch.manual_seed(0)
    return trained(copy.deepcopy(model), teacher, DENOISE, seconds)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="onnxruntime",
                        choices=("onnxruntime", "xnnpack", "torch"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.3, 0.9, 0.8])
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="CPU seconds of init + distill per model (0: no training)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", default="tune_budget")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    info = machine()
    print(hardware_label(info))
    teacher = load_teacher(DENOISE).eval()
    torch.manual_seed(0)  # the LISTs' fresh weights
    light = lwcompile.lighten(teacher, dncnn.example_inputs())
    x = (torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)),)
    options = {"target": args.target, "precision": args.precision, "runs": args.runs,
               "threads": THREADS, "degrade": DENOISE.degrade}
    widest = lwcompile.tune(light, x, budget_ms=1e9, **options)
    print(widest.report, flush=True)
    given_ms = widest.report.ms_before
    models = {"as given": (light, given_ms, None)}
    reports = {"unbounded": widest.report.to_dict()}
    for fraction in args.fractions:
        name = f"budget {fraction:g}x"
        try:
            tuned = lwcompile.tune(light, x, budget_ms=round(fraction * given_ms, 2),
                                   **options)
        except lwcompile.TuneError as exc:  # out of reach on this machine: say so, go on
            print(exc, flush=True)
            reports[name] = {"budget_ms": round(fraction * given_ms, 2), "error": str(exc)}
            continue
        print(tuned.report, flush=True)
        models[name] = (tuned.model, tuned.report.ms_after, tuned.report.budget_ms)
        reports[name] = tuned.report.to_dict()
    pairs = held_out(DENOISE)
    teacher_psnr = score(teacher, DENOISE, pairs)["psnr"]
    rows, results = [], {}
    for name, (model, ms, budget_ms) in models.items():
        widths = sorted({m.squeeze.out_channels for m in model.modules()
                         if isinstance(m, lwcompile.LIST)})
        result = {"ms": ms, "budget_ms": budget_ms, "params": _params(model),
                  "squeeze_widths": widths,
                  "psnr_untrained": round(score(model, DENOISE, pairs)["psnr"], 3)}
        if args.seconds > 0:
            result["psnr_trained"] = round(score(_trained(model, teacher, args.seconds),
                                                 DENOISE, pairs)["psnr"], 3)
        results[name] = result
        rows.append([name, f"{ms:.1f}", f"{result['params']:,}", str(widths),
                     f"{result['psnr_untrained']:.2f}",
                     f"{result['psnr_trained']:.2f}" if "psnr_trained" in result else "-"])
        print(rows[-1], flush=True)
    print(f"\nDnCNN-17 light, 1x1x256x256, {args.target} {args.precision}, {info['cpu']}; "
          f"teacher {teacher_psnr:.2f} dB; trained {args.seconds:g} CPU s each")
    print(table(rows, ["model", "ms", "params", "squeeze widths", "PSNR as tuned",
                       "PSNR trained"]))
    write_json(args.out, {"machine": info, "target": args.target, "precision": args.precision,
                          "seconds": args.seconds, "teacher_psnr": round(teacher_psnr, 3),
                          "models": results, "reports": reports})


if __name__ == "__main__":
    main()
