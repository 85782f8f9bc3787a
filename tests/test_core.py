"""The core compiler on the reference DnCNN, on untraceable code, and on the failure paths."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile import LIST, Match, NoMatch, Rule, Site
from lwcompile.report import APPLIED, KEPT, REFUSED, ROLLED_BACK


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def dncnn_pair():
    torch.manual_seed(0)
    model = dncnn.build()
    return model, lwcompile.lighten(model)


def test_dncnn_matches_the_papers_cheap_dncnn(dncnn_pair):
    model, light = dncnn_pair
    assert n_params(model) == 556_032
    assert n_params(light) == 37_392
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


class PadToMultiple(nn.Module):
    """Shape-dependent control flow at the top level: fx cannot trace forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 8, (-w) % 8
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        y = self.tail(self.body(self.head(x)))
        return y[..., :h, :w]


def test_untraceable_top_level_still_lightens_inner_convs():
    model = PadToMultiple()
    light = lwcompile.lighten(model, (torch.rand(1, 3, 30, 27),))
    assert type(light) is PadToMultiple
    assert isinstance(light.body, torch.fx.GraphModule)
    assert [r.site for r in light.lwcompile_report.applied] == ["body.0", "body.2"]
    assert isinstance(light.body.get_submodule("0"), LIST)
    assert any("<root>: opaque" in line for line in light.lwcompile_report.log)
    assert light(torch.rand(1, 3, 17, 50)).shape == (1, 3, 17, 50)


def test_input_model_is_untouched_bit_for_bit():
    torch.manual_seed(1)
    model = dncnn.DnCNN(features=32, depth=5).train()  # train mode: BN stats must not move
    state = copy.deepcopy(model.state_dict())
    x = torch.rand(1, 1, 32, 32)
    before = model.eval()(x)
    model.train()
    light = lwcompile.lighten(model, (x,))
    assert model.training and light.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.eval()(x), before)
    assert all(not isinstance(m, LIST) for m in model.modules())


def test_result_keeps_each_modules_mode():
    """A frozen BatchNorm (eval) inside a model in training mode stays frozen in the result."""
    model = dncnn.DnCNN(features=32, depth=5).train()
    frozen = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.get_submodule(frozen[1]).eval()
    light = lwcompile.lighten(model, (torch.rand(1, 1, 32, 32),))
    modes = {name: m.training for name, m in light.named_modules()}
    assert modes[frozen[1]] is False
    assert modes[frozen[0]] is True and modes[frozen[2]] is True and light.training


def test_extra_non_tensor_arguments():
    class NoiseLevel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 32, 3, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.c = nn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x, sigma: float):
            return x - sigma * self.c(torch.relu(self.b(self.a(x))))

    light = lwcompile.lighten(NoiseLevel(), (torch.rand(1, 3, 24, 24), 0.1))
    assert [r.site for r in light.lwcompile_report.applied] == ["b"]
    x = torch.rand(1, 3, 24, 24)
    assert light(x, 0.1).shape == x.shape
    # the noise level is not baked in: a specialised graph is never installed
    assert not torch.equal(light(x, 0.1), light(x, 0.5))


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


def test_nothing_traceable():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow, and no submodules to fall back to
                return x * self.w
            return x

    with pytest.raises(lwcompile.UntraceableError, match="no part of the model"):
        lwcompile.lighten(Opaque(), (torch.rand(1, 3, 8, 8),))


class Wrong:
    """Rules that misbehave in each way the engine must survive."""

    class ShapeChanging(Rule):
        name = "shape-changing"

        def match(self, site: Site):
            return Match(site) if site.module.out_channels == 32 else NoMatch("not 32 out")

        def build(self, match: Match) -> nn.Module:
            return nn.Conv2d(match.site.module.in_channels, 16, 3, padding=1)

    class Raising(Rule):
        name = "raising"
        priority = 0  # asked before the built-in rules

        def match(self, site: Site):
            return Match(site) if site.name == "body.2" else NoMatch("only body.2")

        def build(self, match: Match) -> nn.Module:
            raise RuntimeError("builder bug")

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


def test_rollback_of_a_shape_changing_rule():
    model = dncnn.DnCNN(features=32, depth=4)
    with pytest.raises(lwcompile.NothingToLighten, match="3 site\\(s\\) rolled back") as caught:
        lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),), rules=[Wrong.ShapeChanging()],
                          guards=[])
    rows = caught.value.report.rows
    assert len(rows) == 3 and all(r.outcome == ROLLED_BACK for r in rows)
    assert "(1, 16, 16, 16) != original (1, 32, 16, 16)" in rows[1].reason


def test_rollback_of_a_raising_builder_keeps_going():
    model = dncnn.DnCNN(features=32, depth=4)
    light = lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),),
                              rules=[Wrong.Raising(), *lwcompile.default_rules()], guards=[])
    by_site = {r.site: r for r in light.lwcompile_report.rows}
    assert by_site["body.2"].outcome == ROLLED_BACK
    assert by_site["body.2"].decided_by == "raising"
    assert "builder bug" in by_site["body.2"].reason
    assert by_site["body.5"].outcome == APPLIED
    assert type(light.body.get_submodule("2")) is nn.Conv2d


def test_whole_model_failure_is_bisected_to_the_culprit():
    model = dncnn.DnCNN(features=32, depth=5)
    rules = [Wrong.BreaksInContext(), *lwcompile.default_rules()]
    light = lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),), rules=rules)
    by_site = {r.site: r for r in light.lwcompile_report.rows}
    assert by_site["body.2"].outcome == ROLLED_BACK
    assert "whole-model check failed" in by_site["body.2"].reason
    assert by_site["body.5"].outcome == APPLIED and by_site["body.8"].outcome == APPLIED
    assert type(light.body.get_submodule("2")) is nn.Conv2d
    assert light(torch.rand(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_channels_that_do_not_split_are_refused_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 18, 3, padding=1), nn.Conv2d(18, 33, 3, padding=1))
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(model, guards=[])
    rows = caught.value.report.rows
    reasons = [r.reason for r in rows]
    assert all(r.outcome == REFUSED for r in rows)
    assert "3 input channels do not split into 4" in reasons[0]
    assert "18 input channels do not split into 4" in reasons[1]


def test_parent_code_that_needs_the_original_submodule():
    """An untraceable parent reads a plain attribute and calls a method of a traceable
    child: the attribute survives on the installed graph; the method forces the child back
    to its own class, rewritten module by module."""

    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 32
            self.conv = nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

        def gain(self) -> float:
            return 0.5

    class Parent(nn.Module):
        def __init__(self, use_method: bool) -> None:
            super().__init__()
            self.use_method = use_method
            self.head, self.child = nn.Conv2d(3, 32, 3, padding=1), Child()
            self.tail = nn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x):
            if x.shape[-1] % 2:  # untraceable at the top
                x = F.pad(x, (0, 1))
            h = self.child(self.head(x))[:, : self.child.width]
            return self.tail(h * (self.child.gain() if self.use_method else 1.0))

    x = torch.rand(1, 3, 16, 15)
    for use_method, kind in ((False, torch.fx.GraphModule), (True, Child)):
        light = lwcompile.lighten(Parent(use_method), (x,))
        assert isinstance(light.child, kind)
        assert isinstance(light.child.get_submodule("conv"), LIST)
        assert light(x).shape == (1, 3, 16, 16)


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
    assert sum(seconds.values()) <= wall
    report = lwcompile.plan(model, (torch.rand(1, 1, 24, 24),))
    assert "result check" not in report.notes["seconds"]  # a plan builds no result
