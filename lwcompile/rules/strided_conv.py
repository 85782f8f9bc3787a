"""Strided conv (downsampling) -> bilinear resize to the conv's output size + LIST.

The resize computes its size from the original conv's arithmetic on every call, so the
output matches the strided conv for any input size, odd ones included.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import LIST, Match, NoMatch, Refuse, Resize, Rule, Site


@dataclass
class StridedConvRule(Rule):
    name = "strided-conv"
    priority = 30

    squeeze_ratio: int = 4

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d or max(conv.stride) == 1:
            return NoMatch("not a strided Conv2d")
        if conv.groups != 1 or isinstance(conv.padding, str):
            return NoMatch("needs groups 1 and numeric padding")
        why = LIST.unsplittable(conv.in_channels, conv.out_channels, self.squeeze_ratio)
        if why:
            return Refuse(f"LIST cannot split {conv.in_channels}->{conv.out_channels} "
                          f"channels: {why}")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        k = conv.kernel_size[0]
        return nn.Sequential(
            Resize("conv", conv.kernel_size, conv.stride, conv.padding, conv.dilation),
            LIST(conv.in_channels, conv.out_channels, k if k % 2 else 3, self.squeeze_ratio),
        )

    def describe(self, replacement: nn.Module) -> str:
        return f"bilinear 1/{replacement[0].stride[0]} + LIST"
