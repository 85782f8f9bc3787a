"""compiler/driver.py: one reference run, compile, check the whole result, bisect and roll
back the culprit; what compilation spent its time on."""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest
import torch
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile import Match, NoMatch, Rule, Site
from lwcompile.compiler.driver import compile_once, reference_run
from lwcompile.report import APPLIED, ROLLED_BACK

pytestmark = pytest.mark.usefixtures("one_thread")


class BreaksInContext(Rule):
    """Passes the isolated check (random input) but fails on the real activations."""

    name = "breaks-in-context"
    priority = 0

    def match(self, site: Site):
        return Match(site) if site.name == "body.2" else NoMatch("only body.2")

    def build(self, match: Match) -> nn.Module:
        conv = copy.deepcopy(match.site.module)

        class Fragile(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = conv

            def forward(self, x):
                if bool((x >= 0).all()):  # after a ReLU: only in the real model
                    raise ValueError("cannot handle non-negative input")
                return self.conv(x)

        return Fragile()


def test_whole_model_failure_is_bisected_to_the_culprit():
    model = dncnn.DnCNN(features=32, depth=5)
    rules = [BreaksInContext(), *lwcompile.default_rules()]
    light = lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),), rules=rules)
    by_site = {r.site: r for r in light.lwcompile_report.rows}
    assert by_site["body.2"].outcome == ROLLED_BACK
    assert "whole-model check failed" in by_site["body.2"].reason
    assert by_site["body.5"].outcome == APPLIED and by_site["body.8"].outcome == APPLIED
    assert type(light.body.get_submodule("2")) is nn.Conv2d
    assert light(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_nothing_applied_raises_with_the_decisions_and_the_report():
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 1, 3, padding=1))
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),))
    assert str(caught.value).startswith(
        "nothing to lighten in Sequential: 2 site(s) kept by image-boundary")
    assert [r.site for r in caught.value.report.rows] == ["0", "1"]


def test_the_first_workspace_takes_the_reference_runs_copy_and_releases_its_records():
    model, x = dncnn.DnCNN(features=32, depth=4), torch.rand(1, 1, 8, 8)
    reference = reference_run(model, (x,), {}, False, (nn.Conv2d,), Counter())
    spare = reference.spare_copy
    assert spare is not None and reference.root is not None and reference.graph_check.paired
    seconds: Counter[str] = Counter()
    ws, report = compile_once(model, (x,), {}, lwcompile.default_rules(),
                              lwcompile.default_guards(), {}, reference, seconds)
    assert ws.traced.regions[0].module is spare  # the reference run's copy, traced already
    assert reference.spare_copy is None and reference.root is None
    assert not reference.graph_check.paired  # the paired run is let go
    assert len(report.applied) == 2 and set(seconds) == {"tracing + graph check",
                                                         "rule decisions"}
    # a second pass (bisection) copies and traces afresh
    again, held = compile_once(model, (x,), {}, lwcompile.default_rules(),
                               lwcompile.default_guards(), {"body.2": "held"}, reference, seconds)
    assert again.traced.regions[0].module is not spare
    assert {r.site: (r.outcome, r.reason) for r in held.rows}["body.2"] == (ROLLED_BACK, "held")


def test_result_keeps_each_modules_mode():
    """A frozen BatchNorm (eval) inside a model in training mode stays frozen in the result."""
    model = dncnn.DnCNN(features=32, depth=5).train()
    frozen = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.get_submodule(frozen[1]).eval()
    light = lwcompile.lighten(model, (torch.rand(1, 1, 32, 32),))
    modes = {name: m.training for name, m in light.named_modules()}
    assert modes[frozen[1]] is False
    assert modes[frozen[0]] is True and modes[frozen[2]] is True and light.training


def test_lighten_runs_the_original_convs_once_and_checks_sites_without_arithmetic(monkeypatch):
    """The cost design: one eager run; the traced graph's check replays its conv outputs
    (replay.py), and per-site checks run on fake tensors (once per distinct structure), so
    no conv of the original runs more."""
    from torch._subclasses.fake_tensor import FakeTensor

    real_calls = []
    forward = torch.nn.Conv2d.forward

    def counting(self, x):
        if tuple(self.weight.shape) == (32, 32, 3, 3) and not isinstance(x, FakeTensor):
            real_calls.append(tuple(x.shape))
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", counting)
    model = dncnn.DnCNN(features=32, depth=6)  # 4 middle 32->32 convs
    light = lwcompile.lighten(model, (torch.rand(1, 1, 24, 24),))
    assert len(light.lwcompile_report.applied) == 4
    assert real_calls == [(1, 32, 24, 24)] * 4


def test_the_report_says_where_compilation_spent_its_time():
    model = dncnn.DnCNN(features=16, depth=5)
    start = time.perf_counter()
    light = lwcompile.lighten(model, (torch.rand(1, 1, 24, 24),))
    wall = time.perf_counter() - start
    seconds = light.lwcompile_report.notes["seconds"]
    assert list(seconds) == ["reference run", "tracing + graph check", "rule decisions",
                             "result check"]
    # DnCNN's result cost is composed, not run (test_composed.py): its check takes ~0 s
    assert all(s > 0 for phase, s in seconds.items() if phase != "result check")
    # each phase is rounded to the millisecond: up to half a millisecond over per phase
    assert sum(seconds.values()) <= wall + 0.0005 * len(seconds)
    report = lwcompile.plan(model, (torch.rand(1, 1, 24, 24),))
    assert "result check" not in report.notes["seconds"]  # a plan builds no result
