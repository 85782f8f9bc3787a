"""Equivalent module forms that onnxruntime runs faster; used by ``export_onnx``.

In onnxruntime's per-node profile of the light SRResNet x4 (1x3x128x128, 2 threads), a PReLU
cost far more than its arithmetic:

- ``prelu-as-leaky-relu``: a PReLU with one slope is a LeakyReLU with that slope. onnxruntime
  fuses LeakyRelu into the conv before it; PRelu it runs as its own pass over memory, with
  layout reorders around it (with the output conv, the largest costs in an ad-hoc
  per-node profile).

(The other large cost there, the thin 9x9 output conv, is ``emit.ThinConvPhases``, a form
PyTorch gains from too.) It applies to any model, the original included, so speed-ups
compare like with like. It is kept to the ONNX export, where the fusion it enables is.
"""

from __future__ import annotations

from collections import Counter

from torch import nn

from .emit import swap_modules


def onnxruntime_forms(model: nn.Module) -> Counter[str]:
    """Rewrite ``model`` (an eval copy) in place; return the rewrites done, per kind."""
    leaky = swap_modules(model, lambda m: nn.LeakyReLU(float(m.weight.detach()))
                         if isinstance(m, nn.PReLU) and m.num_parameters == 1 else None)
    return +Counter({"prelu-as-leaky-relu": leaky})
