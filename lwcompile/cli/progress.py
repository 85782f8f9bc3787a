"""Progress on stderr while a command runs, so that stdout carries only the result."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def stage(message: str, quiet: bool) -> Iterator[None]:
    """Say on stderr what is running (ticking seconds on a terminal) and how long it took.

    Whatever the library prints meanwhile (e.g. distill's progress) goes to stderr too, so
    ``--json`` output on stdout stays parseable. ``quiet`` keeps only that redirection."""
    err = sys.stderr
    if quiet:
        with contextlib.redirect_stdout(err):
            yield
        return
    start, stop = time.monotonic(), threading.Event()
    ticker = None
    if err.isatty():
        def tick() -> None:
            while not stop.wait(1.0):
                err.write(f"\rlwcompile: {message} ... {time.monotonic() - start:.0f} s")
                err.flush()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        print(f"lwcompile: {message} ...", file=err, flush=True)
    outcome = "failed"
    try:
        with contextlib.redirect_stdout(err):
            yield
        outcome = "done"
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        print(f"{chr(13) if ticker else ''}lwcompile: {message}: {outcome} in "
              f"{time.monotonic() - start:.1f} s", file=err, flush=True)
