"""Quality row of the low-rank rules: a tiny SwinIR x2 teacher, lightened, on held-out images.

The teacher is ``benchmarks/tiny_swinir.py``'s network trained by ``python -m
benchmarks.train_teacher swinir`` (weights committed). ``lwcompile.lighten`` with the default
rules factors its ``nn.Linear`` layers (``low-rank-linear``) and its 3x3 body conv (LIST).
Compared, on centre crops of ``lwcompile.data.HELD_OUT`` (PSNR/SSIM, ``benchmarks.common``):

- bicubic upsampling and the teacher;
- the light net from random init, trained supervised on clean targets for budget B;
- the light net after layer-wise initialisation only (SVD start, reduced-rank regression);
- layer-wise init + distillation from the teacher, init time included in B.

B is CPU seconds with one torch thread (robust to a shared machine).

    .venv/bin/python -m benchmarks.quality_low_rank --budget-seconds 150
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import lwcompile
from benchmarks.common import RESULTS, held_out, score, train_supervised
from benchmarks.quality_denoise import timed_distill
from benchmarks.speed import machine
from benchmarks.tiny_swinir import SWINIR_X2

OUT = RESULTS / "quality_low_rank.json"


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(budget_s: float, init_steps: int, seed: int) -> dict:
    task = SWINIR_X2
    teacher = task.build()
    teacher.load_state_dict(torch.load(task.weights, weights_only=True))
    teacher.eval()
    example = (torch.rand(1, 3, task.crop // 2, task.crop // 2),)
    pairs = held_out(task)
    rows: dict[str, dict] = {}

    def record(name: str, model, c0: float, **info) -> None:  # noqa: ANN001
        cpu = round(time.process_time() - c0, 1)  # before scoring
        rows[name] = {**score(model, task, pairs), **info, "cpu_seconds": cpu}
        print(f"{name}: {rows[name]}", flush=True)

    record("input (bicubic)", lambda x: x, time.process_time())
    record("teacher", teacher, time.process_time(), params=n_params(teacher),
           macs=lwcompile.count_macs(teacher, *example))

    torch.manual_seed(seed)
    scratch = lwcompile.lighten(task.build(), example)
    c0 = time.process_time()
    steps = train_supervised(scratch, task, budget_s, seed=seed, log=lambda s: None)
    record("light, random init, supervised B", scratch, c0, params=n_params(scratch),
           steps=steps)

    torch.manual_seed(seed)
    student = lwcompile.lighten(teacher, example)
    report = student.lwcompile_report
    applied = {r.site: r.decided_by for r in report.applied}
    c0 = time.process_time()
    lwcompile.init_layerwise(student, teacher, channels=3, degrade=task.degrade,
                             steps=init_steps, crop=task.crop, batch_size=task.batch_size,
                             seed=seed)
    init_cpu = time.process_time() - c0
    student.eval()
    record("light, layer-wise init only", student, c0, params=n_params(student),
           macs=lwcompile.count_macs(student, *example))
    c0 = time.process_time() - init_cpu
    steps = timed_distill(student, teacher, task, budget_s - init_cpu, seed)
    record("light, layer-wise init + distill B", student, c0, params=n_params(student),
           steps=steps)
    return {"task": task.name, "budget_cpu_seconds": budget_s, "init_steps": init_steps,
            "seed": seed, "threads": torch.get_num_threads(), "rewrites": applied,
            "held_out": "centre crops (<=256) of lwcompile.data.HELD_OUT",
            "rows": rows,
            "distilled_below_teacher_db": round(
                rows["teacher"]["psnr"] - rows["light, layer-wise init + distill B"]["psnr"], 3),
            "distilled_above_scratch_db": round(
                rows["light, layer-wise init + distill B"]["psnr"]
                - rows["light, random init, supervised B"]["psnr"], 3),
            "machine": machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=150.0)
    parser.add_argument("--init-steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    result = run(args.budget_seconds, args.init_steps, args.seed)
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(f"\nB = {args.budget_seconds:.0f} CPU s")
    print(f"{'model':<38} {'params':>8} {'steps':>6} {'PSNR':>7} {'SSIM':>6} {'CPU s':>7}")
    for row, r in result["rows"].items():
        print(f"{row:<38} {r.get('params', ''):>8} {r.get('steps', ''):>6} {r['psnr']:>7.2f} "
              f"{r['ssim']:>6.3f} {r['cpu_seconds']:>7.1f}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
