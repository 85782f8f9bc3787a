"""Exact rewrites of an exported ATen graph for XNNPACK; used by ``export_mobile``.

XNNPACK folds a BatchNorm into the conv right before it and fuses a ReLU into it, so a plain
conv-BN-ReLU stack costs only its convs. A light block ends in a channel concatenation
(LIST's two branches), and a BatchNorm or ReLU after a ``cat`` gets no such fusion: each is
one more full pass over memory, on top of the concat's own copy. These rewrites remove
them; the arithmetic is ``identities``', shared with the module-level rewrites of
``emit_fast``, and this module only finds the patterns in the ATen graph:

- ``bn-into-cat-convs``: ``bn(cat(conv_i))`` -> ``cat(conv_i')``, each conv folded with its
  part of the BatchNorm (eval statistics);
- ``batchnorm-as-depthwise`` (int8 only): an eval BatchNorm that no conv before it can
  absorb (after a ReLU or an add: GSAT's output) -> a depthwise 1x1 conv. The quantiser
  annotates convs and not a lone BatchNorm, so it ran in float between two conversions;
  as a conv it runs in int8 with the ReLU after it fused. In fp32 ExecuTorch makes the
  same conv itself;
- ``relu-into-cat-parts``, ``prelu-into-cat-parts``, ``activation-into-cat-parts``: an
  elementwise activation of a concat read by nothing else -> the concat of each part's
  activation (a per-channel PReLU's slopes sliced by part). After convs XNNPACK fuses
  them, and the concat can then move on into the next rewrite;
- ``conv-over-cat-split``: ``conv(cat(x_i))`` -> ``sum_i conv_i(x_i)`` (groups 1), where
  the adds move less memory than the concat they remove (a squeezing conv after LIST);
- ``conv-before-upsample``: ``conv1x1(upsample(x))`` -> ``upsample(conv1x1(x))`` (bilinear
  or nearest): the conv runs at the low resolution, the upsample moves its channels;
- ``halving-bilinear-as-conv``: a bilinear resize to exactly half the size (a strided conv
  replaced by resize + LIST) -> a 2x2 stride-2 conv: one dense conv with the 1x1 conv
  after it folded in (LIST's squeeze), else a depthwise one. The shapes of an exported
  program are fixed, so whether the size halves is known. XNNPACK delegates bilinear
  resizing in float only, so in int8 the resize was a float island: its input converted
  to float, resized and converted back. The module-level graphs keep the resize: their
  height and width stay dynamic, and at odd sizes the resize is no average;
- ``thin-conv-phases``: a large-kernel "same" conv writing at most a few channels
  (SRResNet's 9x9 output conv) -> ``pixel_unshuffle``, the conv on pixel phases,
  ``pixel_shuffle``: the GEMM is no longer 3 columns wide. Sizes that are not multiples
  of the phase count are padded with zeros and the output cropped, as at module level
  (XNNPACK runs the pad and the crop too, and the phase form stays far ahead);
- ``depthwise-sum``: a small-kernel conv writing one channel from many -> a depthwise conv
  and a 1x1 conv summing its channels (the output channel is no longer padded to the
  SIMD width). Not for int8 (``quantized``): XNNPACK's int8 measured no faster with it,
  and each depthwise output would be rounded before the sum;
- ``mish-as-exp``: ``mish(x) = x tanh(softplus(x))`` -> ``x n / (n + 2)`` with
  ``n = e (e + 2)``, ``e = exp(min(x, MISH_LINEAR_FROM))``: ``tanh(log(1 + e))`` is
  ``((1 + e)^2 - 1) / ((1 + e)^2 + 1)``. ExecuTorch decomposes Mish into a softplus whose
  compare, ``log1p`` and select XNNPACK does not take, so every Mish split the program into
  more partitions (MoSR: two per block) and a tensor crossing such a boundary came back
  from XNNPACK's int8 program with its dimensions swapped, which made it fail to run. The
  form is all XNNPACK ops; above the clamp the factor is 1 in float32, as torch's softplus
  threshold makes it, and far below zero it tends to ``e`` with no cancellation;
- ``channel-mean-as-conv``: a mean over the channels of an image (``x.mean(1,
  keepdim=True)``: a channel LayerNorm's, NAFNet's and MoSR's) -> a 1x1 conv to one
  channel with weights 1/C. XNNPACK averages over height and width only, so each such
  mean cut the program into more partitions;
- ``split-as-slices``: a split or chunk (NAFNet's SimpleGate, ``x.chunk(2, dim=1)``) ->
  one slice per part. XNNPACK has no split, so each split cut the program;
- ``negative-pad-as-slice``: a constant pad by negative amounts (a crop: RealCUGAN's
  ``F.pad(x, (-4, -4, -4, -4))``) -> slices, and a pad by the positive amounts if any.
  Not for speed: ExecuTorch's pad kernel refuses negative amounts, so the program could
  not run;
- ``empty-pad-removed``: a pad by zero on every side (windowed attention padding to a
  multiple of the window, when the size already is one: DAT, RGT) -> its input. Not for
  speed: XNNPACK refuses to build a quantised pad by nothing, so the int8 program could not
  load;
- ``noise-as-randn``: noise drawn like a tensor (``randn_like``, or ``normal_`` filling a
  fresh tensor: StyleGAN's noise injection in GFPGAN, AuraSR) -> ``randn`` of its shape
  (scaled and shifted where ``normal_`` asks). Not for speed: ExecuTorch draws with
  ``randn`` only, so the program could not be made. Each run draws new noise, as the
  model does;
- ``alias-removed``: an alias of a computed tensor (torch.export's form of a slice over a
  whole dimension: ATD's final crop ``x[:, :, :h * scale, :w * scale]``) -> that tensor.
  Not for speed: where the tensor came from an XNNPACK delegate in channels-last order,
  ExecuTorch's alias kernel refused it, so the program could not run;
- ``unit-dims-dropped``: a reshape to more than 6 dimensions whose leading ones are of size
  one (OmniSR's grid attention: ``(1, 4, 16, 8, 8, 8, 8)``), and the permutes and copies
  that follow it, drop those leading dimensions. Not for speed: XNNPACK defines tensors of
  at most 6 dimensions and refused the program, so OmniSR's program did not load;
- ``adaptive-max-pool-as-pool``: an adaptive max pool whose output size divides its input
  size (SAFMN's pyramid, ``adaptive_max_pool2d(x, (h // 8, w // 8))``) -> a max pool with
  kernel = stride = the ratio. Not for speed either: the adaptive op is not core ATen, and
  ExecuTorch refused the program;
- ``max-dim-as-amax``: the values of a max over one dimension (``x.max(1)[0]``, HVICIDNet's
  HSV value) whose indices nothing reads -> ``amax``, unless XNNPACK can run it (over
  height or width, keeping the dimension). Not for speed: XNNPACK's partitioner takes any
  such max of a 4-D tensor and its lowering then refuses the others, so the program could
  not be made; ``amax`` runs in ExecuTorch's own kernels;
- ``fft-as-matmul`` (``fft_as_matmul``): real 2-D FFTs over the last two axes and the
  complex products between them (LaMa's Fourier convolutions, FFTformer's spectra) -> real
  matrix products, each complex value a pair of real tensors. Not for speed: ExecuTorch has
  no FFT or complex kernels, so the program could not be made. Like the other ops that stay
  float, in int8 after quantising;
- ``sort-as-topk`` (``sort_as_topk``, which ``export_onnx`` applies too): a sort of
  integers (ATD's tokens ordered by category) -> ``topk`` of distinct integer keys. Not for
  speed: ExecuTorch has no sort kernel, so the program could not be made;
- ``strided-view-made-contiguous`` (``strided_views_made_contiguous``, applied by
  ``export_mobile`` to a quantised graph only when its int8 program did not run): a
  reshape or view whose 4-D result is not contiguous (a transposed matrix viewed as an
  image: KBNet's kernel-basis attention, ``y.transpose(-1, -2).reshape(b, c, h, w)``) ->
  that view and a contiguous copy of it. Not for speed: ExecuTorch takes such a tensor's
  layout from its strides, channels-last, and hands it so to the delegates that read it;
  where it crossed from ExecuTorch's kernels into XNNPACK's int8 delegate beside a tensor
  in NCHW, XNNPACK failed to propagate shapes and the program could not run. XNNPACK does
  not take a copy that changes the layout, so each copy runs outside it; programs that
  run without the copies keep their views.

They work on the ATen graph of ``torch.export``, so they apply to any model, hand-written
or lightened, and never touch the model itself.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter

import torch
from torch import fx

from ..tracing.fx_helpers import (
    ATEN_CONVS,
    argument,
    channel_concat_parts,
    node_shape,
    stored_constant,
    stored_value,
    tidied,
)
from . import identities
from .fft_as_matmul import ffts_as_matmuls
from .sort_as_topk import sorts_as_topk

aten = torch.ops.aten
_CONV_DEFAULTS = (None, None, None, [1, 1], [0, 0], [1, 1], 1)  # aten.conv2d's own defaults

#: elementwise activations and the name of their rewrite
_ACTIVATIONS = {
    aten.relu.default: "relu-into-cat-parts", aten.relu_.default: "relu-into-cat-parts",
    aten.prelu.default: "prelu-into-cat-parts",
    **dict.fromkeys((aten.leaky_relu.default, aten.hardtanh.default, aten.sigmoid.default,
                     aten.tanh.default, aten.silu.default, aten.gelu.default,
                     aten.hardswish.default), "activation-into-cat-parts"),
}

_UPSAMPLE_MODES = {aten.upsample_bilinear2d.vec: "bilinear",
                   aten.upsample_bilinear2d.default: "bilinear",
                   aten.upsample_nearest2d.vec: "nearest",
                   aten.upsample_nearest2d.default: "nearest"}


def xnnpack_forms(gm: fx.GraphModule, quantized: bool = False) -> Counter[str]:
    """Rewrite ``gm`` (an ``ExportedProgram.module()``) in place; return rewrites per kind.
    ``quantized``: the graph will be quantised to int8."""
    done: Counter[str] = Counter()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is aten.batch_norm.default and not argument(node, 5, False):
            if _fold_bn(gm, node):
                done["bn-into-cat-convs"] += 1
            elif quantized:
                done["batchnorm-as-depthwise"] += _batchnorm_as_depthwise(gm, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ACTIVATIONS:
            done[_ACTIVATIONS[node.target]] += _activation_into_parts(gm, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and _UPSAMPLE_MODES.get(node.target) \
                in identities.COMMUTING_UPSAMPLE_MODES:
            done["conv-before-upsample"] += _conv_before_upsample(gm, node)
    for node in list(graph.nodes):
        if node.op == "call_function" and _UPSAMPLE_MODES.get(node.target) == "bilinear":
            done["halving-bilinear-as-conv"] += _halving_bilinear_as_conv(gm, node)
    for node in list(graph.nodes):
        if (parts := channel_concat_parts(node)) is not None:
            done["conv-over-cat-split"] += _split_convs(gm, node, parts)
    for node in list(graph.nodes):
        if node.target is aten.conv2d.default:
            done["thin-conv-phases"] += _thin_conv_phases(gm, node)
    for node in list(graph.nodes):
        if node.target is aten.conv2d.default and not quantized:
            done["depthwise-sum"] += _depthwise_sum(gm, node)
    if not quantized:  # in int8 after quantising: ``float_op_forms``
        done += _float_op_forms(gm)
    for node in list(graph.nodes):
        if node.target in (aten.pad.default, aten.constant_pad_nd.default):
            if _empty_pad_removed(gm, node):
                done["empty-pad-removed"] += 1
            else:
                done["negative-pad-as-slice"] += _negative_pad_as_slice(gm, node)
        elif node.target is aten.adaptive_max_pool2d.default:
            done["adaptive-max-pool-as-pool"] += _adaptive_max_pool_as_pool(gm, node)
        elif node.target is aten.max.dim:
            done["max-dim-as-amax"] += _max_dim_as_amax(gm, node)
        elif node.target in _NOISE:
            done["noise-as-randn"] += _noise_as_randn(gm, node)
        elif node.target is aten.alias.default and node.args[0].op != "placeholder":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            done["alias-removed"] += 1
        elif node.target in _RESHAPES and quantized:
            done["channels-last-flatten-as-transpose"] += \
                _channels_last_flatten_as_transpose(gm, node)
    done["unit-dims-dropped"] += _unit_dims_dropped(gm)
    done["sort-as-topk"] += sorts_as_topk(gm)
    tidied(gm)
    return +done


def strided_views_made_contiguous(gm: fx.GraphModule) -> Counter[str]:
    """Give each reshape or view of ``gm`` whose 4-D result is not contiguous a contiguous
    copy for its users, in place; returns the rewrites (``strided-view-made-contiguous``)."""
    done: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        if node.target in _RESHAPES:
            done["strided-view-made-contiguous"] += _made_contiguous(gm, node)
    tidied(gm)
    return +done


def float_op_forms(gm: fx.GraphModule) -> Counter[str]:
    """Rewrite, in place, the ops that stay float in an int8 program (``mish-as-exp``,
    ``channel-mean-as-conv``, ``split-as-slices``, ``fft-as-matmul``);
    returns rewrites per kind. ``xnnpack_forms`` runs them for fp32; for int8,
    ``export_mobile`` runs this on the quantised graph, since before the quantiser their
    rewritten arithmetic (adds, muls) would be annotated for int8 like any other."""
    done = _float_op_forms(gm)
    tidied(gm)
    return done


def _float_op_forms(gm: fx.GraphModule) -> Counter[str]:
    done: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        if node.target is aten.mish.default:
            done["mish-as-exp"] += _mish_as_exp(gm, node)
        elif node.target is aten.mean.dim:
            done["channel-mean-as-conv"] += _channel_mean_as_conv(gm, node)
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default,
                             aten.chunk.default):
            done["split-as-slices"] += _split_as_slices(gm, node)
    done["fft-as-matmul"] += ffts_as_matmuls(gm)
    return +done


def _conv_args(node: fx.Node) -> list:
    """input, weight, bias, stride, padding, dilation, groups of an aten.conv2d node."""
    return [*node.args, *_CONV_DEFAULTS[len(node.args):]]


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
    parts = channel_concat_parts(cat)
    if (parts is None or list(cat.users) != [bn] or not _sole_user_convs(parts, cat)
            or not all(map(_is_attr, bn.args[1:5])) or bn.args[3] is None or bn.args[4] is None):
        return 0
    weight, bias, mean, var = (_tensor(gm, a) for a in bn.args[1:5])
    stats = identities.BatchNormStats(mean, var, bn.args[7], weight, bias)
    convs = [_conv_args(conv) for conv in parts]
    folded = identities.fold_bn_into_parts(
        [(_tensor(gm, args[1]), _tensor(gm, args[2])) for args in convs], stats)
    for conv, args, (w, b) in zip(parts, convs, folded, strict=True):
        with gm.graph.inserting_before(conv):
            args[1], args[2] = _constant(gm, w), _constant(gm, b)
        conv.args = tuple(args)
    bn.replace_all_uses_with(cat)
    gm.graph.erase_node(bn)
    return 1


def _batchnorm_as_depthwise(gm: fx.GraphModule, bn: fx.Node) -> int:
    x, shape = bn.args[0], node_shape(bn.args[0])
    if (shape is None or len(shape) != 4 or not all(map(_is_attr, bn.args[1:5]))
            or bn.args[3] is None or bn.args[4] is None
            or (getattr(x, "target", None) in ATEN_CONVS and len(x.users) == 1)):
        return 0
    weight, bias, mean, var = (_tensor(gm, a) for a in bn.args[1:5])
    channels = int(shape[1])
    w, b = identities.fold_bn(torch.ones(channels, 1, 1, 1, dtype=mean.dtype), None,
                              identities.BatchNormStats(mean, var, bn.args[7], weight, bias))
    with gm.graph.inserting_before(bn):
        conv = gm.graph.call_function(aten.conv2d.default, (
            x, _constant(gm, w), _constant(gm, b), [1, 1], [0, 0], [1, 1], channels))
    return _replaced(gm, bn, conv)


def _activation_into_parts(gm: fx.GraphModule, act: fx.Node) -> int:
    """An elementwise activation of a concat -> the concat of each part's activation."""
    cat = act.args[0] if act.args else None
    parts = channel_concat_parts(cat)
    if parts is None or list(cat.users) != [act]:
        return 0
    extra = [tuple(act.args[1:])] * len(parts)
    if act.target is aten.prelu.default:
        if not _is_attr(act.args[1]) or act.args[1] is None:
            return 0
        slope = _tensor(gm, act.args[1])
        if slope.numel() > 1:  # per-channel slopes: each part its slice
            with gm.graph.inserting_before(cat):
                extra = [(_constant(gm, s),) for s in identities.split_per_channel(
                    slope, [node_shape(p)[1] for p in parts])]
    target = aten.relu.default if act.target is aten.relu_.default else act.target
    outs = []
    with gm.graph.inserting_before(cat):
        for part, args in zip(parts, extra, strict=True):
            out = gm.graph.call_function(target, (part, *args), dict(act.kwargs))
            out.meta = dict(part.meta)
            outs.append(out)
    cat.args = (outs, *cat.args[1:])
    act.replace_all_uses_with(cat)
    gm.graph.erase_node(act)
    return 1


