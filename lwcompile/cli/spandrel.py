"""Import spandrel (the model zoo that identifies checkpoints) without torchvision.

spandrel 0.4.2 imports ``torchvision.transforms.functional`` when it is imported (LaMa's and
RestoreFormer's modules), although no code path lwcompile uses calls it. Without torchvision,
a stub of that module is put into ``sys.modules`` only while spandrel is imported (its
functions raise if ever called) and removed right after, so lwcompile never needs a
torchvision wheel and never leaves a fake torchvision behind. ``examples/zoo.py`` does the
same for the zoo.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import sys
import types
from collections.abc import Iterator


@contextlib.contextmanager
def torchvision_stub() -> Iterator[None]:
    """Provide a minimal ``torchvision.transforms.functional`` while spandrel is imported."""
    if importlib.util.find_spec("torchvision") is not None or "torchvision" in sys.modules:
        yield
        return

    def unavailable(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("torchvision is not installed (lwcompile import stub)")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"

    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    functional.rotate = unavailable  # type: ignore[attr-defined]
    functional.normalize = unavailable  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    tv.transforms = transforms  # type: ignore[attr-defined]
    stubs = {"torchvision": tv, "torchvision.transforms": transforms,
             "torchvision.transforms.functional": functional}
    sys.modules.update(stubs)
    try:
        yield
    finally:
        for name, module in stubs.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]

