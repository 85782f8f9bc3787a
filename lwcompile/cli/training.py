"""``lwcompile distill`` and ``lwcompile eval``: train a saved light model, score it.

    lwcompile lighten examples.dncnn:build -o light.safetensors
    lwcompile distill light.safetensors --teacher examples.dncnn:build --data photos/ \\
        --noise 25 --val held_out/ --minutes 30 -o trained.safetensors
    lwcompile eval trained.safetensors --teacher examples.dncnn:build --data held_out/ \\
        --noise 25

The degradation flags (``--noise``, ``--blur``, ``--downscale``, ``--jpeg``, applied in that
order) say what the teacher restores, so that its inputs can be made from clean images; a
``--low DIR`` of degraded images named as the ``--data`` ones gives pairs instead.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lwcompile

from ..deploy import persist
from ..errors import ArgumentError, CheckpointError
from ..train.data import Degrade, add_noise, downscale, image_channels
from ..train.datasets import PairedFolders
from ..train.degradations import compose, gaussian_blur, jpeg
from ..train.device import amp_dtype, resolve_device
from ..train.validation import validate, validation_pairs
from .loading import load_model
from .progress import stage

Command = Callable[..., argparse.ArgumentParser]


def register(command: Command) -> None:
    """Add ``distill`` and ``eval`` to the parser through ``app``'s ``command`` helper."""
    p = command("distill", distill, "train a light model saved by lighten to reproduce its "
                "teacher (layer-wise init first, then distillation)", model=False)
    p.add_argument("light", metavar="LIGHT", help="a file written by lwcompile lighten")
    p.add_argument("--teacher", required=True, metavar="MODEL",
                   help="the model LIGHT was lightened from (factory or checkpoint)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.safetensors",
                   help="where to save the trained light model")
    p.add_argument("--checkpoint", type=Path, metavar="RUN.pt",
                   help="training checkpoint (default: OUT with the suffix .run.pt)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint (without it, an existing checkpoint "
                        "is refused rather than overwritten)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive, help="training steps (default 1000)")
    budget.add_argument("--minutes", type=float, help="train for this many wall-clock "
                        "minutes, the learning rate annealed over that time")
    p.add_argument("--val", metavar="DIR", help="held-out images: PSNR/SSIM every "
                   "--val-every steps and at the end, the best weights kept in OUT.best.pt")
    p.add_argument("--val-every", type=_positive, default=200, metavar="STEPS")
    p.add_argument("--batch-size", type=_positive, default=16)
    p.add_argument("--crop", type=_positive, default=48, metavar="PX")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="average the weights (e.g. 0.999) and save the average")
    p.add_argument("--features", type=float, default=0.0, metavar="WEIGHT",
                   help="also match the teacher at the end of every rewritten block, with "
                        "this weight (intermediate-feature distillation; 0: off)")
    p.add_argument("--ground-truth", type=float, default=0.0, metavar="WEIGHT",
                   help="mix in the clean target with this weight in [0, 1] (the image the "
                        "degradation flags were applied to, or the --data image of a --low "
                        "pair; 0: the teacher only)")
    p.add_argument("--no-init", action="store_true",
                   help="skip the layer-wise initialisation of a fresh run")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    _device_options(p)
    _data_options(p)

    p = command("eval", evaluate, "PSNR/SSIM of MODEL and its teacher on held-out images",
                model=False)
    p.add_argument("model", metavar="MODEL", help="a file written by lighten or distill, "
                   "or any model spec")
    p.add_argument("--teacher", required=True, metavar="MODEL",
                   help="the teacher (and the original a lightened file is rebuilt from)")
    p.add_argument("--size", type=_positive, default=256, metavar="PX",
                   help="centre crop of each image scored (default 256)")
    _device_options(p)
    _data_options(p)


