"""LIST for a kxk conv without "same" padding (RealCUGAN's ``padding=0`` 3x3 convs).

An unpadded kxk conv shrinks its input by k - 1 - 2p pixels per dimension, and the next
layers rely on that (RealCUGAN crops its skips to match). The plain ``list`` rule only takes
"same" convs, so these stay dense. ``UnpaddedLIST`` keeps the original's output size
exactly: its depthwise kxk branch has the original's padding p, and its 1x1 branch reads
the squeezed input cropped by k // 2 - p on each side (the centre tap of every window the
unpadded conv sees), so both branches cover the same output pixels.

It is its own module, not a ``LIST`` subclass: code that rewrites every ``LIST`` (e.g.
``emit_fast``'s merge into one grouped 1x1) assumes "same" padding. Its registered fitting
is LIST's: both output 1x1 convs solved by least squares around Adam steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwcompile import LIST, FitTask, Match, NoMatch, Refuse, Rule, Site, register_fit


class UnpaddedLIST(nn.Module):
    """LIST (squeeze 1x1 -> 1x1 branch | depthwise kxk + 1x1 branch, concatenated) for a
    kxk conv with padding ``padding`` < k // 2: the output is (k - 1 - 2 padding) smaller."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 squeeze_ratio: int = 4, padding: int = 0) -> None:
        super().__init__()
        if in_channels < squeeze_ratio or out_channels % 2 or kernel_size % 2 == 0 \
                or not 0 <= padding < kernel_size // 2:
            raise ValueError(f"UnpaddedLIST needs at least {squeeze_ratio} in_channels, "
                             f"even out_channels, an odd kernel and 0 <= padding < k // 2; got "
                             f"{in_channels}->{out_channels}, k={kernel_size}, p={padding}")
        squeezed, half = LIST.squeeze_width(in_channels, squeeze_ratio), out_channels // 2
        self.crop = kernel_size // 2 - padding
        self.squeeze = nn.Conv2d(in_channels, squeezed, 1)
        self.pointwise_branch = nn.Conv2d(squeezed, half, 1)
        self.spatial_branch = nn.Sequential(
            nn.Conv2d(squeezed, squeezed, kernel_size, padding=padding, groups=squeezed),
            nn.Conv2d(squeezed, half, 1))

    def cropped(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crop
        return x[..., c:x.shape[-2] - c, c:x.shape[-1] - c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return torch.cat([self.pointwise_branch(self.cropped(squeezed)),
                          self.spatial_branch(squeezed)], dim=-3)


@dataclass
class UnpaddedListRule(Rule):
    name = "list-unpadded"
    priority = 45

    squeeze_ratio: int = 4

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d:
            return NoMatch(f"{type(conv).__name__} is not a plain Conv2d")
        k_h, k_w = conv.kernel_size
        if k_h != k_w or k_h < 3 or k_h % 2 == 0:
            return NoMatch(f"kernel {k_h}x{k_w} is not square, odd and at least 3x3")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1, dilation 1 and groups 1")
        if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1] \
                or conv.padding[0] >= k_h // 2:
            return NoMatch(f"padding {conv.padding} is 'same' or uneven: not this rule's")
        if conv.padding[0] and conv.padding_mode != "zeros":
            return Refuse(f"{conv.padding_mode} padding of a shrinking conv is not modelled")
        why = LIST.unsplittable(conv.in_channels, conv.out_channels, self.squeeze_ratio)
        if why:
            return Refuse(why)
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        return UnpaddedLIST(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                            self.squeeze_ratio, conv.padding[0])

    def describe(self, replacement: nn.Module) -> str:
        k = replacement.spatial_branch[0].kernel_size[0]
        return f"LIST {k}x{k} (unpadded, 1x1 branch cropped by {replacement.crop})"


@torch.no_grad()
def _solve_heads(rep: UnpaddedLIST, task: FitTask) -> None:
    squeezed = rep.squeeze(task.inputs)
    half = rep.pointwise_branch.out_channels
    task.least_squares(rep.pointwise_branch, rep.cropped(squeezed), task.target[:, :half])
    task.least_squares(rep.spatial_branch[1], rep.spatial_branch[0](squeezed),
                       task.target[:, half:])


@register_fit(UnpaddedLIST)
def fit_unpadded_list(rep: UnpaddedLIST, task: FitTask) -> None:
    """As LIST: both output 1x1 convs solved exactly, Adam on the whole, solved again."""
    _solve_heads(rep, task)
    task.adam(rep)
    _solve_heads(rep, task)
