"""Writing your own rules and guards: five small examples, tested in tests/test_custom_rules.py
and (the fitted start, e) tests/test_fitting.py. Only the public API is used
(``import lwcompile``).

    python -m examples.custom_rules
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

import lwcompile
from lwcompile import FitTask, Guard, Match, NoMatch, Proposal, Rule, Site, Veto, register_fit


# (a) A rule: a 5x5 conv becomes two stacked 3x3 convs (same receptive field, fewer weights).
@dataclass
class FiveByFiveToTwoThreeByThree(Rule):
    name = "5x5-to-2x3x3"
    priority = 40  # before the built-in LIST rule (50), which would also take a 5x5 conv

    mid_channels: int | None = None  # default: the conv's output channels

    def match(self, site: Site) -> Match | NoMatch:
        conv = site.module
        if type(conv) is not nn.Conv2d or conv.kernel_size != (5, 5):
            return NoMatch("not a 5x5 Conv2d")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1, dilation 1, groups 1")
        if conv.padding != (2, 2):
            return NoMatch("needs 'same' padding 2")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        mid = self.mid_channels or conv.out_channels
        return nn.Sequential(nn.Conv2d(conv.in_channels, mid, 3, padding=1),
                             nn.Conv2d(mid, conv.out_channels, 3, padding=1))

    def describe(self, replacement: nn.Module) -> str:
        return "2 x Conv2d 3x3"


# (b) The classification recipe, "every kxk conv -> depthwise separable". On a
# super-resolution network the default guard refuses it at the sub-pixel convs.
@dataclass
class DepthwiseSeparable(Rule):
    name = "depthwise-separable"
    priority = 40

    def match(self, site: Site) -> Match | NoMatch:
        conv = site.module
        if type(conv) is not nn.Conv2d or conv.kernel_size[0] < 3 or conv.groups != 1:
            return NoMatch("not a dense kxk conv")
        if conv.stride != (1, 1) or conv.dilation != (1, 1):
            return NoMatch("needs stride 1 and dilation 1")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        c = match.site.module
        return nn.Sequential(
            nn.Conv2d(c.in_channels, c.in_channels, c.kernel_size, padding=c.padding,
                      groups=c.in_channels),
            nn.Conv2d(c.in_channels, c.out_channels, 1))


# (c) A guard: keep every layer whose qualified name matches a pattern.
@dataclass
class KeepByName(Guard):
    name = "keep-by-name"

    pattern: str = "*"

    def check(self, proposal: Proposal) -> Veto | None:
        if fnmatch.fnmatchcase(proposal.match.site.name, self.pattern):
            return Veto(f"name matches {self.pattern!r}: the user keeps these layers")
        return None


# (d) A parameter sweep: the same rule at several settings, without subclassing.
def squeeze_ratio_sweep(model: nn.Module, example_inputs: tuple,
                        ratios: tuple[int, ...] = (2, 4, 8)) -> dict[int, int]:
    """Parameters of the lightened model for each LIST squeeze ratio (a dry run each)."""
    return {
        ratio: lwcompile.plan(model, example_inputs,
                              rule_params={"list": {"squeeze_ratio": ratio}}).summary.params_after
        for ratio in ratios
    }


# (e) A rule whose replacement gets a fitted start: a kxk conv through a few channels, fitted
# to the conv it replaced by ``lwcompile.init_layerwise`` through the fit registered for it.
class LowRankConv(nn.Module):
    """A kxk conv factored through ``rank`` channels: kxk conv to ``rank``, then 1x1 out."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, padding=conv.padding,
                                bias=False)
        self.expand = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))


@dataclass
class LowRank(Rule):
    name = "low-rank"
    priority = 40

    rank: int = 8

    def match(self, site: Site) -> Match | NoMatch:
        conv = site.module
        if type(conv) is not nn.Conv2d or conv.groups != 1 or isinstance(conv.padding, str):
            return NoMatch("not a dense Conv2d with numeric padding")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            return NoMatch("needs stride 1, dilation 1, zero padding")
        if self.rank >= min(conv.in_channels, conv.out_channels):
            return NoMatch(f"rank {self.rank} saves nothing on {conv.in_channels}->"
                           f"{conv.out_channels} channels")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        return LowRankConv(match.site.module, self.rank)


@register_fit(LowRankConv)
@torch.no_grad()
def fit_low_rank(module: LowRankConv, task: FitTask) -> None:
    """Start from the teacher's kernel truncated to the rank (its best rank-r approximation,
    by SVD), then solve the 1x1 expansion by least squares on the teacher's activations:
    the exact optimum given the reduction, where gradient steps from random weights only
    approach one."""
    weight = task.original.weight.flatten(1)  # out x (in * kh * kw)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = module.reduce.out_channels
    module.reduce.weight.copy_((s[:rank, None].sqrt() * vh[:rank]).view_as(module.reduce.weight))
    module.expand.weight.copy_((u[:, :rank] * s[:rank].sqrt())[..., None, None])
    task.least_squares(module.expand, module.reduce(task.inputs))


def main() -> None:
    from examples import dncnn, srresnet

    torch.manual_seed(0)
    five = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(),
                         nn.Conv2d(32, 3, 3, padding=1))
    light = lwcompile.lighten(five, rules=[FiveByFiveToTwoThreeByThree(),
                                           *lwcompile.default_rules()])
    print("(a) 5x5 -> two 3x3\n", light.lwcompile_report, "\n")

    sr = srresnet.SRResNet(scale=4, features=32, blocks=2)
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(sr, (x,), rules=[DepthwiseSeparable()])
    print("(b) depthwise separable everywhere, refused at the sub-pixel convs\n",
          light.lwcompile_report, "\n")

    light = lwcompile.lighten(sr, (x,), guards=[KeepByName("blocks.0.*"),
                                                *lwcompile.default_guards()])
    print("(c) a user guard keeping blocks.0.*\n", light.lwcompile_report, "\n")

    print("(d) LIST squeeze ratio sweep on DnCNN-17:",
          squeeze_ratio_sweep(dncnn.build(), dncnn.example_inputs()))

    teacher = dncnn.DnCNN(features=32, depth=4).eval()
    light = lwcompile.lighten(teacher, dncnn.example_inputs(), rules=[LowRank(rank=8)])
    errors = lwcompile.init_layerwise(light, teacher, torch.rand(8, 1, 48, 48), batch_size=4)
    print("\n(e) low-rank convs fitted to the teacher: relative error per site, before -> after")
    for site, error in errors.items():
        print(f"  {site}: {errors.before[site]:.3g} -> {error:.3g}")


if __name__ == "__main__":
    main()
