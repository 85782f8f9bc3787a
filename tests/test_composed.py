"""The result's cost composed from runs already made (result_cost.py) equals running it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile import Match, NoMatch, Rule, Site
from lwcompile.compiler.result_cost import composed_peak
from lwcompile.graph_check.graph_run import check_after
from lwcompile.measure.cost import Timeline, Window, measure
from lwcompile.tracing.trace import trace_model
from tests import lightened


def _summary_is_measured(light: nn.Module, inputs: tuple) -> None:
    summary, run = light.lwcompile_report.summary, measure(light, inputs)
    assert (summary.macs_after, summary.peak_activation_after) == (run.macs, run.peak_bytes)


@pytest.mark.parametrize("name, how", [
    ("dncnn", "composed"), ("glcic", "composed"),
    ("srresnet", "measured (upsample.0: the rewrite edited the graph around the module)"),
    ("unet", "measured (up3.fuse: the rewrite edited the graph around the module)")])
def test_the_summary_is_what_a_run_of_the_result_measures(name, how):
    light = lightened.light(name)
    assert light.lwcompile_report.notes["result cost"] == how
    _summary_is_measured(light, lightened.inputs(name))


def test_a_peak_composes_from_the_calls_and_the_code_between():
    timeline = Timeline(outside_peak=100, calls={"a": [Window(40, 30)], "b": [Window(60, 50)]})
    assert composed_peak(timeline, {}) == 110  # b's own run, on top of what is alive
    assert composed_peak(timeline, {"b": 10}) == 100  # swapped: the code between decides
    assert composed_peak(timeline, {"a": 90, "b": 10}) == 130


def test_the_graph_check_times_memory_call_by_call():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
    (region,) = trace_model(model, (x,), {}, out, check_after).regions
    plane = 16 * 16 * 4  # bytes of one float channel
    assert region.timeline.calls == {
        "0": [Window(0, 8 * plane)],  # the input existed before: not an activation
        "1": [Window(8 * plane, 0)],  # in place
        "2": [Window(8 * plane, 4 * plane)]}
    # nothing allocates between the calls; what stays alive after one is within its window
    assert region.timeline.outside_peak == 0 and not region.timeline.value_dependent


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.body = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.body(torch.relu(self.head(x))))


class Shared(Plain):
    """One conv called twice: swapping it changes two places."""

    def forward(self, x):
        return self.tail(self.body(torch.relu(self.body(self.head(x)))))


class InPlaceSkip(Plain):
    """``y += skip``, as in Real-ESRGAN's compact net: eager adds in place; the traced graph
    (and so the result) allocates the sum, at the run's peak."""

    def forward(self, x):
        h = torch.relu(self.head(x))
        y = F.interpolate(self.body(h), scale_factor=4)
        y += F.interpolate(h, scale_factor=4)
        return self.tail(y)


def test_a_sum_eager_makes_in_place_is_counted_as_the_result_allocates_it():
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(InPlaceSkip().eval(), (x,), guards=[])
    assert light.lwcompile_report.notes["result cost"] == "composed"
    _summary_is_measured(light, (x,))


class ReadsValues(Plain):
    """Scales by a value read into Python: another input could size or branch differently."""

    def forward(self, x):
        y = self.body(torch.relu(self.head(x)))
        return self.tail(y / (y.abs().amax().item() + 1.0))


class ChannelsLastList(Rule):
    """A LIST whose output comes out channels_last: same shape, other strides."""

    name = "channels-last-list"
    priority = 0

    def match(self, site: Site):
        return Match(site) if site.name == "body" else NoMatch("only body")

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        return nn.Sequential(lwcompile.LIST(conv.in_channels, conv.out_channels),
                             ToChannelsLast())


class ToChannelsLast(nn.Module):
    def forward(self, x):
        return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("model, rules, why", [
    (Shared(), None, "body: not called exactly once by the traced graph"),
    (ReadsValues(), None, "the traced graph reads tensor values"),
    (Plain(), [ChannelsLastList()], "body: its output is laid out unlike the original's"),
])
def test_what_cannot_be_composed_is_run(model, rules, why):
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(model.eval(), (x,), rules=rules, guards=[])
    assert light.lwcompile_report.notes["result cost"] == f"measured ({why})"
    _summary_is_measured(light, (x,))
