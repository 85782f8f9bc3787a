"""Keep the image-facing layers: few-channel convs that read the image or write it.

The first and last layers of a restoration network touch the image itself; they are cheap
(few channels) and lightening them costs quality for almost no saving, so the paper keeps
them standard. This guard vetoes any rewrite of a conv with fewer than ``min_channels``
input or output channels that faces the image, except by a rule written for such layers
(``for_image_layers``, e.g. ``image_output_squeeze`` for a large-kernel output conv such as
SRResNet's 9x9, which is not cheap).

Facing the image is seen in the reference run (``Site.reads_input`` / ``writes_output``):
the conv reads a model input, or its output reaches the model's output, with no other
learned layer in between. A few-channel conv deep inside the network does neither, and is
not cheap when its kernel is large (PLKSR's 17x17 conv on an 8-channel slice costs more than
a 64-channel 3x3): it gets the rules every other conv gets. Where the run could not tell
(``None``, a site built by hand), few channels alone decide, as before.
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
        site = proposal.match.site
        channels = (getattr(site.module, "in_channels", None),
                    getattr(site.module, "out_channels", None))
        if None in channels or min(channels) >= self.min_channels:
            return None
        if site.reads_input is False and site.writes_output is False:
            return None  # inside the network: not an image layer however thin
        facing = [side for side, seen in (("reads the model's input", site.reads_input),
                                          ("writes the model's output", site.writes_output))
                  if seen]
        where = f"; {' and '.join(facing)}" if facing else ""
        return Veto(f"image-facing layer ({channels[0]}->{channels[1]} channels, fewer than "
                    f"{self.min_channels}{where}): kept standard as in the paper")
