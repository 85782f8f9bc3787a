"""A conv that writes the image: squeeze 1x1 C -> C/4, then the kxk conv.

SRResNet ends in a 9x9 64->3 conv at the output resolution. Kept standard, as the paper keeps
DnCNN's 3x3 output conv, it is two thirds of the lightened x4 model's MACs. LIST cannot take
it (3 output channels do not split into two branches) and a depthwise kxk would give each
colour one filtered map. Squeezing the input first keeps a full kxk kernel per output
colour and per squeezed channel: for 9x9 64->3 the MACs per pixel drop from 15,552 to
4,912 (3.2x). A conv that writes the image directly is taken from ``min_kernel`` (5x5) up:
3x3 output convs stay standard, as the paper keeps DnCNN's. Every conv taken must also have
its MACs cut at least ``min_saving`` times by the squeeze.

A sub-pixel upsampler that writes the image (3x3 64 -> 3 r^2, then a pixel shuffle: OmniSR,
PLKSR, Compact, ...) is the same case at low resolution: each of the r^2 phases of each colour
keeps its own 3x3 kernel over the squeezed channels, so nothing depthwise feeds the shuffle and
the phases share no spatial kernel (the grid-artifact argument of ``no-depthwise-subpixel``
does not apply). Such a conv computes r^2 outputs per colour and pixel, so it is taken at any
kernel size. The ``subpixel`` rule (resize + LIST) refuses these: 3 colours do not split into
LIST's two branches.

A default rule because the quality it costs is within what a short fine-tune recovers
(measured by ``python -m benchmarks.image_output_study``; results in docs/quality.md).
``default_rules(without=["image-output-squeeze"])`` keeps every image-facing layer standard,
as the paper does.

The replacement starts from the original weights, not at random: the conv's weight seen as
a C_in x (C_out k k) matrix is cut to its best rank-C_in/4 approximation (SVD), whose left
factor is the squeeze and right factor the kxk conv. That is exact when the conv reads only
a C_in/4-dimensional subspace of its input channels, and a good start otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lwcompile import LIST, Match, NoMatch, Refuse, Rule, Site


@dataclass
class ImageOutputSqueezeRule(Rule):
    name = "image-output-squeeze"
    priority = 40
    for_image_layers = True

    squeeze_ratio: int = 4
    #: at most this many output channels (per pixel-shuffle phase): the conv writes an
    #: image (grey, RGB, RGBA)
    max_out_channels: int = 4
    #: a conv writing the image directly needs at least this kernel (not one feeding a shuffle)
    min_kernel: int = 5
    #: the squeezed form must cut the conv's MACs at least this many times
    min_saving: float = 2.0

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d:
            return NoMatch(f"{type(conv).__name__} is not a plain Conv2d")
        phases = (site.pixel_shuffle_factor or 1) ** 2 if site.feeds_pixel_shuffle else 1
        if conv.out_channels > self.max_out_channels * phases:
            return NoMatch(f"{conv.out_channels} output channels: not an image-writing conv")
        if site.writes_output is False:
            return NoMatch("its output reaches the model's output only through other layers: "
                           "not an image-writing conv")
        k_h, k_w = conv.kernel_size
        if k_h != k_w:
            return NoMatch(f"kernel {k_h}x{k_w} is not square")
        if phases == 1 and k_h < self.min_kernel:
            return NoMatch(f"kernel {k_h}x{k_w} writing the image is below "
                           f"{self.min_kernel}x{self.min_kernel}: kept as the paper keeps it")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1, dilation 1 and groups 1")
        rank = LIST.squeeze_width(conv.in_channels, self.squeeze_ratio)
        if rank < 4:
            return Refuse(f"{conv.in_channels} input channels do not squeeze by "
                          f"{self.squeeze_ratio} to at least 4")
        before = conv.in_channels * conv.out_channels * k_h * k_w
        after = conv.in_channels * rank + rank * conv.out_channels * k_h * k_w
        if before < self.min_saving * after:
            return NoMatch(f"the squeeze saves {before / after:.2f}x of this conv's MACs, "
                           f"below {self.min_saving:g}x")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        rank = LIST.squeeze_width(conv.in_channels, self.squeeze_ratio)
        squeeze = nn.Conv2d(conv.in_channels, rank, 1, bias=False)
        spatial = nn.Conv2d(rank, conv.out_channels, conv.kernel_size, padding=conv.padding,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode)
        with torch.no_grad():
            c_out, c_in, k, _ = conv.weight.shape
            matrix = conv.weight.detach().double().permute(1, 0, 2, 3).reshape(c_in, -1)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            root = s[:rank].sqrt()
            squeeze.weight.copy_((u[:, :rank] * root).T.reshape(rank, c_in, 1, 1))
            spatial.weight.copy_((root[:, None] * vh[:rank]).reshape(rank, c_out, k, k)
                                 .permute(1, 0, 2, 3))
            if conv.bias is not None:
                spatial.bias.copy_(conv.bias)
        return nn.Sequential(squeeze, spatial).to(conv.weight.device, conv.weight.dtype)

    def describe(self, replacement: nn.Module) -> str:
        squeeze, spatial = replacement
        k = spatial.kernel_size[0]
        return (f"squeeze 1x1 {squeeze.in_channels}->{squeeze.out_channels} + "
                f"{k}x{k} {spatial.in_channels}->{spatial.out_channels}")
