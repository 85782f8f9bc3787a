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
        chain = _chain_to_shuffle(node) if node is not None else None
        if chain is not None:
            r = pixel_shuffle_factor(chain[-1])
        elif site.feeds_pixel_shuffle and site.output_shape is not None and (
                tuple(site.output_shape[-2:]) == tuple(site.input_shapes[0][-2:])):
            r = site.pixel_shuffle_factor  # seen at run time; the shuffle stays where it is
        else:
            return NoMatch("output does not go to a pixel shuffle")
        if conv.out_channels % (r * r):
            return NoMatch(f"{conv.out_channels} channels are not a multiple of r^2={r * r}")
        out_channels = conv.out_channels // (r * r)
        why = LIST.unsplittable(conv.in_channels, out_channels, self.squeeze_ratio)
        if why:
            return Refuse(f"LIST cannot split {conv.in_channels}->{out_channels} channels: "
                          f"{why}")
        info = {"factor": r, "out_channels": out_channels}
        if chain is None:
            return Match(site, info=info)
        return Match(site, nodes=tuple(chain), info=info)

    def build(self, match: Match) -> nn.Module:
        conv = match.site.module
        r, k = match.info["factor"], conv.kernel_size[0]
        layers = [Resize("scale", stride=(r, r)),
                  LIST(conv.in_channels, match.info["out_channels"], k if k % 2 else 3,
                       self.squeeze_ratio)]
        if not match.nodes:
            # the shuffle is out of reach (untraced code): hand it the low-resolution layout
            # it expects; pixel_shuffle(pixel_unshuffle(y)) == y, so this is resize + LIST
            layers.append(nn.PixelUnshuffle(r))
        elif len(match.nodes) == 3:  # keep the activation that sat between conv and shuffle
            layers.append(_activation(match.nodes[1]))
        return nn.Sequential(*layers)

    def describe(self, replacement: nn.Module) -> str:
        tail = " (+ unshuffle for the shuffle that follows)" if isinstance(
            replacement[-1], nn.PixelUnshuffle) else ""
        return f"bilinear x{replacement[0].stride[0]} + LIST{tail}"


def _chain_to_shuffle(node: fx.Node) -> list[fx.Node] | None:
    """conv [-> activation] -> pixel shuffle, each feeding only the next; else None."""
    chain = [node]
    while len(chain[-1].users) == 1 and len(chain) < 3:
        user = next(iter(chain[-1].users))
        if pixel_shuffle_factor(user) is not None:
            return [*chain, user]
        if _activation(user) is None:
            return None
        chain.append(user)
    return None
