"""Quantisation-aware fine-tuning: float weights and activation ranges that lose less when a
runtime quantises them.

Post-training int8 rounds every weight and activation of a trained model; a light model,
whose few thin layers each carry much of the signal, loses more from that than a dense one.
Its loss comes almost all from the activations (per-tensor scales, rare large values), so
fine-tuning *through* simulated int8 (pt2e's ``prepare_qat_pt2e``: fake-quantise ops with
straight-through gradients, placed where the runtime's quantiser puts them) trains both the
weights and, where the quantiser's activations are ``LearnableFakeQuantize`` (``learnable``),
each activation's scale and zero point (LSQ, Esser et al. 2020).

The algorithm, the same for every runtime:

1. ``torch.export`` the graph the runtime will quantise (the deployed form: BN folded, LIST
   merged), and make every floating tensor it reads trainable except BatchNorm statistics.
2. Insert fake quantisation with the runtime's quantiser in its QAT configuration, and
   calibrate the activation ranges on the calibration inputs as post-training int8 would
   (high percentiles): training starts from the model the export would otherwise deploy.
3. Train for ``steps`` with Adam and a cosine learning rate to reproduce the *float model's
   own* output (self-distillation: no labels, no teacher, and the float model stays the
   reference the export measures against) on calibration-like inputs. Where the example
   input is larger than ``TRAINING_CROP``, training runs on crops of that side, through the
   same graph exported at that size (``finetune_on_crops``): a step on a quarter of the
   pixels costs about a quarter as much, and four times as many steps over as many pixels
   fit the ranges better than one large crop per step.
4. Return the tuned values (copied back into the graph by name) and the learned activation
   ranges, keyed by the graph node each range quantises (``Tuned``). The runtime's
   post-training path quantises the tuned graph with those ranges (``apply_ranges``) beside
   its own calibrations of the untuned one, and keeps whichever int8 output measures closer
   to the float model given to the export (never to the tuned one): fine-tuning is kept
   only where it measurably helps.

Only the caller knows the runtime: ``int8_xnnpack`` passes ``XNNPACKQuantizer`` (int8
activations), ``export_onnx`` the quantiser that rounds exactly what onnxruntime quantises
(``onnxruntime_simulation``; uint8 activations).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import one_line
from ..measure.inputs import fresh
from ..train.data import Degrade
from . import int8, int8_inputs

#: Adam's peak learning rate per tensor, as a fraction of its int8 grid step (its largest
#: magnitude / 127): Adam's step does not shrink with the loss, so an absolute rate that
#: suits one model's weights moves another's (smaller) weights by whole grid steps
RELATIVE_LEARNING_RATE = 0.02
#: Adam's peak learning rate of an activation's scale, as a fraction of its calibrated
#: value, and of its zero point, in int8 steps
SCALE_LEARNING_RATE = 0.01
ZERO_POINT_LEARNING_RATE = 0.1
#: the calibration that uses the ranges learned in fine-tuning
LEARNED = "learned in QAT"
#: what a calibration's name gets when it ran on the fine-tuned weights
TUNED = " after QAT"
#: calibration inputs that set the activation ranges fine-tuning starts from, at most
CALIBRATION_INPUTS = 8
#: side of the square crops fine-tuning trains on where the example input is larger
TRAINING_CROP = 128


class FinetuneError(int8.Int8Error):
    """Quantisation-aware fine-tuning could not run on this model."""


def _tensor_owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _statistics(module: nn.Module) -> set[str]:
    """Names of BatchNorm running statistics: data, not weights. Matched by name, which an
    exported graph keeps where it no longer has the BatchNorm module."""
    return {n for n, _ in module.named_buffers() if n.endswith(("running_mean", "running_var"))}


@dataclass
class Tuned:
    """What fine-tuning gives: the deployed graph with tuned values, and the learned
    activation ranges as ``(scale, zero_point)`` by the name of the node whose output each
    quantises (empty when the quantiser's activation ranges are not learnable)."""

    graph: torch.fx.GraphModule
    ranges: dict[str, tuple[float, int]]


def learnable(config: Any) -> Any:
    """A pt2e ``QuantizationConfig`` like ``config`` whose activations are quantised with
    learnable scales and zero points, initialised from high-percentile calibration (the
    ranges post-training int8 keeps on light models)."""
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    from .percentile_observer import PercentileObserver

    observer = PercentileObserver.with_args(percentile=int8.CALIBRATION_PERCENTILE)

    def learned(spec: Any) -> Any:  # eps as both quantisers' own activation observers
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=LearnableFakeQuantize.with_args(
            observer=observer, use_grad_scaling=True, eps=2**-12))

    return dataclasses.replace(config, input_activation=learned(config.input_activation),
                               output_activation=learned(config.output_activation))


