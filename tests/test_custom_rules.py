"""User-written rules and guards through the public API, plan() vs lighten(), and misuse."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import lwcompile
from examples import custom_rules, dncnn, glcic, srresnet, unet
from lwcompile import Match, NoMatch, Rule, RuleError, Site, count_params
from lwcompile.report import APPLIED, KEPT, ROLLED_BACK


def test_examples_use_only_the_public_api():
    tree = ast.parse(Path(custom_rules.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and "lwcompile" in node.module:
            assert node.module == "lwcompile", f"private import from {node.module}"
            assert all(alias.name in lwcompile.__all__ for alias in node.names)


def test_five_by_five_becomes_two_three_by_three():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 5, padding=2))
    rules = [custom_rules.FiveByFiveToTwoThreeByThree(), *lwcompile.default_rules()]
    light = lwcompile.lighten(model, rules=rules)
    (row,) = light.lwcompile_report.applied
    assert (row.site, row.decided_by) == ("2", "5x5-to-2x3x3")
    assert (row.params_before, row.params_after) == (32 * 32 * 25 + 32, 2 * (32 * 32 * 9 + 32))
    assert light(torch.rand(1, 3, 20, 24)).shape == (1, 32, 20, 24)


def test_classification_recipe_is_refused_at_subpixel_convs_only():
    model = srresnet.SRResNet(scale=4, features=32, blocks=2)
    light = lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),),
                              rules=[custom_rules.DepthwiseSeparable()])
    rows = light.lwcompile_report.rows
    vetoed = {r.site for r in rows if r.decided_by == "no-depthwise-subpixel"}
    assert vetoed == {"upsample.0", "upsample.3"}
    assert len(light.lwcompile_report.applied) == 5


def test_user_guard_keeps_layers_by_name():
    model = srresnet.SRResNet(scale=2, features=32, blocks=2)
    guards = [custom_rules.KeepByName("blocks.0.*"), *lwcompile.default_guards()]
    light = lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),), guards=guards)
    kept = {r.site for r in light.lwcompile_report.rows if r.decided_by == "keep-by-name"}
    assert kept == {"blocks.0.body.0", "blocks.0.body.3"}
    assert type(light.get_submodule("blocks.0.body.0")) is nn.Conv2d
    assert isinstance(light.get_submodule("blocks.1.body.0"), lwcompile.LIST)


def test_squeeze_ratio_sweep():
    def list_params(c: int, r: int) -> int:  # squeeze, 1x1 branch, depthwise, pointwise
        s = c // r
        return (c * s + s) + (s * c // 2 + c // 2) + (s * 9 + s) + (s * c // 2 + c // 2)

    sweep = custom_rules.squeeze_ratio_sweep(dncnn.build(), dncnn.example_inputs())
    ends_and_bn = 576 + 576 + 15 * 128
    assert sweep == {r: ends_and_bn + 15 * list_params(64, r) for r in (2, 4, 8)}
    assert sweep[4] == 37_392


def test_exclude_globs_keep_sites_and_warn_when_unused():
    model = srresnet.SRResNet(scale=2, features=32, blocks=2)
    x = (torch.rand(1, 3, 16, 16),)
    light = lwcompile.lighten(model, x, exclude=["upsample.*", "fuse.*"])
    kept = {r.site: r for r in light.lwcompile_report.rows if r.decided_by == "exclude"}
    assert set(kept) == {"upsample.0", "fuse.0"}
    assert "'upsample.*'" in kept["upsample.0"].reason
    with pytest.warns(lwcompile.LwCompileWarning, match="'nothing.*' matches no module"):
        lwcompile.plan(model, x, exclude=["nothing.*"])


@pytest.mark.parametrize("module", [srresnet, glcic])
def test_plan_and_lighten_agree(module):
    torch.manual_seed(0)
    model, x = module.build(), module.example_inputs()
    report = lwcompile.plan(model, x)
    light = lwcompile.lighten(model, x)
    decisions = lambda rep: [(r.site, r.outcome, r.decided_by) for r in rep.rows]  # noqa: E731
    assert decisions(report) == decisions(light.lwcompile_report)
    assert report.summary.params_after == count_params(light)
    assert report.summary.macs_after == light.lwcompile_report.summary.macs_after


def test_matchers_see_graph_context():
    @dataclass
    class SkipSourcesOnly(Rule):
        """Lighten only convs whose output feeds a U-Net skip concat, seen via Site."""

        name = "skip-sources"
        seen: list | None = None

        def match(self, site: Site):
            if self.seen is not None:
                self.seen.append((site.name, site.node is not None, site.output_shape))
            if not site.feeds_concat:
                return NoMatch("does not feed a concat")
            return Match(site)

        def build(self, match: Match) -> nn.Module:
            c = match.site.module
            return nn.Conv2d(c.in_channels, c.out_channels, 1)

    seen: list = []
    light = lwcompile.lighten(unet.build(), unet.example_inputs(),
                              rules=[SkipSourcesOnly(seen=seen)], guards=[])
    fired = {r.site for r in light.lwcompile_report.applied}
    # the convs ending each encoder level (through a ReLU) feed the skips
    assert {"enc1.2", "enc2.2", "enc3.2"} <= fired
    assert all(has_node for _, has_node, _ in seen)
    assert dict((n, s) for n, _, s in seen)["enc2.0"] == (1, 64, 32, 32)


class NoBuilder(Rule):
    name = "no-builder"

    def match(self, site: Site):
        return Match(site)


class ReturnsNonModule(Rule):
    name = "returns-a-function"
    priority = 0

    def match(self, site: Site):
        return Match(site)

    def build(self, match: Match):
        return lambda x: x


def test_misuse_errors_are_clear():
    model = dncnn.DnCNN(features=32, depth=4)
    x = (torch.rand(1, 1, 16, 16),)
    with pytest.raises(RuleError, match="no build\\(\\) method"):
        lwcompile.lighten(model, x, rules=[NoBuilder()])
    with pytest.raises(RuleError, match="two rules are named 'list'"):
        lwcompile.lighten(model, x, rules=[*lwcompile.default_rules(),
                                           *lwcompile.default_rules()[-1:]])
    with pytest.raises(RuleError, match="not an lwcompile.Rule"):
        lwcompile.lighten(model, x, rules=[object()])
    with pytest.raises(RuleError, match="no parameter 'squeeze'"):
        lwcompile.lighten(model, x, rule_params={"list": {"squeeze": 8}})
    with pytest.raises(RuleError, match="rule_params names 'lst'"):
        lwcompile.lighten(model, x, rule_params={"lst": {"squeeze_ratio": 8}})
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(model, x, rules=[ReturnsNonModule()], guards=[])
    rows = caught.value.report.rows
    assert rows and all(r.outcome == ROLLED_BACK and r.decided_by == "returns-a-function"
                        and "not an nn.Module" in r.reason for r in rows)


def test_rule_params_reach_the_built_modules():
    light = lwcompile.lighten(glcic.build(), glcic.example_inputs(),
                              rule_params={"gsat": {"groups": 4}, "list": {"squeeze_ratio": 8}})
    gsat = light.get_submodule("body.18")
    assert gsat.grouped_dilated.groups == 4
    assert light.get_submodule("body.6").squeeze.out_channels == 128 // 8
    assert all(r.outcome in (APPLIED, KEPT) for r in light.lwcompile_report.rows)
