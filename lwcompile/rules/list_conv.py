"""LIST: a dense kxk conv becomes squeeze 1x1 -> (1x1 | depthwise kxk + 1x1), concatenated.

The paper's main module. It only stands in for a conv that keeps the spatial size (stride 1,
dilation 1, "same" padding): strided, dilated and transposed convs have rules of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import LIST, Match, NoMatch, Refuse, Rule, Site


@dataclass
class ListRule(Rule):
    name = "list"
    priority = 50

    squeeze_ratio: int = 4

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d:
            return NoMatch(f"{type(conv).__name__} is not a plain Conv2d")
        k_h, k_w = conv.kernel_size
        if k_h != k_w or k_h < 3:
            return NoMatch(f"kernel {k_h}x{k_w} is not square kxk with k >= 3")
        if k_h % 2 == 0:
            return NoMatch(f"even kernel {k_h}x{k_h} has no centred 'same' padding")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1, dilation 1 and groups 1")
        if conv.padding != (k_h // 2, k_h // 2):
            return NoMatch(f"padding {conv.padding} does not keep the spatial size")
        why = LIST.unsplittable(conv.in_channels, conv.out_channels, self.squeeze_ratio)
        if why:
            return Refuse(why)
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        return LIST(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                    self.squeeze_ratio, conv.padding_mode)
