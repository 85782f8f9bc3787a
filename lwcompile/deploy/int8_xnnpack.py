"""int8 for XNNPACK through PyTorch 2 export quantisation (pt2e): ``XNNPACKQuantizer`` with
its symmetric per-channel config (int8 weights per output channel, int8 activations),
calibrated on real inputs, then converted to quantize/dequantize pairs that ExecuTorch's
XNNPACK partitioner lowers to its int8 kernels.

Activation ranges are calibrated two ways (``CALIBRATIONS``), as for onnxruntime: the
quantiser's own histogram observer and high percentiles (``percentile_observer``); the one
whose all-int8 model measures closer to float is kept.

With ``qat_steps``, the deployed graph is first fine-tuned under the quantiser's QAT
configuration with learnable activation ranges (``int8_finetune``), then quantised with the
ranges it learned and measured beside the calibrations of the untuned graph.

A conv kept float is left out of the annotation by a filter on the module path each graph
node records (``nn_module_stack``); its float output is what the next quantised op reads.
The search for such convs quantises once per trial, but every trial observes the same float
values, so each activation's range is computed once and reused (``_reuse_ranges``): the
histogram observer's search for a range takes seconds per tensor, the same on every trial.
A model with many convs is first screened on the converted graph itself
(``pt2e_float_layer``: one conv made float by rewiring, as leaving it out would), and only
the best few are quantised again.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import one_line
from ..measure.inputs import fresh
from ..tracing.fx_helpers import ATEN_CONVS, stored_constant, stored_value, unrounded
from ..train.data import Degrade
from . import int8, int8_inputs
from .pt2e_float_layer import Pt2eFloatLayers

INSTALL_HINT = "pip install lwcompile[mobile]"
#: activation-range calibrations tried (the quantiser's default is its histogram observer)
CALIBRATIONS = ("histogram", f"percentile-{int8.CALIBRATION_PERCENTILE:g}")


def _pt2e() -> tuple[Any, Any, Any, Any]:
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise int8.Int8Error(
            f"int8 mobile export needs ExecuTorch (and torchao), which is not installed "
            f"({one_line(exc)}); install it with `{INSTALL_HINT}`") from exc
    return XNNPACKQuantizer, get_symmetric_quantization_config, prepare_pt2e, convert_pt2e


def _activation_config(config: Any, calibration: str) -> Any:
    """``config`` with its activation observers set for ``calibration`` (a ``CALIBRATIONS``
    name)."""
    if calibration == "histogram":
        return config
    from .percentile_observer import PercentileObserver

    def observed(spec: Any) -> Any:  # eps as the quantiser's own activation observers
        observer = PercentileObserver.with_args(eps=2**-12,
                                                percentile=int8.CALIBRATION_PERCENTILE)
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=observer)

    return dataclasses.replace(config, input_activation=observed(config.input_activation),
                               output_activation=observed(config.output_activation))


def _module_path(node: torch.fx.Node) -> str | None:
    """The innermost module path ``node`` was recorded in, without export's ``L['self']``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L['self']")


def computed_weight_convs(graph_module: torch.fx.GraphModule) -> list[str]:
    """Module paths of the convs whose weight is computed from the input (modulated convs:
    GFPGAN's, AuraSR's), which XNNPACK's int8 lowering cannot take: it quantises a conv's
    weight per channel as a constant."""
    names: list[str] = []
    for node in graph_module.graph.nodes:
        weight = node.args[1] if node.target in ATEN_CONVS and len(node.args) > 1 else None
        weight = unrounded(weight)  # a stored weight, quantised, is still stored
        if isinstance(weight, torch.fx.Node) and weight.op != "get_attr":
            name = _module_path(node) or node.name
            if name not in names:
                names.append(name)
    return names


def conv_layers(graph_module: torch.fx.GraphModule) -> list[str]:
    """Module paths of the convs in an exported graph, in execution order."""
    names: list[str] = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in ATEN_CONVS:
            name = _module_path(node)
            if name is not None and name not in names:
                names.append(name)
    return names


