"""1x1 projections and gated-FFN halves: a 1x1 ``nn.Conv2d`` -> two thin 1x1 convs.

NAFNet, Restormer-style (KBNet, FFTformer, CRAFT, DITN) and Uformer-style blocks spend most
of their multiply-adds in dense 1x1 convs (the FFN's ``project_in`` C -> 2 gamma C before a
gate, ``project_out``, the attention's qkv and output projections); their depthwise 3x3
parts are cheap already (C k^2 per pixel against C^2 for the 1x1s) and left as they are. A
rank-r factorisation ``in -> r -> out`` costs r (in + out) per pixel instead of in x out,
``r = min(in, out) // rank_ratio``; the factors start from the truncated SVD of the weight
and ``init_layerwise`` refits them by reduced-rank regression (``rules/low_rank.py``).

Not matched: grouped, strided or padded 1x1 convs, convs over a pooled 1x1 map (channel
attention gates: already a bottleneck, and no multiply-adds to gain), and convs feeding a
pixel shuffle (each output phase keeps its own channels: that is the sub-pixel rule's
business). Refused: fewer than ``min_channels`` on one side, or factors that would not be
``min_saving`` times cheaper. The image-boundary guard keeps image-facing 1x1s.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import Match, NoMatch, Refuse, Rule, Site
from lwcompile.rules.low_rank import MIN_SIDE, LowRankPointwise, rank_or_refusal


@dataclass
class LowRankPointwiseRule(Rule):
    name = "low-rank-1x1"
    priority = 45  # after split-concat-1x1 (exact) and the sub-pixel rule

    #: rank = min(in_channels, out_channels) // rank_ratio
    rank_ratio: int = 4
    min_channels: int = MIN_SIDE
    #: the factors must cost at most 1 / min_saving of the original's multiply-adds
    min_saving: float = 1.5

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1):
            return NoMatch("not a 1x1 Conv2d")
        if conv.groups != 1 or conv.stride != (1, 1) or conv.padding not in ((0, 0), "valid"):
            return NoMatch("needs groups 1, stride 1 and no padding")
        if tuple(site.input_shapes[0][-2:]) == (1, 1):
            return NoMatch("acts on a pooled 1x1 map (a channel-attention gate): nothing to gain")
        if site.feeds_pixel_shuffle:
            return NoMatch("feeds a pixel shuffle: left to the sub-pixel rule")
        rank = rank_or_refusal(conv.in_channels, conv.out_channels,
                               rank_ratio=self.rank_ratio, min_size=self.min_channels,
                               min_saving=self.min_saving, unit="channels", per="pixel")
        if isinstance(rank, Refuse):
            return rank
        return Match(site, info={"rank": rank})

    def build(self, match: Match) -> nn.Module:
        return LowRankPointwise.from_conv(match.site.module, match.info["rank"])

    def describe(self, replacement: nn.Module) -> str:
        return (f"1x1 {replacement.reduce.in_channels}->{replacement.reduce.out_channels}"
                f"->{replacement.expand.out_channels} (rank {replacement.reduce.out_channels})")
