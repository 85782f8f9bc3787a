"""Shared pieces of the quality benchmarks: the two tasks, CPU-time-budgeted training, scoring.

Budgets are CPU seconds of this process (``time.process_time``) with one torch thread, so
that a run on a shared machine gets the same amount of work however loaded the machine is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.dncnn import DnCNN
from examples.srresnet import SRResNet
from lwcompile.files import write_atomic
from lwcompile.train.data import HELD_OUT, Degrade, add_noise, batches, downscale, load_images
from lwcompile.train.layout import Layout

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Task:
    name: str
    channels: int
    degrade: Degrade
    crop: int  # training crop (high-resolution side)
    batch_size: int
    build: Callable[[], nn.Module]
    weights: Path
    shave: int = 0  # border pixels ignored when scoring


DENOISE = Task("denoise-sigma25", 1, add_noise(25), 40, 16, DnCNN,
               WEIGHTS / "dncnn17_sigma25.pt")
SR2 = Task("sr-x2", 3, downscale(2), 64, 16, lambda: SRResNet(scale=2, features=32, blocks=4),
           WEIGHTS / "srresnet_x2_small.pt", shave=2)
TASKS = {"denoise": DENOISE, "sr": SR2}


def cpu_budget(seconds: float) -> Callable[[], float]:
    """Fraction of a CPU-time budget used so far (>= 1 when spent; a budget of zero or less
    is spent from the start, so a loop that stops on it takes no step)."""
    if seconds <= 0:
        return lambda: 1.0
    start = time.process_time()
    return lambda: (time.process_time() - start) / seconds


def train_supervised(model: nn.Module, task: Task, budget_s: float, *, lr: float = 1e-3,
                     seed: int = 0, log: Callable[[str], None] = print,
                     checkpoint: Path | None = None, freeze_bn: bool = False,
                     amp: str | None = None) -> int:
    """Train on (degraded, clean) crops with MSE for ``budget_s`` CPU seconds; cosine lr.

    ``amp="bf16"`` runs the forward pass under CPU bf16 autocast (weights and optimiser stay
    fp32), as ``distill(amp="bf16")`` does, so that both sides of a comparison get it.

    Like ``distill``, it trains in channels-last memory order where the model runs in it
    (``lwcompile.train.layout``), so that both sides of a comparison get it.

    ``freeze_bn`` keeps BatchNorms in eval mode (running statistics fixed), the usual way to
    fine-tune an already trained network on small batches.

    The lr follows the fraction of the budget spent, so short and long budgets both end
    annealed. With ``checkpoint``, the model, optimiser, step and CPU time spent are saved
    every 5 minutes and an existing checkpoint is resumed: long teacher runs survive the end
    of a session. Returns the number of steps taken.
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    step, spent = 0, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, spent = state["step"], state["cpu_seconds"]
        log(f"resumed {checkpoint} at step {step}, {spent:.0f} CPU s spent")
    start = time.process_time() - spent
    used = lambda: (time.process_time() - start) / budget_s  # noqa: E731

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "cpu_seconds": time.process_time() - start}
        write_atomic(checkpoint, lambda f: torch.save(state, f))

    layout = Layout("train_supervised", None, model)
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    last_save, running = time.time(), None
    for clean in batches(None, channels=task.channels, batch_size=task.batch_size,
                         crop=task.crop, seed=seed, start=step):
        frac = used()
        if frac >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        g = torch.Generator().manual_seed(10_000_019 * seed + step)
        with torch.autocast("cpu", torch.bfloat16, enabled=amp == "bf16"):
            restored = model(layout.batch(task.degrade(clean, g)))
        loss = F.mse_loss(restored.float(), clean)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0:
            log(f"step {step} budget {frac:.1%} loss {running:.2e} "
                f"(~{10 * math.log10(1 / max(running, 1e-12)):.2f} dB)")
        if checkpoint is not None and time.time() - last_save > 300:
            save()
            last_save = time.time()
    if checkpoint is not None:
        save()
    layout.restore()
    model.eval()
    return step


def save_atomic(model: nn.Module, path: Path) -> None:
    """Write ``model``'s state_dict to ``path``; an interrupted run leaves the old file."""
    write_atomic(path, lambda f: torch.save(model.state_dict(), f))


def load_teacher(task: Task) -> nn.Module:
    """The committed teacher weights for ``task``, in eval mode."""
    model = task.build()
    model.load_state_dict(torch.load(task.weights, weights_only=True))
    return model.eval()


def held_out(task: Task, size: int = 256) -> list[tuple[Tensor, Tensor]]:
    """(input, clean) pairs: centre crops of the HELD_OUT images, degraded with fixed seeds."""
    pairs = []
    for i, img in enumerate(load_images(HELD_OUT, task.channels)):
        h, w = img.shape[-2:]
        s = min(size, h, w) // 2 * 2
        top, left = (h - s) // 2, (w - s) // 2
        clean = img[None, :, top:top + s, left:left + s]
        pairs.append((task.degrade(clean, torch.Generator().manual_seed(1000 + i)), clean))
    return pairs


@torch.no_grad()
def score(model: nn.Module | Callable[[Tensor], Tensor], task: Task,
          pairs: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """Mean PSNR / SSIM (skimage.metrics, data range 1) over the held-out pairs."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if isinstance(model, nn.Module):
        model.eval()
    psnrs, ssims = [], []
    for x, clean in pairs:
        y = model(x).clamp(0, 1)
        if y.shape != clean.shape:  # the noisy input itself, for SR: upsample to compare
            y = F.interpolate(y, size=clean.shape[-2:], mode="bicubic",
                              align_corners=False).clamp(0, 1)
        a, b = _hwc(clean, task.shave), _hwc(y, task.shave)
        psnrs.append(peak_signal_noise_ratio(a, b, data_range=1.0))
        ssims.append(structural_similarity(a, b, data_range=1.0, channel_axis=2))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def _hwc(x: Tensor, shave: int) -> np.ndarray:
    a = x[0].permute(1, 2, 0).double().numpy()
    return a[shave:-shave, shave:-shave] if shave else a
