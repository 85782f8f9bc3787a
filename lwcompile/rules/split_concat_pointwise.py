"""1x1 conv over a channel concat -> sum of 1x1 convs over each part (exact).

``conv1x1(cat([a, b]))`` equals ``conv1x1_a(a) + conv1x1_b(b)`` with the weight split by
input channels, so U-Net style fusions never materialise the concatenated tensor, often the
largest activation in a decoder. The engine checks the rewrite numerically (``exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from lwcompile import Match, NoMatch, PointwiseOverParts, Rule, Site, channel_concat_parts


@dataclass
class SplitConcatPointwiseRule(Rule):
    name = "split-concat-1x1"
    priority = 5
    exact = True

    def match(self, site: Site) -> Match | NoMatch:
        conv, node = site.module, site.node
        if type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1):
            return NoMatch("not a 1x1 Conv2d")
        if conv.stride != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
            return NoMatch("needs stride 1, groups 1, no padding")
        if node is None or not isinstance(node.args[0], fx.Node):
            return NoMatch("no traced graph here: cannot see a concat")
        parts = channel_concat_parts(node.args[0])
        if parts is None:
            return NoMatch("input is not a channel concat")
        channels = [p.meta["tensor_meta"].shape[1] for p in parts]
        return Match(site, nodes=(node.args[0], node), inputs=tuple(parts),
                     info={"channels": channels})

    def build(self, match: Match) -> nn.Module:
        return PointwiseOverParts(match.site.module, match.info["channels"])

    def describe(self, replacement: nn.Module) -> str:
        return f"sum of {len(replacement.parts)} 1x1 convs"
