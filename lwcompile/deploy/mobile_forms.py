"""Equivalent forms of an exported graph that run faster on XNNPACK; used by ``export_mobile``.

XNNPACK folds a BatchNorm into the conv right before it and fuses a ReLU into it, so a plain
conv-BN-ReLU stack costs only its convs. A light block ends in a channel concatenation
(LIST's two branches), and a BatchNorm or ReLU after a ``cat`` gets no such fusion: each is
one more full pass over memory, on top of the concat's own copy. On a memory-bound light
net those passes cost as much as the convs. Three rewrites, each exact in real arithmetic
(float results differ by rounding only), remove them:

- ``bn-into-cat-convs``: ``bn(cat(conv_i))`` -> ``cat(conv_i')``, each conv's weight and
  bias scaled by its slice of the BatchNorm (eval statistics);
- ``relu-into-cat-parts``: ``relu(cat(conv_i))`` -> ``cat(relu(conv_i))``, fused by XNNPACK
  (``prelu-into-cat-parts`` likewise, slicing per-channel slopes: not fused, but it lets the
  next rewrite remove the concat);
- ``conv-over-cat-split``: ``conv(cat(x_i))`` -> ``sum_i conv_i(x_i)`` (groups 1), when the
  adds move less memory than the concat they remove (a squeezing conv after LIST);
- ``conv-before-upsample``: ``conv1x1(upsample(x))`` -> ``upsample(conv1x1(x))`` (bilinear or
  nearest): interpolation weights sum to one and a 1x1 conv is the same affine map at every
  pixel, so they commute, and the conv (a LIST's squeeze) runs at the low resolution and
  the upsample moves its fewer channels (``benchmarks.mobile`` before and after it: light
  GLCIC 154.5 -> 142.6 ms, 7.5x -> 8.4x the original);
- ``thin-conv-phases``: a large-kernel (k >= 9) "same" conv writing at most 4 channels
  (SRResNet's 9x9 output conv) is computed on the 16 pixel phases: ``pixel_unshuffle(4)``,
  a (2d+1)^2 conv from 16 C to 16 C_out channels, ``pixel_shuffle(4)``. Each output phase
  gathers exactly the taps the kxk kernel would have read, so the result is the same; the
  GEMM is no longer 3 columns wide (``benchmarks.mobile`` before and after it: SRResNet x4
  original 1630 -> 1404 ms, light 570 -> 352 ms). In a one-off timing a 3x3 32->3 conv
  got slower in phase form, hence k >= 9.

They work on the ATen graph of ``torch.export``, so they apply to any model, hand-written
or lightened, and never touch the model itself.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter

import torch
from torch import fx

aten = torch.ops.aten
_CONV_DEFAULTS = (None, None, None, [1, 1], [0, 0], [1, 1], 1)  # aten.conv2d's own defaults


def xnnpack_forms(gm: fx.GraphModule) -> Counter[str]:
    """Rewrite ``gm`` (an ``ExportedProgram.module()``) in place; return rewrites per kind."""
    done: Counter[str] = Counter()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is aten.batch_norm.default and not _arg(node, 5, False):
            done["bn-into-cat-convs"] += _fold_bn(gm, node)
    for node in list(graph.nodes):
        if node.target in (aten.relu.default, aten.relu_.default):
            done["relu-into-cat-parts"] += _activation_into_parts(gm, node)
        elif node.target is aten.prelu.default:
            done["prelu-into-cat-parts"] += _activation_into_parts(gm, node)
    for node in list(graph.nodes):
        if node.target in _UPSAMPLES:
            done["conv-before-upsample"] += _conv_before_upsample(gm, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.cat.default:
            done["conv-over-cat-split"] += _split_convs(gm, node)
    for node in list(graph.nodes):
        if node.target is aten.conv2d.default:
            done["thin-conv-phases"] += _thin_conv_phases(gm, node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return +done


def _arg(node: fx.Node, i: int, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else default


def _conv_args(node: fx.Node) -> list:
    """input, weight, bias, stride, padding, dilation, groups of an aten.conv2d node."""
    return [*node.args, *_CONV_DEFAULTS[len(node.args):]]


def _channel_cat(node: object) -> list[fx.Node] | None:
    """The parts of ``node`` if it is a concat along channels of 4-d tensors."""
    if not (isinstance(node, fx.Node) and node.target is aten.cat.default):
        return None
    parts, dim = node.args[0], _arg(node, 1, 0)
    val = node.meta.get("val")
    if val is None or val.dim() != 4 or dim % 4 != 1:
        return None
    return list(parts)


def _is_attr(node: object) -> bool:
    """A stored tensor (or an absent optional one): something the rewrite can read and fold."""
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


def _sole_user_convs(parts: list[fx.Node], user: fx.Node) -> bool:
    """Every part is a conv2d with stored weight and bias, used only by ``user``."""
    return all(p.target is aten.conv2d.default and list(p.users) == [user]
               and isinstance(_conv_args(p)[1], fx.Node) and all(map(_is_attr, _conv_args(p)[1:3]))
               for p in parts)


def _fold_bn(gm: fx.GraphModule, bn: fx.Node) -> int:
    cat = bn.args[0]
    parts = _channel_cat(cat)
    if (parts is None or list(cat.users) != [bn] or not _sole_user_convs(parts, cat)
            or not all(map(_is_attr, bn.args[1:5])) or bn.args[3] is None or bn.args[4] is None):
        return 0
    weight, bias, mean, var = (_tensor(gm, a) for a in bn.args[1:5])
    scale = torch.rsqrt(var + bn.args[7])
    scale = scale if weight is None else scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    start = 0
    for conv in parts:
        args = _conv_args(conv)
        w, b = _tensor(gm, args[1]), _tensor(gm, args[2])
        s, t = scale[start:start + w.shape[0]], shift[start:start + w.shape[0]]
        start += w.shape[0]
        with gm.graph.inserting_before(conv):
            args[1] = _constant(gm, w * s.view(-1, 1, 1, 1))
            args[2] = _constant(gm, t if b is None else b * s + t)
        conv.args = tuple(args)
    bn.replace_all_uses_with(cat)
    gm.graph.erase_node(bn)
    return 1


def _activation_into_parts(gm: fx.GraphModule, act: fx.Node) -> int:
    """relu or prelu of a concat of convs -> the concat of each conv's activation."""
    cat = act.args[0]
    parts = _channel_cat(cat)
    if parts is None or list(cat.users) != [act] or not _sole_user_convs(parts, cat):
        return 0
    slope = None
    if act.target is aten.prelu.default:
        if act.args[1] is None or not _is_attr(act.args[1]):
            return 0
        slope = _tensor(gm, act.args[1])
    outs, start = [], 0
    with gm.graph.inserting_before(cat):
        for part in parts:
            if slope is None:
                out = gm.graph.call_function(aten.relu.default, (part,))
            else:  # one slope for all channels, or this part's slice of per-channel slopes
                size = part.meta["val"].shape[1]
                w = act.args[1] if slope.numel() == 1 else _constant(
                    gm, slope[start:start + size])
                start += size
                out = gm.graph.call_function(aten.prelu.default, (part, w))
            out.meta = dict(part.meta)
            outs.append(out)
    cat.args = (outs, *cat.args[1:])
    act.replace_all_uses_with(cat)
    gm.graph.erase_node(act)
    return 1


