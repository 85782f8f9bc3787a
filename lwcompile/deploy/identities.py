"""The tensor identities behind every deployment rewrite, and when each one pays off.

Written once, on plain tensors, and used by both graph levels: ``module_rewrites`` and
``concat_sinking`` (the module-level graph that eager PyTorch and ONNX run: ``emit_fast``,
``export_onnx``) and ``aten_rewrites`` (the ATen graph that ExecuTorch lowers:
``export_mobile``). The adapters only find their pattern in their graph and rebuild it
around what these functions return; each identity is exact in real arithmetic, so a rewrite
changes outputs by float rounding only.

- A conv over ``cat(parts)`` is the sum of convs over each part, with the weight's input
  channels split by part and the bias added once (groups 1, any kernel, any padding: the
  padding acts on each channel alone). A conv with one group per part is the concat of the
  per-part convs, the weight split by output channels.
- An elementwise activation of a concat is the concat of the activations; a per-channel
  PReLU takes each part's slice of its slopes.
- An eval BatchNorm after a conv is the conv with scaled weights and shifted bias (torch's
  own ``fuse_conv_bn_weights``); after a concat of convs, each conv takes its part of it.
- A 1x1 conv commutes with a bilinear or nearest upsampling: interpolation weights sum to
  one and the conv is the same affine map at every pixel. Run first, it works at the low
  resolution and the upsample moves its (often fewer) output channels.
- A "same" kxk conv equals a conv on the r x r pixel phases of its input (``phase_weight``):
  a thin conv (few outputs, large kernel) becomes a GEMM r^2 times wider.
- A conv writing one channel is a depthwise conv (each input channel filtered by its own
  slice of the kernel) followed by a 1x1 conv that sums the channels (``depthwise_sum``).
- A bilinear resize (``align_corners=False``) to exactly half the size samples every output
  pixel half-way between two input pixels in each direction: it is the 2x2 average, a
  depthwise 2x2 stride-2 conv (``halving_average``). A 1x1 conv after it folds in as one
  dense 2x2 stride-2 conv (``depthwise_then_pointwise``), which reads the input once.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.fusion import fuse_conv_bn_weights

#: a "thin" conv: kernel at least MIN_KERNEL, at most MAX_OUT_CHANNELS outputs, run on
#: PHASES x PHASES pixel phases. A 3x3 conv to 3 channels got slower in phase form, hence
#: the large kernels only (``python -m benchmarks.thin_conv`` shows the forms per runtime).
PHASES, MIN_KERNEL, MAX_OUT_CHANNELS = 4, 9, 4

#: a conv writing one channel from at least SUM_MIN_CHANNELS with a kernel from 3 up to
#: MIN_KERNEL (larger ones take the phases) runs as a depthwise conv and a channel sum.
#: Runtimes tile a conv's output channels by the SIMD width, so a conv to one channel pays
#: for 8 or 16 and runs at a few GMAC/s (``python -m benchmarks.op_profile`` shows it).
SUM_MIN_CHANNELS = 16

#: upsampling modes whose interpolation weights sum to one (they commute with a 1x1 conv)
COMMUTING_UPSAMPLE_MODES = frozenset({"bilinear", "nearest"})


def part_slices(sizes: Sequence[int]) -> list[slice]:
    """The channel range of each part of a concat of parts of ``sizes`` channels."""
    starts = list(itertools.accumulate(sizes, initial=0))
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


def split_inputs(weight: Tensor, bias: Tensor | None,
                 sizes: Sequence[int]) -> list[tuple[Tensor, Tensor | None]]:
    """``conv(cat(x_i))`` (groups 1) as ``sum_i conv_i(x_i)``: each term's weight and bias
    (the bias on the first term only)."""
    return [(weight[:, part], bias if i == 0 else None)
            for i, part in enumerate(part_slices(sizes))]


def split_groups(weight: Tensor, bias: Tensor | None,
                 groups: int) -> list[tuple[Tensor, Tensor | None]]:
    """A conv with ``groups`` groups over ``cat`` of ``groups`` equal parts as the concat of
    one conv per part: each part's weight and bias."""
    step = weight.shape[0] // groups
    return [(weight[i * step:(i + 1) * step],
             None if bias is None else bias[i * step:(i + 1) * step]) for i in range(groups)]