def _split_convs(gm: fx.GraphModule, cat: fx.Node, parts: list[fx.Node]) -> int:
    users = list(cat.users)
    if not users or any(
        u.target is not aten.conv2d.default or u.args[0] is not cat
        or _conv_args(u)[6] != 1 or _conv_args(u)[1] is None
        or not all(map(_is_attr, _conv_args(u)[1:3])) or node_shape(u) is None for u in users
    ):
        return 0
    outputs = sum(node_shape(u).numel() for u in users)
    if not identities.sum_of_parts_pays_off(node_shape(cat).numel(), outputs, len(parts)):
        return 0
    sizes = [node_shape(p)[1] for p in parts]
    for conv in users:
        args = _conv_args(conv)
        bias = args[2]
        total = None
        terms = identities.split_inputs(_tensor(gm, args[1]), None, sizes)
        with gm.graph.inserting_before(conv):
            for i, (part, (w, _)) in enumerate(zip(parts, terms, strict=True)):
                out = gm.graph.call_function(
                    aten.conv2d.default,
                    (part, _constant(gm, w), bias if i == 0 else None, *args[3:]))
                total = out if total is None else gm.graph.call_function(
                    aten.add.Tensor, (total, out))
        total.meta = dict(conv.meta)  # same tensor: later rewrites read its shape
        conv.replace_all_uses_with(total)
        gm.graph.erase_node(conv)
    return len(users)