def _device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (fp16: GPU only)")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR",
                   help="folder of clean (ground-truth) images")
    p.add_argument("--low", metavar="DIR", help="folder of the degraded inputs, named as the "
                   "--data images (paired data; then no degradation flags)")
    p.add_argument("--scale", type=_positive, default=1,
                   help="with --low: how many times larger the --data images are")
    p.add_argument("--noise", type=float, metavar="SIGMA",
                   help="Gaussian noise, sigma on the 0..255 scale")
    p.add_argument("--blur", type=float, metavar="SIGMA", help="Gaussian blur (pixels)")
    p.add_argument("--downscale", type=_positive, metavar="N", help="bicubic downscale by N")
    p.add_argument("--jpeg", type=int, metavar="QUALITY", help="JPEG compression (1-95)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _degradation(args: argparse.Namespace) -> Degrade | None:
    """The flags' degradations in their fixed order, or None."""
    steps = [make(value) for value, make in (
        (args.blur, gaussian_blur), (args.downscale, downscale), (args.noise, add_noise),
        (args.jpeg, jpeg)) if value is not None]
    if steps and args.low is not None:
        raise ArgumentError("--low gives the degraded inputs: drop the degradation flags")
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else compose(*steps)


def _paired(args: argparse.Namespace, channels: int, crop: int | None) -> PairedFolders | None:
    if args.low is None:
        return None
    return PairedFolders(args.low, args.data, scale=args.scale, crop=crop, channels=channels)


def _models(args: argparse.Namespace, spec: str) -> tuple[nn.Module, nn.Module]:
    teacher = load_model(args.teacher).eval()
    student = load_model(spec, original=args.teacher)
    return student, teacher


def distill(args: argparse.Namespace) -> dict[str, Any]:
    """Layer-wise init (a fresh run) and distillation of LIGHT; saves OUT (and OUT.best.pt)."""
    student, teacher = _models(args, args.light)
    channels = image_channels(teacher)
    degrade = _degradation(args)
    paired = _paired(args, channels, args.crop * args.scale if args.low else None)
    data = paired if paired is not None else args.data
    checkpoint = args.checkpoint or args.output.with_suffix(".run.pt")
    if checkpoint.exists() and not args.resume:
        raise CheckpointError(f"{checkpoint} exists: pass --resume to continue that run, or "
                              "delete it to start again")
    if args.resume and not checkpoint.exists():
        raise CheckpointError(f"--resume: no checkpoint {checkpoint} to continue")
    val = None
    if args.val is not None:
        val = validation_pairs(args.val, channels=channels, degrade=degrade,
                               multiple=args.downscale or 1) if paired is None else \
            validation_pairs(PairedFolders(args.low, args.val, scale=args.scale, crop=None,
                                           channels=channels), channels=channels)
    if not args.resume and not args.no_init:
        with stage("layer-wise initialisation", args.quiet):
            lwcompile.init_layerwise(student, teacher, data, degrade=degrade,
                                     channels=channels, crop=args.crop, device=args.device,
                                     amp=args.amp, seed=args.seed)
    steps, stop_when, schedule = args.steps or 1000, None, "cosine"
    if args.minutes is not None:
        if args.minutes <= 0:
            raise ArgumentError(f"--minutes must be positive, got {args.minutes}")
        start, seconds = time.monotonic(), 60 * args.minutes
        steps = 10**9
        stop_when = lambda: time.monotonic() - start >= seconds  # noqa: E731
        schedule = lambda step: 0.5 * (1 + math.cos(  # noqa: E731
            math.pi * min((time.monotonic() - start) / seconds, 1.0)))
    history: list[dict[str, float]] = []
    best = args.output.with_suffix(".best.pt") if val is not None else None
    lwcompile.distill(
        student, teacher, data, steps, lr=args.lr, batch_size=args.batch_size, crop=args.crop,
        channels=channels, degrade=degrade, checkpoint=checkpoint, resume=args.resume,
        progress=not args.quiet, seed=args.seed, lr_schedule=schedule, stop_when=stop_when,
        device=args.device, amp=args.amp, val_data=val, val_every=args.val_every,
        best_checkpoint=best, ema=args.ema, workers=args.workers, features=args.features,
        ground_truth=args.ground_truth,
        on_validation=lambda step, s: history.append({"step": step, "psnr": s.psnr,
                                                      "ssim": s.ssim}))
    student.to("cpu")
    persist.save(student, args.output, report=getattr(student, "lwcompile_report", None),
                 source=args.teacher)
    last = history[-1] if history else None
    text = f"saved to {args.output} (load it with --original {args.teacher})"
    if last is not None:
        text = (f"validation at step {last['step']}: PSNR {last['psnr']:.2f} dB, SSIM "
                f"{last['ssim']:.3f}; best weights in {best}\n{text}")
    return {"light": args.light, "teacher": args.teacher, "output": str(args.output),
            "checkpoint": str(checkpoint), "validation": history, "text": text}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """PSNR/SSIM of the degraded input, the teacher and MODEL on --data's images."""
    student, teacher = _models(args, args.model)
    channels = image_channels(teacher)
    degrade = _degradation(args)
    paired = _paired(args, channels, None)
    if paired is None and degrade is None:
        raise ArgumentError("eval: say how the inputs are made (--noise, --blur, --downscale, "
                            "--jpeg) or give them with --low DIR")
    pairs = validation_pairs(paired if paired is not None else args.data, channels=channels,
                             degrade=degrade, size=args.size, multiple=args.downscale or 1)
    device = resolve_device("eval", args.device, student)
    dtype = amp_dtype("eval", args.amp, device)
    rows = {}
    with stage(f"scoring {len(pairs)} images", args.quiet):
        for name, model in (("input", lambda x: x), ("teacher", teacher.to(device)),
                            ("model", student.to(device))):
            rows[name] = validate(model, pairs, device=device, amp=dtype).as_dict()
    params = {"teacher": sum(p.numel() for p in teacher.parameters()),
              "model": sum(p.numel() for p in student.parameters())}
    lines = [f"{'':<8} {'params':>9} {'PSNR':>7} {'SSIM':>6}"]
    for name, r in rows.items():
        lines.append(f"{name:<8} {params.get(name, ''):>9} {r['psnr']:>7.2f} {r['ssim']:>6.3f}")
    gap = rows["teacher"]["psnr"] - rows["model"]["psnr"]
    worst = max(t["psnr"] - m["psnr"] for t, m in zip(rows["teacher"]["per_image"],
                                                      rows["model"]["per_image"], strict=True))
    lines.append(f"model vs teacher: {gap:.2f} dB below on average, {worst:.2f} dB on the "
                 f"worst of {len(pairs)} images")
    return {"model": args.model, "teacher": args.teacher, "images": len(pairs),
            "params": params, "scores": rows, "mean_gap_db": gap, "worst_gap_db": worst,
            "text": "\n".join(lines), "torch_threads": torch.get_num_threads()}
