"""lighten end to end on the reference DnCNN, and the errors misuse gets.

Each compiler stage has its own file: test_compiler_{workspace,sites,decide,check,driver}.py.
"""

from __future__ import annotations

import pytest
import torch

import lwcompile
from examples import dncnn
from lwcompile import count_params
from lwcompile.report import KEPT


@pytest.fixture(scope="module")
def dncnn_pair():
    torch.manual_seed(0)
    model = dncnn.build()
    return model, lwcompile.lighten(model)


def test_dncnn_matches_the_papers_cheap_dncnn(dncnn_pair):
    model, light = dncnn_pair
    assert count_params(model) == 556_032
    assert count_params(light) == 37_392
    assert isinstance(light, torch.fx.GraphModule)
    kinds = [type(m).__name__ for m in light.body.children()]
    paper = [type(m).__name__ for m in dncnn.cheap_dncnn().body.children()]
    assert kinds == paper
    assert kinds.count("LIST") == 15
    x = dncnn.example_inputs()[0]
    assert light(x).shape == x.shape
    assert light(torch.rand(1, 1, 37, 45)).shape == (1, 1, 37, 45)


def test_dncnn_report(dncnn_pair):
    _, light = dncnn_pair
    report = light.lwcompile_report
    assert len(report.applied) == 15
    assert {r.site for r in report.applied} == {f"body.{i}" for i in range(2, 45, 3)}
    kept = {r.site: r for r in report.not_applied}
    with pytest.warns(DeprecationWarning, match="not_applied"):
        assert report.refused == report.not_applied  # the old name, kept for a while
    assert set(kept) == {"body.0", "body.47"}
    assert all(r.decided_by == "image-boundary" and r.outcome == KEPT for r in kept.values())
    row = report.applied[0]
    assert (row.params_before, row.params_after) == (36_864, 2_288)
    # 64x64 input: 64*64*9*64*64 MACs for a dense 3x3 conv
    assert row.macs_before == 64 * 64 * 9 * 64 * 64
    s = report.summary
    assert (s.params_before, s.params_after) == (556_032, 37_392)
    assert s.macs_after < s.macs_before / 15
    d = report.to_dict()
    assert d["summary"]["params_after"] == 37_392 and len(d["rows"]) == 17
    text = str(report)
    assert "image-boundary" in text and "14.9x fewer" in text


def test_image_and_mask_model_needs_example_inputs():
    from examples import glcic

    with pytest.raises(lwcompile.ExampleInputError, match="example_inputs"):
        lwcompile.lighten(glcic.build())


def test_not_a_module():
    with pytest.raises(lwcompile.NotAModuleError, match="nn.Module"):
        lwcompile.lighten(lambda x: x)


def test_example_input_rejected_carries_the_models_message():
    model = dncnn.DnCNN(features=32, depth=4)
    with pytest.raises(lwcompile.ExampleInputError, match=r"rejects the example input.*channels"):
        lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),))