def _conv_before_upsample(gm: fx.GraphModule, up: fx.Node) -> int:
    users = list(up.users)
    if len(users) != 1 or users[0].target is not aten.conv2d.default:
        return 0
    conv, source = users[0], up.args[0]
    args = _conv_args(conv)
    low, high, weight = node_shape(source), node_shape(up), node_shape(args[1])
    if (args[0] is not up or low is None or high is None or node_shape(conv) is None
            or weight is None or tuple(weight[2:]) != (1, 1)
            or list(args[3]) != [1, 1] or list(args[4]) != [0, 0]
            or high[-2] * high[-1] <= low[-2] * low[-1]):
        return 0
    with gm.graph.inserting_before(up):
        early = gm.graph.call_function(aten.conv2d.default, (source, *args[1:]))
        early.meta = {"val": torch.empty(low[0], node_shape(conv)[1], *low[2:],
                                         device="meta")}
        late = gm.graph.call_function(up.target, (early, *up.args[1:]), dict(up.kwargs))
        late.meta = dict(conv.meta)
    conv.replace_all_uses_with(late)
    gm.graph.erase_node(conv)
    gm.graph.erase_node(up)
    return 1


def _scales(up: fx.Node) -> list[float | None]:
    """The scale factors an ``upsample_bilinear2d`` node was given (None where absent)."""
    if up.target is aten.upsample_bilinear2d.vec:
        return list(argument(up, 3) or [None, None])
    return [argument(up, 3), argument(up, 4)]


