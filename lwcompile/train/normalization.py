"""BatchNorm running statistics re-estimated for the weights as they are.

During training a BatchNorm's running statistics trail the weights by an exponential average
of noisy small-batch estimates, so the model saved at the end (or at any step) can normalise
by statistics of weights it no longer has. Re-estimating them as a cumulative average over a
few batches with the weights frozen, as ``torch.optim.swa_utils.update_bn`` does, gives the
statistics of the current weights; ``init_layerwise`` and ``distill`` do it before every
validation and at the end.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from .device import autocast


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm that tracks running statistics."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


@torch.no_grad()
def update_bn_statistics(model: nn.Module, inputs: Iterable[Tensor], device: torch.device,
                         amp: torch.dtype | None = None) -> None:
    """Reset ``model``'s BatchNorm statistics and recompute them as the cumulative average over
    ``inputs`` (model inputs, moved to ``device``); the model's mode is left as it was."""
    if not has_batch_norm(model):
        return
    with autocast(device, amp):
        update_bn(inputs, model, device=device)
