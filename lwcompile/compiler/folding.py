"""Fold re-parameterised blocks into the plain convs they compute, before anything is traced.

Some networks train a conv as several linear branches and, in eval mode, run one conv whose
weights the block's ``forward`` recomputes from the branches on every call. SPAN's ``Conv3XC``
calls ``update_params()`` (1x1 -> 3x3 -> 1x1 plus a 1x1 skip, composed into one 3x3 weight)
and then ``eval_conv``. Traced, such a block is a web of ops on parameters: its conv reads a
computed weight, so it is no site for any rule, and recomputing the weight costs MACs on every
call.

Algorithm (``fold_reparameterised``):
1. Each module a fold recognises (``FOLDS``; the outermost one where they nest) is folded on a
   copy into what it computes in eval mode, e.g. ``eval_conv`` after ``update_params()``,
   followed by the block's activation.
2. One eval-mode run of a copy of the model on the example inputs records what each such
   block receives and returns; a fold is kept only where the folded module returns the same
   (``torch.allclose``, float tolerance) on that input. A block never called is not folded.
3. The kept folds are swapped into a copy of the model; the caller compiles that copy. The
   model itself is never modified.

The result is what the block computes in eval mode: it is exact for inference, and its
trainable weights are the folded ones (a light network is trained after ``lighten`` anyway).
The compiler counts its before/after totals from the folded copy, so the saving of the fold
itself is not claimed as lightening. A fold is recognised by the block's class name and the
attributes it relies on, so nothing here imports the library that defines the block.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import one_line

#: a fold takes a module and returns what it computes in eval mode, or None if not its kind
Fold = Callable[[nn.Module], "nn.Module | None"]


def fold_conv3xc(module: nn.Module) -> nn.Module | None:
    """SPAN's ``Conv3XC``: ``update_params()`` then ``eval_conv`` (+ leaky ReLU 0.05 if
    ``has_relu``)."""
    if type(module).__name__ != "Conv3XC" or not callable(getattr(module, "update_params", None)) \
            or type(getattr(module, "eval_conv", None)) is not nn.Conv2d:
        return None
    block = copy.deepcopy(module)
    with torch.no_grad():
        block.update_params()
    conv = block.eval_conv
    for name, tensor in list(conv.named_parameters(recurse=False)):
        setattr(conv, name, nn.Parameter(tensor.detach().clone()))  # trainable again
    if getattr(module, "has_relu", False):
        return nn.Sequential(conv, nn.LeakyReLU(0.05))
    return conv


FOLDS: tuple[Fold, ...] = (fold_conv3xc,)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules a fold recognises, each with its folded form."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        for fold in FOLDS:
            folded = fold(module)
            if folded is not None:
                found[name] = folded.train(module.training)
                break
    return found


@torch.no_grad()
def _agreeing(model: nn.Module, candidates: dict[str, nn.Module], args: tuple, kwargs: dict,
              log: list[str]) -> list[str]:
    """Names of the candidates whose folded form returns what the block returns in an
    eval-mode run of a copy of ``model``; why the others are not folded goes to ``log``."""
    probe = copy.deepcopy(model).eval()
    seen: dict[str, tuple[Any, torch.Tensor]] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
            if name not in seen and len(inputs) == 1 and isinstance(output, torch.Tensor):
                seen[name] = (inputs[0].detach().clone(), output.detach().clone())
        return hook

    handles = [probe.get_submodule(n).register_forward_hook(record(n)) for n in candidates]
    try:
        probe(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    except Exception as exc:  # noqa: BLE001 - the reference run reports a failing model
        log.append(f"nothing folded: the example run failed ({one_line(exc)})")
        return []
    finally:
        for handle in handles:
            handle.remove()
    agreed = []
    for name, folded in candidates.items():
        if name not in seen:
            log.append(f"{name}: not folded, it was not called with one tensor in the example run")
            continue
        x, expected = seen[name]
        try:
            got = copy.deepcopy(folded).eval()(x)
        except Exception as exc:  # noqa: BLE001 - a fold that cannot run is not applied
            log.append(f"{name}: not folded, the folded form fails ({one_line(exc)})")
            continue
        scale = float(expected.abs().max()) or 1.0
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4,
                                                             atol=1e-5 * scale):
            log.append(f"{name}: not folded, its folded form does not return what it returns")
            continue
        agreed.append(name)
    return agreed


def fold_reparameterised(model: nn.Module, args: tuple, kwargs: dict
                         ) -> tuple[nn.Module, list[str]]:
    """``model`` with its re-parameterised blocks folded (a copy; ``model`` itself when
    nothing folds), and one log line per block: folded, or why not."""
    candidates = _candidates(model)
    if not candidates:
        return model, []
    log: list[str] = []
    agreed = _agreeing(model, candidates, args, kwargs, log)
    if not agreed:
        return model, log
    folded_model = copy.deepcopy(model)
    for name in agreed:
        folded_model.set_submodule(name, candidates[name])
        log.append(f"{name}: {type(model.get_submodule(name)).__name__} folded into the "
                   f"{type(candidates[name]).__name__} it computes in eval mode")
    return folded_model, log