def _split_convs(gm: fx.GraphModule, cat: fx.Node) -> int:
    parts = _channel_cat(cat)
    users = list(cat.users)
    if parts is None or not users or any(
        u.target is not aten.conv2d.default or u.args[0] is not cat
        or _conv_args(u)[6] != 1 or _conv_args(u)[1] is None
        or not all(map(_is_attr, _conv_args(u)[1:3])) for u in users
    ):
        return 0
    if any("val" not in n.meta for n in [*parts, *users]):
        return 0
    sizes = [p.meta["val"].shape[1] for p in parts]
    # a concat reads and writes each element once; each add reads two outputs, writes one
    moved_by_adds = sum(3 * u.meta["val"].numel() for u in users) * (len(parts) - 1)
    if moved_by_adds >= 2 * cat.meta["val"].numel():
        return 0
    for conv in users:
        args = _conv_args(conv)
        weight, bias = _tensor(gm, args[1]), args[2]
        total, start = None, 0
        with gm.graph.inserting_before(conv):
            for i, (part, size) in enumerate(zip(parts, sizes, strict=True)):
                w = _constant(gm, weight[:, start:start + size])
                start += size
                out = gm.graph.call_function(
                    aten.conv2d.default, (part, w, bias if i == 0 else None, *args[3:]))
                total = out if total is None else gm.graph.call_function(
                    aten.add.Tensor, (total, out))
        total.meta = dict(conv.meta)  # same tensor: later rewrites read its shape
        conv.replace_all_uses_with(total)
        gm.graph.erase_node(conv)
    return len(users)


_UPSAMPLES = (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default,
              aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default)


