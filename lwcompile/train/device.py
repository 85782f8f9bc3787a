"""Where training runs and in what precision: the device, autocast and the gradient scaler.

``init_layerwise`` and ``distill`` take ``device=`` (default: where the student's parameters
are) and ``amp=`` ("bf16", "fp16" or None). The teacher is moved to the student's device, so
a user who put their models on a GPU never meets a device-mismatch error from inside torch;
a device that does not exist on this machine is an ``ArgumentError`` before any work.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..errors import ArgumentError

#: the mixed-precision modes: autocast dtype per name (None: full precision)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters (else buffers) are; the CPU for a model with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return torch.device("cpu") if tensor is None else tensor.device


def resolve_device(where: str, device: Any, student: nn.Module) -> torch.device:
    """``device`` as a ``torch.device`` that exists here (None: the student's device)."""
    if device is None:
        return model_device(student)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"{where}: device must be 'cpu', 'cuda', 'cuda:N', 'mps' or a "
                            f"torch.device, got {device!r}") from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentError(f"{where}: device={device!r} but this machine has no CUDA GPU "
                                "(or this torch was built without CUDA): pass device='cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ArgumentError(f"{where}: device={device!r} but this machine has {count} CUDA "
                                f"GPU(s), cuda:0..cuda:{count - 1}")
    elif resolved.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ArgumentError(f"{where}: device={device!r} but MPS is not available here: "
                                "pass device='cpu'")
    elif resolved.type != "cpu":
        raise ArgumentError(f"{where}: device type {resolved.type!r} is not supported: "
                            "pass 'cpu', 'cuda' or 'mps'")
    return resolved


def amp_dtype(where: str, amp: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (None, "bf16" or "fp16") on ``device``."""
    if amp is None or amp is False or amp == "off":
        return None
    if not isinstance(amp, str) or amp not in AMP_DTYPES:
        raise ArgumentError(f"{where}: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type == "cpu":
        raise ArgumentError(f"{where}: amp='fp16' needs a GPU (CPU autocast computes in "
                            "bfloat16): pass amp='bf16' on the CPU")
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled for float16 only (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def to_cpu(value: Any) -> Any:
    """``value`` (tensors nested in dicts, lists and tuples) with every tensor on the CPU, so
    that a checkpoint written on one device loads on any other."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value