def _pointwise_user(up: fx.Node) -> fx.Node | None:
    """The only reader of ``up`` if it is a plain 1x1 conv (stride 1, no padding, groups
    1) with stored weight and bias, else None."""
    users = list(up.users)
    if len(users) != 1 or users[0].target is not aten.conv2d.default:
        return None
    x, weight, bias, stride, padding, dilation, groups = _conv_args(users[0])
    shape = node_shape(weight)
    if (x is not up or weight is None or not _is_attr(weight) or not _is_attr(bias)
            or shape is None or tuple(shape[2:]) != (1, 1) or list(stride) != [1, 1]
            or list(padding) != [0, 0] or groups != 1):
        return None
    return users[0]


def _halving_bilinear_as_conv(gm: fx.GraphModule, up: fx.Node) -> int:
    source = up.args[0]
    low, high = node_shape(up), node_shape(source)
    if (low is None or high is None or len(high) != 4 or argument(up, 2, False)
            or not identities.halves_exactly(high[-2:], low[-2:], _scales(up))):
        return 0
    dtype = _dtype(source)
    average = identities.halving_average(int(high[1]), dtype)
    pointwise = _pointwise_user(up)
    with gm.graph.inserting_before(up):
        if pointwise is None:
            conv = gm.graph.call_function(aten.conv2d.default, (
                source, _constant(gm, average), None, [2, 2], [0, 0], [1, 1], int(high[1])))
            return _replaced(gm, up, conv)
        args = _conv_args(pointwise)
        weight, bias = identities.depthwise_then_pointwise(
            (average, None), (_tensor(gm, args[1]), _tensor(gm, args[2])))
        conv = gm.graph.call_function(aten.conv2d.default, (
            source, _constant(gm, weight), _constant(gm, bias), [2, 2]))
    _replaced(gm, pointwise, conv)
    gm.graph.erase_node(up)
    return 1


