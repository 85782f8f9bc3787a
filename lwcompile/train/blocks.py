"""What follows a rewritten site in the student's graph: the block it heads.

A replacement is rarely alone: in DnCNN each LIST feeds a BatchNorm and a ReLU. Layer-wise
initialisation fits the replacement together with those per-channel modules (the *block*),
since a BatchNorm that divides by a small running variance amplifies whatever error the
replacement leaves in that channel. The same walk finds the one conv that consumes the
block's output, where a permutation of the site's output channels can be undone exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from ..nn import LIST
from .fitting import PER_CHANNEL


@dataclass(frozen=True)
class Block:
    """The per-channel modules that alone read a site's output, in order (``chain``), and the
    module they all flow into (``consumer``) when that is a dense conv or a LIST, else None."""

    chain: tuple[nn.Module, ...]
    consumer: nn.Module | None


def block_after(student: nn.Module, site: str) -> Block:
    """The block headed by ``site`` in ``student``: the per-channel modules its output flows
    through alone (each a module called once, with that one input), and the conv or LIST they
    feed, if any. A site outside any fx graph, or called more than once, heads an empty
    block."""
    for prefix, gm in student.named_modules():
        if not isinstance(gm, fx.GraphModule) or (prefix and not site.startswith(prefix + ".")):
            continue
        name = site[len(prefix) + 1:] if prefix else site
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name),
                    None)
        if node is None or calls[name] != 1:
            continue
        chain: list[nn.Module] = []
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node.op != "call_module" or calls[node.target] != 1 \
                    or len(node.all_input_nodes) != 1:
                break
            module = gm.get_submodule(node.target)
            if isinstance(module, PER_CHANNEL):
                chain.append(module)
                continue
            if isinstance(module, LIST) or isinstance(module, nn.Conv2d) and module.groups == 1:
                return Block(tuple(chain), module)
            break
        return Block(tuple(chain), None)
    return Block((), None)


@torch.no_grad()
def permute_inputs(chain: tuple[nn.Module, ...] | list[nn.Module], consumer: nn.Module,
                   perm: Tensor) -> None:
    """Make ``chain`` and ``consumer`` read channel k as the channel ``perm[k]`` they expect."""
    permute_chain(chain, perm)
    conv = consumer.squeeze if isinstance(consumer, LIST) else consumer
    conv.weight.copy_(conv.weight[:, perm])


@torch.no_grad()
def permute_chain(chain: tuple[nn.Module, ...] | list[nn.Module], perm: Tensor) -> None:
    """Reorder the per-channel parameters and statistics of ``chain`` by ``perm``."""
    for m in chain:
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[perm.to(t.device)])
        elif isinstance(m, nn.PReLU) and m.weight.numel() > 1:
            m.weight.copy_(m.weight[perm.to(m.weight.device)])
