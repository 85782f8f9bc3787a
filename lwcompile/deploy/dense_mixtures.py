"""A mixture of experts that picks its experts in Python, deployed as one that runs every
expert and weighs the unpicked ones by zero.

SeemoRe's ``MoELayer`` takes the top k of its router's softmax per image and calls only
those experts (``[self.experts[i] for i in topk_experts.squeeze(0)]``): Python reads the
router's values, which no exporter can write down. torch.export (and so ExecuTorch) stops
there, and a TorchScript trace keeps the example's pick, so ``export_onnx`` refuses it too.
Running every expert with a gate that is zero for the unpicked ones adds the same products
(an added exact zero changes no value; with k > 1 they are summed in expert order, not in
pick order), so the deployed form computes what the model does, and the pick is made by
tensor ops an exporter records. The price is that every expert runs.

Recognised by class name and the attributes the rewrite relies on, as
``compiler.folding`` recognises SPAN's blocks: lwcompile imports no model library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .module_rewrites import swap_modules


class DenseMixture(nn.Module):
    """``inputs`` plus every expert's output weighted by its gate: the router's softmax
    weight for the top ``k`` experts, zero for the others."""

    def __init__(self, experts: nn.ModuleList, router: nn.Module, k: int) -> None:
        super().__init__()
        self.experts, self.router, self.k = experts, router, k

    def forward(self, inputs: Tensor, *expert_args: Tensor) -> Tensor:
        weights = F.softmax(self.router(inputs), dim=1, dtype=torch.float).to(inputs.dtype)
        top, picked = torch.topk(weights, self.k)
        gates = torch.zeros_like(weights).scatter(1, picked, top)
        out = inputs.clone()
        for i, expert in enumerate(self.experts):
            out = out + expert(inputs, *expert_args) * gates[:, i:i + 1, None, None]
        return out


def dense_mixtures(model: nn.Module) -> int:
    """Put a ``DenseMixture`` in place of every eval-mode ``MoELayer`` in ``model`` (in
    place; callers work on a copy); return how many."""
    return swap_modules(model, _dense)


def _dense(module: nn.Module) -> DenseMixture | None:
    experts, router, k = (getattr(module, name, None) for name in ("experts", "gate",
                                                                    "num_expert"))
    if type(module).__name__ != "MoELayer" or module.training \
            or not isinstance(experts, nn.ModuleList) or not isinstance(router, nn.Module) \
            or not isinstance(k, int) or not 0 < k <= len(experts):
        return None
    return DenseMixture(experts, router, k)
