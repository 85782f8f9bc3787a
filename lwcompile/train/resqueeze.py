"""A LIST at another squeeze ratio, started from the LIST it replaces.

``tune(..., budget_ms=)`` changes LIST squeeze ratios to meet a latency budget. The new
LIST starts as close to the old one's function as its width allows:

- **Wider** (more squeezed channels): exact. The old squeeze rows and depthwise kernels are
  kept, the extra channels keep their fresh initialisation, and the two output 1x1 convs
  read them through zero weights: the function is unchanged, and training can grow the
  zero weights, since the extra channels carry signal.
- **Narrower**: fitted. The new squeeze projects the old squeezed features onto their
  leading principal components (measured on ``inputs``), each new depthwise kernel is the
  mix of the old ones with the squared loadings as weights, and the LIST fitting registered
  for ``init_layerwise`` (``train.fitting``: least squares for the two output 1x1 convs
  around Adam steps) fits the new LIST to the old one's output on ``inputs``.

A narrower LIST is a different function, so the model needs ``distill`` afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..nn import LIST
from .fitting import FitTask, fitting_for, relative_error


def with_ratio(old: LIST, ratio: int) -> LIST:
    """A freshly initialised LIST of ``old``'s shape at ``ratio``, on its device."""
    dw = old.spatial_branch[0]
    new = LIST(old.squeeze.in_channels, 2 * old.pointwise_branch.out_channels,
               dw.kernel_size[0], ratio, dw.padding_mode)
    return new.to(old.squeeze.weight.device).train(old.training)


@torch.no_grad()
def widened(old: LIST, ratio: int) -> LIST:
    """``old`` at a ratio with at least as many squeezed channels, the same function."""
    new = with_ratio(old, ratio)
    r = old.squeeze.out_channels
    if new.squeeze.out_channels < r:
        raise ValueError(f"ratio {ratio} squeezes to {new.squeeze.out_channels} channels, "
                         f"fewer than {r}")
    old_dw, new_dw = old.spatial_branch[0], new.spatial_branch[0]
    new.squeeze.weight[:r] = old.squeeze.weight
    new.squeeze.bias[:r] = old.squeeze.bias
    new_dw.weight[:r] = old_dw.weight
    new_dw.bias[:r] = old_dw.bias
    for new_head, old_head in ((new.pointwise_branch, old.pointwise_branch),
                               (new.spatial_branch[1], old.spatial_branch[1])):
        new_head.weight.zero_()
        new_head.weight[:, :r] = old_head.weight
        new_head.bias.copy_(old_head.bias)
    return new


def narrowed(old: LIST, ratio: int, inputs: Tensor, steps: int = 100) -> tuple[LIST, float]:
    """``old`` at a ratio with fewer squeezed channels, fitted to ``old`` on ``inputs``, and
    its relative error against ``old`` there (``fitting.relative_error``)."""
    new = with_ratio(old, ratio)
    width = new.squeeze.out_channels
    with torch.no_grad():
        squeezed = old.squeeze(inputs).transpose(0, 1).flatten(1).double()  # (r, pixels)
        centred = squeezed - squeezed.mean(1, keepdim=True)
        loadings = torch.linalg.eigh(centred @ centred.T).eigenvectors  # ascending
        top = loadings[:, -width:].flip(1).float()  # (r, width), leading component first
        new.squeeze.weight.copy_(torch.einsum("rw,rc->wc", top, old.squeeze.weight[..., 0, 0])
                                 [..., None, None])
        new.squeeze.bias.copy_(top.T @ old.squeeze.bias)
        old_dw, new_dw = old.spatial_branch[0], new.spatial_branch[0]
        mix = top.pow(2)  # each column sums to 1
        new_dw.weight.copy_(torch.einsum("rw,rkij->wkij", mix, old_dw.weight))
        new_dw.bias.copy_(mix.T @ old_dw.bias)
        target = old(inputs)
    fitting_for(new).fit(new, FitTask(inputs, target, original=old, steps=steps))
    return new, relative_error(new, inputs, target)
