"""Emit the form of a (lightened) model that runs fastest on CPU, with the same outputs.

Each step is exact up to float rounding, and each was adopted only because it measured
faster (``python -m benchmarks.emit_forms``):

- ``merge_lists``: each LIST becomes a ``FusedLIST``: its two 1x1 convs are one grouped
  1x1 conv over ``cat([squeezed, depthwise(squeezed)])``, so the concat copies C/2 squeezed
  channels instead of the C output channels, and one conv call replaces two.
- ``inline_modules``: in a GraphModule, the ops of FusedLIST, GSAT and Sequential modules
  become graph nodes, so each intermediate is freed right after its last use (a LIST's
  input once squeezed) and the BN folds below can see inside them.
- ``pointwise_before_upsampling``: a bilinear upsample followed by a 1x1 conv (the
  squeeze of the LIST that replaced a transposed or sub-pixel conv) is run conv first.
  These two bring peak activation memory down to the dense model's or below.
- ``fold_batchnorm``: an eval BatchNorm right after a conv (or LIST, FusedLIST) whose output
  nothing else reads is folded into that conv's weights and removed.
- ``sink_concats`` (``lwcompile.concat_sinking``): a LIST's output concat is pushed through
  activations into the 1x1 convs that read them and vanishes. ``benchmarks.emit_forms``,
  light DnCNN-17 / GLCIC / U-Net at 256x256: channels_last 184 -> 129, 176 -> 139,
  55 -> 50 ms; exported to onnxruntime 80 -> 59, 113 -> 96, 30 -> 26 ms.
- ``thin_convs_on_phases``: a large-kernel (k >= 9) "same" conv writing at most 4 channels
  (SRResNet's 9x9 output conv) becomes a ``ThinConvPhases``: one stride-4 conv computing
  the 16 pixel phases, then a pixel shuffle. 16 -> 3 channels 9x9 at 512x512
  (``benchmarks.thin_conv``): PyTorch NCHW 277 -> 58 ms, channels_last 57 -> 44 ms,
  onnxruntime 88 -> 34 ms.
- ``channels_last``: the model in NHWC plus a wrapper converting 4-D inputs; depthwise and
  thin 1x1 convs run far faster that way on oneDNN.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from ..errors import VerificationError
from ..measure.profile import time_interleaved
from ..nn import GSAT, LIST, Resize
from .concat_sinking import sink_concats
from .mobile_forms import MAX_OUT_CHANNELS, MIN_KERNEL, PHASES, phase_weight


class FusedLIST(nn.Module):
    """LIST with one grouped 1x1 conv (groups=2) over ``cat([squeezed, depthwise])``.

    Group 0 is LIST's 1x1 branch and group 1 the 1x1 after its depthwise conv, so the
    parameters are LIST's, value for value and in number.
    """

    def __init__(self, lst: LIST) -> None:
        super().__init__()
        pointwise, spatial = lst.pointwise_branch, lst.spatial_branch[1]
        self.squeeze = copy.deepcopy(lst.squeeze)
        self.depthwise = copy.deepcopy(lst.spatial_branch[0])
        self.pointwise = nn.Conv2d(2 * lst.squeeze.out_channels,
                                   pointwise.out_channels + spatial.out_channels, 1, groups=2)
        with torch.no_grad():
            self.pointwise.weight.copy_(torch.cat([pointwise.weight, spatial.weight]))
            self.pointwise.bias.copy_(torch.cat([pointwise.bias, spatial.bias]))
        self.train(lst.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return self.pointwise(torch.cat([squeezed, self.depthwise(squeezed)], dim=1))


class ChannelsLast(nn.Module):
    """Runs ``module`` in channels_last on channels_last copies of its 4-D tensor inputs.

    ``module`` itself is converted (``nn.Module.to`` works in place): pass a copy to keep
    the original in NCHW.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.contiguous(memory_format=torch.channels_last)
                     if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        return self.module(*args, **kwargs)


