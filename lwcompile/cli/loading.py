"""What the command line names, made into objects: MODEL as an nn.Module, --rule as a Rule.

MODEL is tried in this order: a file written by ``lwcompile lighten`` (told by its magic
bytes), any other file (a checkpoint whose architecture spandrel identifies from its keys), and
otherwise ``package.module:factory``. Every failure is an ``LwCompileError`` naming the spec,
so the command exits 1 with the reason rather than a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..deploy import persist
from ..errors import LwCompileError, NotAModuleError, one_line
from ..rule import Rule
from .spandrel import torchvision_stub


class ModelSpecError(LwCompileError):
    """MODEL names no loadable network (no such file or factory, unidentifiable checkpoint)."""


class RuleSpecError(LwCompileError):
    """A --rule names nothing that makes an lwcompile Rule."""


def load_model(spec: str) -> nn.Module:
    """The network MODEL names: an lwcompile save, a spandrel checkpoint or module:factory."""
    path = Path(spec)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(len(persist.MAGIC)) == persist.MAGIC:
                return persist.load(path)
        return _load_checkpoint(path)
    obj = _find(spec, ModelSpecError, "no file, nor a factory like 'package.module:build'")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModelSpecError(f"{spec!r} is a {type(obj).__name__}, not a factory")
        try:
            obj = obj()
        except Exception as exc:
            raise ModelSpecError(f"calling {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise NotAModuleError(f"{spec!r} returned a {type(obj).__name__}, not an nn.Module")
    return obj


def load_rule(spec: str) -> Rule:
    """The Rule a --rule names: a Rule instance, or a class or factory called without
    arguments."""
    obj = _find(spec, RuleSpecError, "not like 'package.module:RuleClass'")
    try:
        rule = obj() if callable(obj) and not isinstance(obj, Rule) else obj
    except Exception as exc:
        raise RuleSpecError(f"calling {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(rule, Rule):
        raise RuleSpecError(f"{spec!r} gives a {type(rule).__name__}, not an lwcompile Rule")
    return rule


def _find(spec: str, error: type[LwCompileError], what: str) -> Any:
    """The object ``package.module:name`` names (the current folder importable too)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise error(f"{spec!r} is {what}")
    if os.getcwd() not in sys.path:  # console scripts do not put the current folder there
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise error(f"cannot find {spec!r}: {one_line(exc)}") from exc
    return obj


def _load_checkpoint(path: Path) -> nn.Module:
    """The network in a checkpoint file, its architecture identified by spandrel (eval mode)."""
    try:
        with torchvision_stub():
            from spandrel import ModelLoader
    except ImportError as exc:
        raise ModelSpecError(f"reading checkpoint {path} needs spandrel (pip install "
                             f"spandrel): {one_line(exc)}") from exc
    try:
        with torchvision_stub():
            model = ModelLoader().load_from_file(path).model
    except Exception as exc:  # spandrel raises ValueError, UnsupportedModelError, pickle errors
        why = one_line(exc).rstrip(": ")
        if why == "UnsupportedModelError":
            why = "no architecture spandrel knows matches its keys"
        raise ModelSpecError(f"{path} is not a model checkpoint spandrel can identify: "
                             f"{why}") from exc
    return model.eval()
