"""Degradations that turn clean images into a restoration model's inputs, composable.

Each is a ``Degrade``: a function of a clean batch (N,C,H,W in [0, 1]) and a
``torch.Generator`` that seeds any randomness, so the same step always gets the same noise.
Gaussian noise and bicubic downscaling are in ``data.py`` (``add_noise``, ``downscale``);
here are blur, JPEG (through Pillow's encoder) and ``compose``:

    degrade = compose(gaussian_blur(1.2), downscale(2), add_noise(5), jpeg(60))
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ArgumentError, LwCompileError
from .data import Degrade


def compose(*degrades: Degrade) -> Degrade:
    """Apply ``degrades`` in order, each with its own generator drawn from the one given."""
    if not degrades or not all(callable(d) for d in degrades):
        raise ArgumentError("compose: pass one or more degradations (functions of a batch "
                            "and a generator)")

    def degrade(x: Tensor, generator: torch.Generator) -> Tensor:
        for step in degrades:
            seed = int(torch.randint(2**62, (1,), generator=generator))
            x = step(x, torch.Generator().manual_seed(seed))
        return x
    return degrade


def gaussian_blur(sigma: float) -> Degrade:
    """Isotropic Gaussian blur of standard deviation ``sigma`` pixels (kernel +-3 sigma,
    reflected borders)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
        raise ArgumentError(f"gaussian_blur: sigma must be a positive number, got {sigma!r}")
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()

    def degrade(x: Tensor, generator: torch.Generator) -> Tensor:
        c = x.shape[1]
        k = kernel.to(x.device, x.dtype)
        y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return degrade


def jpeg(quality: int) -> Degrade:
    """JPEG compression at ``quality`` (1-95) through Pillow, each image encoded and decoded
    as 8-bit grey or RGB."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ArgumentError(f"jpeg: quality must be an int in 1..95, got {quality!r}")
    try:
        from PIL import Image
    except ImportError as exc:
        raise LwCompileError("jpeg degradation needs Pillow: pip install pillow") from exc

    def one(image: Tensor) -> Tensor:
        array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        if array.shape[2] not in (1, 3):
            raise LwCompileError(f"jpeg: images must have 1 or 3 channels, got "
                                 f"{array.shape[2]}")
        buffer = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(
            buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out = np.array(decoded)
        out = out[..., None] if out.ndim == 2 else out
        return torch.from_numpy(out).permute(2, 0, 1).float() / 255

    def degrade(x: Tensor, generator: torch.Generator) -> Tensor:
        return torch.stack([one(image) for image in x]).to(x.device, x.dtype)
    return degrade