def _thin_conv_phases(gm: fx.GraphModule, conv: fx.Node, r: int = identities.PHASES) -> int:
    x, weight, bias, stride, padding, dilation, groups = _conv_args(conv)
    shape = node_shape(x)
    if (shape is None or len(shape) != 4 or not _is_attr(weight) or weight is None
            or not _is_attr(bias)):
        return 0
    w = _tensor(gm, weight)
    if not identities.thin_conv(w.shape[0], tuple(w.shape[2:]), padding, stride, dilation,
                                groups):
        return 0
    phased, d = identities.phase_weight(w, r)
    new_bias = identities.phase_bias(_tensor(gm, bias), r)
    h, w_ = int(shape[-2]), int(shape[-1])
    graph = gm.graph
    with graph.inserting_before(conv):
        if h % r or w_ % r:  # zeros past the edge: what the conv's own padding reads
            x = graph.call_function(aten.constant_pad_nd.default,
                                    (x, [0, (-w_) % r, 0, (-h) % r], 0.0))
        unshuffled = graph.call_function(aten.pixel_unshuffle.default, (x, r))
        inner = graph.call_function(aten.conv2d.default, (
            unshuffled, _constant(gm, phased),
            None if new_bias is None else _constant(gm, new_bias), [1, 1], [d, d]))
        out = graph.call_function(aten.pixel_shuffle.default, (inner, r))
        if h % r or w_ % r:
            out = graph.call_function(aten.slice.Tensor, (out, 2, 0, h))
            out = graph.call_function(aten.slice.Tensor, (out, 3, 0, w_))
    return _replaced(gm, conv, out)


