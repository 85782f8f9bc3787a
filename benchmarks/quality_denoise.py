"""Does a lightened net keep its teacher's quality? PSNR/SSIM on held-out images.

For each task (DnCNN-17 denoising at sigma=25, grey; small SRResNet x2, RGB) the teacher is
the committed, long-trained model (``benchmarks/train_teacher.py``), and the light net is
``lwcompile.lighten(teacher)``. Compared, on centre crops of ``lwcompile.data.HELD_OUT``:

- the degraded input (noisy; bicubic-upsampled for SR) and the teacher;
- the light net from random init, trained supervised on clean targets for budget B (the
  paper's recipe);
- the light net after layer-wise initialisation only;
- layer-wise init + distillation from the teacher, init time included in B;
- layer-wise init + supervised training, init time included in B (separates the two).

B is CPU seconds of this process (robust to a shared machine; ``--threads 2 --budget-seconds
600`` is 300 s on two cores). Distillation pays a teacher forward per step, so in the same B
it takes fewer steps; steps are reported. ``--amp bf16`` runs every forward pass (teacher,
student, the random-init baseline) under bf16 autocast: on a CPU with AMX or AVX512-BF16 the
same budget buys more steps.

    nice -n 10 .venv/bin/python -m benchmarks.quality_denoise --task denoise --budget-seconds 300
    nice -n 10 .venv/bin/python -m benchmarks.quality_denoise --task sr --budget-seconds 120
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import lwcompile
from benchmarks.common import (
    RESULTS,
    TASKS,
    Task,
    cpu_budget,
    held_out,
    train_supervised,
)
from benchmarks.speed import machine
from lwcompile.train.distill import distill
from lwcompile.train.layerwise import init_layerwise
from lwcompile.train.validation import validate

DEFAULT_BUDGET = {"denoise": 300.0, "sr": 120.0}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def example(task: Task) -> tuple[torch.Tensor]:
    side = task.crop // 2 if task.channels == 3 else task.crop  # SR input is low resolution
    return (torch.rand(1, task.channels, side, side),)


def timed_distill(student: nn.Module, teacher: nn.Module, task: Task, budget_s: float,
                  seed: int, ema: float | None = None, amp: str | None = None,
                  **options: float) -> int:
    """Distil until ``budget_s`` CPU seconds are spent (cosine lr over the budget's fraction,
    as ``train_supervised``); ``options`` go to ``distill`` (``features``, ``ground_truth``).
    Returns the steps taken."""
    used = cpu_budget(budget_s)
    taken = 0

    def schedule(step: int) -> float:  # asked once per step taken
        nonlocal taken
        taken += 1
        return 0.5 * (1 + math.cos(math.pi * min(used(), 1.0)))

    distill(student, teacher, steps=10**9, stop_when=lambda: used() >= 1, lr_schedule=schedule,
            channels=task.channels, degrade=task.degrade, batch_size=task.batch_size,
            crop=task.crop, loss="mse", progress=False, seed=seed, ema=ema, amp=amp,
            **options)
    return taken


def run(task_name: str, budget_s: float, init_steps: int, seed: int,
        teacher_path: Path | None, extra: bool, ema: float | None = None,
        scratch_row: bool = True, scratch_only: bool = False, amp: str | None = None,
        init_options: dict | None = None, distill_options: dict | None = None) -> dict:
    task = TASKS[task_name]
    teacher = task.build()
    teacher.load_state_dict(torch.load(teacher_path or task.weights, weights_only=True))
    teacher.eval()
    pairs = held_out(task)
    rows: dict[str, dict] = {}

    def record(name: str, model, c0: float, **info) -> None:
        cpu = round(time.process_time() - c0, 1)  # before scoring
        scores = validate(model, pairs, shave=task.shave)  # skimage PSNR/SSIM, as score()
        rows[name] = {"psnr": scores.psnr, "ssim": scores.ssim, **info, "cpu_seconds": cpu,
                      "per_image_psnr": [round(r["psnr"], 3) for r in scores.per_image]}
        print(f"{name}: {rows[name]}", flush=True)

    record("input (noisy)" if task.channels == 1 else "input (bicubic)", lambda x: x,
           time.process_time())
    record("teacher", teacher, time.process_time(), params=n_params(teacher))

    if scratch_row:
        torch.manual_seed(seed)
        scratch = lwcompile.lighten(task.build(), example(task))
        c0 = time.process_time()
        steps = train_supervised(scratch, task, budget_s, seed=seed, log=lambda s: None,
                                 amp=amp)
        record("light, random init, supervised B", scratch, c0, params=n_params(scratch),
               steps=steps)
    if scratch_only:
        return {"task": task.name, "budget_cpu_seconds": budget_s, "seed": seed, "amp": amp,
                "threads": torch.get_num_threads(), "rows": rows, "machine": machine()}

    torch.manual_seed(seed)
    student = lwcompile.lighten(teacher, example(task))
    c0 = time.process_time()
    errors = init_layerwise(student, teacher, channels=task.channels, degrade=task.degrade,
                            steps=init_steps, crop=task.crop, batch_size=task.batch_size,
                            seed=seed, amp=amp, **(init_options or {}))
    init_cpu = time.process_time() - c0
    student.eval()
    record("light, layer-wise init only", student, c0, params=n_params(student),
           fit_error_mean=sum(errors.values()) / max(len(errors), 1),
           fit_error_before_mean=sum(errors.before.values()) / max(len(errors), 1))

    supervised = copy.deepcopy(student)
    c0 = time.process_time() - init_cpu
    steps = timed_distill(student, teacher, task, budget_s - init_cpu, seed, ema, amp,
                          **(distill_options or {}))
    record("light, layer-wise init + distill B", student, c0, params=n_params(student),
           steps=steps)

    if extra:
        c0 = time.process_time() - init_cpu
        steps = train_supervised(supervised, task, budget_s - init_cpu, seed=seed,
                                 log=lambda s: None, amp=amp)
        record("light, layer-wise init + supervised B", supervised, c0,
               params=n_params(supervised), steps=steps)
    return {"task": task.name, "budget_cpu_seconds": budget_s, "init_steps": init_steps,
            "seed": seed, "ema": ema, "amp": amp, "init_options": init_options,
            "distill_options": distill_options, "threads": torch.get_num_threads(),
            "held_out": "centre crops (<=256) of lwcompile.data.HELD_OUT",
            "rows": rows, "gaps_db": gaps(rows), "machine": machine()}


def gaps(rows: dict) -> dict:
    """How far each light row is below the teacher (mean and worst image, dB), and how far
    the distilled row is above the light net trained from scratch."""
    teacher = rows["teacher"]["per_image_psnr"]
    out = {}
    for name, row in rows.items():
        if name.startswith("light"):
            below = [t - s for t, s in zip(teacher, row["per_image_psnr"], strict=True)]
            out[name] = {"mean_below_teacher": round(sum(below) / len(below), 3),
                         "worst_below_teacher": round(max(below), 3)}
    distilled = rows.get("light, layer-wise init + distill B")
    scratch = rows.get("light, random init, supervised B")
    if distilled and scratch:
        out["distilled_above_scratch"] = round(distilled["psnr"] - scratch["psnr"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append",
                        help="repeatable; default: both")
    parser.add_argument("--budget-seconds", type=float,
                        help=f"student budget B in CPU seconds (default {DEFAULT_BUDGET})")
    parser.add_argument("--init-steps", type=int, default=50)
    parser.add_argument("--init-output-steps", type=int, default=0,
                        help="init_layerwise(output_steps=N): fit each site to the teacher's "
                             "output too")
    parser.add_argument("--init-block-steps", type=int, default=0,
                        help="init_layerwise(block_steps=N): refine each replacement through "
                             "the BatchNorm/activation after it")
    parser.add_argument("--init-refit-kept", action="store_true",
                        help="init_layerwise(refit_kept=True): re-solve the kept output conv")
    parser.add_argument("--distill-features", type=float, default=0.0,
                        help="distill(features=W): match the teacher at every rewritten "
                             "block's end too")
    parser.add_argument("--distill-ground-truth", type=float, default=0.0,
                        help="distill(ground_truth=W): mix in the clean target with weight W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--teacher", type=Path, help="teacher weights (default: committed)")
    parser.add_argument("--ema", type=float, help="EMA decay of the distilled weights")
    parser.add_argument("--amp", choices=["bf16"], help="bf16 autocast for every forward pass")
    parser.add_argument("--no-scratch", action="store_true",
                        help="skip the random-init row (e.g. for a second seed)")
    parser.add_argument("--scratch-only", action="store_true",
                        help="only the random-init row (the reference for another run)")
    parser.add_argument("--no-extra", action="store_true",
                        help="skip the layer-wise init + supervised row")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality_denoise.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.task or ["denoise", "sr"]:
        budget = args.budget_seconds or DEFAULT_BUDGET[name]
        t0 = time.time()
        results[name] = run(name, budget, args.init_steps, args.seed, args.teacher,
                            not args.no_extra, args.ema, not args.no_scratch,
                            args.scratch_only, args.amp,
                            init_options(args),
                            {"features": args.distill_features,
                             "ground_truth": args.distill_ground_truth})
        results[name]["wall_seconds"] = round(time.time() - t0, 1)
        print_table(name, results[name])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def init_options(args: argparse.Namespace) -> dict:
    """The ``init_layerwise`` options the command line sets (the rest: the library's)."""
    return {"output_steps": args.init_output_steps, "refit_kept": args.init_refit_kept,
            "block_steps": args.init_block_steps}


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: B = {result['budget_cpu_seconds']:.0f} CPU s")
    print(f"{'model':<38} {'params':>8} {'steps':>6} {'PSNR':>7} {'SSIM':>6} {'CPU s':>7}")
    for row, r in result["rows"].items():
        print(f"{row:<38} {r.get('params', ''):>8} {r.get('steps', ''):>6} {r['psnr']:>7.2f} "
              f"{r['ssim']:>6.3f} {r['cpu_seconds']:>7.1f}")
    for row, gap in result.get("gaps_db", {}).items():
        print(f"{row}: {gap}")


if __name__ == "__main__":
    main()
