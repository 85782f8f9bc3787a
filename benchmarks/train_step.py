"""What one distillation step of the light DnCNN-17 costs, by memory layout and precision.

    python -m benchmarks.train_step --runs 7

The committed trained DnCNN-17 teacher (sigma 25) and ``lighten`` of it, on the benchmark's
training batch (16 x 1 x 40 x 40, as ``benchmarks.quality_denoise``), 2 torch threads. Timed,
interleaved round-robin (2 warm-up + ``--runs`` rounds of 5 calls, medians): the teacher's
forward (no grad), and the student's training step (forward, MSE to the teacher's output,
backward, Adam) in the standard (NCHW) and channels-last layouts, each in fp32 and under bf16
autocast. ``distill`` trains channels-last by default (``lwcompile/train/layout.py``).
Writes benchmarks/results/train_step.json with the machine (CPU model, ISA flags, versions).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

import lwcompile
from benchmarks.common import DENOISE
from benchmarks.speed import machine, table, write_json
from lwcompile.measure.profile import time_interleaved
from lwcompile.train.layout import Layout

CALLS = 5  # per timed sample: one step is short


def student_step(base: torch.nn.Module, x: torch.Tensor, target: torch.Tensor,
                 channels_last: bool, bf16: bool) -> Callable[[], None]:
    student = copy.deepcopy(base).train()
    x = Layout("train_step", channels_last, student).batch(x)  # as distill switches it
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)

    def step() -> None:
        for _ in range(CALLS):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                out = student(x)
            loss = F.mse_loss(out.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return step


def teacher_forward(teacher: torch.nn.Module, x: torch.Tensor, bf16: bool
                    ) -> Callable[[], None]:
    def forward() -> None:
        for _ in range(CALLS):
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                teacher(x)
    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    torch.manual_seed(0)
    teacher = DENOISE.build()
    teacher.load_state_dict(torch.load(DENOISE.weights, weights_only=True))
    teacher.eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    x = torch.rand(DENOISE.batch_size, 1, DENOISE.crop, DENOISE.crop)
    with torch.no_grad():
        target = teacher(x)
    variants = {"teacher forward, fp32": teacher_forward(teacher, x, False),
                "teacher forward, bf16": teacher_forward(teacher, x, True)}
    for layout in ("NCHW", "channels-last"):
        for precision in ("fp32", "bf16"):
            variants[f"student step, {layout}, {precision}"] = student_step(
                light, x, target, layout == "channels-last", precision == "bf16")
    times = time_interleaved(variants, runs=args.runs)
    ms = {name: 1000 * statistics.median(t) / CALLS for name, t in times.items()}
    reference = ms["student step, NCHW, bf16"]
    rows = [(name, f"{value:.1f}", f"{reference / value:.2f}x" if "student" in name else "")
            for name, value in ms.items()]
    print(f"{info['cpu']}, {args.threads} threads, batch {tuple(x.shape)}")
    print(table(rows, ["variant", "median ms", "vs NCHW bf16 step"]))
    path = write_json("train_step", {"batch": list(x.shape), "runs": args.runs,
                                     "calls_per_sample": CALLS, "median_ms": ms,
                                     "machine": info})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