class ThinConvPhases(nn.Module):
    """A "same" kxk conv with few output channels, computed on ``r * r`` pixel phases.

    One stride-r conv computes all r * r phases of each r x r output cell (C_out r^2
    channels), and ``pixel_shuffle`` puts them in place. Its kernel, (2d + 1) r wide, is
    ``phase_weight``'s (the conv between ``pixel_unshuffle`` and ``pixel_shuffle``) with the
    unshuffle folded in: that saves the unshuffle's transpose, which onnxruntime runs as a
    full copy of the input (``benchmarks.thin_conv``, onnxruntime, 16 -> 3 channels at
    512x512: 34 ms, against 61 ms with the unshuffle and 88 ms for the plain 9x9 conv).
    """

    def __init__(self, conv: nn.Conv2d, r: int = PHASES) -> None:
        super().__init__()
        phased, reach = phase_weight(conv.weight.detach(), r)
        c_out, c_in, taps = phased.shape[0], conv.in_channels, phased.shape[-1]
        # phased[o, c r^2 + alpha r + beta, di, dj] -> weight[o, c, r di + alpha, r dj + beta]
        weight = (phased.view(c_out, c_in, r, r, taps, taps).permute(0, 1, 4, 2, 5, 3)
                  .reshape(c_out, c_in, taps * r, taps * r))
        self.r = r
        self.conv = nn.Conv2d(c_in, c_out, taps * r, stride=r, padding=reach * r,
                              bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.repeat_interleave(r * r))
        self.conv.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if _must_pad(h, w, self.r):
            # zero rows and columns past the edge are what the conv's own zero padding reads
            x = F.pad(x, (0, (-w) % self.r, 0, (-h) % self.r))
        return F.pixel_shuffle(self.conv(x), self.r)[..., :h, :w]


def _must_pad(h: int, w: int, r: int) -> bool:
    """Pad unless eager sizes are multiples of ``r`` (a pad of zero still copies the input).
    A traced or exported graph always pads: it must hold at every size."""
    if torch.jit.is_tracing() or not (isinstance(h, int) and isinstance(w, int)):
        return True
    return bool(h % r or w % r)


