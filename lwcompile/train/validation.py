"""Held-out scoring while and after training: PSNR and SSIM per image.

A validation set is a list of (model input, clean target) pairs of whole images. It comes
from a folder of clean images degraded with fixed seeds (the same noise every time), from
paired low/high folders, or from the caller as pairs. PSNR and SSIM are scikit-image's
(``skimage.metrics``, data range 1, SSIM over the channel axis), not written here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ArgumentError, LwCompileError
from .data import Degrade, load_folder, to_channels
from .device import autocast

Pairs = list[tuple[Tensor, Tensor]]


@dataclass
class Scores:
    """Mean PSNR (dB) and SSIM over a validation set, and each image's."""

    psnr: float
    ssim: float
    per_image: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"psnr": self.psnr, "ssim": self.ssim, "per_image": self.per_image}


def centre_crop(image: Tensor, size: int | None, multiple: int = 1) -> Tensor:
    """The centre ``size`` x ``size`` (at most the image) of a CxHxW image, both sides
    rounded down to a ``multiple`` (so a downscaled input keeps an exact size)."""
    h, w = image.shape[-2:]
    s_h, s_w = (h, w) if size is None else (min(size, h), min(size, w))
    s_h, s_w = s_h // multiple * multiple, s_w // multiple * multiple
    top, left = (h - s_h) // 2, (w - s_w) // 2
    return image[..., top:top + s_h, left:left + s_w]


def validation_pairs(val: Any, *, channels: int, degrade: Degrade | None = None,
                     size: int | None = 256, seed: int = 1000, multiple: int = 1) -> Pairs:
    """(input, clean) pairs (each 1xCxHxW) for ``validate``.

    ``val`` is a folder of clean images (centre crops of at most ``size``, degraded by
    ``degrade`` with the generator seeded ``seed + i`` for image i, so every call gives the
    same inputs), a ``PairedFolders`` dataset (its whole aligned images), or a list of
    (input, clean) tensor pairs, used as given.
    """
    from .datasets import PairedFolders  # datasets imports data, as we do

    if isinstance(val, PairedFolders):
        return [tuple(t[None] for t in val.whole(i)) for i in range(len(val))]
    if isinstance(val, (str, Path)):
        if degrade is None:
            raise ArgumentError("validation: a folder of clean images needs degrade= to make "
                                "the model's inputs (or pass paired low/high folders)")
        pairs = []
        for i, image in enumerate(load_folder(val, channels)):
            clean = centre_crop(image, size, multiple)[None]
            pairs.append((degrade(clean, torch.Generator().manual_seed(seed + i)), clean))
        return pairs
    if isinstance(val, (list, tuple)) and val and all(
            isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(t, Tensor) for t in p) for p in val):
        return [(to_channels(x if x.dim() == 4 else x[None], channels),
                 to_channels(y if y.dim() == 4 else y[None], channels)) for x, y in val]
    raise ArgumentError(f"validation data must be a folder of images, paired folders or a "
                        f"list of (input, clean) tensor pairs, got {type(val).__name__}")


def _hwc(x: Tensor, shave: int) -> np.ndarray:
    a = x[0].detach().float().cpu().permute(1, 2, 0).double().numpy()
    return a[shave:-shave, shave:-shave] if shave else a


@torch.no_grad()
def validate(model: nn.Module | Any, pairs: Pairs, *, device: torch.device | str = "cpu",
             amp: torch.dtype | None = None, shave: int = 0) -> Scores:
    """PSNR and SSIM of ``model`` (in eval mode; any callable) on ``pairs``, outputs clamped
    to [0, 1]; an output of another size than the target (a degraded input for SR) is resized
    bicubically first. ``shave`` border pixels are ignored, as usual for SR."""
    try:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    except ImportError as exc:
        raise LwCompileError("validation needs scikit-image: pip install 'lwcompile[data]'") \
            from exc
    device = torch.device(device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    rows = []
    try:
        for x, clean in pairs:
            with autocast(device, amp):
                y = model(x.to(device))
            y = y.float().clamp(0, 1).cpu()
            if y.shape != clean.shape:
                y = F.interpolate(y, size=clean.shape[-2:], mode="bicubic",
                                  align_corners=False).clamp(0, 1)
            a, b = _hwc(clean, shave), _hwc(y, shave)
            rows.append({"psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
                         "ssim": float(structural_similarity(a, b, data_range=1.0,
                                                             channel_axis=2))})
    finally:
        if was_training is not None:
            model.train(was_training)
    if not rows:
        raise ArgumentError("validation: no images to score")
    return Scores(float(np.mean([r["psnr"] for r in rows])),
                  float(np.mean([r["ssim"] for r in rows])), rows)