def _conv_before_upsample(gm: fx.GraphModule, up: fx.Node) -> int:
    users = list(up.users)
    if len(users) != 1 or users[0].target is not aten.conv2d.default:
        return 0
    conv, source = users[0], up.args[0]
    args = _conv_args(conv)
    low, high = source.meta.get("val"), up.meta.get("val")
    if (args[0] is not up or low is None or high is None or conv.meta.get("val") is None
            or not isinstance(args[1], fx.Node) or "val" not in args[1].meta
            or tuple(args[1].meta["val"].shape[2:]) != (1, 1)
            or list(args[3]) != [1, 1] or list(args[4]) != [0, 0]
            or high.shape[-2] * high.shape[-1] <= low.shape[-2] * low.shape[-1]):
        return 0
    with gm.graph.inserting_before(up):
        early = gm.graph.call_function(aten.conv2d.default, (source, *args[1:]))
        early.meta = {"val": torch.empty(low.shape[0], conv.meta["val"].shape[1],
                                         *low.shape[2:], device="meta")}
        late = gm.graph.call_function(up.target, (early, *up.args[1:]), dict(up.kwargs))
        late.meta = dict(conv.meta)
    conv.replace_all_uses_with(late)
    gm.graph.erase_node(conv)
    gm.graph.erase_node(up)
    return 1


#: a "thin" conv: kernel at least MIN_KERNEL, at most MAX_OUT_CHANNELS outputs; it runs on
#: PHASES x PHASES pixel phases (also ``emit.ThinConvPhases``, the module-level form)
PHASES, MIN_KERNEL, MAX_OUT_CHANNELS = 4, 9, 4


def _thin_conv_phases(gm: fx.GraphModule, conv: fx.Node, r: int = PHASES) -> int:
    x, weight, bias, stride, padding, dilation, groups = _conv_args(conv)
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if (val is None or val.dim() != 4 or not _is_attr(weight) or weight is None
            or not _is_attr(bias) or groups != 1 or list(stride) != [1, 1]
            or list(dilation) != [1, 1] or val.shape[-2] % r or val.shape[-1] % r):
        return 0
    w = _tensor(gm, weight)
    c_out, _, k, k_w = w.shape
    if (c_out > MAX_OUT_CHANNELS or k != k_w or k < MIN_KERNEL
            or list(padding) != [k // 2, k // 2]):
        return 0
    phased, d = phase_weight(w, r)
    b_val = _tensor(gm, bias)
    with gm.graph.inserting_before(conv):
        unshuffled = gm.graph.call_function(aten.pixel_unshuffle.default, (x, r))
        new_bias = None if b_val is None else _constant(gm, b_val.repeat_interleave(r * r))
        inner = gm.graph.call_function(
            aten.conv2d.default, (unshuffled, _constant(gm, phased), new_bias, [1, 1], [d, d]))
        out = gm.graph.call_function(aten.pixel_shuffle.default, (inner, r))
    out.meta = dict(conv.meta)
    conv.replace_all_uses_with(out)
    gm.graph.erase_node(conv)
    return 1


def phase_weight(w: torch.Tensor, r: int) -> tuple[torch.Tensor, int]:
    """The weight (and padding d) of the conv on r*r pixel phases that equals the "same"
    kxk conv ``w`` (padding p = k // 2) between ``pixel_unshuffle(r)`` and ``pixel_shuffle(r)``.

    Output pixel (r i + a, r j + b) reads input pixel (r i + a + u - p, ...), which is phase
    alpha of phase-grid cell i + di where r di + alpha = a + u - p. So ``w[o, c, u, v]`` goes
    to ``[o r^2 + a r + b, c r^2 + alpha r + beta, di + d, dj + d]``; other taps are zero.
    """
    c_out, c_in, k, _ = w.shape
    p, d = k // 2, (k // 2 + r - 1) // r  # d: the kernel's reach in phase-grid steps
    phased = w.new_zeros(c_out * r * r, c_in * r * r, 2 * d + 1, 2 * d + 1)
    outs, ins = torch.arange(c_out) * r * r, torch.arange(c_in) * r * r
    steps = range(-d, d + 1)
    for a, b, alpha, beta, di, dj in itertools.product(range(r), range(r), range(r), range(r),
                                                       steps, steps):
        u, v = r * di + alpha - a + p, r * dj + beta - b + p
        if 0 <= u < k and 0 <= v < k:
            phased[(outs + a * r + b)[:, None], ins + alpha * r + beta, di + d, dj + d] = \
                w[:, :, u, v]
    return phased, d


def _tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    if node is None:
        return None
    return functools.reduce(getattr, node.target.split("."), gm).detach()


def _constant(gm: fx.GraphModule, value: torch.Tensor) -> fx.Node:
    """A new attribute of ``gm`` holding ``value``, read by a get_attr node at the cursor."""
    name = f"_xnnpack_form_{sum(1 for _ in gm.buffers())}"
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, value.contiguous().clone())
    return gm.graph.get_attr(name)
