"""A large-kernel conv that writes the image: squeeze 1x1 C -> C/4, then the kxk conv.

SRResNet ends in a 9x9 64->3 conv at the output resolution. Kept standard, as the paper keeps
DnCNN's 3x3 output conv, it is two thirds of the lightened x4 model's MACs. LIST cannot take
it (3 output channels do not split into two branches) and a depthwise kxk would give each
colour one filtered map. Squeezing the input first keeps a full kxk kernel per output
colour and per squeezed channel: for 9x9 64->3 the MACs per pixel drop from 15,552 to
4,912 (3.2x). Small kernels (3x3) are left alone: there the squeeze saves little.

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

from lwcompile import Match, NoMatch, Refuse, Rule, Site


@dataclass
class ImageOutputSqueezeRule(Rule):
    name = "image-output-squeeze"
    priority = 40
    for_image_layers = True

    squeeze_ratio: int = 4
    #: at most this many output channels: the conv writes an image (grey, RGB, RGBA)
    max_out_channels: int = 4
    min_kernel: int = 5

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv = site.module
        if type(conv) is not nn.Conv2d:
            return NoMatch(f"{type(conv).__name__} is not a plain Conv2d")
        if conv.out_channels > self.max_out_channels:
            return NoMatch(f"{conv.out_channels} output channels: not an image-writing conv")
        k_h, k_w = conv.kernel_size
        if k_h != k_w or k_h < self.min_kernel:
            return NoMatch(f"kernel {k_h}x{k_w} is below {self.min_kernel}x{self.min_kernel}: "
                           "squeezing it saves little")
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            return NoMatch("needs stride 1, dilation 1 and groups 1")
        if conv.in_channels % self.squeeze_ratio or conv.in_channels < 4 * self.squeeze_ratio:
            return Refuse(f"{conv.in_channels} input channels do not squeeze by "
                          f"{self.squeeze_ratio} to at least 4")
        return Match(site)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        rank = conv.in_channels // self.squeeze_ratio
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
