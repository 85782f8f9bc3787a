"""Fitting a replacement to the teacher's *output*, not only to its own layer's.

A light replacement cannot reproduce a dense layer exactly: each fit leaves an error of a
few percent. Fitted to the layer's own output, that error lands in whatever directions the
least-squares fit finds cheapest, and fifteen of them in a row (DnCNN) leave nothing of the
fine residual the network exists to predict. What matters is the error the rest of the
network passes to the image.

Algorithm: the replacements fitted so far are *plugged* into the teacher (each swapped in for
the teacher layer it replaces, and swapped back out afterwards), so the teacher runs
as the student up to the current site and as itself after it. The current replacement then
takes Adam steps on the mean squared error between that hybrid's output and the teacher's
own, on calibration inputs, with every other weight frozen. The last sites are thereby
fitted to what the student will actually output; earlier ones to the error the teacher's
downstream layers turn into image error. It is block-wise reconstruction weighted by output
sensitivity (as post-training quantisation does), computed exactly through the frozen
teacher rather than approximated.

Channel orders: where layer-wise fitting permuted a replacement's output channels (and the
student's downstream modules with them), the plug maps them back to the teacher's order, and
a replacement whose input channels were permuted gets its input in that order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..measure.snapshot import eval_mode
from .fitting import adam_steps


@dataclass(frozen=True)
class Plug:
    """A replacement standing in for a teacher layer inside the teacher."""

    replacement: nn.Module
    #: the replacement reads its input channels in this order (None: the teacher's)
    input_order: Tensor | None = None
    #: the replacement's output channel j is the teacher's channel ``output_order[j]``
    output_order: Tensor | None = None


class _Plugged(nn.Module):
    """What sits in the teacher in place of a replaced layer while plugged: the replacement,
    with the channel orders mapped to the teacher's."""

    def __init__(self, plug: Plug) -> None:
        super().__init__()
        self.replacement = plug.replacement
        self.input_order = plug.input_order
        self.inverse = None if plug.output_order is None else torch.argsort(plug.output_order)

    def forward(self, x: Tensor, *rest: object) -> Tensor:
        if self.input_order is not None:
            x = x[:, self.input_order]
        y = self.replacement(x, *rest)
        return y if self.inverse is None else y[:, self.inverse]


@contextlib.contextmanager
def plugged(teacher: nn.Module, plugs: dict[str, Plug], trained: nn.Module | None = None
            ) -> Iterator[None]:
    """Run ``teacher`` with each named layer's output replaced by its plug's; no gradient
    is kept for any weight but ``trained``'s (the teacher's and the other plugs' are
    frozen meanwhile)."""
    # swapped in, not hooked: a hook would still run the dense layer it replaces
    originals = {site: teacher.get_submodule(site) for site in plugs}
    for site, plug in plugs.items():
        teacher.set_submodule(site, _Plugged(plug))
    keep = {id(p) for p in trained.parameters()} if trained is not None else set()
    # the plugs' replacements are inside the teacher now
    frozen = [p for p in teacher.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for site, original in originals.items():
            teacher.set_submodule(site, original)


def fit_to_output(teacher: nn.Module, plugs: dict[str, Plug], site: str, inputs: Tensor,
                  target: Tensor, steps: int, lr: float, amp: torch.dtype | None) -> None:
    """``steps`` Adam steps on the parameters of ``plugs[site]``'s replacement so that the
    teacher with ``plugs`` maps ``inputs`` to ``target`` (the teacher's own output). All in
    eval mode, as the student will run: BatchNorms use their statistics."""
    replacement = plugs[site].replacement
    with eval_mode(teacher, replacement), plugged(teacher, plugs, trained=replacement):
        adam_steps(teacher, replacement.parameters(), inputs, target, steps, lr, amp)
