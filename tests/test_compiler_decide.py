"""compiler/decide.py: match -> guard -> check -> rewrite, and the one row per site."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile import Guard, Match, NoMatch, Proposal, Refuse, Rule, Site, Veto
from lwcompile.compiler.decide import describe
from lwcompile.report import APPLIED, KEPT, REFUSED, ROLLED_BACK

pytestmark = pytest.mark.usefixtures("one_thread")


class Wrong:
    """Rules that misbehave in ways decide must survive: each rolls its site back."""

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


@dataclass
class Refuses(Rule):
    name = "refuses"
    priority = 0

    def match(self, site: Site):
        return Refuse("refuses every site")

    def build(self, match: Match) -> nn.Module:
        raise AssertionError("a refused site is never built")


@dataclass
class Pointwise(Rule):
    """Any conv -> a 1x1 conv with the same channels (shapes kept, not exact)."""

    name = "pointwise"
    priority = 1

    def match(self, site: Site):
        return Match(site) if site.module.kernel_size != (1, 1) else NoMatch("already 1x1")

    def build(self, match: Match) -> nn.Module:
        c = match.site.module
        return nn.Conv2d(c.in_channels, c.out_channels, 1)


class RaisingMatcher(Rule):
    name = "raising-matcher"
    priority = 0

    def match(self, site: Site):
        raise KeyError("matcher bug")

    def build(self, match: Match) -> nn.Module:
        raise AssertionError("never matched")


@dataclass
class VetoesAll(Guard):
    name: str = "vetoes-all"

    def check(self, proposal: Proposal) -> Veto | None:
        kind = "a refusal" if proposal.replacement is None else "a rewrite"
        return Veto(f"{self.name} vetoes {kind}")


class SiteOnly(Guard):
    """Speaks about the site alone: vetoes refusals too (their replacement is None)."""

    name = "site-only"

    def check(self, proposal: Proposal) -> Veto | None:
        return Veto("the site is special") if proposal.replacement is None else None


def _two_convs() -> tuple[nn.Module, tuple]:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    return model, (torch.rand(1, 3, 12, 12),)


def _rows(rules, guards=()):
    model, x = _two_convs()
    report = lwcompile.plan(model, x, rules=rules, guards=list(guards))
    return {r.site: r for r in report.rows}, report


def test_a_refusal_lets_a_later_rule_rewrite_the_site():
    rows, _ = _rows([Refuses(), Pointwise()])
    assert all(r.outcome == APPLIED and r.decided_by == "pointwise" for r in rows.values())
    assert rows["2"].replacement == "Conv2d" and rows["2"].params_after == 8 * 8 + 8


def test_the_first_refusal_is_the_row_when_no_rule_rewrites():
    rows, report = _rows([Refuses()])
    assert [(r.outcome, r.decided_by, r.reason) for r in rows.values()] == [
        (REFUSED, "refuses", "refuses every site")] * 2
    assert rows["0"].params_before == rows["0"].params_after == 3 * 8 * 9 + 8
    assert not any("no rule matched" in line for line in report.log)


def test_a_guard_that_vetoes_a_refusal_names_the_deeper_reason():
    rows, _ = _rows([Refuses()], [SiteOnly()])
    assert {(r.outcome, r.decided_by, r.reason) for r in rows.values()} == {
        (KEPT, "site-only", "the site is special")}


def test_the_first_guard_that_vetoes_decides():
    rows, _ = _rows([Pointwise()], [VetoesAll("first"), VetoesAll("second")])
    assert {(r.outcome, r.decided_by, r.reason) for r in rows.values()} == {
        (KEPT, "first", "first vetoes a rewrite")}
    assert all(r.replacement == "kept" and r.macs_before == r.macs_after for r in rows.values())


def test_no_match_is_logged_and_gives_no_row():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1))
    report = lwcompile.plan(model, (torch.rand(1, 3, 8, 8),), rules=[Pointwise()], guards=[])
    assert [r.site for r in report.rows] == ["1"]
    assert "0: no rule matched (pointwise: already 1x1)" in report.log


def test_a_raising_matcher_rolls_its_site_back():
    rows, _ = _rows([RaisingMatcher(), Pointwise()])
    assert {(r.outcome, r.decided_by) for r in rows.values()} == {(ROLLED_BACK,
                                                                    "raising-matcher")}
    assert rows["0"].reason == "matcher raised KeyError: 'matcher bug'"


def test_describe_names_a_module_shortly():
    assert describe(nn.Conv2d(64, 64, 3)) == "Conv2d 64->64 3x3"
    assert describe(nn.Conv2d(8, 16, 3, stride=2, dilation=2, groups=4)) == (
        "Conv2d 8->16 3x3 (s2, d2, g4)")
    assert describe(nn.ConvTranspose2d(8, 4, 4, stride=2)) == "ConvTranspose2d 8->4 4x4 (s2)"
    assert describe(nn.ReLU()) == "ReLU"


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


def test_channels_that_do_not_split_are_refused_with_a_reason():
    model = nn.Sequential(nn.Conv2d(3, 18, 3, padding=1), nn.Conv2d(18, 33, 3, padding=1))
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(model, guards=[])
    rows = caught.value.report.rows
    reasons = [r.reason for r in rows]
    assert all(r.outcome == REFUSED for r in rows)
    assert "3 input channels are fewer than the squeeze ratio 4" in reasons[0]
    assert "33 output channels do not split into two equal branches" in reasons[1]
