"""The example input lighten runs the model on: given by the user, or inferred."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ExampleInputError, LwCompileError
from .cost import Measured, measure

DEFAULT_SIZE = 64


def fresh(args: tuple) -> tuple:
    """Copies of the tensors in ``args``, for one run of a model. A model that writes into
    its input (RCAN's ``x *= rgb_range``) would otherwise see the values its previous run
    wrote: a check would compare, a calibration observe and a measurement score runs on
    different inputs."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def infer_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A 1xCx64x64 image, C taken from the model's first conv: enough for single-image models."""
    required = [
        p for p in inspect.signature(model.forward).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(required) != 1:
        names = ", ".join(p.name for p in required)
        raise ExampleInputError(
            f"{type(model).__name__}.forward takes {len(required)} required inputs ({names}); "
            "lwcompile can only guess a single image: pass example_inputs=(...)"
        )
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ExampleInputError(
            f"{type(model).__name__} has no Conv2d to infer the input channels from: "
            "pass example_inputs=(...)"
        )
    ref = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, conv.in_channels, DEFAULT_SIZE, DEFAULT_SIZE, generator=generator)
    return (image.to(device=ref.device, dtype=ref.dtype),)


def run_example(model: nn.Module, args: tuple, kwargs: dict[str, Any],
                inferred: bool) -> Measured:
    """Run the model once (no grad, state restored) and turn its failure into a clear error.

    Returns the output with the MACs and peak activation memory measured on that run.

    Call it on a copy in eval mode: a forward may still touch state we cannot restore.
    """
    try:
        return measure(model, args, kwargs)
    except Exception as exc:
        hint = ("the inferred 1xCx64x64 input does not fit this model; pass "
                "example_inputs=(...)" if inferred else "check example_inputs")
        raise ExampleInputError(
            f"{type(model).__name__} rejects the example input "
            f"({_shapes(args)}): {type(exc).__name__}: {exc}; {hint}"
        ) from None


@contextlib.contextmanager
def blamed_on_inputs(where: str, model: nn.Module, args: tuple) -> Iterator[None]:
    """Run the body; if it fails with a raw error and ``model`` itself cannot run on ``args``
    (an image of the wrong channel count, say), raise an ExampleInputError saying so instead.
    The model is tried on an eval copy, only after a failure: nothing of it changes."""
    try:
        yield
    except LwCompileError:
        raise
    except Exception as exc:
        try:
            with torch.no_grad():
                copy.deepcopy(model).eval()(*args)
        except Exception as own:
            raise ExampleInputError(
                f"{where}: {type(model).__name__} rejects the example input ({_shapes(args)}): "
                f"{type(own).__name__}: {str(own).strip().splitlines()[0] if str(own) else ''}"
            ) from exc
        raise


def _shapes(args: tuple) -> str:
    return ", ".join(
        "x".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else repr(a) for a in args
    )
