"""Distillation: train a lightened student to reproduce its teacher's outputs.

Usually after ``init_layerwise`` (``layerwise.py``) has given each replacement a fitted start:

    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    init_layerwise(light, teacher, degrade=add_noise(25))
    distill(light, teacher, steps=2000, degrade=add_noise(25), checkpoint="run.pt")
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import arguments as check
from ..errors import ArgumentError, CheckpointError, DestinationError, one_line
from ..files import write_atomic
from .checks import run_on_batch, same_output_shape, training_arguments
from .data import Degrade, model_inputs


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda f: torch.save(state, f))


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any = None,
    steps: int = 1000,
    *,
    lr: float = 1e-3,
    loss: str = "l1",
    batch_size: int = 16,
    crop: int | None = 40,
    channels: int | None = None,
    degrade: Degrade | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    lr_schedule: Callable[[int], float] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> nn.Module:
    """Train ``student`` in place to reproduce ``teacher``'s outputs; returns it.

    ``stop_when``, asked before each step, ends training early when it answers True (e.g. a
    time budget is spent); the checkpoint is written as at the end.

    Adam at ``lr``, times ``lr_schedule(step)`` if given (a function of the step alone, so
    that resuming stays exact; by default constant, so a longer run continues a shorter
    one). Step ``s`` always sees the same batch and noise (generators seeded from
    ``(seed, rank, s)``), and the checkpoint holds weights, optimiser, step and RNG state:
    a run resumed from its checkpoint ends bit-identical to an uninterrupted one. Checkpoints
    are written atomically (temp file, then ``os.replace``) every ``checkpoint_every`` steps
    and at the end. ``data``, ``batch_size``, ``crop``, ``channels`` and ``degrade`` are as
    in ``init_layerwise``.

    Launched by ``torchrun`` (``WORLD_SIZE`` set), it trains with DistributedDataParallel
    (gloo on CPU): each rank draws its own crops, gradients are averaged, rank 0 writes the
    checkpoints.
    """
    losses = {"l1": F.l1_loss, "mse": F.mse_loss}
    if not isinstance(loss, str) or loss not in losses:
        raise ArgumentError(f"distill: loss must be one of {sorted(losses)}, got {loss!r}")
    training_arguments("distill", student, teacher, steps=steps, lr=lr, batch_size=batch_size,
                       crop=crop, channels=channels, degrade=degrade, seed=seed)
    path = None if checkpoint is None else check.path("distill", "checkpoint", checkpoint)
    check.integer("distill", "checkpoint_every", checkpoint_every, minimum=1)
    check.function("distill", "lr_schedule", lr_schedule)
    check.function("distill", "stop_when", stop_when)
    criterion = losses[loss]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    torch.manual_seed(seed)
    random.seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    start = 0
    if path is not None and resume and path.exists():
        start = _resume(path, student, opt)
    if path is not None and not path.parent.is_dir():  # refused now, not after training
        raise DestinationError(f"distill: cannot write the checkpoint {path}: folder "
                               f"{path.parent} does not exist (create it first)")

    def save(step: int) -> None:
        if path is not None and rank == 0:
            rng = random.getstate()
            _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(),
                          "step": step, "torch_rng": torch.get_rng_state(),
                          "python_rng": (rng[0], list(rng[1]), rng[2]), "seed": seed}, path)

    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    model.train()
    bar = _progress(start, steps, progress and rank == 0)
    done = start
    try:
        stream = model_inputs(data, teacher, channels, degrade, batch_size, crop, seed, start,
                              rank)
        for _ in range(start, steps):
            if stop_when is not None and stop_when():
                break
            item = next(stream, None)
            if item is None:
                break
            step, x = item
            if lr_schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_schedule(step)
            with torch.no_grad():
                target = run_on_batch("distill", "teacher", teacher, x)
            output = run_on_batch("distill", "student", model, x)
            same_output_shape("distill", output, target)
            value = criterion(output, target)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            done = step + 1
            bar(done, value.item())
            if done % checkpoint_every == 0:
                save(done)
        if done > start and done % checkpoint_every:
            save(done)
    finally:
        bar(None, None)
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        if own_group:
            del model  # DDP's reducer must go before its process group, or exit can hang
            dist.destroy_process_group()
    return student


_CHECKPOINT_KEYS = ("student", "optimizer", "torch_rng", "python_rng", "step")


def _resume(path: Path, student: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load a checkpoint written by ``distill`` into ``student`` and ``opt``; its step.
    Anything else (unreadable, foreign, another model's) is a CheckpointError, left as is."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"distill: {path} is not a distill checkpoint (cannot read it: "
                              f"{one_line(exc)}); delete it or pass another checkpoint=") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"distill: {path} is not a distill checkpoint (it holds a "
                              f"{type(state).__name__})")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"distill: {path} is not a distill checkpoint: it has no "
                              f"{missing[0]!r} (keys: {sorted(map(str, state))[:6]})")
    own = {key: tuple(value.shape) for key, value in student.state_dict().items()}
    saved = state["student"]
    theirs = {key: tuple(getattr(value, "shape", ())) for key, value in saved.items()} \
        if isinstance(saved, dict) else {}
    if own != theirs:  # checked before loading: a failed load would leave half the weights
        diff = sorted(set(own) ^ set(theirs)) or [k for k in own if own[k] != theirs[k]]
        raise CheckpointError(f"distill: {path} is the checkpoint of another model (first "
                              f"difference: {diff[0]!r}); pass this student's checkpoint")
    student.load_state_dict(saved)
    try:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]),
                         state["python_rng"][2]))
        return int(state["step"])
    except Exception as exc:
        raise CheckpointError(f"distill: {path} is a corrupt distill checkpoint: "
                              f"{one_line(exc)}") from exc


def _progress(start: int, total: int, enabled: bool):
    """A callback (step, loss) -> None drawing a tqdm bar, or printing if tqdm is missing;
    called with (None, None) to close."""
    if not enabled:
        return lambda step, value: None
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(1, total // 20)

        def show(step: int | None, value: float | None) -> None:
            if step is not None and (step % every == 0 or step == total):
                print(f"distill step {step}/{total} loss {value:.4g}", flush=True)
        return show
    bar = tqdm(total=total, initial=start, desc="distill", unit="step")

    def update(step: int | None, value: float | None) -> None:
        if step is None:
            bar.close()
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return update
