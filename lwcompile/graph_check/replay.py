"""Conv outputs of lighten's eager run, replayed when a traced graph is checked against it.

Used for a root with opaque leaves and the regions below it; a root traced whole is checked
alongside the eager run instead (lockstep.py), which needs no record.
A traced graph is trusted only once it gives eager's output on the same input (graph_run.py).
That check is a second forward of the whole model, and in a restoration network nearly all
of a forward is convs: work whose result is already known, because a conv called on the same
input with the same weights as in eager gives the same output. So the eager run records each
conv call's output with fingerprints of its input and weights, and the graph's run takes
the output from the record when the fingerprints agree. What the check is for, the Python
between module calls that tracing may have baked in or dropped, still runs for real. A
difference it makes reaches some conv's input, changes that fingerprint, and from there on
convs are computed.

Algorithm:
1. During the eager run, a forward hook on every conv stores the fingerprints of its input
   and of its parameters, and a copy of its output (the forward may write to the output in
   place next, as ``ReLU(inplace=True)`` does), outside any recording mode, so the run's
   measured MACs, peak memory and data flow are unchanged. Recording stops at
   ``BUDGET_BYTES``.
2. When the graph calls a conv, the fingerprints of its input and present parameters (a
   forward may rewrite a conv's weights) are looked up among that conv's recorded calls. A
   hit returns a copy of the recorded output; on a miss the conv runs. Either way the
   check's verdict is the one computing every conv would give.

The fingerprint is shape, strides, dtype and three sums: plain, squared, and weighted by
position with ``PERIOD`` random weights repeated, so that a flipped or shifted tensor
differs too. Identical inputs always agree, being the same bits reduced by the same
kernels; a different input would have to agree on all three sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..measure.cost import unobserved

#: the most memory recorded outputs may hold; calls past it are recomputed in the check
BUDGET_BYTES = 512 * 2**20

#: length of the repeating position weights (a prime, so rows and planes rarely align)
PERIOD = 1021

#: modules whose output depends only on their input and parameters (in eval mode)
REPLAYABLE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class _Call:
    fingerprint: tuple
    output: torch.Tensor


@dataclass
class Replay:
    """The recorded conv calls of one eager run, by qualified module name."""

    calls: dict[str, list[_Call]] = field(default_factory=dict)
    recorded_bytes: int = 0
    hits: int = 0
    position_weights: torch.Tensor = field(
        default_factory=lambda: torch.randn(PERIOD, generator=torch.Generator().manual_seed(0)))

    def record(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> None:
        fingerprint = self._key(module, inputs)
        if fingerprint is None or not isinstance(output, torch.Tensor):
            return
        size = output.numel() * output.element_size()
        if self.recorded_bytes + size > BUDGET_BYTES:
            return
        self.recorded_bytes += size
        self.calls.setdefault(name, []).append(_Call(fingerprint, output.detach().clone()))

    def output_for(self, name: str, module: nn.Module, args: tuple,
                   kwargs: dict) -> torch.Tensor | None:
        """The recorded output of ``module`` (at ``name``) called on these arguments with its
        present parameters, or None: run it."""
        if kwargs or name not in self.calls:
            return None
        with unobserved():
            fingerprint = self._key(module, args)
        for call in self.calls[name]:
            if call.fingerprint == fingerprint:
                self.hits += 1
                return call.output.clone()
        return None

    def _key(self, module: nn.Module, inputs: tuple) -> tuple | None:
        """Fingerprints of the single tensor input and of the module's parameters and
        buffers (a forward may rewrite a conv's weights): equal keys, equal outputs."""
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            return None
        state = [t.detach() for t in (*module.parameters(), *module.buffers())]
        if not all(t.is_floating_point() for t in (inputs[0], *state)):
            return None
        layout = tuple((tuple(t.shape), t.stride(), t.dtype) for t in (inputs[0], *state))
        flat_state = torch.cat([t.reshape(-1).float() for t in state]) if state else None
        return layout, self._sums(inputs[0].detach()), self._sums(flat_state)

    def _sums(self, x: torch.Tensor | None) -> tuple[float, ...]:
        """Plain, squared and position-weighted sums of ``x``'s values (two passes)."""
        if x is None or x.numel() == 0:
            return ()
        flat = x.reshape(-1).to(torch.promote_types(x.dtype, torch.float32))  # half: no overflow
        whole = flat.numel() // PERIOD * PERIOD
        columns = flat[:whole].view(-1, PERIOD).sum(0)  # one pass; the rest folded in below
        columns[: flat.numel() - whole] += flat[whole:]
        sums = torch.stack([columns.sum(), torch.dot(flat, flat),
                            columns @ self.position_weights.to(flat)])
        return tuple(sums.tolist())


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[Replay]:
    """Record the calls of ``model``'s convs made inside the block."""
    replay = Replay()
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, REPLAYABLE):
            continue

        def hook(m: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
            with unobserved():
                replay.record(name, m, inputs, output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield replay
    finally:
        for handle in handles:
            handle.remove()
