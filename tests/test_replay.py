"""Checking a traced graph replays the eager run's conv outputs instead of recomputing them."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile.graph_check import replay as replay_module
from lwcompile.graph_check.graph_run import check_after
from lwcompile.graph_check.replay import recording
from lwcompile.measure.cost import measure
from lwcompile.tracing.trace import trace_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _eager_then_trace(model: nn.Module, x: torch.Tensor):
    model.eval()
    with recording(model) as replay, torch.no_grad():
        out = model(x)
    return trace_model(model, (x,), {}, out, partial(check_after, replay=replay)), replay


def test_a_faithful_graph_takes_every_conv_output_from_the_eager_run():
    model = dncnn.DnCNN(features=16, depth=5)
    traced, replay = _eager_then_trace(model, torch.rand(1, 1, 20, 20))
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert [r.traced for r in traced.regions] == [True]
    assert replay.hits == convs == 5
    assert replay.recorded_bytes == 16 * 20 * 20 * 4 * 4 + 20 * 20 * 4


def test_an_in_place_activation_after_a_conv_does_not_spoil_its_recorded_output():
    """ReLU(inplace=True) overwrites the conv's output right after the hook saw it (as in
    ESRGAN's blocks): the record is a copy, so the graph still agrees with eager."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                          nn.Conv2d(8, 3, 3, padding=1))
    traced, replay = _eager_then_trace(model, torch.randn(1, 3, 12, 12))
    assert [r.traced for r in traced.regions] == [True]
    assert replay.hits == 3
    first = replay.calls["0"][0].output
    assert (first < 0).any()  # the conv's own output, not the ReLU's


_calls = [0]


class CountsCalls(nn.Module):
    """Tracing bakes in the Python counter's value at trace time: the graph is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        _calls[0] += 1
        return self.second(F.relu(self.first(x)) * _calls[0])


def test_a_graph_that_bakes_in_python_still_disagrees_with_eager():
    traced, replay = _eager_then_trace(CountsCalls(), torch.rand(1, 3, 12, 12))
    (region,) = traced.regions
    assert not region.traced
    assert region.opaque_reason == "traced graph disagrees with eager"
    assert replay.hits == 1  # the second conv's input differed: it was computed


def test_past_the_memory_budget_convs_are_computed(monkeypatch):
    one_output = 16 * 20 * 20 * 4
    monkeypatch.setattr(replay_module, "BUDGET_BYTES", 2 * one_output)
    traced, replay = _eager_then_trace(dncnn.DnCNN(features=16, depth=5),
                                       torch.rand(1, 1, 20, 20))
    assert replay.recorded_bytes == 2 * one_output
    assert replay.hits == 2
    assert [r.traced for r in traced.regions] == [True]


class ConvTwice(nn.Module):
    """One conv, called on the input and then on its own output flipped."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.flip(self.conv(x), dims=[-1]))


def test_a_conv_called_twice_is_replayed_by_its_input():
    model = ConvTwice()
    x = torch.rand(1, 4, 30, 30)  # 3600 values: three whole weight periods and a rest
    traced, replay = _eager_then_trace(model, x)
    assert [r.traced for r in traced.regions] == [True]
    assert replay.hits == 2 and len(replay.calls["conv"]) == 2
    # a flipped input has the same plain sums, but not the same position-weighted one
    flipped = torch.flip(x, dims=[-1])
    assert replay.output_for("conv", model.conv, (flipped,), {}) is None
    torch.testing.assert_close(replay.output_for("conv", model.conv, (x,), {}), model.conv(x))


class RewritesItsWeights(nn.Module):
    """Each forward bumps the conv's weights first, and the traced graph does it too: the
    graph is right, and its check (run after eager's) sees weights bumped once more."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        self.conv.weight.data.add_(1.0)
        return self.conv(x)


def test_a_conv_whose_weights_changed_since_eager_is_computed_not_replayed():
    """Replay must not change the check's verdict: the same input with other weights runs."""
    model = RewritesItsWeights().eval()
    traced, replay = _eager_then_trace(model, torch.rand(1, 3, 8, 8))
    (region,) = traced.regions
    assert replay.hits == 0 and len(replay.calls["conv"]) == 1
    assert region.opaque_reason == "traced graph disagrees with eager"  # as without replay


def test_recording_leaves_the_reference_measurements_as_they_were():
    model = dncnn.DnCNN(features=16, depth=5)
    x = torch.rand(1, 1, 24, 24)
    light = lwcompile.lighten(model, (x,))
    summary, plain = light.lwcompile_report.summary, measure(model.eval(), (x,))
    assert (summary.macs_before, summary.peak_activation_before) == (
        plain.macs, plain.peak_bytes)
