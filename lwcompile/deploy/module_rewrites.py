"""Exact rewrites of a model at module level, for eager PyTorch and ONNX (``emit_fast``).

Each finds its pattern among modules or in a GraphModule's graph and rebuilds it from
``identities``, where the arithmetic is written once; ``concat_sinking`` holds the concat
rewrites. The model is changed in place: callers work on a copy.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..nn import LIST, DenseLIST, FusedLIST, Resize, ThinConvPhases
from ..tracing.fx_helpers import ThreadConfinedTracer
from . import identities


def swap_modules(model: nn.Module,
                 replacement_for: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put ``replacement_for(child)`` in place of every submodule of ``model`` (not ``model``
    itself) for which it is not None; return how many were replaced."""
    done = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            replacement = replacement_for(child)
            if replacement is not None:
                setattr(parent, name, replacement)
                done += 1
    return done


def merge_lists(model: nn.Module) -> nn.Module:
    """Replace every LIST in ``model`` (in place) by the equivalent FusedLIST."""
    if isinstance(model, LIST):
        return FusedLIST(model)
    swap_modules(model, lambda m: FusedLIST(m) if isinstance(m, LIST) else None)
    return model


def on_phases(conv: nn.Conv2d, r: int = identities.PHASES) -> ThinConvPhases:
    """``conv`` (a "same" kxk conv) computed on its r x r pixel phases."""
    weight, padding = identities.strided_phase_weight(conv.weight.detach(), r)
    bias = None if conv.bias is None else conv.bias.detach()
    return ThinConvPhases(weight, identities.phase_bias(bias, r), r, padding)


def _thin(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and identities.thin_conv(conv.out_channels, conv.kernel_size, conv.padding,
                                     conv.stride, conv.dilation, conv.groups))


def thin_convs_on_phases(model: nn.Module) -> int:
    """Replace (in place) every thin large-kernel conv in ``model`` by its ThinConvPhases."""
    return swap_modules(model, lambda m: on_phases(m) if _thin(m) else None)


def as_depthwise_sum(conv: nn.Conv2d) -> nn.Sequential:
    """``conv`` (one output channel) as a depthwise conv and a 1x1 conv summing channels."""
    depthwise_weight, sum_weight = identities.depthwise_sum(conv.weight)
    channels = conv.in_channels
    depthwise = nn.Conv2d(channels, channels, conv.kernel_size, padding=conv.padding,
                          padding_mode=conv.padding_mode, groups=channels, bias=False)
    total = nn.Conv2d(channels, 1, 1, bias=conv.bias is not None)
    with torch.no_grad():
        depthwise.weight.copy_(depthwise_weight)
        total.weight.copy_(sum_weight)
        if conv.bias is not None:
            total.bias.copy_(conv.bias)
    return nn.Sequential(depthwise, total).to(conv.weight.device, conv.weight.dtype)


def _single_output(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d
            and identities.single_output_conv(conv.in_channels, conv.out_channels,
                                              conv.kernel_size, conv.stride, conv.dilation,
                                              conv.groups))


def single_output_convs_as_depthwise_sum(model: nn.Module) -> int:
    """Replace (in place) every conv of ``model`` writing one channel from many by a
    depthwise conv and a channel sum (``identities.depthwise_sum``)."""
    return swap_modules(model, lambda m: as_depthwise_sum(m) if _single_output(m) else None)


def onnxruntime_forms(model: nn.Module) -> Counter[str]:
    """Forms onnxruntime runs faster, in place; the rewrites done, per kind.

    ``prelu-as-leaky-relu``: a PReLU with one slope is a LeakyReLU with that slope;
    onnxruntime fuses LeakyRelu into the conv before it, while it runs PRelu as a pass of
    its own with layout reorders around it. Kept to ONNX export, where that fusion is.
    """
    leaky = swap_modules(model, lambda m: nn.LeakyReLU(float(m.weight.detach()))
                         if isinstance(m, nn.PReLU) and m.num_parameters == 1 else None)
    return +Counter({"prelu-as-leaky-relu": leaky})