def _depthwise_sum(gm: fx.GraphModule, conv: fx.Node) -> int:
    x, weight, bias, stride, padding, dilation, groups = _conv_args(conv)
    if weight is None or not _is_attr(weight) or not _is_attr(bias):
        return 0
    w = _tensor(gm, weight)
    if not identities.single_output_conv(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]),
                                         stride, dilation, groups):
        return 0
    depthwise_weight, sum_weight = identities.depthwise_sum(w)
    with gm.graph.inserting_before(conv):
        filtered = gm.graph.call_function(aten.conv2d.default, (
            x, _constant(gm, depthwise_weight), None, stride, padding, dilation, w.shape[1]))
        total = gm.graph.call_function(aten.conv2d.default,
                                       (filtered, _constant(gm, sum_weight), bias))
    return _replaced(gm, conv, total)


#: where ``mish_as_exp`` stops growing ``exp``: beyond it ``n / (n + 2)`` is 1 in float32
MISH_LINEAR_FROM = 20.0


def _mish_as_exp(gm: fx.GraphModule, mish: fx.Node) -> int:
    graph, x = gm.graph, mish.args[0]

    def op(target: object, *args: object) -> fx.Node:
        node = graph.call_function(target, args)
        node.meta = dict(mish.meta)  # every step has the input's shape and dtype
        return node

    with graph.inserting_before(mish):
        dtype = _dtype(mish)
        two = _constant(gm, torch.tensor(2.0, dtype=dtype))
        e = op(aten.exp.default, op(aten.clamp.default, x, None, MISH_LINEAR_FROM))
        n = op(aten.mul.Tensor, e, op(aten.add.Tensor, e, two))
        factor = op(aten.div.Tensor, n, op(aten.add.Tensor, n, two))
        out = op(aten.mul.Tensor, x, factor)
    return _replaced(gm, mish, out)


def _channel_mean_as_conv(gm: fx.GraphModule, mean: fx.Node) -> int:
    x, shape = mean.args[0], node_shape(mean.args[0])
    dims = argument(mean, 1)
    if (shape is None or len(shape) != 4 or not isinstance(dims, list | tuple)
            or [d % 4 for d in dims] != [1] or not argument(mean, 2, False) or mean.kwargs):
        return 0
    dtype = _dtype(mean)
    weight = torch.full((1, int(shape[1]), 1, 1), 1.0 / int(shape[1]), dtype=dtype)
    with gm.graph.inserting_before(mean):
        conv = gm.graph.call_function(aten.conv2d.default, (x, _constant(gm, weight)))
    return _replaced(gm, mean, conv)


