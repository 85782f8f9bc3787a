"""Small lightened versions of the four reference networks, built once per test session.

Shared by the deployment tests (lighten is the slow part): import it as
``from tests.lightened import ...`` so that every file shares one cache. BatchNorm statistics
are randomised first: with the init values (mean 0, var 1) a wrong fold would go unnoticed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

import lwcompile
from examples import dncnn, glcic, srresnet, unet
from tests.helpers import image_and_mask

NAMES = ["dncnn", "srresnet", "glcic", "unet"]


def _images(*shapes: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(s, generator=g) for s in shapes)


#: name -> (builder, example inputs, inputs of another size)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple, tuple]] = {
    "dncnn": (lambda: dncnn.DnCNN(features=32, depth=5), _images((1, 1, 32, 32)),
              _images((1, 1, 40, 24), seed=1)),
    "srresnet": (lambda: srresnet.SRResNet(scale=4, features=32, blocks=2),
                 _images((1, 3, 16, 16)), _images((1, 3, 20, 12), seed=1)),
    "glcic": (glcic.build, image_and_mask(32, 32), image_and_mask(40, 24)),
    "unet": (lambda: unet.UNet(base=16), _images((1, 3, 32, 32)), _images((1, 3, 40, 24),
                                                                          seed=1)),
}


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                n = bn.num_features
                bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
                bn.weight.copy_(0.5 + torch.rand(n, generator=g))
                bn.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


@functools.cache
def original(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise_batchnorm(CASES[name][0]()).eval()


@functools.cache
def light(name: str) -> nn.Module:
    return lwcompile.lighten(original(name), CASES[name][1])


def inputs(name: str) -> tuple:
    return CASES[name][1]


def other_inputs(name: str) -> tuple:
    return CASES[name][2]
