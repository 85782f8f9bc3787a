"""GSAT: a dense dilated conv (C -> C) becomes grouped dilated 3x3, shuffle, grouped 1x1,
residual add. The dilation (and so the receptive field) and the spatial size are kept."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import GSAT, Match, NoMatch, Refuse, Rule, Site


@dataclass
class GsatRule(Rule):
    name = "gsat"
    priority = 20

    groups: int = 8

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d or max(conv.dilation) == 1:
            return NoMatch("not a dilated Conv2d")
        d, k = conv.dilation[0], conv.kernel_size[0]
        if conv.dilation != (d, d) or conv.kernel_size != (k, k) or k % 2 == 0:
            return NoMatch("needs a square odd kernel and equal dilations")
        if conv.stride != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1 and groups 1")
        if conv.padding != (d * (k - 1) // 2,) * 2:
            return NoMatch(f"padding {conv.padding} does not keep the spatial size")
        if conv.in_channels != conv.out_channels:
            return Refuse(f"GSAT's residual needs C_in == C_out, got "
                          f"{conv.in_channels}->{conv.out_channels}")
        if conv.in_channels % self.groups:
            return Refuse(f"{conv.in_channels} channels do not split into {self.groups} groups")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        return GSAT(conv.in_channels, conv.dilation[0], self.groups, conv.padding_mode)