def _split_as_slices(gm: fx.GraphModule, split: fx.Node) -> int:
    x, shape = split.args[0], node_shape(split.args[0])
    dim = argument(split, 2, 0)
    users = list(split.users)
    if (shape is None or not isinstance(dim, int) or split.kwargs or not users
            or any(u.target is not operator.getitem for u in users)):
        return 0
    dim %= len(shape)
    size, length = split.args[1], int(shape[dim])
    if split.target is aten.chunk.default:  # chunks of ceil(length / n), as torch.chunk
        size = -(-length // size)
    sizes = list(size) if isinstance(size, list | tuple) else \
        [min(size, length - start) for start in range(0, length, size)]
    starts = [0, *itertools.accumulate(sizes)]
    for user in users:
        i = user.args[1] % len(sizes)
        with gm.graph.inserting_before(user):
            part = gm.graph.call_function(aten.slice.Tensor,
                                          (x, dim, starts[i], starts[i + 1]))
        _replaced(gm, user, part)
    gm.graph.erase_node(split)
    return 1


def _empty_pad_removed(gm: fx.GraphModule, pad: fx.Node) -> bool:
    amounts = pad.args[1]
    if not all(isinstance(a, int) and a == 0 for a in amounts):
        return False
    pad.replace_all_uses_with(pad.args[0])
    gm.graph.erase_node(pad)
    return True


def _negative_pad_as_slice(gm: fx.GraphModule, pad: fx.Node) -> int:
    x, amounts = pad.args[:2]
    if pad.target is aten.pad.default:
        mode, value = argument(pad, 2, pad.kwargs.get("mode", "constant")), argument(pad, 3, None)
    else:
        mode, value = "constant", argument(pad, 2, 0.0)
    shape = node_shape(x)
    if mode != "constant" or shape is None or not all(isinstance(a, int) for a in amounts) \
            or min(amounts, default=0) >= 0:
        return 0
    out = x
    with gm.graph.inserting_before(pad):
        for i in range(len(amounts) // 2):  # amounts run from the last dimension backwards
            dim, (before, after) = len(shape) - 1 - i, amounts[2 * i: 2 * i + 2]
            if before < 0 or after < 0:
                start, end = max(-before, 0), shape[dim] + min(after, 0)
                out = gm.graph.call_function(aten.slice.Tensor, (out, dim, start, end))
        if max(amounts) > 0:
            out = gm.graph.call_function(aten.constant_pad_nd.default,
                                         (out, [max(a, 0) for a in amounts], value or 0.0))
    return _replaced(gm, pad, out)


#: XNNPACK's largest tensor rank (``XNN_MAX_TENSOR_DIMS``)
_MAX_RANK = 6
_RESHAPES = (aten.reshape.default, aten.view.default)
_COPIES = (aten.clone.default, aten.contiguous.default)


def _unit_dims_dropped(gm: fx.GraphModule) -> int:
    """Reshapes to more than ``_MAX_RANK`` dimensions whose extra leading ones are of size
    one reshape to the shape without them; a permute keeping those dimensions first, or a
    copy, of such a tensor works on it without them too. Other users get the full shape back
    by a reshape. Returns how many reshapes were shortened."""
    dropped: dict[fx.Node, int] = {}  # node -> leading unit dimensions it no longer has
    for node in list(gm.graph.nodes):
        shape = node_shape(node)
        source = node.args[0] if node.args else None
        if node.target in _RESHAPES and shape is not None and len(shape) > _MAX_RANK \
                and all(d == 1 for d in shape[:len(shape) - _MAX_RANK]):
            k = len(shape) - _MAX_RANK
            node.args = (source, list(shape[k:]))
            dropped[node] = k
        elif source in dropped and node.target is aten.permute.default and \
                list(node.args[1][:dropped[source]]) == list(range(dropped[source])):
            k = dropped[source]
            node.args = (source, [d - k for d in node.args[1][k:]])
            dropped[node] = k
        elif source in dropped and node.target in _COPIES:
            dropped[node] = dropped[source]
    for node in dropped:
        for user in [u for u in node.users if u not in dropped and u.target not in _RESHAPES]:
            with gm.graph.inserting_before(user):
                full = gm.graph.call_function(aten.reshape.default, (node, node_shape(node)))
            user.replace_input_with(node, full)
    return sum(1 for node in dropped if node.target in _RESHAPES)


def _made_contiguous(gm: fx.GraphModule, view: fx.Node) -> int:
    value = view.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.is_contiguous():
        return 0
    with gm.graph.inserting_after(view):
        copy = gm.graph.call_function(aten.clone.default, (view,),
                                      {"memory_format": torch.contiguous_format})
    view.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    return 1


def _channels_last_flatten_as_transpose(gm: fx.GraphModule, view: fx.Node) -> int:
    """A reshape of an image permuted to channels-last order, ``x.permute(0, 2, 3, 1)``
    (through copies), reads the same values in the same order from
    ``x.reshape(N, C, H * W).permute(0, 2, 1)``: a 3-D transpose instead of a 4-D tensor.

    Why (int8 only): XNNPACK's layout pass tags that 4-D tensor channels-last, and where
    its quantised value was also a partition's output (RestoreFormer's vector quantiser
    flattens its latents so and returns them), converting it for the reshape rewired the
    output to a node of its own without a recorded value, and the lowering failed
    (``KeyError: 'val'``). 3-D tensors keep their layout. Other readers of the permuted
    image keep it; a permuted image read by reshapes only is left as it is (no output
    then: the windowed attention of HAT, DAT, RGT, ... lowers in int8 as it is)."""
    source = view.args[0]
    while getattr(source, "target", None) in _COPIES:
        source = source.args[0]
    if getattr(source, "target", None) is not aten.permute.default \
            or list(source.args[1]) != [0, 2, 3, 1] \
            or all(r.target in _RESHAPES for r in _readers_through_copies(source)):
        return 0
    image = source.args[0]
    shape = node_shape(image)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        return 0
    n, c, h, w = shape
    with gm.graph.inserting_before(view):
        rows = gm.graph.call_function(aten.reshape.default, (image, [n, c, h * w]))
        tokens = gm.graph.call_function(aten.permute.default, (rows, [0, 2, 1]))
        flat = gm.graph.call_function(aten.reshape.default, (tokens, view.args[1]))
    if isinstance(value := image.meta.get("val"), torch.Tensor):  # recorded, as the others
        rows.meta["val"] = value.reshape(n, c, h * w)
        tokens.meta["val"] = rows.meta["val"].permute(0, 2, 1)
    return _replaced(gm, view, flat)


def _readers_through_copies(node: fx.Node) -> list[fx.Node]:
    """The nodes reading ``node``'s values, looking through copies of it."""
    return [r for u in node.users
            for r in (_readers_through_copies(u) if u.target in _COPIES else [u])]


def _adaptive_max_pool_as_pool(gm: fx.GraphModule, pool: fx.Node) -> int:
    x, size = pool.args[:2]
    shape = node_shape(x)
    if shape is None or not _indices_unread(pool) \
            or not all(isinstance(s, int) and s > 0 and n % s == 0
                       for s, n in zip(size, shape[-2:], strict=True)):
        return 0
    ratio = [n // s for s, n in zip(size, shape[-2:], strict=True)]
    with gm.graph.inserting_before(pool):
        out = gm.graph.call_function(aten.max_pool2d.default, (x, ratio, ratio))
    return _values_from(gm, pool, out)


def _max_dim_as_amax(gm: fx.GraphModule, top: fx.Node) -> int:
    x, shape = top.args[0], node_shape(top.args[0])
    dim, keepdim = argument(top, 1), argument(top, 2, False)
    if shape is None or not isinstance(dim, int) or top.kwargs or not _indices_unread(top):
        return 0
    dim %= len(shape)
    if keepdim and dim in (2, 3):
        return 0  # XNNPACK runs it
    with gm.graph.inserting_before(top):
        amax = gm.graph.call_function(aten.amax.default, (x, [dim], keepdim))
    return _values_from(gm, top, amax)


#: ops drawing standard normal noise of their input's shape: (mean, std) argument positions
_NOISE = {aten.randn_like.default: None, aten.normal_.default: (1, 2),
          aten.normal_functional.default: (1, 2)}


def _noise_as_randn(gm: fx.GraphModule, noise: fx.Node) -> int:
    like, shape = noise.args[0], node_shape(noise.args[0])
    if shape is None or not all(isinstance(n, int) for n in shape) \
            or noise.kwargs.get("generator") is not None:
        return 0
    if noise.target is aten.normal_.default and list(like.users) != [noise]:
        return 0  # the tensor it fills is read elsewhere too
    value = noise.meta["val"]
    with gm.graph.inserting_before(noise):
        drawn = gm.graph.call_function(aten.randn.default, (list(shape),),
                                       {"dtype": value.dtype, "device": value.device})
        if (places := _NOISE[noise.target]) is not None:
            mean, std = (argument(noise, places[0], 0.0), argument(noise, places[1], 1.0))
            if std != 1.0:
                drawn = gm.graph.call_function(aten.mul.Tensor, (drawn, std))
            if mean != 0.0:
                drawn = gm.graph.call_function(aten.add.Tensor, (drawn, mean))
    return _replaced(gm, noise, drawn)


def _indices_unread(op: fx.Node) -> bool:
    """``op`` returns (values, indices) and nothing reads the indices: every user is a
    getitem, of the values or of indices no one reads."""
    return all(u.target is operator.getitem and (u.args[1] == 0 or not u.users)
               for u in op.users)


def _values_from(gm: fx.GraphModule, op: fx.Node, new: fx.Node) -> int:
    """``new`` computes the values of ``op`` (see ``_indices_unread``): the values' getitems
    are replaced by it, ``op`` and its unread indices' getitems erased; one rewrite."""
    for user in list(op.users):
        if user.args[1] == 0:
            _replaced(gm, user, new)
        else:
            gm.graph.erase_node(user)
    gm.graph.erase_node(op)
    return 1


def _replaced(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> int:
    """``new`` takes ``old``'s place and recorded shape (later rewrites read it); one rewrite."""
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return 1


def _dtype(node: fx.Node) -> torch.dtype:
    """The dtype of the tensor ``node`` computes, as recorded (float32 where not)."""
    return getattr(node.meta.get("val"), "dtype", torch.float32)


def _tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    return None if node is None else stored_value(gm, node)


def _constant(gm: fx.GraphModule, value: torch.Tensor) -> fx.Node:
    return stored_constant(gm, value, "_xnnpack_form")
