"""Transposed conv (upsampling) -> bilinear resize to its output size + LIST.

Resize-then-convolve has no uneven kernel overlap, so none of the checkerboard a transposed
conv can leave; the size, ``output_padding`` included, follows the original's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import LIST, Match, NoMatch, Refuse, Resize, Rule, Site


@dataclass
class TransposedConvRule(Rule):
    name = "transposed-conv"
    applies_to = (nn.ConvTranspose2d,)
    priority = 30

    squeeze_ratio: int = 4

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.ConvTranspose2d or conv.groups != 1:
            return NoMatch("not a dense ConvTranspose2d")
        if len(site.input_shapes) != 1:
            return NoMatch("called with an explicit output_size")
        why = LIST.unsplittable(conv.in_channels, conv.out_channels, self.squeeze_ratio)
        if why:
            return Refuse(f"LIST cannot split {conv.in_channels}->{conv.out_channels} "
                          f"channels: {why}")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        k = conv.kernel_size[0]
        return nn.Sequential(
            Resize("transposed", conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.output_padding),
            LIST(conv.in_channels, conv.out_channels, k if k % 2 else 3, self.squeeze_ratio),
        )

    def describe(self, replacement: nn.Module) -> str:
        return f"bilinear x{replacement[0].stride[0]} + LIST"
