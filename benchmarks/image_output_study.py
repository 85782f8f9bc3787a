"""What does squeezing SRResNet's 9x9 image-writing conv cost in quality?

``rules/image_output_squeeze`` rewrites the large-kernel conv that writes the image (9x9
C->3 in SRResNet) as a 1x1 squeeze C -> C/r followed by the 9x9 conv, starting from the best
rank-C/r factorisation of the original weights. On the committed, trained small SRResNet x2
(``benchmarks/train_teacher.py``), only that conv is rewritten, and PSNR/SSIM on held-out
images (centre crops of ``lwcompile.data.HELD_OUT``) is reported:

- the teacher, and bicubic upsampling;
- for each squeeze ratio r: the rewrite as built (SVD of the weights, no data), after
  ``init_layerwise`` (the squeezed pair fitted to the teacher's conv on calibration crops),
  and after fine-tuning the whole network supervised for B CPU seconds (Adam, ``--lr``,
  BatchNorm statistics frozen);
- control: the teacher itself fine-tuned for the same B (separates the extra training from
  the rewrite).

    nice -n 10 .venv/bin/python -m benchmarks.image_output_study --budget-seconds 120
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import lwcompile
from benchmarks.common import RESULTS, TASKS, held_out, load_teacher, score, train_supervised
from benchmarks.quality_denoise import example, n_params, print_table
from lwcompile.measure.cost import measure
from lwcompile.rules.image_output_squeeze import ImageOutputSqueezeRule
from lwcompile.train.layerwise import init_layerwise


def run(budget_s: float, ratios: list[int], seed: int, lr: float) -> dict:
    task = TASKS["sr"]
    teacher = load_teacher(task)
    pairs = held_out(task)
    probe = (torch.rand(1, 3, 64, 64),)  # LR side of a 128x128 output, for the MAC counts
    rows: dict[str, dict] = {}

    def record(name: str, model, c0: float, **info) -> None:
        cpu = round(time.process_time() - c0, 1)
        if isinstance(model, torch.nn.Module):
            info |= {"params": n_params(model), "gmacs_64x64": measure(model, probe).macs / 1e9}
        rows[name] = {**score(model, task, pairs), **info, "cpu_seconds": cpu}
        print(f"{name}: {rows[name]}", flush=True)

    record("input (bicubic)", lambda x: x, time.process_time())
    record("teacher", teacher, time.process_time())
    for r in ratios:
        torch.manual_seed(seed)
        student = lwcompile.lighten(teacher, example(task),
                                    rules=[ImageOutputSqueezeRule(squeeze_ratio=r)])
        assert [row.site for row in student.lwcompile_report.applied] == ["tail"], \
            "only the output conv should change"
        record(f"squeeze /{r}, SVD of the weights", student.eval(), time.process_time())
        c0 = time.process_time()
        init_layerwise(student, teacher, channels=3, degrade=task.degrade, crop=task.crop,
                       batch_size=task.batch_size, seed=seed)
        record(f"squeeze /{r}, + layer-wise fit", student.eval(), c0)
        c0 = time.process_time()
        steps = train_supervised(student, task, budget_s, lr=lr, seed=seed, log=lambda s: None,
                                 freeze_bn=True)
        record(f"squeeze /{r}, + fine-tune B", student, c0, steps=steps)
    control = copy.deepcopy(teacher)
    c0 = time.process_time()
    steps = train_supervised(control, task, budget_s, lr=lr, seed=seed, log=lambda s: None,
                             freeze_bn=True)
    record("teacher, + fine-tune B (control)", control, c0, steps=steps)
    return {"task": task.name, "budget_cpu_seconds": budget_s, "seed": seed,
            "fine_tune_lr": lr, "fine_tune_bn": "frozen",
            "held_out": "centre crops (<=256) of lwcompile.data.HELD_OUT",
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=120.0)
    parser.add_argument("--ratio", type=int, action="append", help="default: 2, 4, 8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    parser.add_argument("--out", type=Path, default=RESULTS / "image_output_study.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    result = run(args.budget_seconds, args.ratio or [2, 4, 8], args.seed, args.lr)
    result["wall_seconds"] = round(time.time() - t0, 1)
    print_table("sr-x2, 9x9 output conv squeezed", result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
