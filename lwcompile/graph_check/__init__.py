"""Is a traced graph faithful to eager? One entry point, ``GraphCheck``, judges every graph
tracing produces against one eager run of the model.

fx can trace without error and still be wrong (a Python ``if`` baked in, a forward that
assigns attributes), so a graph is trusted only once it gives eager's output on the same
input. Checking by a second forward would double the cost of lightening a large network;
instead:
1. Before the eager run, the root's trace attempt is handed over. A root traced whole (no
   opaque leaves) is paired with the eager forward (lockstep.py): it takes eager's result
   for every call eager made on the same values (eager_calls.py) and computes only the
   rest. Otherwise the eager run records its conv outputs (replay.py).
2. ``during`` wraps that eager run; ``root`` then gives the root's verdict.
3. ``region`` judges any other traced module by running its graph after eager
   (graph_run.py), taking recorded conv outputs while they are held (``release`` drops
   them, and the paired run, once the first workspace is traced).
The check measures memory call by call on a whole root (``cost.Timeline``): the result's
peak is composed from it. Tracing calls the check only through the function it is handed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..tracing.flow import DataFlow
from ..tracing.trace import Attempt, Region
from .graph_run import check_after
from .lockstep import Lockstep
from .replay import Replay, recording

__all__ = ["GraphCheck"]


class GraphCheck:
    """The graph checks of one eager run of a model, rooted at ``root_attempt`` (None when
    the root is a leaf fx does not trace)."""

    def __init__(self, root_attempt: Attempt | None) -> None:
        self.root_attempt = root_attempt
        whole = root_attempt is not None and root_attempt.whole
        self.pairing: Lockstep | None = Lockstep(root_attempt) if whole else None
        self.replay: Replay | None = None

    @property
    def paired(self) -> bool:
        """Whether the root's graph runs alongside the eager forward."""
        return self.pairing is not None

    @property
    def paired_seconds(self) -> float:
        """Time the root's graph took inside the eager run: the check's, not eager's."""
        return self.pairing.seconds if self.pairing is not None else 0.0

    @contextlib.contextmanager
    def during(self, model: nn.Module, flow: DataFlow | None = None) -> Iterator[None]:
        """Wrap the eager forward of ``model`` (``flow``, recorded on it, is paused while
        the paired graph runs the same modules)."""
        if self.pairing is not None:
            with self.pairing.alongside(model, flow):
                yield
        else:
            with recording(model) as self.replay:
                yield

    def root(self, output: Any, *, eager_read_values: bool) -> tuple[Region, set[str]] | None:
        """The root's region and opaque leaves, judged against eager's ``output``; None if
        the root was not traced. ``eager_read_values``: the eager run read a tensor value
        into Python (a paired graph, taking eager's results, may not have)."""
        if self.pairing is not None:
            return self.pairing.region(output, eager_read_values=eager_read_values)
        if self.root_attempt is not None:
            return self.region(self.root_attempt, output)
        return None

    def region(self, attempt: Attempt, expected: Any) -> tuple[Region, set[str]]:
        """Any traced module, judged against eager's ``expected`` output for its call."""
        return check_after(attempt, expected, self.replay)

    def release(self) -> None:
        """Drop the recorded conv outputs and the paired run: later checks compute."""
        self.root_attempt = self.pairing = self.replay = None
