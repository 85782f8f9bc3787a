"""Quantisation-aware fine-tuning: float weights that lose less when a runtime quantises them.

Post-training int8 rounds every weight and activation of a trained model; a light model,
whose few thin layers each carry much of the signal, loses more from that than a dense one.
Fine-tuning the weights *through* simulated int8 (pt2e's ``prepare_qat_pt2e``: fake-quantise
ops with straight-through gradients, placed where the runtime's quantiser puts them) moves
them to values that survive the rounding.

The algorithm, the same for every runtime:

1. ``torch.export`` the graph the runtime will quantise (the deployed form: BN folded, LIST
   merged), and make every floating tensor it reads trainable except BatchNorm statistics.
2. Insert fake quantisation with the runtime's quantiser in its QAT configuration.
3. Train for ``steps`` with Adam and a cosine learning rate to reproduce the *float model's
   own* output (self-distillation: no labels, no teacher, and the float model stays the
   reference the export measures against) on calibration-like inputs.
4. Copy the tuned values back into the float module by name. The runtime's post-training
   path then calibrates and quantises both the tuned and the untuned weights and keeps the
   one whose int8 output measures closer to the float model given to the export (never to
   the tuned one): fine-tuning is kept only where it measurably helps.

Only the caller knows the runtime: ``int8_xnnpack`` passes ``XNNPACKQuantizer`` (int8
activations), ``export_onnx`` the x86 quantiser (uint8 activations, as onnxruntime's).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import one_line
from . import int8

#: Adam's peak learning rate per tensor, as a fraction of its int8 grid step (its largest
#: magnitude / 127): Adam's step does not shrink with the loss, so an absolute rate that
#: suits one model's weights moves another's (smaller) weights by whole grid steps
RELATIVE_LEARNING_RATE = 0.02
#: what a calibration's name gets when it ran on the fine-tuned weights
TUNED = " after QAT"


class FinetuneError(int8.Int8Error):
    """Quantisation-aware fine-tuning could not run on this model."""


def _tensor_owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _statistics(module: nn.Module) -> set[str]:
    """Names of BatchNorm running statistics: data, not weights. Matched by name, which an
    exported graph keeps where it no longer has the BatchNorm module."""
    return {n for n, _ in module.named_buffers() if n.endswith(("running_mean", "running_var"))}


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


def finetune(graph_module: torch.fx.GraphModule, reference: nn.Module, inputs: list[tuple],
             quantizer: Any, steps: int) -> torch.fx.GraphModule:
    """A copy of ``graph_module`` (``torch.export(...).module()`` of the deployed form) whose
    floating tensors were fine-tuned for ``steps`` under ``quantizer``'s fake quantisation
    to reproduce ``reference``'s first output on ``inputs`` (cycled, one per step)."""
    with warnings.catch_warnings():  # torch's own deprecation, raised copying export specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return _finetune(graph_module, reference, inputs, quantizer, steps)


def _finetune(graph_module: torch.fx.GraphModule, reference: nn.Module, inputs: list[tuple],
              quantizer: Any, steps: int) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    tuned, names = trainable(graph_module)
    try:
        # BatchNorm keeps its running statistics while the weights train: the deployed
        # model normalises with them, and a batch of one crop has no statistics of its own
        prepared = move_exported_model_to_eval(prepare_qat_pt2e(tuned, quantizer))
    except Exception as exc:
        raise FinetuneError(
            f"quantisation-aware fine-tuning could not prepare the model: {one_line(exc)}"
        ) from exc
    found = dict(prepared.named_parameters())
    params = {n: found[n] for n in names if n in found}  # the tensors the graph still reads
    if not params:
        raise FinetuneError("quantisation-aware fine-tuning found no weights to tune")
    reference = reference.eval()
    with torch.enable_grad():  # exports run under no_grad
        _train(prepared, reference, inputs, list(params.values()), steps)
    result = copy.deepcopy(graph_module)
    load_values(result, {n: p.detach() for n, p in params.items()})
    return result


def _train(prepared: nn.Module, reference: nn.Module, inputs: list[tuple],
           params: list[nn.Parameter], steps: int) -> None:
    groups = [{"params": [p], "lr": RELATIVE_LEARNING_RATE * grid_step(p)} for p in params]
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        args = inputs[step % len(inputs)]
        with torch.no_grad():
            target = int8.first_output(reference(*args)).detach()
        out = int8.first_output(prepared(*args))
        loss = nn.functional.mse_loss(out, target)
        if not torch.isfinite(loss):
            raise FinetuneError(f"quantisation-aware fine-tuning diverged at step {step} "
                                f"(loss {float(loss)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


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

