"""SRResNet (Ledig et al., CVPR 2017): the generator of SRGAN, trained with plain MSE.

A super-resolution example with residual blocks, a long global skip and sub-pixel
(PixelShuffle) upsampling, so the compiler sees skips and a non-conv reshaping op.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv3x3-BN-PReLU-conv3x3-BN with an identity skip, as in the paper's figure 4."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
            nn.PReLU(),
            nn.Conv2d(features, features, 3, padding=1),
            nn.BatchNorm2d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet for x2 or x4 upscaling of RGB images.

    The defaults (x4, 64 features, 16 blocks) have exactly 1,549,462 parameters. Convs keep
    their bias and each PReLU has a single slope (``nn.PReLU()``), as in the common public
    reimplementations; the paper does not specify either detail.
    """

    def __init__(self, scale: int = 4, features: int = 64, blocks: int = 16) -> None:
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"SRResNet supports scale 2 or 4, got {scale}")
        self.head = nn.Sequential(nn.Conv2d(3, features, 9, padding=4), nn.PReLU())
        self.blocks = nn.Sequential(*(ResidualBlock(features) for _ in range(blocks)))
        self.fuse = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.BatchNorm2d(features)
        )
        upsample: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            upsample += [
                nn.Conv2d(features, features * 4, 3, padding=1),
                nn.PixelShuffle(2),
                nn.PReLU(),
            ]
        self.upsample = nn.Sequential(*upsample)
        self.tail = nn.Conv2d(features, 3, 9, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head(x)
        features = head + self.fuse(self.blocks(head))
        return self.tail(self.upsample(features))


def build() -> nn.Module:
    """The paper's x4 SRResNet."""
    return SRResNet()


def example_inputs() -> tuple[torch.Tensor]:
    """One 32x32 RGB low-resolution patch, seeded for reproducibility."""
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, 32, 32, generator=generator),)
