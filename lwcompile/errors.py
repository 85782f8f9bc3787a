"""Every failure a user can cause is an ``LwCompileError``: one ``except`` catches them all,
and the message names the problem instead of surfacing a torch.fx traceback."""


class LwCompileError(Exception):
    """Base class of every error lwcompile raises on purpose."""


class NotAModuleError(LwCompileError, TypeError):
    """The object handed to lwcompile is not an ``nn.Module``."""


class ExampleInputError(LwCompileError, ValueError):
    """The model cannot run on the example input (or none could be inferred)."""


class UntraceableError(LwCompileError):
    """No part of the model could be traced or even visited for rewriting."""


class RuleError(LwCompileError):
    """A rule or guard is malformed or misused (no builder, name collision, ...)."""


class VerificationError(LwCompileError):
    """The assembled result does not behave like the original (shape change, crash)."""
