"""Equivalent module forms that onnxruntime runs faster; used by ``export_onnx``.

Measured on the light SRResNet x4 (1x3x128x128, 2 threads, onnxruntime's per-node profile),
two things cost far more than their arithmetic:

- ``prelu-as-leaky-relu``: a PReLU with one slope is a LeakyReLU with that slope. onnxruntime
  fuses LeakyRelu into the conv before it; PRelu it runs as its own pass over memory, with
  layout reorders around it (PRelu plus its reorders were 60 of 208 ms).
- ``thin-conv-phases``: a large-kernel (k >= 9) "same" conv writing at most 4 channels
  (SRResNet's 9x9 output conv) is computed on the r x r pixel phases, as ``export_mobile``
  does for XNNPACK (``mobile_forms.phase_weight``), here by one stride-r conv: onnxruntime
  pads such a conv's 3 output channels to a block of 8, and the phase form writes 48 (the
  light tail alone took 88 of 208 ms). The input is zero-padded to a multiple of r and the
  output cropped, which is exact for zero padding, so height and width stay free.

Both apply to any model, the original included, so speed-ups compare like with like.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .mobile_forms import phase_weight

PHASES = 4
MIN_KERNEL = 9
MAX_OUT_CHANNELS = 4


class ThinConvPhases(nn.Module):
    """A "same" kxk conv with few output channels, computed on ``r * r`` pixel phases.

    One stride-r conv computes all r * r phases of each r x r output cell (C_out r^2
    channels), and ``pixel_shuffle`` puts them in place. Its kernel, (2d + 1) r wide, is
    ``phase_weight``'s (the conv between ``pixel_unshuffle`` and ``pixel_shuffle``) with the
    unshuffle folded in: that saves the unshuffle's transpose, which onnxruntime runs as a
    full copy of the input (ThinConvPhases on 16 -> 3 channels at 512x512: 32 ms, against
    54-69 ms with the unshuffle and 89-96 ms for the plain 9x9 conv).
    """

    def __init__(self, conv: nn.Conv2d, r: int = PHASES) -> None:
        super().__init__()
        phased, reach = phase_weight(conv.weight.detach(), r)
        c_out, c_in, taps = phased.shape[0], conv.in_channels, phased.shape[-1]
        # phased[o, c r^2 + alpha r + beta, di, dj] -> weight[o, c, r di + alpha, r dj + beta]
        weight = (phased.view(c_out, c_in, r, r, taps, taps).permute(0, 1, 4, 2, 5, 3)
                  .reshape(c_out, c_in, taps * r, taps * r))
        self.r = r
        self.conv = nn.Conv2d(c_in, c_out, taps * r, stride=r, padding=reach * r,
                              bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.repeat_interleave(r * r))
        self.conv.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # zero rows and columns past the edge are what the conv's own zero padding reads
        x = F.pad(x, (0, (-w) % self.r, 0, (-h) % self.r))
        return F.pixel_shuffle(self.conv(x), self.r)[..., :h, :w]


def _thin(conv: nn.Conv2d) -> bool:
    k_h, k_w = conv.kernel_size
    return (type(conv) is nn.Conv2d and conv.out_channels <= MAX_OUT_CHANNELS
            and k_h == k_w >= MIN_KERNEL and conv.padding == (k_h // 2, k_w // 2)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def onnxruntime_forms(model: nn.Module) -> Counter[str]:
    """Rewrite ``model`` (an eval copy) in place; return the rewrites done, per kind."""
    done: Counter[str] = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.PReLU) and child.num_parameters == 1:
                setattr(parent, name, nn.LeakyReLU(float(child.weight.detach())))
                done["prelu-as-leaky-relu"] += 1
            elif isinstance(child, nn.Conv2d) and _thin(child):
                setattr(parent, name, ThinConvPhases(child))
                done["thin-conv-phases"] += 1
    return +done
