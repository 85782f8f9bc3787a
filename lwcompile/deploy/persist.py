"""Save a lightened model and load it back: files that hold data only, never code.

``save`` writes a ``.safetensors`` file (``weights_file``): the weights, plus the report and
the plan lighten recorded (``light_plan``) as JSON in its metadata. ``load`` rebuilds the
architecture from the original the caller hands in (code the caller already trusts) by
replaying the plan with lwcompile's own rules (``rebuild``), checks it against the file, and
only then loads the weights, strictly: nothing in the file is ever imported or unpickled.

The first format (a pickle of the whole module, ``pickle_file``) is still read and written,
only on request: ``load(..., trust=True)`` and ``save(..., format="pickle")``, for models
that cannot be replayed (edited by hand after lighten); ``convert`` turns such a file into
the data-only one. Files are told apart by their content, not their names: a data-only
file named ``.pt`` is still data only. Writes are atomic (``files.write_atomic``).
Over ~300 lines: the one public entry point of both formats (which file is which, and the
header checks they share).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import arguments as check
from ..errors import ArgumentError, NotAModuleError, one_line
from ..report import Report, Row, Summary
from ..rule import Rule
from ..train.features import CHANNEL_ORDERS
from . import light_plan, pickle_file, rebuild, weights_file
from .file_errors import (
    NotSavableError,
    OriginalNeededError,
    PersistError,
    ReplayError,
    SaveFileError,
    UntrustedFileError,
    WeightMismatchError,
    WrongArchitectureError,
)

__all__ = ["save", "load", "info", "architecture", "report_from_dict", "file_kind",
           "PersistError", "SaveFileError", "WrongArchitectureError", "UntrustedFileError",
           "OriginalNeededError", "ReplayError", "WeightMismatchError", "NotSavableError"]

MAGIC = pickle_file.MAGIC
FORMATS = ("safetensors", "pickle")
_EXPECTED_KEYS = {"class_name", "params", "architecture"}
_HOW_TO_TRUST = ("if you trust whoever wrote it, load it with lwcompile.load(path, trust=True), "
                 "or convert it once into a data-only file: lwcompile convert OLD --original "
                 "MODEL --trust-pickle -o NEW.safetensors")


def save(model: nn.Module, path: str | os.PathLike[str], *, report: Report | None = None,
         format: str = "safetensors", source: str | None = None) -> Path:
    """Write ``model`` and its report to ``path`` atomically; returns the path.

    The default format holds data only: the weights and the plan ``lighten`` recorded on
    ``model``, replayed by ``load`` on the original. ``source`` records how the original was
    named (a ``module:factory`` spec or a checkpoint path), for the reader's information.
    ``format="pickle"`` writes the whole module as a pickle instead, for a model edited
    after lighten (loading it then needs ``trust=True``). ``report`` defaults to
    ``model.lwcompile_report``.
    """
    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"lwcompile.save needs an nn.Module, got {type(model).__name__}")
    path = check.path("lwcompile.save", "path", path)
    if report is not None and not isinstance(report, Report):
        raise ArgumentError(f"lwcompile.save: report must be a Report (or None), got "
                            f"a {type(report).__name__}")
    if format not in FORMATS:
        raise ArgumentError(f"lwcompile.save: format must be one of {FORMATS}, got {format!r}")
    if source is not None and not isinstance(source, str):
        raise ArgumentError(f"lwcompile.save: source must be a str (or None), got a "
                            f"{type(source).__name__}")
    report = report if report is not None else getattr(model, "lwcompile_report", None)
    header = {"lwcompile_version": light_plan.lwcompile_version(),
              "torch_version": torch.__version__, "class_name": type(model).__name__,
              "params": _params(model), "architecture": architecture(model),
              "report": report.to_dict() if isinstance(report, Report) else None,
              "channel_orders": getattr(model, CHANNEL_ORDERS, None)}
    if format == "pickle":
        pickle_file.write(path, model, header)
        return path
    plan = _savable_plan(model)
    if source is not None:
        plan["original"] = {**plan["original"], "source": source}
    tensors, aliases = _unshared(model.state_dict())
    weights_file.write(path, tensors, {"format": weights_file.FORMAT, "format_version": 1,
                                       **header, "plan": plan, "aliases": aliases})
    return path


def _savable_plan(model: nn.Module) -> dict[str, Any]:
    """The model's plan, refreshed with its training flags, after checking that the model is
    still what lighten made (the replay would otherwise rebuild something else)."""
    plan = getattr(model, "lwcompile_plan", None)
    pickle_hint = ("save(..., format='pickle') writes the whole module instead (a pickle: "
                   "loading it needs trust=True)")
    if not isinstance(plan, dict):
        raise NotSavableError(f"{type(model).__name__} has no lighten plan (lwcompile.lighten "
                              f"records one on its result), so it cannot be saved as data: "
                              f"{pickle_hint}")
    if plan.get("replayable", True) is not True:
        raise NotSavableError(f"the lighten that made {type(model).__name__} cannot be "
                              f"replayed from data ({plan['replayable']}): {pickle_hint}")
    if light_plan.shapes_digest(model) != plan["result"]["architecture"]:
        raise NotSavableError(f"{type(model).__name__} was changed after lighten (its tensor "
                              f"names or shapes differ from lighten's result): {pickle_hint}")
    for site in plan["sites"]:
        try:
            module = model.get_submodule(site["result_name"])
        except AttributeError:
            module = None
        if module is None or light_plan.structure_digest(module) != site["structure"]:
            raise NotSavableError(f"{type(model).__name__} was changed after lighten (the "
                                  f"replacement at {site['site']!r} differs): {pickle_hint}")
    return {**plan, "result": light_plan.result_entry(model)}


def _unshared(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                          dict[str, str]]:
    """CPU copies of the state's tensors, each entry that is the same tensor as an earlier
    one (tied weights) recorded as an alias of it instead."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """``"safetensors"`` (data only), ``"pickle"`` (the first format) or None (not lwcompile's:
    a checkpoint, say), judged from the first bytes and, for safetensors, its metadata."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            start = f.read(len(MAGIC))
    except OSError:
        return None
    if start == MAGIC:
        return "pickle"
    if weights_file.looks_like_safetensors(start):
        try:
            weights_file.read(path, path.read_bytes())
        except SaveFileError as exc:
            return "safetensors" if "not one lwcompile wrote" not in str(exc) else None
        return "safetensors"
    return None


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a model file of either format, after checking that the file is complete
    and intact; nothing is unpickled or imported."""
    path = check.path("lwcompile.info", "path", path)
    return _read(path)[0]


def load(path: str | os.PathLike[str], original: nn.Module | None = None, *,
         rules: Sequence[Rule] = (), example_inputs: Sequence[Any] | None = None,
         trust: bool = False, expected: str | nn.Module | Mapping[str, Any] | None = None,
         map_location: str | torch.device | None = "cpu") -> nn.Module:
    """Load a model written by ``save``; its report is at ``model.lwcompile_report``.

    A data-only file is rebuilt from ``original`` (the model it was lightened from: its
    weights do not matter) by replaying the file's plan; a rule of your own that made it is
    used only when passed in ``rules``; ``example_inputs`` replace the recorded ones where
    the file could not hold them. A file in the first (pickle) format loads only with
    ``trust=True``: unpickling runs code chosen by whoever wrote the file. ``expected``
    checks the saved architecture first: a class name, a module of the same architecture,
    or a mapping with any of ``class_name``, ``params``, ``architecture``.
    """
    path = check.path("lwcompile.load", "path", path)
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise ArgumentError(f"lwcompile.load: map_location must be a device name or "
                            f"torch.device (or None), got a {type(map_location).__name__}")
    if original is not None and not isinstance(original, nn.Module):
        raise NotAModuleError(f"lwcompile.load: original must be an nn.Module (the model the "
                              f"file was lightened from), got a {type(original).__name__}")
    rules = list(check.sequence("lwcompile.load", "rules", rules) or ())
    if any(not isinstance(r, Rule) for r in rules):
        raise ArgumentError("lwcompile.load: rules must be lwcompile.Rule instances")
    inputs = check.inputs("lwcompile.load", "example_inputs", example_inputs, optional=True)
    header, kind, data = _read(path)
    if expected is not None:
        _check_expected(path, header, expected)
    if kind == "pickle":
        if trust is not True:
            raise UntrustedFileError(
                f"{path} is a pickle (lwcompile's model file format before data-only files): "
                f"loading it runs code chosen by whoever wrote it; {_HOW_TO_TRUST}")
        model = pickle_file.unpickle(path, header, data, map_location)
    else:
        model = _rebuilt(path, header, data, original, rules, inputs)
        if map_location is not None:
            model.to(map_location)
    if getattr(model, "lwcompile_report", None) is None and header["report"] is not None:
        model.lwcompile_report = report_from_dict(header["report"])
    if header.get("channel_orders"):  # as init_layerwise left them (train/features.py)
        setattr(model, CHANNEL_ORDERS, header["channel_orders"])
    return model


def _rebuilt(path: Path, header: dict[str, Any], data: bytes, original: nn.Module | None,
             rules: list[Rule], inputs: tuple | None) -> nn.Module:
    plan, aliases = header["plan"], header["aliases"]
    if original is None:
        made = plan["original"]
        source = f" (its author says: {made['source']!r})" if made.get("source") else ""
        raise OriginalNeededError(
            f"{path} holds weights and a plan, not code: it is rebuilt from the model it was "
            f"lightened from, a {made['class_name']}{source}: pass it, lwcompile.load(path, "
            "original=model) (on the command line: --original MODEL)")
    shapes = weights_file.read(path, data)[1]
    table = {name: shapes[aliases.get(name, name)] for name in [*shapes, *aliases]}
    try:
        model = rebuild.rebuild(original, plan, table, rules=rules,
                                inputs=None if inputs is None else (inputs, {}))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # lighten turns its own failures into LwCompileErrors: these are the plan's values
        raise SaveFileError(f"{path} is corrupt: its plan cannot be used "
                            f"({one_line(exc)})") from exc
    state = weights_file.tensors(path, data)
    state.update({name: state[target] for name, target in aliases.items()})
    _match_dtypes(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightMismatchError(f"{path}: the weights do not load into the rebuilt model: "
                                  f"{one_line(exc)}") from exc
    model.lwcompile_plan = plan
    model.lwcompile_report = None  # the file's report, not the replay's
    return model


def _match_dtypes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give the rebuilt model the file's floating dtype (a model saved in half precision
    loads in half precision), when the file has one; mixed files must match as rebuilt."""
    own = model.state_dict()
    wanted = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(wanted) == 1 and any(t.is_floating_point() and t.dtype not in wanted
                                for t in own.values()):
        model.to(wanted.pop())
        own = model.state_dict()
    wrong = next((n for n, t in state.items() if own[n].dtype != t.dtype), None)
    if wrong is not None:
        raise WeightMismatchError(f"tensor {wrong!r} is {state[wrong].dtype} in the file, "
                                  f"{own[wrong].dtype} in the rebuilt model")


