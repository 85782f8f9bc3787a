"""Emit the form of a (lightened) model that runs fastest on CPU, with the same outputs.

Each step is exact up to float rounding, and each was adopted only because it measured
faster (``python -m benchmarks.emit_forms``, ``python -m benchmarks.thin_conv``):

- ``merge_lists``: each LIST becomes a ``FusedLIST``: one grouped 1x1 conv over
  ``cat([squeezed, depthwise(squeezed)])``, so the concat copies C/2 squeezed channels
  instead of the C output channels, and one conv call replaces two.
- ``inline_modules``: in a GraphModule, the ops of FusedLIST, GSAT and Sequential modules
  become graph nodes, so each intermediate is freed right after its last use (a LIST's
  input once squeezed) and the rewrites below can see inside them.
- ``pointwise_before_upsampling``: a 1x1 conv after an upsampling (the squeeze of the LIST
  that replaced a transposed or sub-pixel conv) runs first, at the low resolution. With
  the inlining, this keeps peak activation memory at the dense model's or below.
- ``fold_batchnorm``: an eval BatchNorm right after a conv (or LIST, FusedLIST) whose output
  nothing else reads is folded into that conv's weights and removed.
- ``sink_concats``: a concat is pushed through activations into the convs that read it and
  vanishes (``concat_sinking``).
- ``thin_convs_on_phases``: a large-kernel "same" conv writing a few channels (SRResNet's
  9x9 output conv) becomes a ``ThinConvPhases``: one stride-4 conv computing the 16 pixel
  phases, then a pixel shuffle, a GEMM 16 times wider.
- ``single_output_convs_as_depthwise_sum``: a small-kernel conv writing one channel from
  many (a gray denoiser's output conv, after ``sink_concats`` one per concat part) becomes a
  depthwise conv and a 1x1 conv summing the channels; runtimes pad a conv's output channels
  to the SIMD width, so the conv to one channel paid for 8 or 16.
- ``channels_last``: the model in NHWC plus a wrapper converting 4-D inputs; depthwise and
  thin 1x1 convs run far faster that way on oneDNN. Chosen by timing when not given.

The rewrites themselves are in ``module_rewrites`` and ``concat_sinking``, on the tensor
identities of ``identities``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import arguments as check
from ..errors import VerificationError
from ..measure.inputs import blamed_on_inputs, fresh
from ..measure.profile import time_interleaved
from ..nn import GSAT, ChannelsLast, FusedLIST, ThinConvPhases, accept_unbatched
from ..tracing.fx_helpers import make_picklable, one_at_a_time
from ..tracing.like_original import like_original
from .concat_sinking import sink_concats
from .module_rewrites import (
    fold_batchnorm,
    inline_modules,
    merge_lists,
    pointwise_before_upsampling,
    single_output_convs_as_depthwise_sum,
    thin_convs_on_phases,
)

# where these classes lived before: models emitted then unpickle by these names
__all__ = ["ChannelsLast", "FusedLIST", "ThinConvPhases", "emit_fast"]


@one_at_a_time  # it traces with fx (module_rewrites), which patches nn.Module process-wide
def emit_fast(model: nn.Module, example_inputs: Sequence[Any], *, merge: bool = True,
              fold_bn: bool = True, sink: bool = True, phases: bool = True,
              depthwise_sum: bool = True, channels_last: bool | None = None,
              rtol: float = 1e-4, atol: float = 1e-4) -> nn.Module:
    """A copy of ``model`` (eval mode) in its fastest exact CPU form; ``model`` is untouched.

    ``channels_last=None`` times the emitted model in both memory formats on
    ``example_inputs`` and keeps the faster. The result is checked against ``model`` on
    ``example_inputs`` (``VerificationError`` if it differs beyond ``rtol``/``atol``) and
    keeps ``lwcompile_report`` if ``model`` had one.
    """
    check.module("emit_fast", "model", model)
    args = check.inputs("emit_fast", "example_inputs", example_inputs)
    for name, value in (("merge", merge), ("fold_bn", fold_bn), ("sink", sink),
                        ("phases", phases), ("depthwise_sum", depthwise_sum)):
        check.flag("emit_fast", name, value)
    check.flag("emit_fast", "channels_last", channels_last, optional=True)
    rtol, atol = check.tolerance("emit_fast", "rtol", rtol), check.tolerance("emit_fast",
                                                                              "atol", atol)
    with blamed_on_inputs("emit_fast", model, args):
        return _emit_fast(model, args, merge, fold_bn, sink, phases, depthwise_sum,
                          channels_last, rtol, atol)


def _emit_fast(model: nn.Module, args: tuple, merge: bool, fold_bn: bool, sink: bool,
               phases: bool, depthwise_sum: bool, channels_last: bool | None, rtol: float,
               atol: float) -> nn.Module:
    fast = copy.deepcopy(model).eval()
    if merge:
        fast = merge_lists(fast)
    for gm in [m for m in fast.modules() if isinstance(m, fx.GraphModule)]:
        make_picklable(gm)
        inline_modules(gm, (nn.Sequential, FusedLIST, GSAT))
        pointwise_before_upsampling(gm)
    if fold_bn:
        fast = fold_batchnorm(fast, fresh(args))
    if sink:
        with torch.no_grad():
            for gm in [m for m in fast.modules() if isinstance(m, fx.GraphModule)]:
                if gm is fast:  # nested graphs' inputs are not the example inputs
                    sink_concats(gm, fresh(args))
    if phases:
        thin_convs_on_phases(fast)
    if depthwise_sum:
        single_output_convs_as_depthwise_sum(fast)
    if channels_last is None:
        channels_last = _channels_last_faster(fast, fresh(args))
    if channels_last:
        fast = ChannelsLast(fast)
    _check_same(model, fast, args, rtol, atol)
    accept_unbatched(fast, args)  # the graph's inlined ops (channel shuffle) need the batch
    if isinstance(fast, fx.GraphModule):  # fx's copy and pickle would drop those hooks
        like_original(fast, None)
    if hasattr(model, "lwcompile_report"):
        fast.lwcompile_report = model.lwcompile_report
    return fast


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
        expected = copy.deepcopy(model).eval()(*fresh(args))
        got = fast(*fresh(args))
    try:
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, check_stride=False)
    except AssertionError as exc:
        raise VerificationError(f"emit_fast changed the outputs: {exc}") from exc
