"""Every model of the spandrel zoo (examples/zoo.py) builds and runs one forward pass.

Entries outside ``zoo.ZOO_FAST`` are marked ``zoo``: ``pytest -m "not zoo"`` runs only the
fast subset.
"""

from __future__ import annotations

import pkgutil

import pytest
import torch

# examples.zoo imports spandrel behind a temporary torchvision stub (spandrel 0.4.2 imports
# torchvision at import time, but none of the zoo's code paths use it).  Import it before
# importorskip: otherwise importorskip("spandrel") would fail on the missing torchvision and
# silently skip the whole module.
from examples import zoo
from tests.helpers import zoo_cases

spandrel = pytest.importorskip("spandrel")


def test_zoo_is_populated() -> None:
    assert zoo.SPANDREL_IMPORT_ERROR is None
    assert len(zoo.ZOO) >= 45
    assert set(zoo.ZOO_FAST) <= set(zoo.ZOO)
    assert 6 <= len(zoo.ZOO_FAST) <= 10


@pytest.mark.parametrize("name", zoo_cases())
def test_forward(name: str) -> None:
    entry = zoo.ZOO[name]
    model = entry.build()
    assert not model.training
    inputs = entry.example_inputs()
    with torch.no_grad():
        output = model(*inputs)
    image = zoo.first_image(output)
    assert isinstance(image, torch.Tensor)
    assert image.dim() == 4
    assert image.shape[0] == 1
    assert torch.isfinite(image).all()


@pytest.mark.zoo
def test_every_spandrel_architecture_is_covered() -> None:
    """Each spandrel/architectures/* package has a zoo entry (or a reason in SKIPPED)."""
    import spandrel.architectures as archs

    shipped = {
        info.name for info in pkgutil.iter_modules(archs.__path__) if not info.name.startswith("_")
    }
    covered = {type(entry.build()).__module__.split(".")[2] for entry in zoo.ZOO.values()}
    assert shipped - covered - set(zoo.SKIPPED) == set()
