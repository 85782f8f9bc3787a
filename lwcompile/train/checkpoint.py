"""Distillation checkpoints: written atomically, on CPU tensors, checked before loading.

A checkpoint holds everything a resumed run needs to end bit-identical to an uninterrupted
one: the student's weights, the optimiser, the step, the RNG states, the EMA of the weights
and the validation history. Every tensor is saved on the CPU and loaded onto the CPU first,
so a run checkpointed on a GPU resumes on a CPU and back; ``write_atomic`` means an
interrupted write leaves the previous checkpoint, never a corrupt one.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, one_line
from ..files import write_atomic
from .device import to_cpu

REQUIRED = ("student", "optimizer", "torch_rng", "python_rng", "step")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors moved to the CPU) to ``path`` atomically."""
    cpu_state = to_cpu(state)
    write_atomic(path, lambda f: torch.save(cpu_state, f))


def rng_state() -> dict[str, Any]:
    """torch's and Python's global RNG states, in a form ``torch.load(weights_only)`` reads."""
    rng = random.getstate()
    return {"torch_rng": torch.get_rng_state(), "python_rng": (rng[0], list(rng[1]), rng[2])}


def read_checkpoint(path: Path, where: str = "distill") -> dict[str, Any]:
    """The state in ``path``, on the CPU; anything but a distill checkpoint is a
    ``CheckpointError`` naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{where}: {path} is not a distill checkpoint (cannot read it: "
                              f"{one_line(exc)}); delete it or pass another checkpoint=") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: {path} is not a distill checkpoint (it holds a "
                              f"{type(state).__name__})")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{where}: {path} is not a distill checkpoint: it has no "
                              f"{missing[0]!r} (keys: {sorted(map(str, state))[:6]})")
    return state


def same_architecture(where: str, path: Path, model: nn.Module, saved: Any) -> None:
    """``saved`` must be a state dict of ``model``'s keys and shapes: checked before loading,
    since a failed load would leave half the weights."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    theirs = {key: tuple(getattr(value, "shape", ())) for key, value in saved.items()} \
        if isinstance(saved, dict) else {}
    if own != theirs:
        diff = sorted(set(own) ^ set(theirs)) or [k for k in own if own[k] != theirs[k]]
        raise CheckpointError(f"{where}: {path} is the checkpoint of another model (first "
                              f"difference: {diff[0]!r}); pass this student's checkpoint")


def restore(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
            where: str = "distill") -> dict[str, Any]:
    """Load a checkpoint written by ``distill`` into ``student``, ``optimizer`` and the global
    RNGs; returns the whole state (step, EMA, validation history) for the caller."""
    state = read_checkpoint(path, where)
    same_architecture(where, path, student, state["student"])
    student.load_state_dict(state["student"])
    try:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]),
                         state["python_rng"][2]))
        state["step"] = int(state["step"])
    except Exception as exc:
        raise CheckpointError(f"{where}: {path} is a corrupt distill checkpoint: "
                              f"{one_line(exc)}") from exc
    return state
