"""Sink channel concats into the 1x1 convs that read them, so they are never materialised.

A LIST ends in ``cat([a, b])``; in a plain chain of LISTs (DnCNN) the next thing that reads
it, through an activation, is the next LIST's 1x1 squeeze. The copy into the concatenated
tensor is pure memory traffic, and light models are memory-bound. Three exact identities
push a concat down the graph until it disappears:

- an elementwise activation of a concat is the concat of the activations (a per-channel
  PReLU splits its slopes by part);
- a 1x1 conv with one group per concat part is the concat of per-part 1x1 convs;
- a dense 1x1 conv of a concat is the sum of 1x1 convs of its parts (the weight's column
  blocks), the bias added once.

Only a concat with a single reader is sunk (otherwise the concat would still be needed),
and every step keeps the function, value for value up to float rounding.

``lwcompile.mobile_forms`` applies the same identities to the ATen graph that ExecuTorch
lowers; this module works on the module-level graph that eager PyTorch runs (``emit_fast``),
where the new 1x1 convs stay ordinary ``nn.Conv2d`` submodules.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..tracing.trace import ShapeRecorder

#: activations that act on every element alone, as modules and as functions
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                        nn.GELU, nn.Hardswish, nn.Identity)
_ELEMENTWISE_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.sigmoid, torch.tanh,
                          torch.nn.functional.leaky_relu, torch.nn.functional.silu}


def _is_channel_cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim in (1, -3) and isinstance(node.args[0], (list, tuple))


def _channels(node: Any) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return None if meta is None or len(meta.shape) != 4 else int(meta.shape[1])


def _pointwise_conv(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1)
            and module.stride == (1, 1) and module.padding == (0, 0)
            and module.dilation == (1, 1))


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
    if not isinstance(prelu, nn.PReLU):
        return None
    if prelu.num_parameters == 1:
        return [node.target] * len(sizes)
    if prelu.num_parameters != sum(sizes):
        return None
    targets, start = [], 0
    for i, size in enumerate(sizes):
        part = nn.PReLU(size).to(prelu.weight.device, prelu.weight.dtype)
        with torch.no_grad():
            part.weight.copy_(prelu.weight[start:start + size])
        start += size
        targets.append(f"{node.target.replace('.', '_')}_part{i}")
        gm.add_submodule(targets[-1], part.train(prelu.training))
    return targets


def _conv_slice(conv: nn.Conv2d, inputs: slice, outputs: slice, bias: bool) -> nn.Conv2d:
    weight = conv.weight[outputs, inputs] if conv.groups == 1 else conv.weight[outputs]
    part = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=bias and conv.bias is not None)
    with torch.no_grad():
        part.weight.copy_(weight)
        if part.bias is not None:
            part.bias.copy_(conv.bias[outputs])
    return part.to(conv.weight.device, conv.weight.dtype).train(conv.training)


def _sink_once(gm: fx.GraphModule, cat: fx.Node) -> bool:
    """Push ``cat`` through its single reader; True if the graph changed."""
    parts = list(cat.args[0])
    sizes = [_channels(p) for p in parts]
    if len(cat.users) != 1 or None in sizes:
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
    elif user.op == "call_module" and _pointwise_conv(conv := gm.get_submodule(user.target)):
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        if conv.groups == len(parts) and len(set(sizes)) == 1:
            step = conv.out_channels // conv.groups
            outs = [slice(i * step, (i + 1) * step) for i in range(len(parts))]
            ins = [slice(None)] * len(parts)
        elif conv.groups == 1:
            outs = [slice(None)] * len(parts)
            ins = [slice(bounds[i], bounds[i + 1]) for i in range(len(parts))]
        else:
            return False
        with graph.inserting_before(user):
            mapped = []
            for i, part in enumerate(parts):
                name = f"{user.target.replace('.', '_')}_part{i}"
                gm.add_submodule(name, _conv_slice(conv, ins[i], outs[i],
                                                   bias=conv.groups > 1 or i == 0))
                mapped.append(graph.call_module(name, (part,)))
                out = conv.out_channels // conv.groups if conv.groups > 1 else conv.out_channels
                mapped[-1].meta = {"tensor_meta": _with_channels(cat, out)}
            if conv.groups > 1:
                new_cat = graph.call_function(torch.cat, (mapped, 1))
            else:
                new_cat = mapped[0]
                for term in mapped[1:]:
                    new_cat = graph.call_function(operator.add, (new_cat, term))
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
    while changed := [n for n in list(gm.graph.nodes) if _is_channel_cat(n)
                      and _sink_once(gm, n)]:
        steps += len(changed)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return steps