def _thin(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d:
        return False
    k_h, k_w = conv.kernel_size
    return (conv.out_channels <= MAX_OUT_CHANNELS
            and k_h == k_w >= MIN_KERNEL and conv.padding == (k_h // 2, k_w // 2)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def thin_convs_on_phases(model: nn.Module) -> int:
    """Replace (in place) every thin large-kernel conv in ``model`` by its ThinConvPhases."""
    return swap_modules(model, lambda m: ThinConvPhases(m) if _thin(m) else None)


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


def emit_fast(model: nn.Module, example_inputs: Sequence[Any], *, merge: bool = True,
              fold_bn: bool = True, sink: bool = True, phases: bool = True,
              channels_last: bool | None = None, rtol: float = 1e-4,
              atol: float = 1e-4) -> nn.Module:
    """A copy of ``model`` (eval mode) in its fastest exact CPU form; ``model`` is untouched.

    ``channels_last=None`` times the emitted model in both memory formats on
    ``example_inputs`` and keeps the faster. The result is checked against ``model`` on
    ``example_inputs`` (``VerificationError`` if it differs beyond ``rtol``/``atol``) and
    keeps ``lwcompile_report`` if ``model`` had one.
    """
    args = tuple(example_inputs)
    fast = copy.deepcopy(model).eval()
    if merge:
        fast = merge_lists(fast)
    for gm in [m for m in fast.modules() if isinstance(m, fx.GraphModule)]:
        make_picklable(gm)
        inline_modules(gm, (nn.Sequential, FusedLIST, GSAT))
        pointwise_before_upsampling(gm)
    if fold_bn:
        fast = fold_batchnorm(fast, args)
    if sink:
        with torch.no_grad():
            for gm in [m for m in fast.modules() if isinstance(m, fx.GraphModule)]:
                if gm is fast:  # nested graphs' inputs are not the example inputs
                    sink_concats(gm, args)
    if phases:
        thin_convs_on_phases(fast)
    if channels_last is None:
        channels_last = _channels_last_faster(fast, args)
    if channels_last:
        fast = ChannelsLast(fast)
    _check_same(model, fast, args, rtol, atol)
    if hasattr(model, "lwcompile_report"):
        fast.lwcompile_report = model.lwcompile_report
    return fast


def merge_lists(model: nn.Module) -> nn.Module:
    """Replace every LIST in ``model`` (in place) by the equivalent FusedLIST."""
    if isinstance(model, LIST):
        return FusedLIST(model)
    swap_modules(model, lambda m: FusedLIST(m) if isinstance(m, LIST) else None)
    return model


def make_picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """Let ``torch.save(gm)`` work: torch.fx cannot pickle string type annotations (from
    ``from __future__ import annotations``), and unpickling re-creates the tracer class
    with no arguments (lwcompile's tracers take some); the plain Tracer does."""
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm._tracer_cls = gm.graph._tracer_cls = None
    gm.recompile()
    return gm


class _OneLevel(fx.Tracer):
    """Traces a module's own forward only: every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def inline_modules(gm: fx.GraphModule, kinds: tuple[type, ...]) -> fx.GraphModule:
    """Splice the forward of every ``call_module`` node of exactly these types into ``gm``,
    repeatedly (a Sequential holding a FusedLIST is inlined, then the FusedLIST).

    The modules stay in place as containers of the submodules their nodes now call.
    """
    def inlinable(node: fx.Node) -> bool:
        return node.op == "call_module" and type(gm.get_submodule(node.target)) in kinds

    while todo := [n for n in gm.graph.nodes if inlinable(n)]:
        for node in todo:
            module = gm.get_submodule(node.target)
            inner = _OneLevel().trace(module)
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


def pointwise_before_upsampling(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``conv1x1(upsample(x))`` as ``upsample(conv1x1(x))`` (Resize, in place).

    Bilinear weights sum to one and a 1x1 conv is the same affine map at every pixel, so
    the two commute; run at the low resolution, the conv costs 1/stride^2 of the MACs and
    the upsampled tensor has the conv's (fewer, e.g. LIST's squeezed) channels.
    """
    for conv_node in list(gm.graph.nodes):
        if conv_node.op != "call_module" or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        resize_node = conv_node.args[0]
        conv = gm.get_submodule(conv_node.target)
        if not (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1)
                and conv.stride == (1, 1) and conv.padding == (0, 0)
                and isinstance(resize_node, fx.Node) and resize_node.op == "call_module"
                and len(resize_node.users) == 1 and len(resize_node.args) == 1):
            continue
        resize = gm.get_submodule(resize_node.target)
        if not (isinstance(resize, Resize) and resize.kind != "conv"
                and min(resize.stride) > 1):
            continue
        conv_node.args = resize_node.args
        with gm.graph.inserting_after(conv_node):
            upsampled = gm.graph.call_module(resize_node.target, (conv_node,))
        conv_node.replace_all_uses_with(
            upsampled, delete_user_cb=lambda user, new=upsampled: user is not new)
        gm.graph.erase_node(resize_node)
    gm.recompile()
    return gm


def _foldable(bn: nn.Module) -> bool:
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def fold_bn_into(module: nn.Module, bn: nn.BatchNorm2d) -> nn.Module | None:
    """``module`` followed by ``bn`` as one new module, or None if that is not exact."""
    if module.training:
        return None
    if type(module) is nn.Conv2d:
        return fuse_conv_bn_eval(module, bn)
    if type(module) is nn.ConvTranspose2d and module.groups == 1:
        return fuse_conv_bn_eval(module, bn, transpose=True)
    if isinstance(module, FusedLIST):
        fused = copy.deepcopy(module)
        fused.pointwise = fuse_conv_bn_eval(module.pointwise, bn)
        return fused
    if isinstance(module, LIST):  # LIST's output channels: [1x1 branch | spatial branch]
        fused = copy.deepcopy(module)
        half = module.pointwise_branch.out_channels
        for conv, part in ((fused.pointwise_branch, slice(0, half)),
                           (fused.spatial_branch[1], slice(half, None))):
            def piece(t: torch.Tensor | None, part: slice = part) -> torch.Tensor | None:
                return None if t is None else t[part]

            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean[part], bn.running_var[part], bn.eps,
                piece(bn.weight), piece(bn.bias))
        return fused
    return None


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


def _channels_last_faster(model: nn.Module, args: tuple, runs: int = 5) -> bool:
    """Time the model as is and in channels_last, interleaved; True if NHWC's median wins."""
    if not any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args):
        return False
    nhwc = ChannelsLast(copy.deepcopy(model))
    with torch.no_grad():
        times = time_interleaved({"nchw": lambda: model(*args), "nhwc": lambda: nhwc(*args)},
                                 runs=runs, warmup=1)
    return sorted(times["nhwc"])[runs // 2] < sorted(times["nchw"])[runs // 2]


def _check_same(model: nn.Module, fast: nn.Module, args: tuple, rtol: float,
                atol: float) -> None:
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(*args)
        got = fast(*args)
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, check_stride=False)
    except AssertionError as exc:
        raise VerificationError(f"emit_fast changed the outputs: {exc}") from exc
