"""Small helpers shared by the test files (plain functions; fixtures live in conftest.py).

Import them as ``from tests.helpers import ...`` (one module identity for every test file).
Parameter counts come from the public ``lwcompile.count_params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import lwcompile


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: the tolerance a rewritten or exported graph is held to."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, check_stride=False)


@torch.no_grad()
def run(model: nn.Module, args: tuple) -> torch.Tensor:
    """One forward pass on the tuple of inputs ``args``, without autograd."""
    return model(*args)


def image_and_mask(h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An inpainting input (GLCIC's two arguments): a seeded RGB image and a mask whose
    rectangular hole (ones = missing) covers rows h/4..h/2 and columns w/4..3w/4."""
    image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 4: h // 2, w // 4: 3 * w // 4] = 1.0
    return image, mask


def depthwise_feeding_pixel_shuffle(model: nn.Module, inputs: tuple) -> set[str]:
    """Depthwise convs whose output reaches a pixel shuffle, seen in a real forward pass
    (independent of the compiler's own guard, which decides from the traced graph)."""
    names = [n for n, m in model.named_modules() if lwcompile.is_depthwise(m)]
    return lwcompile.record_flow(model, inputs, watch=names).feeds_pixel_shuffle & set(names)


def zoo_cases(slow: frozenset[str] = frozenset()) -> list:
    """One pytest param per spandrel zoo network: marked ``zoo`` outside ``ZOO_FAST`` (only
    ``make zoo`` runs those), and ``slow`` for the fast-subset names in ``slow``."""
    import pytest

    from examples import zoo  # imports spandrel: only for the files that test the zoo

    def marks(name: str) -> tuple:
        if name not in zoo.ZOO_FAST:
            return (pytest.mark.zoo,)
        return (pytest.mark.slow,) if name in slow else ()

    return [pytest.param(name, id=name, marks=marks(name)) for name in zoo.ZOO]


def small_dncnn_and_light() -> tuple[nn.Module, nn.Module]:
    """A seeded 4-layer, 16-feature DnCNN (eval) and ``lighten`` of it: the teacher and
    student the training tests run on."""
    from examples.dncnn import DnCNN

    torch.manual_seed(0)
    teacher = DnCNN(features=16, depth=4).eval()
    return teacher, lwcompile.lighten(teacher, (torch.rand(1, 1, 24, 24),))


TINY_FACTORY = (
    "import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),\n"
    "                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),\n"
    "                         nn.Conv2d(16, 3, 3, padding=1))\n")


def tiny_factory_in(folder: Path, monkeypatch: Any, module: str) -> None:
    """Work in ``folder``, where ``MODULE:build`` is a small three-conv factory (a module name
    of its own per test file, so the import caches of the files do not meet)."""
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    (folder / f"{module}.py").write_text(TINY_FACTORY)


class ConvThen(nn.Module):
    """A seeded 3 -> 3 3x3 conv, then ``then(conv_output, input)``: the small models that each
    reproduce one problem an exporter had with a real network."""

    def __init__(self, then: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.then = then

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.then(self.conv(x), x)


def runs_in_executorch_as_eager(model: nn.Module, x: torch.Tensor, path: Path,
                                tolerance: float = 1e-5) -> Any:
    """``model`` through ``export_mobile`` to ``path``, its program run by ExecuTorch on
    ``x`` and held to eager within ``tolerance`` (rtol and atol); returns the export."""
    from lwcompile.deploy.mobile import export_mobile, load_pte

    export = export_mobile(model, (x,), path)
    (got,) = load_pte(export.path)(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=tolerance, atol=tolerance)
    return export
