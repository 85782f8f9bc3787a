"""DnCNN (Zhang et al., TIP 2017) and the hand-made cheap DnCNN of Lahiri et al. (TCSVT 2021).

DnCNN is the canonical restoration network for this project: a plain stack of dense 3x3
convs, so almost all of its parameters sit in layers the compiler can make lightweight.
"""

from __future__ import annotations

import torch
from torch import nn

from lwcompile.nn import LIST


class DnCNN(nn.Module):
    """Residual denoiser: ``body`` predicts the noise, ``forward`` subtracts it.

    Defaults (grey, 64 features, depth 17) give exactly 556,032 parameters:
    2 * 576 for the end convs + 15 * (36,864 conv + 128 BN) for the middle blocks.
    Convs carry no bias because each middle one feeds a BatchNorm, as in the paper.
    """

    def __init__(self, in_channels: int = 1, features: int = 64, depth: int = 17) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, features, 3, padding=1, bias=False),
            nn.ReLU(),
        ]
        for _ in range(depth - 2):
            layers += [
                nn.Conv2d(features, features, 3, padding=1, bias=False),
                nn.BatchNorm2d(features),
                nn.ReLU(),
            ]
        layers.append(nn.Conv2d(features, in_channels, 3, padding=1, bias=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def cheap_dncnn(in_channels: int = 1, features: int = 64, depth: int = 17) -> nn.Module:
    """The paper's hand-built light DnCNN: every middle conv becomes ``LIST(features, features)``.

    Kept as the target the compiler's output is compared against. With the defaults it has
    exactly 37,392 parameters: 2 * 576 + 15 * (2,288 LIST + 128 BN).
    """
    model = DnCNN(in_channels, features, depth)
    for i, layer in enumerate(model.body):
        # The first and last convs change the channel count and stay dense.
        if (
            isinstance(layer, nn.Conv2d)
            and layer.in_channels == features
            and layer.out_channels == features
        ):
            model.body[i] = LIST(features, features)
    return model


def build() -> nn.Module:
    """The default grey-scale DnCNN-S (17 layers, 64 features)."""
    return DnCNN()


def example_inputs() -> tuple[torch.Tensor]:
    """One 64x64 grey patch; seeded so that traces and tests are reproducible."""
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(1, 1, 64, 64, generator=generator),)