def split_per_channel(values: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Per-channel values (PReLU slopes) for each part of a concat; one value shared by
    all channels is every part's."""
    if values.numel() == 1:
        return [values] * len(sizes)
    return [values[part] for part in part_slices(sizes)]


@dataclass(frozen=True)
class BatchNormStats:
    """An eval BatchNorm's affine map: ``(x - mean) / sqrt(var + eps) * weight + bias``."""

    mean: Tensor
    var: Tensor
    eps: float
    weight: Tensor | None = None
    bias: Tensor | None = None

    def part(self, channels: slice) -> BatchNormStats:
        def piece(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[channels]

        return BatchNormStats(self.mean[channels], self.var[channels], self.eps,
                              piece(self.weight), piece(self.bias))


def fold_bn(weight: Tensor, bias: Tensor | None, bn: BatchNormStats,
            transpose: bool = False) -> tuple[Tensor, Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one conv (``transpose`` for a transposed
    conv, whose output channels are the weight's dim 1)."""
    w, b = fuse_conv_bn_weights(weight, bias, bn.mean, bn.var, bn.eps, bn.weight, bn.bias,
                                transpose=transpose)
    return w.detach(), b.detach()


def fold_bn_into_parts(convs: Sequence[tuple[Tensor, Tensor | None]],
                       bn: BatchNormStats) -> list[tuple[Tensor, Tensor]]:
    """``bn(cat(conv_i(x)))`` as ``cat(conv_i'(x))``: each conv folded with its part of
    ``bn``, parts in order."""
    sizes = [w.shape[0] for w, _ in convs]
    return [fold_bn(w, b, bn.part(part))
            for (w, b), part in zip(convs, part_slices(sizes), strict=True)]


def sum_of_parts_pays_off(concat_elements: int, output_elements: int, parts: int) -> bool:
    """Whether ``conv(cat(x_i))`` should become ``sum_i conv_i(x_i)``: the adds it costs
    must move less memory than the concat it removes. A concat reads and writes each
    element once; each of the ``parts - 1`` adds reads two outputs and writes one. So a
    squeezing conv after a concat (a LIST's consumer) gains, a widening one does not."""
    return 3 * output_elements * (parts - 1) < 2 * concat_elements


def thin_conv(out_channels: int, kernel: tuple[int, int], padding: tuple[int, int],
              stride: tuple[int, int], dilation: tuple[int, int], groups: int) -> bool:
    """Whether a conv is worth computing on pixel phases: a "same", dense, stride-1 conv
    with a large square kernel and at most a few output channels."""
    k = kernel[0]
    return (out_channels <= MAX_OUT_CHANNELS and kernel[1] == k >= MIN_KERNEL
            and tuple(padding) == (k // 2, k // 2) and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1) and groups == 1)


def single_output_conv(in_channels: int, out_channels: int, kernel: tuple[int, int],
                       stride: tuple[int, int], dilation: tuple[int, int],
                       groups: int) -> bool:
    """Whether a conv is worth running as ``depthwise_sum``: dense, stride 1, undilated,
    one output channel from many, a square kernel too small for the phases."""
    k = kernel[0]
    return (out_channels == 1 and groups == 1 and in_channels >= SUM_MIN_CHANNELS
            and kernel[1] == k and 3 <= k < MIN_KERNEL and tuple(stride) == (1, 1)
            and tuple(dilation) == (1, 1))


def depthwise_sum(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A conv writing one channel (``weight``: 1 x C x k x k) as a depthwise kxk conv and a
    1x1 conv summing its C channels: ``sum_c w[c] * x_c`` is ``sum_c s_c ((w[c] / s_c) * x_c)``.
    Returns the depthwise weight (C x 1 x k x k) and the sum's (1 x C x 1 x 1). ``s_c`` is
    kernel c's largest magnitude (1 for a zero kernel): the depthwise outputs share one scale,
    which int8 rounds alike, and two such convs never hold equal weights (an exporter would
    merge those into one tensor). The conv's padding goes to the depthwise conv (it acts on
    each channel alone), its bias to the sum."""
    kernels = weight[0].detach()
    scale = kernels.abs().amax(dim=(1, 2))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (kernels / scale[:, None, None]).unsqueeze(1), scale.view(1, -1, 1, 1).clone()


def phase_weight(w: Tensor, r: int = PHASES) -> tuple[Tensor, int]:
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


def strided_phase_weight(w: Tensor, r: int = PHASES) -> tuple[Tensor, int]:
    """``phase_weight`` with the ``pixel_unshuffle`` folded in: the weight (and padding, in
    input pixels) of one stride-r conv on the input itself that computes all r*r phases.
    This saves the unshuffle's transpose (a full copy of the input in onnxruntime)."""
    phased, reach = phase_weight(w, r)
    c_out, c_in, taps = phased.shape[0], w.shape[1], phased.shape[-1]
    # phased[o, c r^2 + alpha r + beta, di, dj] -> weight[o, c, r di + alpha, r dj + beta]
    weight = (phased.view(c_out, c_in, r, r, taps, taps).permute(0, 1, 4, 2, 5, 3)
              .reshape(c_out, c_in, taps * r, taps * r))
    return weight, reach * r


def phase_bias(bias: Tensor | None, r: int = PHASES) -> Tensor | None:
    """The phase conv's bias: each output channel's, once per phase."""
    return None if bias is None else bias.repeat_interleave(r * r)


def depthwise_then_pointwise(depthwise: tuple[Tensor, Tensor | None],
                             pointwise: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    """A depthwise kxk conv followed by a 1x1 conv as one dense kxk conv: the 1x1 mixes
    channels that were each filtered alone, so ``w[o, c] = pw[o, c] * dw[c]`` (kernel by
    scalar), and the depthwise bias passes through the 1x1 into the bias."""
    (dw_w, dw_b), (pw_w, pw_b) = depthwise, pointwise
    mix = pw_w[:, :, 0, 0]
    weight = mix[:, :, None, None] * dw_w[:, 0][None]
    bias = torch.zeros(pw_w.shape[0], dtype=pw_w.dtype) if pw_b is None else pw_b.clone()
    if dw_b is not None:
        bias = bias + mix @ dw_b
    return weight.detach(), bias.detach()


def halving_average(channels: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The depthwise 2x2 stride-2 kernel of a bilinear resize to half the size: output
    pixel i samples input position ``2 i + 0.5`` (``align_corners=False``), weight 1/2 on
    each neighbour in each direction, so 1/4 on each of the four."""
    return torch.full((channels, 1, 2, 2), 0.25, dtype=dtype)


def halves_exactly(in_size: Sequence[int], out_size: Sequence[int],
                   scales: Sequence[float | None]) -> bool:
    """Whether a bilinear resize from ``in_size`` to ``out_size`` (spatial) is the 2x2
    average: every output dimension is exactly half its input, and any given scale factor
    is 1/2 (another factor with the same rounded size samples elsewhere)."""
    return (len(in_size) == len(out_size) == 2
            and all(i == 2 * o > 0 for i, o in zip(in_size, out_size, strict=True))
            and all(s is None or s == 0.5 for s in scales))


def pointwise_as_kernel(pointwise: tuple[Tensor, Tensor | None],
                        kernel: int) -> tuple[Tensor, Tensor]:
    """A 1x1 conv as a "same" kxk conv whose only non-zero tap is the centre one."""
    pw_w, pw_b = pointwise
    weight = pw_w.new_zeros(pw_w.shape[0], pw_w.shape[1], kernel, kernel)
    weight[:, :, kernel // 2, kernel // 2] = pw_w[:, :, 0, 0]
    bias = torch.zeros(pw_w.shape[0], dtype=pw_w.dtype) if pw_b is None else pw_b
    return weight.detach(), bias.detach()
