"""Sub-pixel upsampler -> bilinear upsample + LIST.

A sub-pixel upsampler is conv(C -> C_out*r^2) -> [activation] -> pixel shuffle(r). The
paper's safe cheap replacement resizes first and then convolves at the high resolution with
LIST(C -> C_out): no output phase depends on its own slice of channels, so there is nothing
to make periodic. This rule needs the graph (it removes the pixel shuffle), so it only
applies where the region around the conv was traced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lwcompile import LIST, Match, NoMatch, Refuse, Resize, Rule, Site

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Identity)


def pixel_shuffle_factor(node: fx.Node) -> int | None:
    """The upscale factor if ``node`` is a pixel shuffle, else None."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return module.upscale_factor if isinstance(module, nn.PixelShuffle) else None
    if node.op == "call_function" and node.target in (F.pixel_shuffle, torch.pixel_shuffle):
        return node.args[1] if len(node.args) > 1 else node.kwargs["upscale_factor"]
    if node.op == "call_method" and node.target == "pixel_shuffle":
        return node.args[1]
    return None


def _activation(node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    module = node.graph.owning_module.get_submodule(node.target)
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return None  # per-channel slopes belong to the r^2-times-wider tensor
    return module if isinstance(module, ACTIVATIONS) else None


@dataclass
class SubpixelRule(Rule):
    name = "subpixel"
    priority = 10  # before LIST, which would otherwise take the conv on its own

    squeeze_ratio: int = 4

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        conv, node = site.module, site.node
        if type(conv) is not nn.Conv2d or conv.stride != (1, 1) or conv.groups != 1:
            return NoMatch("not a stride-1 dense Conv2d")
        if node is None:
            return NoMatch("no traced graph here: cannot see whether a pixel shuffle follows")
        chain = [node]
        while len(chain[-1].users) == 1 and len(chain) < 3:
            user = next(iter(chain[-1].users))
            factor = pixel_shuffle_factor(user)
            if factor is not None:
                chain.append(user)
                break
            if _activation(user) is None:
                break
            chain.append(user)
        if factor_of(chain) is None:
            return NoMatch("output does not go (only) to a pixel shuffle")
        r = factor_of(chain)
        if conv.out_channels % (r * r):
            return NoMatch(f"{conv.out_channels} channels are not a multiple of r^2={r * r}")
        out_channels = conv.out_channels // (r * r)
        if conv.in_channels % self.squeeze_ratio or out_channels % 2:
            return Refuse(f"LIST cannot split {conv.in_channels}->{out_channels} channels "
                          f"(squeeze {self.squeeze_ratio}, two equal branches)")
        return Match(site, nodes=tuple(chain), info={"factor": r, "out_channels": out_channels})

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        r, k = match.info["factor"], conv.kernel_size[0]
        layers = [Resize("scale", stride=(r, r)),
                  LIST(conv.in_channels, match.info["out_channels"], k if k % 2 else 3,
                       self.squeeze_ratio)]
        if len(match.nodes) == 3:  # keep the activation that sat between conv and shuffle
            layers.append(_activation(match.nodes[1]))
        return nn.Sequential(*layers)

    def describe(self, replacement: nn.Module) -> str:
        return f"bilinear x{replacement[0].stride[0]} + LIST"


def factor_of(chain: list[fx.Node]) -> int | None:
    return pixel_shuffle_factor(chain[-1]) if len(chain) > 1 else None
