"""Token MLPs and attention projections: ``nn.Linear`` -> two thin Linears (low rank).

In a Swin-style block nearly every weight sits in ``nn.Linear`` layers (qkv, proj, the MLP's
fc1/fc2), applied at every token; kxk-conv rules never reach them. A rank-r factorisation
``in -> r -> out`` costs r (in + out) multiply-adds per token instead of in x out, with
``r = min(in, out) // rank_ratio``. The factors start from the truncated SVD of the weight,
and ``init_layerwise`` refits them by reduced-rank regression on the teacher's tokens
(``rules/low_rank.py``).

It refuses layers with fewer than ``min_features`` inputs or outputs (16, as ``low-rank-1x1``:
relative-position MLPs fed 2 coordinates would get a rank of nothing) and any layer where
the factors would not be at least ``min_saving`` times cheaper than the original.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lwcompile import Match, NoMatch, Refuse, Rule, Site
from lwcompile.rules.low_rank import MIN_SIDE, LowRankLinear, rank_or_refusal


@dataclass
class LowRankLinearRule(Rule):
    name = "low-rank-linear"
    priority = 45
    applies_to = (nn.Linear,)

    #: rank = min(in_features, out_features) // rank_ratio
    rank_ratio: int = 4
    min_features: int = MIN_SIDE
    #: the factors must cost at most 1 / min_saving of the original's multiply-adds
    min_saving: float = 1.5

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        linear = site.module
        if type(linear) is not nn.Linear:
            return NoMatch(f"{type(linear).__name__} is not a plain nn.Linear")
        rank = rank_or_refusal(linear.in_features, linear.out_features,
                               rank_ratio=self.rank_ratio, min_size=self.min_features,
                               min_saving=self.min_saving, unit="features", per="token")
        if isinstance(rank, Refuse):
            return rank
        return Match(site, info={"rank": rank})

    def build(self, match: Match) -> nn.Module:
        return LowRankLinear.from_linear(match.site.module, match.info["rank"])

    def describe(self, replacement: nn.Module) -> str:
        return (f"Linear {replacement.reduce.in_features}->{replacement.reduce.out_features}"
                f"->{replacement.expand.out_features} (rank {replacement.reduce.out_features})")
