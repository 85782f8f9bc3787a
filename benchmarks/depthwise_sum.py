"""A conv to one channel as a depthwise conv and a channel sum, measured in context.

    python -m benchmarks.depthwise_sum
    python -m benchmarks.depthwise_sum --runs 15 --precision fp32

``python -m benchmarks.op_profile`` showed a gray denoiser's 3x3 output conv (64 -> 1, after
concat sinking two 32 -> 1 convs) taking 13-16% of the light DnCNN-17's onnxruntime time on
an AVX2 CPU, at a few GMAC/s: runtimes tile a conv's output channels by the SIMD width, so
one output channel pays for 8 or 16. ``identities.depthwise_sum`` writes it as a depthwise
conv and a 1x1 sum instead. This benchmark exports the trained DnCNN-17 and ``lighten`` of
it (seeded) with the form and without it (its policy, ``identities.single_output_conv``,
switched off for the export) to onnxruntime and ExecuTorch/XNNPACK, fp32 and int8, times all
of them interleaved in one process (2 threads, onnxruntime spin-waiting as deployed, 50 ms
idle before each call, medians of ``--runs``) and gives each int8 export's PSNR against
float. Writes benchmarks/results/depthwise_sum.json with the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

import lwcompile
from benchmarks.common import DENOISE, load_teacher
from benchmarks.deploy import build_form, set_threads
from benchmarks.speed import THREADS, hardware_label, machine, report_and_write
from lwcompile.deploy import identities
from lwcompile.measure.profile import time_interleaved


@contextlib.contextmanager
def form(on: bool) -> Iterator[None]:
    """The depthwise-sum form on (as shipped) or off (its policy says never)."""
    policy = identities.single_output_conv
    if not on:
        identities.single_output_conv = lambda *args, **kwargs: False
    try:
        yield
    finally:
        identities.single_output_conv = policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--precision", action="append", choices=["fp32", "int8"], default=None)
    parser.add_argument("--out", default="depthwise_sum")
    options = parser.parse_args()
    set_threads(THREADS)
    info = machine()
    teacher = load_teacher(DENOISE)
    inputs = (torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)),)
    torch.manual_seed(0)
    models = {"original": teacher, "light": lwcompile.lighten(teacher, inputs).eval()}
    folder = Path(tempfile.mkdtemp())
    runners, psnr = {}, {}
    for model_name, model in models.items():
        for runtime in ("ort", "xnnpack"):
            for precision in options.precision or ["fp32", "int8"]:
                for on in (True, False):
                    key = (model_name, f"{runtime}-{precision}", on)
                    with form(on):
                        run = build_form(f"{runtime}-{precision}", model, inputs, folder,
                                         f"{model_name}-{on}", DENOISE.degrade)
                    runners[key] = run
                    if run.int8_report is not None:
                        psnr[key] = run.int8_report.psnr_db
    times = time_interleaved({"|".join(map(str, k)): (lambda f=f: f(*inputs))
                              for k, f in runners.items()}, runs=options.runs, warmup=2,
                             pause=0.05)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows, results = [], []
    for model_name, runtime_precision, on in runners:
        if not on:
            continue
        with_ms = medians[f"{model_name}|{runtime_precision}|True"]
        without_ms = medians[f"{model_name}|{runtime_precision}|False"]
        row = {"model": model_name, "form": runtime_precision, "plain_ms": round(without_ms, 2),
               "depthwise_sum_ms": round(with_ms, 2), "speedup": round(without_ms / with_ms, 3),
               "int8_psnr_db_plain": psnr.get((model_name, runtime_precision, False)),
               "int8_psnr_db_depthwise_sum": psnr.get((model_name, runtime_precision, True))}
        results.append(row)
        rows.append([model_name, runtime_precision, f"{without_ms:.1f}", f"{with_ms:.1f}",
                     f"{row['speedup']:.2f}x",
                     "" if row["int8_psnr_db_plain"] is None else
                     f"{row['int8_psnr_db_plain']:.2f} / {row['int8_psnr_db_depthwise_sum']:.2f}"])
    print(f"DnCNN-17 1x1x256x256 -- {hardware_label(info)}; medians of {options.runs}"
          " interleaved rounds")
    report_and_write(rows, ["model", "form", "plain ms", "depthwise+sum ms", "speed-up",
                            "int8 vs float dB (plain / depthwise+sum)"],
                     options.out, {"machine": info, "runs": options.runs, "rows": results})


if __name__ == "__main__":
    main()
