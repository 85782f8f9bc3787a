"""Distillation: train a lightened student to reproduce its teacher's outputs.

Usually after ``init_layerwise`` (``layerwise.py``) has given each replacement a fitted start:

    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    init_layerwise(light, teacher, degrade=add_noise(25))
    distill(light, teacher, steps=2000, degrade=add_noise(25), checkpoint="run.pt",
            lr_schedule="cosine", val_data="val_images/", device="cuda", amp="bf16")

The loop itself is here; where it runs (``device.py``), what it saves (``checkpoint.py``),
how it scores (``validation.py``), its schedules and weight average (``schedule.py``) and
the BatchNorm re-estimation (``normalization.py``) are one module each.
"""

from __future__ import annotations

import copy
import itertools
import math
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
from ..errors import ArgumentError, DestinationError
from .checkpoint import restore, rng_state, save_checkpoint
from .checks import fits_target, run_on_batch, same_output_shape, training_arguments
from .data import Degrade, image_channels, model_examples, model_inputs
from .device import amp_dtype, autocast, grad_scaler, process_group_backend, resolve_device
from .features import CHANNEL_ORDERS, Features, boundaries
from .layerwise import applied_sites
from .layout import Layout
from .normalization import has_batch_norm, update_bn_statistics
from .progress import progress as progress_bar
from .schedule import Schedule, schedule_for, weight_average
from .validation import Scores, validate, validation_pairs

