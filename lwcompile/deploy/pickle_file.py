"""lwcompile's first model file format: a checked header and a ``torch.save`` pickle of the
whole module. Kept for models that cannot be replayed (edited by hand after lighten) and to
read old files, only behind an explicit ``trust=True``: unpickling runs code chosen by
whoever wrote the file, and the header's sha256, written by that same person, proves nothing.

    b"LWCOMPILE\\0SAVE\\n" | header length (8 bytes, big-endian) | header (JSON) | payload

The header (versions, class name, parameter count, an architecture fingerprint, the report,
the payload's size and sha256) is read and checked before anything is unpickled, so a
truncated, corrupt or foreign file is refused with a clear error instead of a pickle
traceback.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import one_line
from ..files import write_atomic
from ..tracing.fx_helpers import picklable
from .file_errors import SaveFileError

MAGIC = b"LWCOMPILE\x00SAVE\n"
FORMAT = 1
_LENGTH = struct.Struct(">Q")
_MAX_HEADER = 64 * 2**20  # a report is kilobytes; anything larger is not our header
_HEADER_KEYS = ("format", "lwcompile_version", "torch_version", "class_name", "params",
                "architecture", "report", "payload_bytes", "payload_sha256")


def write(path: Path, model: nn.Module, header: dict[str, Any]) -> None:
    """Pickle ``model`` behind ``header`` (sizes and sha256 added) into ``path`` atomically."""
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
    header = {"format": FORMAT, **header, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    head = json.dumps(header, default=str).encode()
    if not path.parent.is_dir():
        raise SaveFileError(f"cannot save to {path}: folder {path.parent} does not exist")
    try:
        write_atomic(path, lambda f: f.writelines([MAGIC, _LENGTH.pack(len(head)), head,
                                                   payload]))
    except OSError as exc:
        raise SaveFileError(f"cannot save to {path}: {one_line(exc)}") from exc


def unpickle(path: Path, header: Mapping[str, Any], payload: bytes,
             map_location: str | torch.device | None) -> nn.Module:
    """The pickled module: runs the file's code. Only called with ``trust=True``."""
    try:
        model = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as exc:
        raise SaveFileError(
            f"{path}: the model cannot be rebuilt here: {one_line(exc)} (saved with torch "
            f"{header['torch_version']}, lwcompile {header['lwcompile_version']}; this is "
            f"torch {torch.__version__}; the model's classes must be importable)"
        ) from exc
    if not isinstance(model, nn.Module) or sum(p.numel() for p in model.parameters()) \
            != header["params"] or type(model).__name__ != header["class_name"]:
        raise SaveFileError(f"{path}: the payload does not match its header (corrupt file)")
    return model


def read(path: Path, data: bytes,
         check_report: Any = None) -> tuple[dict[str, Any], bytes]:
    """Header and payload of a pickle save file (``data`` starts with ``MAGIC``), refusing
    anything incomplete or foreign; ``check_report`` validates the header's report."""
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
    _check_fields(path, header, check_report)
    payload = data[start + length:]
    if len(payload) != payload_bytes:
        raise SaveFileError(f"{path} is truncated or corrupt: the model data is "
                            f"{len(payload):,} bytes, the header says {payload_bytes:,}")
    if hashlib.sha256(payload).hexdigest() != sha:
        raise SaveFileError(f"{path} is corrupt: the model data fails its sha256 check")
    return header, payload


def _check_fields(path: Path, header: dict[str, Any], check_report: Any) -> None:
    """The fields others read from a header have their types, and the report rebuilds: a
    header that parses but holds garbage is refused here, not by a raw error in a caller."""
    wanted = {"class_name": str, "params": int, "lwcompile_version": str, "torch_version": str}
    for key, kind in wanted.items():
        if not isinstance(header[key], kind) or isinstance(header[key], bool):
            raise SaveFileError(f"{path} is corrupt: the header's {key} is unreadable "
                                f"(expected a {kind.__name__}, got {header[key]!r:.60})")
    if header["report"] is not None and check_report is not None:
        check_report(path, header["report"])