def architecture(model: nn.Module) -> str:
    """A fingerprint of the parameter and buffer names, shapes and dtypes (not the values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


def report_from_dict(data: Mapping[str, Any]) -> Report:
    """Rebuild a ``Report`` from ``Report.to_dict()`` (unknown keys are ignored)."""
    row_keys = {f.name for f in fields(Row)}
    summary_keys = {f.name for f in fields(Summary)}
    summary = data.get("summary")
    return Report(
        rows=[Row(**{k: v for k, v in row.items() if k in row_keys}) for row in data["rows"]],
        summary=Summary(**{k: v for k, v in summary.items() if k in summary_keys})
        if summary else None,
        log=list(data.get("log", [])), notes=dict(data.get("notes", {})))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _read(path: Path) -> tuple[dict[str, Any], str, bytes]:
    """Header, kind and data of a model file (the pickle payload, or the whole safetensors
    file), refusing anything incomplete or foreign before anything is made from it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SaveFileError(f"cannot read {path}: {one_line(exc)}") from exc
    if data.startswith(MAGIC):
        header, payload = pickle_file.read(path, data, _check_report)
        return header, "pickle", payload
    if not weights_file.looks_like_safetensors(data[:16]):
        raise SaveFileError(f"{path} is not an lwcompile model file{_what_it_is(data)}")
    header = weights_file.read(path, data)[0]
    try:
        light_plan.validate(header)
    except (ValueError, KeyError, TypeError) as exc:
        raise SaveFileError(f"{path} is corrupt: its lwcompile header is unreadable "
                            f"({one_line(exc)})") from exc
    if header["report"] is not None:
        _check_report(path, header["report"])
    return header, "safetensors", data


