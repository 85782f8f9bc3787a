"""A small restoration U-Net (after Ronneberger et al., MICCAI 2015) with concat skips.

The example for encoder-decoder graphs: channel concatenations, pooling and transposed-conv
upsampling, with a global residual so the network predicts a correction to its input.
"""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two conv3x3 + ReLU, the unit of every U-Net level."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(),
    )


class UpBlock(nn.Module):
    """Upsample x2, concatenate the skip, fuse back to ``out_channels`` with a 1x1, refine."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.fuse = nn.Conv2d(2 * out_channels, out_channels, 1)
        self.conv = _double_conv(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(self.fuse(torch.cat([self.up(x), skip], dim=1)))


class UNet(nn.Module):
    """Three-level U-Net (widths 32/64/128, bottleneck 256); 1,775,363 parameters by default.

    Height and width must be multiples of 8 (three 2x2 poolings). Output = input + residual.
    """

    def __init__(self, channels: int = 3, base: int = 32) -> None:
        super().__init__()
        widths = [base, 2 * base, 4 * base]
        self.enc1 = _double_conv(channels, widths[0])
        self.enc2 = _double_conv(widths[0], widths[1])
        self.enc3 = _double_conv(widths[1], widths[2])
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(widths[2], 8 * base)
        self.up3 = UpBlock(8 * base, widths[2])
        self.up2 = UpBlock(widths[2], widths[1])
        self.up1 = UpBlock(widths[1], widths[0])
        self.out = nn.Conv2d(widths[0], channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        s3 = self.enc3(self.pool(s2))
        y = self.bottleneck(self.pool(s3))
        y = self.up3(y, s3)
        y = self.up2(y, s2)
        y = self.up1(y, s1)
        return x + self.out(y)


def build() -> nn.Module:
    """The default RGB U-Net with base width 32."""
    return UNet()


def example_inputs() -> tuple[torch.Tensor]:
    """One seeded 64x64 RGB patch."""
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, 64, 64, generator=generator),)
