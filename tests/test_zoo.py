"""lighten on third-party restoration networks (spandrel's architectures, examples/zoo.py).

Entries outside ``zoo.ZOO_FAST`` are marked ``zoo`` (``make zoo`` runs them all). For each
network: either it is lightened (at least one rewrite, output shapes kept, forward runs) or
lighten raises a clear ``LwCompileError``; and, checked independently of the compiler's own
guard by watching every depthwise conv in a real forward, no depthwise conv feeds a pixel
shuffle in the result.
"""

from __future__ import annotations

import pytest
import torch

import lwcompile
from examples import zoo

pytest.importorskip("spandrel")


def shapes(out):  # noqa: ANN001, ANN201
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(shapes(o) for o in out)
    return type(out).__name__


def _cases() -> list:
    return [pytest.param(name, id=name, marks=() if name in zoo.ZOO_FAST else pytest.mark.zoo)
            for name in zoo.ZOO]


@pytest.mark.parametrize("name", _cases())
def test_lighten_zoo_network(name: str) -> None:
    entry = zoo.ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    inputs = entry.example_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        light = lwcompile.lighten(model, inputs)
    except lwcompile.LwCompileError as exc:
        assert str(exc)  # a refusal names its reason
        return
    finally:
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    report = light.lwcompile_report
    assert report.applied, f"nothing rewritten: {report.log[:3]}"
    with torch.no_grad():
        assert shapes(light(*inputs)) == shapes(model(*inputs))
    depthwise = [n for n, m in light.named_modules() if lwcompile.is_depthwise(m)]
    flow = lwcompile.record_flow(light, inputs, watch=depthwise)
    assert not (flow.feeds_pixel_shuffle & set(depthwise))
