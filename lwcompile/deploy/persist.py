"""Save a lightened model (architecture and weights) and load it back without re-running lighten.

The file is a short checked header followed by a ``torch.save`` pickle of the whole module::

    b"LWCOMPILE\\0SAVE\\n" | header length (8 bytes, big-endian) | header (JSON) | payload

The header (lwcompile and torch versions, class name, parameter count, an architecture
fingerprint, the report, the payload's size and sha256) is read and checked *before* anything
is unpickled, so a truncated, corrupt or foreign file, or one holding another architecture,
is refused with a clear error instead of a pickle traceback. Files are written atomically
(``lwcompile.files.write_atomic``): an interrupted save leaves the previous file as it was.
GraphModules in the model are made picklable for the save (``tracing.fx_helpers.picklable``).

Loading unpickles Python objects: only load files you trust. The classes of the model's
modules (yours included) must be importable where the file is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import arguments as check
from ..errors import ArgumentError, LwCompileError, NotAModuleError, one_line
from ..files import write_atomic
from ..report import Report, Row, Summary
from ..tracing.fx_helpers import picklable

MAGIC = b"LWCOMPILE\x00SAVE\n"
FORMAT = 1
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 64 * 2**20  # a report is kilobytes; anything larger is not our header
_EXPECTED_KEYS = {"class_name", "params", "architecture"}
_HEADER_KEYS = ("format", "lwcompile_version", "torch_version", "class_name", "params",
                "architecture", "report", "payload_bytes", "payload_sha256")


class PersistError(LwCompileError):
    """Saving or loading a model failed (base class of the two errors below)."""


class SaveFileError(PersistError):
    """The file is missing, not an lwcompile save, truncated, corrupt, or cannot be written."""


class WrongArchitectureError(PersistError):
    """The file holds another architecture than the caller expected."""


def save(model: nn.Module, path: str | os.PathLike[str], *,
         report: Report | None = None) -> Path:
    """Write ``model`` (whole module, weights included) and its report to ``path`` atomically.

    ``report`` defaults to ``model.lwcompile_report`` (set by ``lighten``). Returns the path.
    """
    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"lwcompile.save needs an nn.Module, got {type(model).__name__}")
    path = check.path("lwcompile.save", "path", path)
    if report is not None and not isinstance(report, Report):
        raise ArgumentError(f"lwcompile.save: report must be a Report (or None), got "
                                  f"a {type(report).__name__}")
    report = report if report is not None else getattr(model, "lwcompile_report", None)
    buffer = io.BytesIO()
    try:
        with picklable(model):
            torch.save(model, buffer)
    except Exception as exc:
        raise SaveFileError(
            f"cannot save {type(model).__name__}: {one_line(exc)} (every module class must be "
            "defined at module level so that it can be pickled and imported again)"
        ) from exc
    payload = buffer.getvalue()
    header = {
        "format": FORMAT,
        "lwcompile_version": _version(),
        "torch_version": torch.__version__,
        "class_name": type(model).__name__,
        "params": _params(model),
        "architecture": architecture(model),
        "report": report.to_dict() if isinstance(report, Report) else None,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header, default=str).encode()
    _write(path, [MAGIC, _LENGTH.pack(len(head)), head, payload])
    return path


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a save file, after checking that the file is complete and intact."""
    return _read(check.path("lwcompile.info", "path", path))[0]


def load(path: str | os.PathLike[str], *,
         expected: str | nn.Module | Mapping[str, Any] | None = None,
         map_location: str | torch.device | None = "cpu") -> nn.Module:
    """Load a model written by ``save``; its report is at ``model.lwcompile_report``.

    ``expected`` checks the architecture before anything is unpickled: a class name, a
    module of the same architecture (class name, parameter count and parameter shapes), or
    a mapping with any of ``class_name``, ``params``, ``architecture``.
    """
    path = check.path("lwcompile.load", "path", path)
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise ArgumentError(f"lwcompile.load: map_location must be a device name or "
                                  f"torch.device (or None), got a {type(map_location).__name__}")
    header, payload = _read(path)
    if expected is not None:
        _check_expected(path, header, expected)
    try:
        model = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise SaveFileError(
            f"{path}: the model cannot be rebuilt here: {one_line(exc)} (saved with torch "
            f"{header['torch_version']}, lwcompile {header['lwcompile_version']}; this is "
            f"torch {torch.__version__}; the model's classes must be importable)"
        ) from exc
    if not isinstance(model, nn.Module) or _params(model) != header["params"] \
            or type(model).__name__ != header["class_name"]:
        raise SaveFileError(f"{path}: the payload does not match its header (corrupt file)")
    if getattr(model, "lwcompile_report", None) is None and header["report"] is not None:
        model.lwcompile_report = report_from_dict(header["report"])
    return model


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