def own_parameter_reads(graph_module: torch.fx.GraphModule) -> int:
    """Give every conv its own copy of its weight and bias, in place (exact); returns how
    many copies were added. A conv module called twice (RGT's ``reduction1``) reads the same
    parameter nodes twice, and the quantiser annotates a parameter node once: the second
    conv stayed float between quantised activations, which XNNPACK refuses to build, so the
    program did not load. A copy, not a second read of the same tensor: XNNPACK packs a
    quantised conv's weights once per tensor, with the first conv's input zero point
    folded into the bias."""
    added = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "get_attr":
            continue
        convs = [u for u in node.users if u.target is torch.ops.aten.conv2d.default
                 and node in u.args[1:3]]
        if len(convs) < 2:
            continue
        value = stored_value(graph_module, node)
        for conv in convs[1:]:
            with graph_module.graph.inserting_before(conv):
                own = stored_constant(graph_module, value, f"{node.target.replace('.', '_')}_call")
            own.meta = dict(node.meta)
            conv.replace_input_with(node, own)
            added += 1
    if added:
        graph_module.recompile()
    return added


def integer_scalars_as_tensors(graph_module: torch.fx.GraphModule) -> int:
    """Write each number added to or multiplied with an integer tensor as a 0-d tensor of
    that tensor's dtype, in place (exact); returns how many. The quantiser turns every such
    number into a float32 tensor to annotate the op, which made integer index arithmetic
    float (SCUNet's relative position index: ``coords + window_size - 1``), and the graph
    then failed the dtype assertions torch.export wrote for it."""
    written = 0
    for node in list(graph_module.graph.nodes):
        value = node.meta.get("val")
        if node.target not in (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor) or \
                not isinstance(value, Tensor) or value.is_floating_point():
            continue
        args = list(node.args)
        for i, arg in enumerate(args):
            if isinstance(arg, int | bool):
                with graph_module.graph.inserting_before(node):
                    args[i] = stored_constant(graph_module, torch.tensor(arg, dtype=value.dtype),
                                              "_integer_scalar")
                written += 1
        node.args = tuple(args)
    if written:
        graph_module.recompile()
    return written


def _for_the_quantiser(graph_module: torch.fx.GraphModule) -> None:
    """``graph_module`` rewritten, exactly, where XNNPACKQuantizer would otherwise make it
    unloadable (``own_parameter_reads``) or wrong (``integer_scalars_as_tensors``)."""
    own_parameter_reads(graph_module)
    integer_scalars_as_tensors(graph_module)


