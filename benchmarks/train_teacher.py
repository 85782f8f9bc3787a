"""Train a benchmark teacher for a fixed CPU-time budget and save its weights.

Quality comparisons need a teacher trained far longer than any student budget (see
/work/shared/perf/BASELINE.md). One torch thread, so the machine stays usable meanwhile:

    nice -n 10 .venv/bin/python -m benchmarks.train_teacher denoise --budget-minutes 50
    nice -n 10 .venv/bin/python -m benchmarks.train_teacher sr --budget-minutes 20
    nice -n 10 .venv/bin/python -m benchmarks.train_teacher swinir --budget-minutes 45 --lr 5e-4

``swinir`` is the tiny SwinIR x2 transformer of ``benchmarks/tiny_swinir.py`` (the teacher of
the low-rank rules' quality row), trained on the same data and degradation as ``sr``.

Rerunning the same command resumes from ``benchmarks/weights/<name>.ckpt`` (written every 5
minutes) until the budget is spent; the final weights go to ``<name>.pt`` with a ``.json``
record of the run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.common import TASKS, held_out, save_atomic, score, train_supervised
from benchmarks.tiny_swinir import SWINIR_X2

ALL_TASKS = {**TASKS, "swinir": SWINIR_X2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(ALL_TASKS))
    parser.add_argument("--budget-minutes", type=float, default=50.0, help="CPU minutes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = ALL_TASKS[args.task]
    model = task.build()
    task.weights.parent.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.time(), time.process_time()
    steps = train_supervised(model, task, args.budget_minutes * 60, lr=args.lr, seed=args.seed,
                             log=lambda s: print(s, flush=True),
                             checkpoint=task.weights.with_suffix(".ckpt"))
    save_atomic(model, task.weights)
    quality = score(model, task, held_out(task))
    meta = {"task": task.name, "steps": steps, "batch_size": task.batch_size,
            "crop": task.crop, "lr": args.lr, "seed": args.seed, "threads": args.threads,
            "cpu_seconds_this_session": round(time.process_time() - c0, 1),
            "wall_seconds_this_session": round(time.time() - t0, 1),
            "budget_cpu_minutes": args.budget_minutes, "held_out": quality}
    task.weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
