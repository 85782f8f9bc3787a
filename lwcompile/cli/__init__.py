"""The ``lwcompile`` command line: lighten, report, profile, export, distil."""

from .commands import main

__all__ = ["main"]