def _reuse_ranges(prepared: torch.fx.GraphModule,
                  known: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Fix every per-tensor (activation) observer of the calibrated ``prepared`` graph to the
    ``(scale, zero_point)`` in ``known`` for the node it observes, computing and recording
    the ones not known yet. Trials that differ only in which convs stay float observe every
    tensor on the same float values, so each range is the same on every trial; per-channel
    (weight) observers are left alone."""
    from torchao.quantization.pt2e.observer import (
        FixedQParamsObserver,
        UniformQuantizationObserverBase,
    )

    from .int8_finetune import quantised_nodes

    for module, producer in quantised_nodes(prepared):
        observer = getattr(prepared, module)
        if not isinstance(observer, UniformQuantizationObserverBase) or \
                observer.qscheme != torch.per_tensor_affine:
            continue
        if producer not in known:
            known[producer] = observer.calculate_qparams()
        scale, zero_point = known[producer]
        setattr(prepared, module, FixedQParamsObserver(
            float(scale), int(zero_point), dtype=observer.dtype, qscheme=observer.qscheme,
            quant_min=observer.quant_min, quant_max=observer.quant_max))


def _runner(converted: torch.fx.GraphModule) -> int8.Runner:
    """Runs the quantised graph ``converted`` on one tuple of inputs (its first output)."""
    def run(args: tuple) -> Tensor:
        with torch.no_grad():
            return int8.first_output(converted(*args))
    return run


def quantize_pt2e(graph_module: torch.fx.GraphModule, model: nn.Module,
                  example_inputs: tuple, calibration: Any, *, min_psnr: float | None,
                  degrade: Degrade | None,
                  target_psnr: float, max_float_layers: int, calibration_count: int,
                  evaluation_count: int, qat_steps: int = 0,
                  export_at: Callable[[tuple], torch.fx.GraphModule] | None = None
                  ) -> tuple[torch.fx.GraphModule, int8.Int8Report]:
    """``graph_module`` (from ``torch.export.export(...).module()`` of ``model`` or of an
    equivalent form) quantised and converted, with its report measured against ``model``;
    raises ``Int8QualityError`` below ``min_psnr``. ``qat_steps`` > 0 fine-tunes it under
    fake int8 first (``int8_finetune``), on smaller crops where ``export_at(args)`` gives
    the same graph exported at the size of ``args``."""
    XNNPACKQuantizer, config_for, prepare_pt2e, convert_pt2e = _pt2e()
    _for_the_quantiser(graph_module)
    calib = int8_inputs.calibration_inputs(calibration, example_inputs, calibration_count, degrade)
    held = int8_inputs.evaluation_inputs(calibration, example_inputs, evaluation_count, len(calib),
                                  degrade)
    reference = int8.float_outputs(model, held)
    candidates = {name: (name, graph_module, {}) for name in CALIBRATIONS}
    if qat_steps:
        from .int8_finetune import LEARNED, finetune_on_crops, learnable

        qat_config = learnable(config_for(is_per_channel=True, is_qat=True))
        tuned = finetune_on_crops(graph_module, export_at, model,
                                  example_inputs, calibration, degrade,
                                  XNNPACKQuantizer().set_global(qat_config), qat_steps,
                                  calibration_count)
        _for_the_quantiser(tuned.graph)
        candidates[LEARNED] = (CALIBRATIONS[1], tuned.graph, tuned.ranges)

    def quantizer(calibration_name: str, pristine: torch.fx.GraphModule,
                  ranges: dict[str, tuple[float, int]]) -> int8.Quantize:
        config = _activation_config(config_for(is_per_channel=True), calibration_name)
        known: dict[str, tuple[Tensor, Tensor]] = {}  # this calibration's activation ranges

        def quantize(excluded: frozenset[str]) -> tuple[int8.Runner, torch.fx.GraphModule]:
            annotator = XNNPACKQuantizer().set_global(config)
            if excluded:
                annotator.set_filter_function(lambda n: _module_path(n) not in excluded)
            prepared = prepare_pt2e(copy.deepcopy(pristine), annotator)
            with torch.no_grad():
                for args in calib:
                    prepared(*fresh(args))
            if ranges:  # the fine-tuned graph, with the ranges it was tuned for
                from .int8_finetune import apply_ranges

                apply_ranges(prepared, ranges)
            _reuse_ranges(prepared, known)
            converted = convert_pt2e(prepared)
            return _runner(converted), converted
        return quantize

    def screen(calibration_name: str, pristine: torch.fx.GraphModule) -> int8.Screen:
        def one_float_from(kept: torch.fx.GraphModule) -> Callable[[str], int8.Runner]:
            config = _activation_config(config_for(is_per_channel=True), calibration_name)
            prepared = prepare_pt2e(copy.deepcopy(pristine), XNNPACKQuantizer().set_global(
                config))  # its annotation and float weights; never calibrated or run
            layers = Pt2eFloatLayers(kept, prepared, _module_path)
            return lambda name: _runner(layers.with_float(name))
        return one_float_from

    converted, report = int8.choose_calibration(
        {name: quantizer(*candidate) for name, candidate in candidates.items()},
        conv_layers(graph_module), held,
        reference, target_psnr, max_float_layers, len(calib), min_psnr,
        {name: screen(calibration, pristine)
         for name, (calibration, pristine, _) in candidates.items()})
    int8.refuse_below(report, min_psnr)
    return converted, report

