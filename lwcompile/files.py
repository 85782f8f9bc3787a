"""Writing files so that an interrupted write never leaves a half-written one behind.

The temporary file is named ``.<name>.<host>.<pid>.<random>.lwtmp`` beside the destination,
so that a save killed outright (SIGKILL, power loss), which cannot remove its own temporary
file, leaves one that the next save of the same destination recognises and removes: one
whose process is gone on this host, or (written from another host, which cannot be asked)
older than a day.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import DestinationError, one_line

TEMP_SUFFIX = ".lwtmp"
#: a temporary file from another host is stale after this long (its process cannot be asked)
FOREIGN_TEMP_AGE_S = 24 * 3600


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())[:64]


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` that says whose it is (host and process)."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}."
                          f"{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _is_stale(temp: Path, destination: Path, now: float) -> bool:
    owner = temp.name[len(destination.name) + 2:-len(TEMP_SUFFIX)]  # host.pid.random
    host, _, rest = owner.rpartition(".")[0].rpartition(".")
    if not rest.isdigit():
        return False  # not one of ours
    if host == _host():
        return int(rest) != os.getpid() and not _alive(int(rest))
    try:
        return now - temp.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except OSError:
        return False


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` that were killed before they
    could clean up (see the module docstring); return them."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError):
        for temp in path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_SUFFIX}"):
            if _is_stale(temp, path, now):
                with contextlib.suppress(OSError):
                    temp.unlink()
                    removed.append(temp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _open_new(temp: Path, like: Path) -> int:
    """Create ``temp`` with the mode a plain ``open(path, "wb")`` would give ``like``: an
    existing file's own mode, else 0666 less the umask (the kernel applies it)."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                 0o666)
    with contextlib.suppress(OSError):
        existing = like.stat()
        if stat.S_ISREG(existing.st_mode):
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))
    return fd


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the complete new one, never a part. The file gets
    the mode a plain ``open()`` would give it (the umask's, or the replaced file's).

    The one policy of every lwcompile writer for a missing folder: it is refused, never
    created (a mistyped path should not grow a folder tree), with a ``DestinationError``
    (an ``LwCompileError`` and an ``OSError``) naming the path; so is a folder that cannot
    be written and a write the disk refuses. The temporary file is removed on any failure,
    and temporary files of earlier killed writes of ``path`` on the next write.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DestinationError(f"cannot write {path}: folder {path.parent} does not exist "
                               "(create it first)")
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        fd = _open_new(tmp, path)
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
