"""Sink channel concats into the convs that read them, so they are never materialised.

A LIST ends in ``cat([a, b])``; in a plain chain of LISTs (DnCNN) the next thing that reads
it, through an activation, is the next LIST's 1x1 squeeze. The copy into the concatenated
tensor is pure memory traffic, and light models are memory-bound. The identities of
``identities`` push a concat down the module-level graph until it disappears:

- an elementwise activation of a concat is the concat of the activations (a per-channel
  PReLU splits its slopes by part);
- a conv with one group per equal concat part is the concat of per-part convs;
- a dense conv of a concat is the sum of convs of its parts, where that pays off
  (``identities.sum_of_parts_pays_off``: a squeezing conv, not a widening one).

Only a concat with a single reader is sunk (otherwise the concat would still be needed).
This is the module-level adapter (``emit_fast``, ONNX), where the new convs are ordinary
``nn.Conv2d`` submodules; ``aten_rewrites`` applies the same identities to the ATen graph
that ExecuTorch lowers.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..tracing.fx_helpers import channel_concat_parts, node_shape
from ..tracing.trace import ShapeRecorder
from . import identities

#: activations that act on every element alone, as modules and as functions
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.GELU, nn.Hardswish, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, torch.tanh,
                          torch.nn.functional.leaky_relu, torch.nn.functional.silu}


def _elementwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    if len(node.all_input_nodes) != 1 or node.kwargs.get("inplace"):
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, _ELEMENTWISE_MODULES) and not getattr(module, "inplace", False)
    return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS


def _prelu_parts(gm: fx.GraphModule, node: fx.Node, sizes: list[int]) -> list[str] | None:
    """Targets of one PReLU per concat part: the module itself when its slope is shared,
    else new PReLUs holding each part's slice of the per-channel slopes."""
    prelu = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(prelu, nn.PReLU) or prelu.num_parameters not in (1, sum(sizes)):
        return None
    if prelu.num_parameters == 1:
        return [node.target] * len(sizes)
    targets = []
    for i, slopes in enumerate(identities.split_per_channel(prelu.weight.detach(), sizes)):
        part = nn.PReLU(slopes.numel()).to(slopes.device, slopes.dtype)
        with torch.no_grad():
            part.weight.copy_(slopes)
        targets.append(f"{node.target.replace('.', '_')}_part{i}")
        gm.add_submodule(targets[-1], part.train(prelu.training))
    return targets


def _conv_like(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A dense conv with ``conv``'s geometry and the given weight and bias."""
    part = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, bias=bias is not None,
                     padding_mode=conv.padding_mode)
    with torch.no_grad():
        part.weight.copy_(weight)
        if bias is not None:
            part.bias.copy_(bias)
    return part.to(conv.weight.device, conv.weight.dtype).train(conv.training)


def _conv_parts(conv: nn.Module, cat: fx.Node, out: fx.Node,
                sizes: list[int]) -> tuple[list[tuple[Tensor, Tensor | None]], bool] | None:
    """Per-part weights of ``conv`` over ``cat`` and whether their outputs are summed (a
    dense conv) rather than concatenated (one group per part); None where neither holds
    or the sum does not pay off."""
    if type(conv) is not nn.Conv2d:
        return None
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    if conv.groups == len(sizes) > 1 and len(set(sizes)) == 1:
        return identities.split_groups(weight, bias, conv.groups), False
    shapes = node_shape(cat), node_shape(out)
    if conv.groups != 1 or None in shapes or not identities.sum_of_parts_pays_off(
            shapes[0].numel(), shapes[1].numel(), len(sizes)):
        return None
    return identities.split_inputs(weight, bias, sizes), True


def _sink_once(gm: fx.GraphModule, cat: fx.Node, parts: list[fx.Node]) -> bool:
    """Push ``cat`` through its single reader; True if the graph changed."""
    sizes = [node_shape(p)[1] for p in parts]
    if len(cat.users) != 1:
        return False
    user = next(iter(cat.users))
    if user.args[:1] != (cat,):
        return False
    graph = gm.graph
    prelus = _prelu_parts(gm, user, sizes) if len(user.args) == 1 else None
    if _elementwise(gm, user) or prelus is not None:
        with graph.inserting_before(user):
            mapped = [graph.node_copy(user, lambda n, p=p: p if n is cat else n) for p in parts]
            for i, (new, size) in enumerate(zip(mapped, sizes, strict=True)):
                new.meta = {"tensor_meta": _with_channels(cat, size)}
                if prelus is not None:
                    new.target = prelus[i]
            new_cat = graph.call_function(torch.cat, (mapped, 1))
    elif user.op == "call_module" and len(user.args) == 1 and not user.kwargs and (
            split := _conv_parts(conv := gm.get_submodule(user.target), cat, user, sizes)):
        terms, summed = split
        with graph.inserting_before(user):
            mapped = []
            for i, (part, (weight, bias)) in enumerate(zip(parts, terms, strict=True)):
                name = f"{user.target.replace('.', '_')}_part{i}"
                gm.add_submodule(name, _conv_like(conv, weight, bias))
                mapped.append(graph.call_module(name, (part,)))
                mapped[-1].meta = {"tensor_meta": _with_channels(user, weight.shape[0])}
            if summed:
                new_cat = mapped[0]
                for term in mapped[1:]:
                    new_cat = graph.call_function(operator.add, (new_cat, term))
            else:
                new_cat = graph.call_function(torch.cat, (mapped, 1))
    else:
        return False
    new_cat.meta = dict(user.meta)
    user.replace_all_uses_with(new_cat)
    graph.erase_node(user)
    graph.erase_node(cat)
    return True


def _with_channels(like: fx.Node, channels: int) -> Any:
    meta = like.meta["tensor_meta"]
    return type(meta)(torch.Size([meta.shape[0], channels, *meta.shape[2:]]), meta.dtype)


def sink_concats(gm: fx.GraphModule, example_inputs: tuple) -> int:
    """Sink every channel concat of ``gm`` as far as it goes (in place); how many steps."""
    ShapeRecorder(gm).run(*example_inputs)
    steps = 0
    while changed := [n for n in list(gm.graph.nodes)
                      if (parts := channel_concat_parts(n)) is not None
                      and _sink_once(gm, n, parts)]:
        steps += len(changed)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return steps
