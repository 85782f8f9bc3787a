"""Intermediate-feature distillation: the student also matches the teacher inside, at the
boundary of every rewritten block, not only at the output.

A boundary is the end of a rewritten site's block (the replacement and the per-channel
modules after it, ``blocks.block_after``: in DnCNN the LIST, its BatchNorm and its ReLU),
paired with the same point in the teacher (the per-channel modules keep their names; a block
of the replacement alone pairs with the layer it replaced). The output of a module called
more than once in a forward is no boundary. Each boundary's loss is its squared error
relative to the teacher feature's mean square, so that blocks of any scale weigh alike; their
mean, times the ``features`` weight, is added to the output loss. With an output error near
zero from the start (after ``init_layerwise``), the boundary terms keep every block close to
the teacher's while the whole is trained, instead of letting errors be traded between blocks.

Channel orders: where ``init_layerwise`` permuted a block's output channels (and the
consumer's inputs with them, so the network computes the same), it records the order on the
student (``CHANNEL_ORDERS``); the teacher's feature is read in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .blocks import block_after

#: the student attribute where ``init_layerwise`` records, per replacement (by its name in the
#: student), the teacher channel each of its block's output channels holds
CHANNEL_ORDERS = "lwcompile_channel_orders"


@dataclass(frozen=True)
class Boundary:
    """One block end: the module ending it in the student and in the teacher."""

    name: str  # the replacement heading the block, in the student
    student: nn.Module
    teacher: nn.Module
    #: the student's channel j is the teacher's channel ``order[j]`` (None: the same)
    order: Tensor | None


def boundaries(student: nn.Module, teacher: nn.Module, sites: dict[str, str]
               ) -> list[Boundary]:
    """The boundary of each rewritten site's block (``sites``: teacher name -> name of the
    replacement in the student), in the order of ``sites``."""
    names = {id(m): n for n, m in student.named_modules()}
    orders = getattr(student, CHANNEL_ORDERS, None) or {}
    found = []
    for site, name in sites.items():
        chain = block_after(student, name).chain
        end = chain[-1] if chain else student.get_submodule(name)
        try:
            paired = teacher.get_submodule(names[id(end)] if chain else site)
        except AttributeError:
            continue
        order = orders.get(name)
        found.append(Boundary(name, end, paired,
                              None if order is None else torch.tensor(order)))
    return found


class Features:
    """Hooks that keep the outputs at the boundaries, in the student and the teacher, from
    every forward until ``clear``; ``close`` removes them."""

    def __init__(self, found: list[Boundary]) -> None:
        self.found = found
        self.student: dict[int, list[Tensor]] = {}
        self.teacher: dict[int, list[Tensor]] = {}
        self._handles = []
        for i, b in enumerate(found):
            self._handles.append(b.student.register_forward_hook(
                lambda _m, _a, out, i=i: self.student.setdefault(i, []).append(out)))
            self._handles.append(b.teacher.register_forward_hook(
                lambda _m, _a, out, i=i: self.teacher.setdefault(i, []).append(out.detach())))

    def clear(self) -> None:
        self.student.clear()
        self.teacher.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.clear()

    def loss(self) -> Tensor | None:
        """Mean over the boundaries seen once in both models, with one shape, of the squared
        error relative to the teacher's mean square; None where there are none."""
        terms = []
        for i, b in enumerate(self.found):
            mine, theirs = self.student.get(i, []), self.teacher.get(i, [])
            if len(mine) != 1 or len(theirs) != 1:
                continue
            s, t = mine[0].float(), theirs[0].float()
            if b.order is not None:
                t = t[:, b.order.to(t.device)]
            if s.shape != t.shape:
                continue
            terms.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        return torch.stack(terms).mean() if terms else None
