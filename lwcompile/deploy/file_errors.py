"""The errors of saving and loading model files (``persist``), in one place so that the
readers, the writer and the replay raise the same classes without importing each other."""

from __future__ import annotations

from ..errors import LwCompileError


class PersistError(LwCompileError):
    """Saving or loading a model failed (base class of the errors below)."""


class SaveFileError(PersistError):
    """The file is missing, not an lwcompile save, truncated, corrupt, or cannot be written."""


class WrongArchitectureError(PersistError):
    """The file holds another architecture than the caller expected, or was made from
    another original architecture than the one handed to ``load``."""


class UntrustedFileError(PersistError):
    """The file is a pickle (lwcompile's format before model files became data only), and
    loading it would run code chosen by whoever wrote it: refused unless ``trust=True``."""


class OriginalNeededError(PersistError):
    """A data-only model file is rebuilt from its original architecture: none was given."""


class ReplayError(PersistError):
    """The recorded plan cannot be replayed on the original given: the message names the
    first difference. Nothing was loaded."""


class UnknownRuleError(ReplayError):
    """The plan names a rule this lwcompile lacks, or a user's rule that was not passed."""


class WeightMismatchError(ReplayError):
    """The rebuilt model's tensors (names, shapes) or replacements differ from the file's."""


class NotSavableError(PersistError):
    """The model cannot be written as data (no plan, edited after lighten): the message says
    how to save it anyway (``format="pickle"``)."""