def _version() -> str:
    try:
        return metadata.version("lwcompile")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def _write(path: Path, chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically, as a SaveFileError where that fails."""
    if not path.parent.is_dir():
        raise SaveFileError(f"cannot save to {path}: folder {path.parent} does not exist")
    try:
        write_atomic(path, lambda f: f.writelines(chunks))
    except OSError as exc:
        raise SaveFileError(f"cannot save to {path}: {one_line(exc)}") from exc


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    """Header and payload of a save file, refusing anything incomplete or foreign."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SaveFileError(f"cannot read {path}: {one_line(exc)}") from exc
    if not data.startswith(MAGIC):
        raise SaveFileError(f"{path} is not an lwcompile save file{_what_it_is(data)}")
    start = len(MAGIC) + _LENGTH.size
    if len(data) < start:
        raise SaveFileError(f"{path} is truncated: the header is incomplete")
    (length,) = _LENGTH.unpack_from(data, len(MAGIC))
    if length > _MAX_HEADER or len(data) < start + length:
        raise SaveFileError(f"{path} is truncated or corrupt: the header is incomplete")
    try:
        header = json.loads(data[start:start + length])
        missing = [key for key in _HEADER_KEYS if key not in header]
        if not isinstance(header, dict) or missing:
            raise KeyError(f"no {missing[0] if missing else 'fields'}")
        payload_bytes, sha = int(header["payload_bytes"]), str(header["payload_sha256"])
        fmt = int(header["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SaveFileError(f"{path} is corrupt: unreadable header ({one_line(exc)})") from exc
    if fmt > FORMAT:
        raise SaveFileError(f"{path} was written by a newer lwcompile "
                            f"({header.get('lwcompile_version')}, file format {fmt}): upgrade")
    _check_fields(path, header)
    payload = data[start + length:]
    if len(payload) != payload_bytes:
        raise SaveFileError(f"{path} is truncated or corrupt: the model data is "
                            f"{len(payload):,} bytes, the header says {payload_bytes:,}")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise SaveFileError(f"{path} is corrupt: the model data fails its sha256 check")
    return header, payload


def _check_fields(path: Path, header: dict[str, Any]) -> None:
    """The fields others read from a header have their types, and the report rebuilds: a
    header that parses but holds garbage is refused here, not by a raw error in a caller."""
    wanted = {"class_name": str, "params": int, "lwcompile_version": str, "torch_version": str}
    for key, kind in wanted.items():
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise SaveFileError(f"{path} is corrupt: the header's {key} is unreadable "
                                f"(expected a {kind.__name__}, got {header[key]!r:.60})")
    if header["report"] is not None:
        try:
            if not isinstance(header["report"], Mapping):
                raise TypeError(f"a {type(header['report']).__name__}, not a mapping")
            report_from_dict(header["report"]).to_dict()
        except Exception as exc:
            raise SaveFileError(f"{path} is corrupt: the header's report is unreadable "
                                f"({one_line(exc)})") from exc


def _what_it_is(data: bytes) -> str:
    if data.startswith(b"PK\x03\x04") or data.startswith(b"\x80"):
        return (" (it is a plain torch.save file, e.g. a state_dict: load that with "
                "torch.load and load_state_dict, or lighten the model it belongs to)")
    if not data:
        return " (it is empty)"
    return ""


def _check_expected(path: Path, header: dict[str, Any],
                    expected: str | nn.Module | Mapping[str, Any]) -> None:
    """Compare the header's architecture with what the caller expects; before unpickling."""
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
