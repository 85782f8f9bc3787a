"""Keep the image-facing layers: convs that read or write only a few channels.

The first and last layers of a restoration network touch the image itself; they are cheap
(few channels) and lightening them costs quality for almost no saving, so the paper keeps
them standard. This guard vetoes any rewrite of a conv with fewer than ``min_channels``
input or output channels, except by a rule written for such layers (``for_image_layers``,
e.g. ``image_output_squeeze`` for a large-kernel output conv such as SRResNet's 9x9, which
is not cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

from lwcompile import Guard, Proposal, Veto


@dataclass
class ImageBoundaryGuard(Guard):
    name = "image-boundary"

    min_channels: int = 16

    def check(self, proposal: Proposal) -> Veto | None:
        if proposal.rule.for_image_layers:
            return None
        module = proposal.match.site.module
        channels = (getattr(module, "in_channels", None), getattr(module, "out_channels", None))
        if None in channels or min(channels) >= self.min_channels:
            return None
        return Veto(f"image-facing layer ({channels[0]}->{channels[1]} channels, fewer than "
                    f"{self.min_channels}): kept standard as in the paper")