def trainable(module: nn.Module) -> tuple[nn.Module, list[str]]:
    """A copy of ``module`` in which every floating parameter and buffer (folded weights a
    rewrite stored as buffers included) is a trainable parameter, BatchNorm statistics
    excepted; and their names."""
    module = copy.deepcopy(module)
    stats = _statistics(module)
    names = []
    for name, value in list(module.named_parameters()) + list(module.named_buffers()):
        if not value.is_floating_point() or name in stats:
            continue
        owner, leaf = _tensor_owner(module, name)
        if leaf in owner._buffers:
            del owner._buffers[leaf]
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        else:
            value.requires_grad_(True)
        names.append(name)
    return module, names


def training_example(example_inputs: tuple) -> tuple | None:
    """``example_inputs`` with the image (the first tensor) and every tensor of its height and
    width cut to their top-left ``TRAINING_CROP`` square, or None where the image is no
    larger than that on either side."""
    _, image = int8_inputs.image_argument(example_inputs)
    size = image.shape[-2:]
    if min(size) <= TRAINING_CROP:
        return None
    return tuple(a[..., :TRAINING_CROP, :TRAINING_CROP]
                 if isinstance(a, Tensor) and a.dim() >= 2 and a.shape[-2:] == size else a
                 for a in example_inputs)


