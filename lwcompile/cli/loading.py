"""What the command line names, made into objects: MODEL as an nn.Module, --rule as a Rule.

MODEL is tried in this order: a file written by ``lwcompile lighten`` (told by its content:
a data-only ``.safetensors`` file is rebuilt from ``--original``; a pickle file of the first
format loads only with ``--trust-pickle``), any other file (a checkpoint whose architecture
spandrel identifies from its keys, read as tensors only: safetensors, or ``torch.load`` with
``weights_only=True``), and otherwise ``package.module:factory``. A name recorded inside a
file (the original's spec) is never imported or loaded unless the user passes it. Every
failure is an ``LwCompileError`` naming the spec, so the command exits 1 with the reason
rather than a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..deploy import persist
from ..deploy.weights_file import looks_like_safetensors
from ..errors import LwCompileError, NotAModuleError, one_line
from ..rule import Rule
from .spandrel import torchvision_stub


class ModelSpecError(LwCompileError):
    """MODEL names no loadable network (no such file or factory, unidentifiable checkpoint)."""


class RuleSpecError(LwCompileError):
    """A --rule names nothing that makes an lwcompile Rule."""


def load_model(spec: str, *, original: str | None = None, trust_pickle: bool = False,
               rules: Sequence[Rule] = ()) -> nn.Module:
    """The network MODEL names: an lwcompile model file (rebuilt from ``original``, a MODEL
    spec itself, with the user's ``rules``; or, for a pickle file, only with
    ``trust_pickle``), a spandrel checkpoint or module:factory."""
    path = Path(spec)
    if path.is_file():
        kind = persist.file_kind(path)
        if kind == "safetensors":
            if original is None:
                persist.info(path)  # a damaged file is refused as such first
                raise ModelSpecError(_original_needed(path))
            return persist.load(path, original=load_model(original), rules=rules)
        if kind == "pickle":
            return persist.load(path, trust=trust_pickle)
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
    state = _checkpoint_tensors(path)
    try:
        with torchvision_stub():
            from spandrel import canonicalize_state_dict

            model = ModelLoader().load_from_state_dict(canonicalize_state_dict(state)).model
    except Exception as exc:  # spandrel raises ValueError, UnsupportedModelError
        why = one_line(exc).rstrip(": ")
        if why == "UnsupportedModelError":
            why = "no architecture spandrel knows matches its keys"
        raise ModelSpecError(f"{path} is not a model checkpoint spandrel can identify: "
                             f"{why}") from exc
    return model.eval()


def _checkpoint_tensors(path: Path) -> dict[str, Any]:
    """A checkpoint's tensors, read as data only: safetensors, or ``torch.load`` restricted
    to tensors and containers (``weights_only=True``); never TorchScript or a full pickle."""
    try:
        with path.open("rb") as f:
            start = f.read(16)
        if looks_like_safetensors(start):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors of damaged or odd files
        raise ModelSpecError(f"{path} is not a model checkpoint spandrel can identify: it "
                             f"cannot be read as tensors only ({one_line(exc)})") from exc
    if not isinstance(state, dict):
        raise ModelSpecError(f"{path} is not a model checkpoint spandrel can identify: it "
                             f"holds a {type(state).__name__}, not a state dict")
    return state


def _original_needed(path: Path) -> str:
    made = persist.info(path)["plan"]["original"]
    source = made.get("source")
    said = (f"; its author says it was made from {source!r} (a name lwcompile never imports "
            f"or loads from a file: pass --original {source} yourself if you trust it)"
            if source else "")
    return (f"{path} holds weights and a plan, not code: it is rebuilt from the "
            f"{made['class_name']} it was lightened from: pass --original MODEL{said}")
