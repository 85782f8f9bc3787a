"""Lightweight building blocks from Lahiri et al. (TCSVT 2021).

Plain ``nn.Module`` classes: they know nothing of the compiler, so users can also build
light networks by hand with them.
"""

from __future__ import annotations

import torch
from torch import nn


class LIST(nn.Module):
    """Drop-in for a dense kxk conv (stride 1): squeeze, then a 1x1 and a spatial branch.

    Squeezing to ``in_channels // squeeze_ratio`` first is where the savings come from; the
    depthwise kxk branch keeps the receptive field, the 1x1 branch keeps cheap channel mixing.
    All four convs carry a bias, as in the authors' reference code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        squeeze_ratio: int = 4,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if in_channels % squeeze_ratio or out_channels % 2 or kernel_size % 2 == 0:
            raise ValueError(
                f"LIST needs in_channels divisible by {squeeze_ratio}, even out_channels and an "
                f"odd kernel; got {in_channels}->{out_channels}, k={kernel_size}"
            )
        squeezed = in_channels // squeeze_ratio
        half = out_channels // 2
        self.squeeze = nn.Conv2d(in_channels, squeezed, 1)
        self.pointwise_branch = nn.Conv2d(squeezed, half, 1)
        self.spatial_branch = nn.Sequential(
            nn.Conv2d(
                squeezed, squeezed, kernel_size, padding=kernel_size // 2,
                groups=squeezed, padding_mode=padding_mode,
            ),
            nn.Conv2d(squeezed, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return torch.cat([self.pointwise_branch(squeezed), self.spatial_branch(squeezed)], dim=1)