def same_graph(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether ``a`` and ``b`` have the same nodes (names, ops, targets, in order) and the
    same tensors by name: what training one and loading its values and ranges into the
    other needs."""
    def nodes(g: torch.fx.GraphModule) -> list[tuple]:
        return [(n.name, n.op, str(n.target)) for n in g.graph.nodes]

    return nodes(a) == nodes(b) and a.state_dict().keys() == b.state_dict().keys()


def finetune_on_crops(graph_module: torch.fx.GraphModule,
                      export_at: Callable[[tuple], torch.fx.GraphModule] | None,
                      reference: nn.Module, example_inputs: tuple, data: Any,
                      degrade: Degrade | None, quantizer: Any, steps: int,
                      calibration_count: int) -> Tuned:
    """``finetune`` on ``steps`` inputs drawn from ``data`` as the calibration is, cut to
    ``TRAINING_CROP`` where the example is larger: ``export_at(args)`` gives the deployed
    graph exported at the size of ``args``. The ranges start from a calibration on as many
    pixels as ``calibration_count`` example inputs hold. Without ``export_at``, or where the
    graph at the crop size cannot be exported or differs from ``graph_module``, training
    runs at the example size."""
    example, training_graph = example_inputs, None
    small = None if export_at is None else training_example(example_inputs)
    if small is not None:
        try:
            candidate = export_at(small)
        except Exception:  # noqa: BLE001 -- any export failure: train at the example size
            candidate = None
        if candidate is not None and same_graph(candidate, graph_module):
            example, training_graph = small, candidate
    ratio = _pixels(example_inputs) // _pixels(example)
    count = calibration_count * ratio
    inputs = int8_inputs.calibration_inputs(data, example, max(steps, count), degrade)
    return finetune(graph_module, reference, inputs[:steps], quantizer, steps, inputs[:count],
                    training_graph)


def _pixels(example_inputs: tuple) -> int:
    _, image = int8_inputs.image_argument(example_inputs)
    return image.shape[0] * image.shape[-2] * image.shape[-1]


def finetune(graph_module: torch.fx.GraphModule, reference: nn.Module, inputs: list[tuple],
             quantizer: Any, steps: int, calibration: list[tuple] | None = None,
             training_graph: torch.fx.GraphModule | None = None) -> Tuned:
    """``graph_module`` (``torch.export(...).module()`` of the deployed form) with its
    floating tensors, and its activation ranges where ``quantizer`` makes them learnable,
    fine-tuned for ``steps`` under ``quantizer``'s fake quantisation to reproduce
    ``reference``'s first output on ``inputs`` (cycled, one per step). The ranges start from
    a calibration on ``calibration`` (default: the first ``CALIBRATION_INPUTS`` of
    ``inputs``). ``training_graph``, the same graph exported at the size of ``inputs`` (see
    ``same_graph``), is the one trained where given; the values and ranges learned are
    returned for ``graph_module``, which is not changed."""
    with warnings.catch_warnings():  # torch's own deprecation, raised copying export specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        if training_graph is None:
            training_graph = graph_module
        elif not same_graph(training_graph, graph_module):
            raise FinetuneError("the training graph is not the deployed graph at another size")
        return _finetune(graph_module, reference, inputs, quantizer, steps,
                         calibration or inputs[:CALIBRATION_INPUTS], training_graph)


def _finetune(graph_module: torch.fx.GraphModule, reference: nn.Module, inputs: list[tuple],
              quantizer: Any, steps: int, calibration: list[tuple],
              training_graph: torch.fx.GraphModule) -> Tuned:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    tuned, names = trainable(training_graph)
    try:
        # BatchNorm keeps its running statistics while the weights train: the deployed
        # model normalises with them, and a batch of one crop has no statistics of its own
        prepared = move_exported_model_to_eval(prepare_qat_pt2e(tuned, quantizer))
    except Exception as exc:
        raise FinetuneError(
            f"quantisation-aware fine-tuning could not prepare the model: {one_line(exc)}"
        ) from exc
    learned = _calibrate(prepared, calibration)
    found = dict(prepared.named_parameters())
    params = {n: found[n] for n in names if n in found}  # the tensors the graph still reads
    if not params:
        raise FinetuneError("quantisation-aware fine-tuning found no weights to tune")
    groups = [{"params": [p], "lr": RELATIVE_LEARNING_RATE * grid_step(p)}
              for p in params.values()]
    for fake in learned.values():
        groups.append({"params": [fake.scale],
                       "lr": SCALE_LEARNING_RATE * float(fake.scale.detach().abs().max())})
        groups.append({"params": [fake.zero_point], "lr": ZERO_POINT_LEARNING_RATE})
    reference = reference.eval()
    with torch.enable_grad():  # exports run under no_grad
        _train(prepared, reference, inputs, groups, steps)
    result = copy.deepcopy(graph_module)
    load_values(result, {n: p.detach() for n, p in params.items()})
    return Tuned(result, _ranges(prepared, learned))


def _calibrate(prepared: torch.fx.GraphModule, calibration: list[tuple]) -> dict[str, Any]:
    """Let every fake-quantise module observe ``calibration`` in float (as post-training
    calibration does), then switch fake quantisation on, and range learning on for the
    learnable ones, which are returned by module name."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    fakes = {n: m for n, m in prepared.named_modules() if isinstance(m, FakeQuantizeBase)}
    for fake in fakes.values():
        fake.disable_fake_quant()
        fake.enable_observer()
    with torch.no_grad():
        for args in calibration:
            prepared(*fresh(args))
    learned = {n: m for n, m in fakes.items() if isinstance(m, LearnableFakeQuantize)}
    for fake in fakes.values():
        fake.enable_fake_quant()
    for fake in learned.values():
        fake.enable_range_learning()
    return learned


def quantised_nodes(prepared: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """``(module name, name of the node it quantises)`` for every module call in a pt2e
    prepared graph that reads a node (observers and fake-quantise modules among them)."""
    return [(str(node.target), node.args[0].name) for node in prepared.graph.nodes
            if node.op == "call_module" and node.args and isinstance(node.args[0], torch.fx.Node)]


def _ranges(prepared: torch.fx.GraphModule,
            learned: dict[str, Any]) -> dict[str, tuple[float, int]]:
    """The learned ``(scale, zero_point)`` by the name of the node each quantises."""
    ranges = {}
    for module, producer in quantised_nodes(prepared):
        if module in learned:
            scale, zero_point = learned[module].calculate_qparams()
            ranges[producer] = (float(scale.flatten()[0]), int(zero_point.flatten()[0]))
    return ranges


def _train(prepared: nn.Module, reference: nn.Module, inputs: list[tuple],
           groups: list[dict[str, Any]], steps: int) -> None:
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        args = inputs[step % len(inputs)]
        with torch.no_grad():
            target = int8.first_output(reference(*fresh(args))).detach()
        out = int8.first_output(prepared(*fresh(args)))
        loss = nn.functional.mse_loss(out, target)
        if not torch.isfinite(loss):
            raise FinetuneError(f"quantisation-aware fine-tuning diverged at step {step} "
                                f"(loss {float(loss)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def apply_ranges(prepared: torch.fx.GraphModule, ranges: dict[str, tuple[float, int]]) -> int:
    """Set the range of every calibrated per-tensor observer in ``prepared`` (a
    ``prepare_pt2e`` graph of the tuned graph) that quantises a node named in ``ranges`` to
    the learned one, so that conversion quantises with it; returns how many were set."""
    from torchao.quantization.pt2e import MinMaxObserver

    done = set()
    for module, producer in quantised_nodes(prepared):
        observer = getattr(prepared, module)
        if (module in done or producer not in ranges
                or not isinstance(observer, MinMaxObserver)
                or observer.qscheme != torch.per_tensor_affine):
            continue
        scale, zero_point = ranges[producer]
        low, high = observer.quant_min, observer.quant_max
        observer.min_val.fill_((low - zero_point) * scale)
        observer.max_val.fill_((high - zero_point) * scale)
        done.add(module)
    return len(done)


def grid_step(tensor: Tensor) -> float:
    """The int8 grid step of ``tensor``'s largest magnitude (symmetric, 127 levels a side)."""
    return max(float(tensor.detach().abs().max()), 1e-8) / 127


def load_values(module: nn.Module, values: dict[str, Tensor]) -> None:
    """Copy ``values`` into ``module``'s parameters and buffers of the same names, in place;
    a name ``module`` lacks is an error (the tuned graph and the module must be one form)."""
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    missing = sorted(set(values) - set(own))
    if missing:
        raise FinetuneError(f"fine-tuned tensors have no place in the model: {missing[:5]}")
    with torch.no_grad():
        for name, value in values.items():
            own[name].copy_(value)