def _check_report(path: Path, report: Any) -> None:
    try:
        if not isinstance(report, Mapping):
            raise TypeError(f"a {type(report).__name__}, not a mapping")
        report_from_dict(report).to_dict()
    except Exception as exc:
        raise SaveFileError(f"{path} is corrupt: the header's report is unreadable "
                            f"({one_line(exc)})") from exc


def _what_it_is(data: bytes) -> str:
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\x80"):
        return (" (it is a plain torch.save file, e.g. a state_dict: load that with "
                "torch.load(..., weights_only=True) and load_state_dict, or lighten the model "
                "it belongs to)")
    if not data:
        return " (it is empty)"
    return ""


def _check_expected(path: Path, header: dict[str, Any],
                    expected: str | nn.Module | Mapping[str, Any]) -> None:
    """Compare the header's architecture with what the caller expects, before anything is
    built or unpickled."""
    if isinstance(expected, str):
        want: dict[str, Any] = {"class_name": expected}
    elif isinstance(expected, nn.Module):
        want = {"class_name": type(expected).__name__, "params": _params(expected),
                "architecture": architecture(expected)}
    elif isinstance(expected, Mapping):
        unknown = sorted(set(expected) - _EXPECTED_KEYS)
        if unknown:
            raise PersistError(f"expected= has unknown key {unknown[0]!r}; use "
                               f"{sorted(_EXPECTED_KEYS)}")
        want = dict(expected)
    else:
        raise PersistError("expected= must be a class name, a module or a mapping, not "
                           f"{type(expected).__name__}")
    wrong = [f"{key} {header.get(key)!r} (expected {value!r})"
             for key, value in want.items() if header.get(key) != value]
    if wrong:
        raise WrongArchitectureError(f"{path} holds a different architecture: "
                                     + ", ".join(wrong))
