"""Writing files so that an interrupted write never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import DestinationError, one_line


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the complete new one, never a part.

    The one policy of every lwcompile writer for a missing folder: it is refused, never
    created (a mistyped path should not grow a folder tree), with a ``DestinationError``
    (an ``LwCompileError`` and an ``OSError``) naming the path; so is a folder that cannot
    be written and a write the disk refuses. The temporary file is removed on any failure.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DestinationError(f"cannot write {path}: folder {path.parent} does not exist "
                               "(create it first)")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DestinationError(f"cannot write {path}: {one_line(exc)}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, DestinationError):
            raise DestinationError(f"cannot write {path}: {one_line(exc)}") from exc
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
