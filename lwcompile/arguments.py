"""Checks of public arguments, written once: each raises an ``ArgumentError`` naming the
function, the argument and what was expected, before any work starts (so misuse never
surfaces as a raw ``TypeError`` from deep inside torch)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ArgumentError, DestinationError, NotAModuleError


def _got(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def module(where: str, name: str, value: Any) -> nn.Module:
    """``value`` must be an ``nn.Module`` (a ``NotAModuleError``, itself a TypeError)."""
    if not isinstance(value, nn.Module):
        raise NotAModuleError(f"{where}: {name} must be an nn.Module, got {_got(value)}")
    return value


def inputs(where: str, name: str, value: Any, *, optional: bool = False) -> tuple | None:
    """Positional forward arguments: one tensor, or a list/tuple of them (and other values).
    Tensors are copied, so a forward that writes into its input never writes into the
    caller's tensor."""
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor):
        return (own_copy(value),)
    if isinstance(value, (list, tuple)):
        return tuple(own_copy(v) if isinstance(v, torch.Tensor) else v for v in value)
    raise ArgumentError(f"{where}: {name} must be a tensor or a tuple/list of the forward's "
                        f"positional arguments{' (or None)' if optional else ''}, "
                        f"got {_got(value)}")


def own_copy(t: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) copy of ``t`` that keeps its ``requires_grad``."""
    with torch.inference_mode(False):
        return t.detach().clone().requires_grad_(t.requires_grad)


def strings(where: str, name: str, value: Any) -> tuple[str, ...]:
    """One string or a sequence of strings (glob patterns, rule names)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, (bytes, Mapping, torch.Tensor)):
        value = list(value)
        bad = [v for v in value if not isinstance(v, str)]
        if not bad:
            return tuple(value)
        raise ArgumentError(f"{where}: {name} must hold strings, but holds {_got(bad[0])} "
                            f"({bad[0]!r})")
    raise ArgumentError(f"{where}: {name} must be a string or a list of strings, "
                        f"got {_got(value)}")


def sequence(where: str, name: str, value: Any, *, optional: bool = True) -> list | None:
    """A list/tuple of objects (rules, guards), or None for the default."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes, Mapping, torch.Tensor)) or not isinstance(value, Iterable):
        raise ArgumentError(f"{where}: {name} must be a list or tuple"
                            f"{' (or None for the defaults)' if optional else ''}, "
                            f"got {_got(value)}")
    return list(value)


def mapping(where: str, name: str, value: Any, *, values_are_mappings: bool = False,
            optional: bool = True) -> dict | None:
    """A mapping with string keys (and, if asked, mappings as values), or None."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise ArgumentError(f"{where}: {name} must be a dict{' (or None)' if optional else ''}"
                            f", got {_got(value)}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ArgumentError(f"{where}: {name} must have string keys, got {key!r}")
        if values_are_mappings and not isinstance(item, Mapping):
            raise ArgumentError(f"{where}: {name}[{key!r}] must be a dict of parameter "
                                f"values, got {_got(item)}")
    return dict(value)


def path(where: str, name: str, value: Any) -> Path:
    """A file path: a str or os.PathLike, not empty."""
    if not isinstance(value, (str, os.PathLike)) or str(value) == "":
        raise ArgumentError(f"{where}: {name} must be a file path (str or pathlib.Path), "
                            f"got {_got(value)}{' (empty)' if value == '' else ''}")
    return Path(value)


def destination(where: str, name: str, value: Any) -> Path:
    """A file path to write, whose folder exists: checked before any long work, by the
    policy of ``files.write_atomic`` (a missing folder is refused, never created)."""
    target = path(where, name, value)
    if target.is_dir():
        raise DestinationError(f"{where}: cannot write {target}: it is a folder (give a file "
                               "name inside it)")
    if not target.parent.is_dir():
        raise DestinationError(f"{where}: cannot write {target}: folder {target.parent} "
                               "does not exist (create it first)")
    return target


def function(where: str, name: str, value: Any, *, optional: bool = True) -> Any:
    """Something callable (a degradation, a schedule, a stop test), or None."""
    if value is None and optional:
        return None
    if not callable(value):
        raise ArgumentError(f"{where}: {name} must be a function{' (or None)' if optional else ''}"
                            f", got {_got(value)}")
    return value


def integer(where: str, name: str, value: Any, *, minimum: int | None = None,
            optional: bool = False) -> int | None:
    """A whole number (not a bool), at least ``minimum``; None too if ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{where}: {name} must be an int, got {_got(value)}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{where}: {name} must be >= {minimum}, got {value}")
    return value


def number(where: str, name: str, value: Any, *, positive: bool = False,
           optional: bool = False) -> float | None:
    """A real number (not a bool), strictly positive if asked."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(f"{where}: {name} must be a number, got {_got(value)}")
    if positive and not value > 0:
        raise ArgumentError(f"{where}: {name} must be > 0, got {value}")
    return float(value)


def flag(where: str, name: str, value: Any, *, optional: bool = False) -> bool | None:
    """A bool (or None, meaning "decide for me", if ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ArgumentError(f"{where}: {name} must be True or False"
                            f"{' (or None)' if optional else ''}, got {_got(value)}")
    return value


def tolerance(where: str, name: str, value: Any) -> float:
    """A comparison tolerance: a real number >= 0 (not NaN)."""
    value = number(where, name, value)
    if not value >= 0:
        raise ArgumentError(f"{where}: {name} must be >= 0, got {value}")
    return value
