"""Refuse any rewrite that leaves a depthwise(-separable) conv feeding a pixel shuffle.

A pixel shuffle gives each of the r^2 output phases its own channels, i.e. its own spatial
kernel. If those channels come from a depthwise conv through pointwise ops only, every phase
is a mix of the *same* depthwise-filtered maps: the phases share one spatial kernel and the
upsampled image shows a periodic grid (Lahiri et al. 2021). This guard applies to every
rule, user rules included; it looks at the replacement itself with a real forward
(``record_flow``), and at where the site's output goes in the real model (``Site``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lwcompile import DataFlow, Guard, Proposal, Veto, is_depthwise, random_inputs, record_flow

SAFE = "use resize-then-convolve (bilinear upsample + LIST, the `subpixel` rule) instead"


@dataclass
class DepthwiseSubpixelGuard(Guard):
    name = "no-depthwise-subpixel"
    #: flows already recorded, by replacement structure and input shapes: a network's
    #: hundreds of identical LISTs need one forward, not hundreds
    _flows: dict[tuple, DataFlow] = field(default_factory=dict, repr=False, compare=False)

    def check(self, proposal: Proposal) -> Veto | None:
        replacement, match = proposal.replacement, proposal.match
        if replacement is None:
            return None
        depthwise = [n for n, m in replacement.named_modules() if is_depthwise(m)]
        if not depthwise:
            return None
        key = (proposal.replacement_key, tuple(match.shapes), match.site.dtype)
        if key not in self._flows:
            self._flows[key] = _flow(replacement, match.shapes, depthwise, match.site.dtype)
        flow = self._flows[key]
        inside = flow.feeds_pixel_shuffle & set(depthwise)
        if inside:
            return Veto(f"depthwise conv {sorted(inside)[0]} would feed a pixel shuffle inside "
                        f"the replacement: all r^2 phases would share one spatial kernel "
                        f"(grid artifacts); {SAFE}")
        replaces_the_shuffle = any(
            "pixel_shuffle" in str(n.target) or "PixelShuffle" in _module_type(n)
            for n in match.nodes)
        if match.site.feeds_pixel_shuffle and not replaces_the_shuffle and flow.feeds_output:
            return Veto("the replacement ends in a depthwise-separable path and this conv feeds "
                        "a pixel shuffle: all r^2 output phases would share one spatial kernel "
                        f"(grid artifacts); {SAFE}")
        return None


def _flow(replacement, shapes, watch, dtype):  # noqa: ANN001, ANN202
    """Data flow does not depend on image size: try a small crop first, it is much cheaper."""
    small = tuple(torch.Size([*s[:-2], *(min(n, 16) for n in s[-2:])]) if len(s) == 4 else s
                  for s in shapes)
    try:
        return record_flow(replacement, random_inputs(small, dtype=dtype), watch=watch)
    except Exception:  # some modules need their real size (windows, fixed patches)
        return record_flow(replacement, random_inputs(shapes, dtype=dtype), watch=watch)


def _module_type(node) -> str:  # noqa: ANN001 - an fx.Node
    if node.op != "call_module":
        return ""
    return type(node.graph.owning_module.get_submodule(node.target)).__name__