#: seed offset of the batches BatchNorm statistics are re-estimated on (not training's)
_BN_SEED = 7919


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
    lr_schedule: str | Schedule | None = None,
    stop_when: Callable[[], bool] | None = None,
    device: Any = None,
    amp: str | None = None,
    val_data: Any = None,
    val_every: int | None = None,
    best_checkpoint: str | Path | None = None,
    ema: float | None = None,
    bn_batches: int = 8,
    workers: int = 0,
    on_validation: Callable[[int, Scores], None] | None = None,
    features: float = 0.0,
    channels_last: bool | None = None,
    ground_truth: float = 0.0,
) -> nn.Module:
    """Train ``student`` in place to reproduce ``teacher``'s outputs; returns it.

    Adam at ``lr``, times ``lr_schedule(step)``: "cosine" (from 1 to 0 over ``steps``), a
    function of the step alone (so that resuming stays exact) or None (constant, so that a
    longer run continues a shorter one). ``stop_when``, asked before each step, ends
    training early when it answers True (e.g. a time budget is spent); everything then
    happens as at the end. ``ema`` (a decay such as 0.999) keeps an exponential moving
    average of the student's weights, which the student receives at the end.

    ``device`` (default: where the student's parameters are) is where both models train;
    the teacher is moved there. ``amp`` ("bf16", or "fp16" with a loss scaler on a GPU)
    runs the forward passes under autocast. ``workers`` loads an ``ImageFolder`` /
    ``PairedFolders`` dataset (or a folder) in that many DataLoader processes, with pinned
    memory on a GPU.

    With ``val_data`` (a folder of clean images, degraded by ``degrade`` with fixed seeds;
    ``PairedFolders``; or (input, clean) pairs), the student is scored (PSNR/SSIM,
    ``validate``) every ``val_every`` steps (default ``checkpoint_every``) and at the end,
    each time on a copy whose BatchNorm statistics were re-estimated (``bn_batches``
    batches, cumulative average); ``on_validation(step, scores)`` hears each result, and
    ``best_checkpoint`` receives the weights (re-estimated statistics included) of the best
    PSNR so far. At the end the student's own BatchNorm statistics are re-estimated the
    same way (``bn_batches=0``: left as training left them).

    ``features`` > 0 adds intermediate-feature distillation: at the end of every rewritten
    block, the student's feature is matched to the teacher's (squared error relative to the
    teacher's mean square, averaged over blocks, times ``features``; ``features.py``).

    ``ground_truth`` (a weight in [0, 1]) mixes in the clean target where the data has one
    (the image before ``degrade``, the high image of ``PairedFolders``, a DataLoader's second
    tensor): the loss is ``(1 - w)`` times the loss against the teacher plus ``w`` times the
    loss against the target. The teacher's outputs carry its own errors; on smooth images,
    where those dominate, the target keeps the student from copying them.

    ``channels_last`` trains both models in channels-last memory order (faster convs on
    oneDNN and cuDNN; ``layout.py``): None, the default, where the student has 2-D convs and
    both models run that way; the models' weights get their own layout back at the end.

    Step ``s`` always sees the same batch and noise (generators seeded from
    ``(seed, rank, s)``), and the checkpoint holds weights, optimiser, step, RNG state, EMA
    and validation history, all on CPU tensors: a run resumed from its checkpoint, on this
    device or another, ends as an uninterrupted one (bit-identical on the same device).
    Checkpoints are written atomically every ``checkpoint_every`` steps and at the end.
    ``data``, ``batch_size``, ``crop``, ``channels`` and ``degrade`` are as in
    ``init_layerwise``.

    Launched by ``torchrun`` (``WORLD_SIZE`` set), it trains with DistributedDataParallel
    (NCCL on GPUs, gloo on the CPU): each rank draws its own crops, gradients are averaged,
    rank 0 validates and writes the checkpoints.
    """
    losses = {"l1": F.l1_loss, "mse": F.mse_loss}
    if not isinstance(loss, str) or loss not in losses:
        raise ArgumentError(f"distill: loss must be one of {sorted(losses)}, got {loss!r}")
    training_arguments("distill", student, teacher, steps=steps, lr=lr, batch_size=batch_size,
                       crop=crop, channels=channels, degrade=degrade, seed=seed)
    path = None if checkpoint is None else check.path("distill", "checkpoint", checkpoint)
    best_path = None if best_checkpoint is None \
        else check.path("distill", "best_checkpoint", best_checkpoint)
    check.integer("distill", "checkpoint_every", checkpoint_every, minimum=1)
    check.integer("distill", "val_every", val_every, minimum=1, optional=True)
    check.integer("distill", "bn_batches", bn_batches, minimum=0)
    check.integer("distill", "workers", workers, minimum=0)
    check.function("distill", "stop_when", stop_when)
    check.function("distill", "on_validation", on_validation)
    check.flag("distill", "channels_last", channels_last, optional=True)
    if check.tolerance("distill", "features", features) and not math.isfinite(features):
        raise ArgumentError(f"distill: features must be a finite weight >= 0, got {features}")
    if (isinstance(ground_truth, bool) or not isinstance(ground_truth, (int, float))
            or not 0.0 <= ground_truth <= 1.0):
        raise ArgumentError(f"distill: ground_truth must be a weight in [0, 1], got "
                            f"{ground_truth!r}")
    schedule = schedule_for("distill", lr_schedule, steps)
    where = resolve_device("distill", device, student)
    dtype = amp_dtype("distill", amp, where)
    channels = channels or image_channels(teacher)
    pairs = None if val_data is None else validation_pairs(val_data, channels=channels,
                                                           degrade=degrade)
    for target in (path, best_path):
        if target is not None and not target.parent.is_dir():  # refused now, not at the end
            raise DestinationError(f"distill: cannot write {target}: folder {target.parent} "
                                   "does not exist (create it first)")
    criterion = losses[loss]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and where.type == "cuda" and where.index is None:
        where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group(process_group_backend(where))
    rank = dist.get_rank() if world > 1 else 0

    student.to(where)
    teacher.to(where)
    torch.manual_seed(seed)
    random.seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    scaler = grad_scaler(where, dtype)
    average = weight_average("distill", student, ema)
    start, history = 0, []
    if path is not None and resume and path.exists():
        state = restore(path, student, opt)
        start, history = state["step"], list(state.get("history", []))
        if state.get("channel_orders"):
            setattr(student, CHANNEL_ORDERS, state["channel_orders"])
        if average is not None and "ema" in state:
            average.load_state_dict(state["ema"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    best = max((h["psnr"] for h in history), default=None)

    def save(step: int) -> None:
        if path is not None and rank == 0:
            state = {"student": student.state_dict(), "optimizer": opt.state_dict(),
                     "step": step, **rng_state(), "seed": seed, "history": history,
                     "channel_orders": getattr(student, CHANNEL_ORDERS, None)}
            if average is not None:
                state["ema"] = average.state_dict()
            if scaler.is_enabled():
                state["scaler"] = scaler.state_dict()
            save_checkpoint(path, state)

    def bn_inputs():
        stream = model_inputs(data, teacher, channels, degrade, batch_size, crop,
                              seed + _BN_SEED, workers=workers)
        return (x for _, x in itertools.islice(stream, bn_batches))

    def final_weights() -> nn.Module:
        """The weights training ends with: the EMA's, or the student's."""
        return student if average is None else average.module

    def evaluate(step: int) -> None:
        nonlocal best
        model = copy.deepcopy(final_weights())
        if bn_batches:
            update_bn_statistics(model, bn_inputs(), where, dtype)
        scores = validate(model, pairs, device=where, amp=dtype)
        history.append({"step": step, "psnr": scores.psnr, "ssim": scores.ssim})
        if best_path is not None and (best is None or scores.psnr > best):
            save_checkpoint(best_path, {"student": model.state_dict(), "step": step,
                                        "psnr": scores.psnr, "ssim": scores.ssim})
        best = scores.psnr if best is None else max(best, scores.psnr)
        if on_validation is not None:
            on_validation(step, scores)

    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            student, device_ids=[where.index] if where.type == "cuda" else None)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    model.train()
    every_val = val_every or checkpoint_every
    last_psnr = history[-1]["psnr"] if history else None
    bar = progress_bar(start, steps, progress and rank == 0)
    done = start
    layout = Layout("distill", channels_last, student, teacher)
    # after a resume, which restores the channel orders init_layerwise recorded
    seen = Features(boundaries(student, teacher, applied_sites(student, teacher))
                    if features else [])
    try:
        stream = model_examples(data, teacher, channels, degrade, batch_size, crop, seed,
                                start, rank, workers=workers, pin_memory=where.type == "cuda")
        for _ in range(start, steps):
            if stop_when is not None and stop_when():
                break
            item = next(stream, None)
            if item is None:
                break
            step, x, clean = item
            if ground_truth and clean is None:
                raise ArgumentError(
                    "distill: ground_truth needs clean targets, and this data has none: give "
                    "degrade= (the clean crops are the targets), PairedFolders, or a DataLoader "
                    "of (input, target) batches")
            x = layout.batch(x.to(where, non_blocking=True))
            if schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * schedule(step)
            seen.clear()
            with torch.no_grad(), autocast(where, dtype):
                target = run_on_batch("distill", "teacher", teacher, x)
            with autocast(where, dtype):
                output = run_on_batch("distill", "student", model, x)
            same_output_shape("distill", output, target)
            value = criterion(output.float(), target.float())
            if ground_truth:
                clean = clean.to(where, non_blocking=True)
                fits_target("distill", output, clean)
                value = (1 - ground_truth) * value + ground_truth * criterion(output.float(),
                                                                               clean.float())
            inside = seen.loss()  # None without boundaries (features=0)
            if inside is not None:
                value = value + features * inside
            seen.clear()
            opt.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(opt)
            scaler.update()
            if average is not None:
                average.update_parameters(student)
            done = step + 1
            if pairs is not None and rank == 0 and done % every_val == 0:
                evaluate(done)
                last_psnr = history[-1]["psnr"]
            bar(done, value.item(), last_psnr)
            if done % checkpoint_every == 0:
                save(done)
        if pairs is not None and rank == 0 and done > start and done % every_val:
            evaluate(done)
        if done > start and done % checkpoint_every:
            save(done)
        _finish(student, average, bn_inputs if bn_batches else None, where, dtype)
    finally:
        seen.close()
        layout.restore()
        bar(None, None, None)
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        if own_group:
            del model  # DDP's reducer must go before its process group, or exit can hang
            dist.destroy_process_group()
    return student


def _finish(student: nn.Module, average: Any, bn_inputs: Callable | None,
            where: torch.device, dtype: torch.dtype | None) -> None:
    """The student as training ends it: the EMA's weights if kept, BatchNorm statistics
    re-estimated for them (the checkpoint keeps the raw training state, so that a longer
    run can continue it exactly)."""
    if average is not None:
        with torch.no_grad():
            for mine, averaged in zip(student.parameters(), average.module.parameters(),
                                      strict=True):
                mine.copy_(averaged)
    if bn_inputs is not None and has_batch_norm(student):
        update_bn_statistics(student, bn_inputs(), where, dtype)
