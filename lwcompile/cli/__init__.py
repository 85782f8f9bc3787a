"""The ``lwcompile`` command line: lighten, plan, export, profile and report from the shell.

``app`` parses arguments and turns results and errors into output and exit codes,
``commands`` holds one function per subcommand, ``loading`` makes MODEL and --rule specs into
objects, ``crops`` draws the report's output images, ``progress`` reports on stderr, and
``spandrel`` imports the checkpoint reader without torchvision.
"""

from .app import main

__all__ = ["main"]
