"""A tiny SwinIR x2 super-resolution task: the transformer teacher of the low-rank quality row.

spandrel's own SwinIR architecture at a small configuration (48 features, two residual Swin
groups of two blocks, 8x8 windows, MLP ratio 2, the light "pixelshuffledirect" upsampler):
nearly all of its weights sit in ``nn.Linear`` layers (qkv, proj, fc1, fc2), which is what
the ``low-rank-linear`` rule is for. Trained by ``python -m benchmarks.train_teacher swinir``
on the same data and degradation as the SRResNet teacher (``benchmarks.common.SR2``).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from benchmarks.common import SR2, WEIGHTS
from examples.zoo import torchvision_stub


def tiny_swinir() -> nn.Module:
    """SwinIR x2, 48 features, depths (2, 2), 3 heads, window 8 (random weights)."""
    with torchvision_stub():
        from spandrel.architectures.SwinIR import SwinIR
    return SwinIR(img_size=32, embed_dim=48, depths=[2, 2], num_heads=[3, 3], window_size=8,
                  mlp_ratio=2.0, upscale=2, upsampler="pixelshuffledirect",
                  drop_path_rate=0.0, resi_connection="1conv")


SWINIR_X2 = dataclasses.replace(SR2, name="sr-x2-swinir", build=tiny_swinir,
                                weights=WEIGHTS / "swinir_x2_tiny.pt")