class _OneLevel(ThreadConfinedTracer):
    """Traces a module's own forward only: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def inline_modules(gm: fx.GraphModule, kinds: tuple[type, ...]) -> fx.GraphModule:
    """Splice the forward of every ``call_module`` node of exactly these types into ``gm``,
    repeatedly (a Sequential holding a FusedLIST is inlined, then the FusedLIST): each
    intermediate is then freed right after its last use, and the rewrites below can see
    inside them. The modules stay in place as containers of the submodules their nodes now
    call."""
    def inlinable(node: fx.Node) -> bool:
        return node.op == "call_module" and type(gm.get_submodule(node.target)) in kinds

    while todo := [n for n in gm.graph.nodes if inlinable(n)]:
        for node in todo:
            inner = _OneLevel().trace(gm.get_submodule(node.target))
            inputs = iter(node.args)
            env: dict[fx.Node, Any] = {}
            with gm.graph.inserting_before(node):
                for n in inner.nodes:
                    if n.op == "placeholder":
                        env[n] = next(inputs)
                    elif n.op == "output":
                        node.replace_all_uses_with(fx.map_arg(n.args[0], env.__getitem__))
                    else:
                        env[n] = gm.graph.node_copy(n, env.__getitem__)
                        if n.op in ("call_module", "get_attr"):
                            env[n].target = f"{node.target}.{n.target}"
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _upsamples(module: nn.Module) -> bool:
    """An upsampling module whose interpolation weights sum to one."""
    if isinstance(module, Resize):  # bilinear
        return module.kind != "conv" and min(module.stride) > 1
    if isinstance(module, nn.Upsample) and module.mode in identities.COMMUTING_UPSAMPLE_MODES:
        scale = module.scale_factor
        return scale is not None and min(scale if isinstance(scale, tuple) else (scale,)) > 1
    return False


def _pointwise(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1)
            and module.stride == (1, 1) and module.padding == (0, 0))


def pointwise_before_upsampling(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``conv1x1(upsample(x))`` as ``upsample(conv1x1(x))`` (in place): the conv
    runs at the low resolution and the upsample moves its (often fewer) channels."""
    for conv_node in list(gm.graph.nodes):
        if conv_node.op != "call_module" or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        up_node = conv_node.args[0]
        if not (_pointwise(gm.get_submodule(conv_node.target))
                and isinstance(up_node, fx.Node) and up_node.op == "call_module"
                and len(up_node.users) == 1 and len(up_node.args) == 1
                and not up_node.kwargs and _upsamples(gm.get_submodule(up_node.target))):
            continue
        conv_node.args = up_node.args
        with gm.graph.inserting_after(conv_node):
            upsampled = gm.graph.call_module(up_node.target, (conv_node,))
        conv_node.replace_all_uses_with(
            upsampled, delete_user_cb=lambda user, new=upsampled: user is not new)
        gm.graph.erase_node(up_node)
    gm.recompile()
    return gm


def _foldable(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def _stats(bn: nn.BatchNorm2d) -> identities.BatchNormStats:
    def get(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return identities.BatchNormStats(bn.running_mean, bn.running_var, bn.eps,
                                     get(bn.weight), get(bn.bias))


def _set_weights(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    trainable = conv.weight.requires_grad
    conv.weight = nn.Parameter(weight, trainable)
    conv.bias = nn.Parameter(bias, trainable)


def fold_bn_into(module: nn.Module, bn: nn.BatchNorm2d) -> nn.Module | None:
    """``module`` followed by ``bn`` (eval) as one new module, or None if that is not exact."""
    if module.training:
        return None
    convs: list[nn.Module]
    fused = copy.deepcopy(module)
    if type(module) is nn.Conv2d or (type(module) is nn.ConvTranspose2d
                                     and module.groups == 1):
        convs = [fused]
    elif isinstance(module, FusedLIST):
        convs = [fused.pointwise]
    elif isinstance(module, DenseLIST):
        convs = [fused.conv]
    elif isinstance(module, LIST):  # LIST's output channels: [1x1 branch | spatial branch]
        convs = [fused.pointwise_branch, fused.spatial_branch[1]]
    else:
        return None
    if len(convs) == 1:
        transpose = type(module) is nn.ConvTranspose2d
        w, b = convs[0].weight.detach(), convs[0].bias
        _set_weights(convs[0], *identities.fold_bn(
            w, None if b is None else b.detach(), _stats(bn), transpose=transpose))
        return fused
    folded = identities.fold_bn_into_parts(
        [(c.weight.detach(), c.bias.detach()) for c in convs], _stats(bn))
    for conv, (w, b) in zip(convs, folded, strict=True):
        _set_weights(conv, w, b)
    return fused


def fold_batchnorm(model: nn.Module, example_inputs: Sequence[Any]) -> nn.Module:
    """Fold eval BatchNorms into the conv (or LIST) right before them, in place.

    In GraphModules: a BN node whose input is a call_module node read by nothing else. In an
    ``nn.Sequential`` that runs as such: a BN right after a conv. Both modules must be
    reachable under one name only and run exactly as often as their container on
    ``example_inputs`` (so no other code calls them: folding would change that use).
    """
    calls = _call_counts(model, tuple(example_inputs))
    aliases = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def only_here(container: nn.Module, *modules: nn.Module) -> bool:
        return all(aliases[id(m)] == 1 and calls[id(m)] == calls[id(container)] > 0
                   for m in modules)

    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            bn, producer = gm.get_submodule(node.target), node.args[0]
            if not (_foldable(bn) and isinstance(producer, fx.Node)
                    and producer.op == "call_module" and len(producer.users) == 1):
                continue
            module = gm.get_submodule(producer.target)
            fused = fold_bn_into(module, bn) if only_here(gm, module, bn) else None
            if fused is not None:
                _set_submodule(gm, producer.target, fused)
                node.replace_all_uses_with(producer)
                gm.graph.erase_node(node)
                _set_submodule(gm, node.target, nn.Identity())  # Sequential indices stay
        gm.recompile()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            producer, bn = seq[i], seq[i + 1]
            fused = (fold_bn_into(producer, bn)
                     if _foldable(bn) and only_here(seq, producer, bn) else None)
            if fused is not None:
                seq[i], seq[i + 1] = fused, nn.Identity()
    return model


def _call_counts(model: nn.Module, args: tuple) -> Counter:
    """How often each module (by id) runs in one forward on ``args``."""
    calls: Counter = Counter()
    handles = [m.register_forward_pre_hook(lambda m, _a: calls.update([id(m)]))
               for m in model.modules()]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return calls


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
