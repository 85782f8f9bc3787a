"""An activation observer for pt2e that sets a tensor's int8 range from high percentiles of
its values instead of their extremes.

A handful of rare large activations (an edge, a noise spike) stretch a min/max range so far
that every other value falls on a few int8 levels; the histogram observer XNNPACK's
quantiser uses by default searches a range that minimises the squared quantisation error of
the calibration data, which on restoration networks still leaves most of that. Clipping the
top and bottom ``100 - percentile`` per cent (the same range onnxruntime's ``Percentile``
calibration gives) costs those few values and buys resolution for all the rest. Which of the
two is better depends on the model, so ``int8_xnnpack`` measures both.

Each calibration batch's percentiles are exact (``Tensor.kthvalue``, which, unlike
``torch.quantile``, has no size limit); the range is their mean over the batches seen, so
no batch's outliers decide it alone.

Imports torchao: import this module only where the ``mobile`` extra is installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchao.quantization.pt2e import MinMaxObserver


def percentile_range(x: Tensor, percentile: float) -> tuple[Tensor, Tensor]:
    """The ``100 - percentile`` and ``percentile`` per-cent points of ``x``'s values."""
    values = x.detach().float().flatten()
    n = values.numel()
    tail = round((100.0 - percentile) / 100.0 * n)
    low = values.kthvalue(max(1, tail)).values
    high = values.kthvalue(min(n, n - tail)).values
    return low, high


class PercentileObserver(MinMaxObserver):
    """``MinMaxObserver`` whose range is the mean over calibration batches of each batch's
    ``(100 - percentile, percentile)`` per-cent points."""

    def __init__(self, *args: Any, percentile: float = 99.95, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.register_buffer("batches", torch.tensor(0))

    def forward(self, x_orig: Tensor) -> Tensor:
        if x_orig.numel() == 0:
            return x_orig
        low, high = percentile_range(x_orig, self.percentile)
        seen = int(self.batches)
        if seen == 0:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.min_val.copy_((self.min_val * seen + low) / (seen + 1))
            self.max_val.copy_((self.max_val * seen + high) / (seen + 1))
        self.batches += 1
        return x_orig

    def reset_min_max_vals(self) -> None:
        super().reset_min_max_vals()
        self.batches.zero_()
