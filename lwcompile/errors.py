"""Every failure a user can cause is an ``LwCompileError``: one ``except`` catches them all,
and the message names the problem instead of surfacing a torch.fx traceback."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

#: the colour codes some exporters put in their messages (the ONNX exporter's steps)
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = _TERMINAL_COLOURS.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


@contextlib.contextmanager
def raised_as(error: type[LwCompileError], message: str, hint: str = "") -> Iterator[None]:
    """A raw error from the body (from inside torch, an exporter, a runtime) raised as
    ``error("{message}: {one_line}{hint}")`` with the cause chained; an ``LwCompileError``
    passes unchanged (it already names the problem)."""
    try:
        yield
    except LwCompileError:
        raise
    except Exception as exc:
        raise error(f"{message}: {one_line(exc)}{hint}") from exc


class LwCompileWarning(UserWarning):
    """Something the user asked for had no effect (e.g. an exclude pattern matching nothing)."""


class LwCompileError(Exception):
    """Base class of every error lwcompile raises on purpose."""


class NotAModuleError(LwCompileError, TypeError):
    """The object handed to lwcompile is not an ``nn.Module``."""


class ArgumentError(LwCompileError, TypeError):
    """A public function was called with an argument of the wrong type or value; the message
    names the argument and what was expected."""


class DestinationError(LwCompileError, OSError):
    """A file cannot be written where asked: its folder does not exist or is not writable,
    or the disk refused the write."""


class TrainingError(LwCompileError):
    """``init_layerwise`` or ``distill`` cannot train on what it was given (images the
    teacher cannot read, a teacher whose outputs or modules do not match the student)."""


class CheckpointError(TrainingError):
    """A distill checkpoint to resume from is unreadable, foreign, or another model's."""


class ExampleInputError(LwCompileError, ValueError):
    """The model cannot run on the example input (or none could be inferred)."""


class UntraceableError(LwCompileError):
    """No part of the model could be traced or even visited for rewriting."""


class RuleError(LwCompileError):
    """A rule or guard is malformed or misused (no builder, name collision, ...)."""


class VerificationError(LwCompileError):
    """The assembled result does not behave like the original (shape change, crash)."""


class ExportError(LwCompileError):
    """An exporter (torch.export, the ONNX exporter, ExecuTorch's lowering) could not take
    this model; the message names the exporter and its first complaint, the cause is chained."""


class CompileFailed(LwCompileError):
    """Compilation hit something unexpected; the message names it and the model is untouched."""


class NothingToLighten(LwCompileError):
    """No rewrite could be applied; ``report`` says what was found and why each was kept."""

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report
