"""The data-only model file: a standard ``.safetensors`` file whose metadata holds lwcompile's
header (versions, report, plan) as JSON under the key ``"lwcompile"``.

Layout (the safetensors format)::

    header length N (8 bytes, little-endian) | header (N bytes of JSON: each tensor's dtype,
    shape and byte range, and "__metadata__": {"lwcompile": "<JSON>"}) | tensor bytes

Anyone can open it with ``safetensors.torch.load_file`` alone. Reading checks, before any
tensor is made: the header parses and is lwcompile's, every byte range lies inside the
file, the data section has the length the header implies (truncation) and the sha256 the
lwcompile header records (damage: it proves integrity, not authorship, which a file that
holds data only does not need). Writing is atomic (``files.write_atomic``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as serialise

from ..errors import one_line
from ..files import write_atomic
from .file_errors import SaveFileError

KEY = "lwcompile"
FORMAT = "lwcompile-plan"
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def looks_like_safetensors(start: bytes) -> bool:
    """Whether the first bytes could begin a safetensors file (length, then ``{``)."""
    return len(start) >= 9 and start[8:9] == b"{" and \
        _LENGTH.unpack_from(start)[0] < _MAX_HEADER


def write(path: Path, tensors: Mapping[str, torch.Tensor], header: dict[str, Any]) -> None:
    """Write ``tensors`` (contiguous, unshared, on the CPU) and ``header`` to ``path``."""
    try:
        first = serialise(dict(tensors),
                          metadata={KEY: json.dumps(header | {"data_sha256": ""}, default=str)})
        data = first[8 + _LENGTH.unpack_from(first)[0]:]
        text = json.dumps(header | {"data_sha256": hashlib.sha256(data).hexdigest()},
                          default=str)
        blob = serialise(dict(tensors), metadata={KEY: text})
    except (SafetensorError, ValueError, TypeError, RuntimeError) as exc:  # e.g. a dtype
        raise SaveFileError(f"cannot save to {path}: the tensors cannot be written as "
                            f"safetensors ({one_line(exc)})") from exc
    if blob[8 + _LENGTH.unpack_from(blob)[0]:] != data:  # the layout ignores the metadata
        raise SaveFileError(f"cannot save to {path}: the safetensors layout changed between "
                            "two writes of the same tensors")
    if not path.parent.is_dir():
        raise SaveFileError(f"cannot save to {path}: folder {path.parent} does not exist")
    try:
        write_atomic(path, lambda f: f.write(blob))
    except OSError as exc:
        raise SaveFileError(f"cannot save to {path}: {one_line(exc)}") from exc


def read(path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The lwcompile header and each tensor's shape, after checking the file is complete and
    intact; ``data`` is the file's bytes. No tensor is made."""
    if len(data) < 8:
        raise SaveFileError(f"{path} is truncated: the safetensors header is incomplete")
    (length,) = _LENGTH.unpack_from(data)
    if length > _MAX_HEADER or len(data) < 8 + length:
        raise SaveFileError(f"{path} is truncated or corrupt: the safetensors header is "
                            "incomplete")
    try:
        table = json.loads(data[8:8 + length])
        if not isinstance(table, dict):
            raise TypeError(f"a {type(table).__name__}, not an object")
        meta = table.pop("__metadata__", None) or {}
    except (ValueError, TypeError) as exc:
        raise SaveFileError(f"{path} is corrupt: unreadable safetensors header "
                            f"({one_line(exc)})") from exc
    if not isinstance(meta, dict) or KEY not in meta:
        raise SaveFileError(f"{path} is a safetensors file, but not one lwcompile wrote (no "
                            "lwcompile plan in its metadata): if it is a checkpoint, lighten "
                            "the model it belongs to")
    try:
        header = json.loads(meta[KEY])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise KeyError("format")
        shapes = {name: [int(d) for d in entry["shape"]] for name, entry in table.items()}
        end = max((int(entry["data_offsets"][1]) for entry in table.values()), default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise SaveFileError(f"{path} is corrupt: unreadable lwcompile header "
                            f"({one_line(exc)})") from exc
    payload = data[8 + length:]
    if len(payload) != end:
        raise SaveFileError(f"{path} is truncated or corrupt: the tensor data is "
                            f"{len(payload):,} bytes, the header says {end:,}")
    if hashlib.sha256(payload).hexdigest() != header.get("data_sha256"):
        raise SaveFileError(f"{path} is corrupt: the tensor data fails its sha256 check")
    return header, shapes


def tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a file ``read`` has checked."""
    try:
        return load_tensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise SaveFileError(f"{path} is corrupt: {one_line(exc)}") from exc
