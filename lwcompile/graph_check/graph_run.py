"""Run a traced graph on its module's recorded call and judge its output against eager's.

This is the plain graph check, run after the eager forward; it serves every graph except a
root traced whole, which is checked alongside eager instead (lockstep.py, which runs the
same interpreter). Conv calls whose output the eager run recorded with the same input and
weights take it from the record (replay.py). The run's memory is timed call by call
(``cost.CostMode``) only where a result's cost can be composed from it: a whole model
traced without opaque leaves; elsewhere that would only slow the check.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx

from ..errors import one_line
from ..measure.cost import CostMode, preexisting
from ..measure.snapshot import preserved_state
from ..tracing.trace import Attempt, Region, ShapeRecorder, join
from .replay import Replay


class GraphRun(ShapeRecorder):
    """A shape-recording run of a region's graph whose module calls are timed in ``cost``
    (by qualified name, ``prefix`` being the region's) and whose conv calls take the
    outputs ``replay`` recorded where input and weights agree."""

    def __init__(self, gm: fx.GraphModule, replay: Replay | None = None,
                 prefix: str = "", cost: CostMode | None = None) -> None:
        super().__init__(gm)
        self.replay, self.prefix, self.cost = replay, prefix, cost

    def call_module(self, target, args, kwargs):  # noqa: ANN001 - fx signature
        name = join(self.prefix, target)
        with self.cost.window(name) if self.cost is not None else contextlib.nullcontext():
            if self.replay is not None:
                out = self.replay.output_for(name, self.fetch_attr(target), args, kwargs)
                if out is not None:
                    return out
            return super().call_module(target, args, kwargs)


def same_output(a: Any, b: Any) -> bool:
    """Whether a graph's output equals eager's (within float tolerance, any nesting)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5,
                                                            equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same_output(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_output(a[k], b[k]) for k in a)
    return type(a) is type(b)


def check_after(attempt: Attempt, expected: Any,
                replay: Replay | None = None) -> tuple[Region, set[str]]:
    """Run the traced graph on the recorded call's arguments and compare with eager's
    ``expected`` output; the region (traced or opaque) and its opaque leaves.

    ``replay`` holds conv outputs of an eager run on the same inputs."""
    if attempt.graph_module is None:
        return attempt.refused(attempt.failure)
    cost = CostMode(preexisting(attempt.module, attempt.values)) if attempt.whole else None
    try:
        with preserved_state(attempt.module), torch.no_grad(), cost or contextlib.nullcontext():
            out = GraphRun(attempt.graph_module, replay, attempt.name,
                           cost).run(*attempt.values)
    except Exception as exc:
        return attempt.refused(f"traced graph fails to run: {one_line(exc)}")
    if not same_output(out, expected):
        return attempt.refused("traced graph disagrees with eager")
    return attempt.accepted(cost.timeline if cost is not None else None)
