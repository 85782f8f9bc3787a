"""Completion network of Iizuka et al. (SIGGRAPH 2017), "Globally and Locally Consistent
Image Completion": the inpainting example.

It has two inputs (image and mask), strided convs, a run of dilated convs and transposed
convs, so the compiler must handle multi-input graphs, dilation and learned upsampling.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1
) -> list[nn.Module]:
    """Conv + BN + ReLU with 'same' padding (for stride 1)."""
    padding = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def _deconv(in_channels: int, out_channels: int) -> list[nn.Module]:
    """4x4 stride-2 transposed conv (doubles the size) + BN + ReLU."""
    return [
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class CompletionNetwork(nn.Module):
    """The GLCIC generator (table 1 of the paper); exactly 6,072,131 parameters.

    The hole is blanked out of the image and the mask is given as a fourth channel. Convs keep
    their bias. Spatial sizes are not multiples of 4 in general, so for odd inputs the output
    size may differ from the input (67x61 gives 68x64); we deliberately do not crop or pad.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            *_conv(4, 64, 5),
            *_conv(64, 128, 3, stride=2),
            *_conv(128, 128, 3),
            *_conv(128, 256, 3, stride=2),
            *_conv(256, 256, 3),
            *_conv(256, 256, 3),
        ]
        for dilation in (2, 4, 8, 16):
            layers += _conv(256, 256, 3, dilation=dilation)
        layers += [
            *_conv(256, 256, 3),
            *_conv(256, 256, 3),
            *_deconv(256, 128),
            *_conv(128, 128, 3),
            *_deconv(128, 64),
            *_conv(64, 32, 3),
            nn.Conv2d(32, 3, 3, padding=1),
            nn.Sigmoid(),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([image * (1 - mask), mask], dim=1))


def build() -> nn.Module:
    """The paper's completion network."""
    return CompletionNetwork()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded 64x64 RGB image and a mask with a 24x32 rectangular hole (ones = missing)."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=generator)
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 20:44, 16:48] = 1.0
    return image, mask
