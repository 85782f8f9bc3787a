"""Check the root's traced graph against eager while the eager forward runs.

A traced graph is trusted only once it gives eager's output on the same input (trace.py).
Run after eager, that check is a second forward, nearly all of it convs. Run alongside
eager, it computes none of them: each time eager finishes a conv, the graph is advanced to
its own next conv call, and if that is the same conv on an equal input, the graph takes a
copy of eager's output. Everything between the convs (the Python that tracing may have
baked in or dropped, which is what the check is for) runs for real, and the final outputs
are compared as before.

Algorithm:
1. The graph runs as a generator that pauses at each call of a conv it calls directly and
   resumes with eager's output, or None to compute it.
2. A forward hook on each of those convs hands over eager's call. With eager's recording
   modes off and the graph's own memory count on, the call is compared with the one the
   graph waits at: same module, no keyword arguments, one input, ``torch.equal`` to
   eager's, and no in-place write by the graph into a weight, buffer or input so far (the
   graph shares the model's weights with eager). Then the graph runs on to its next pause.
3. The first call that disagrees ends the pairing: the graph computes everything after it
   itself. Whatever is left runs once eager has returned.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from .cost import CostMode, preexisting, unobserved
from .errors import one_line
from .flow import DataFlow
from .replay import REPLAYABLE
from .state import preserved_state
from .trace import Attempt, Region, ShapeRecorder, TensorMeta, join, same_output

_UNFINISHED = object()


class Lockstep:
    """One traced graph, run alongside the eager forward of its module."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        gm = attempt.graph_module
        # the graph's own copies: an eager forward may write into its inputs
        values = [v.clone() if isinstance(v, torch.Tensor) else v for v in attempt.values]
        self.cost = CostMode(preexisting(attempt.module, values))
        self.recorder = ShapeRecorder(gm, prefix=attempt.name, cost=self.cost)
        self.convs = {n.target for n in gm.graph.nodes if n.op == "call_module"
                      and isinstance(gm.get_submodule(n.target), REPLAYABLE)}
        self.paired, self.hits, self.seconds = True, 0, 0.0
        self._steps = self._run(values)
        self._waiting: tuple[str, tuple, dict] | None = None
        self._output: Any = _UNFINISHED
        self._error = ""
        self.flow: DataFlow | None = None

    def _run(self, values: list[Any]) -> Generator[tuple[str, tuple, dict], Any, Any]:
        """fx.Interpreter.run, pausing at the convs while paired with eager."""
        r = self.recorder
        r.env, r.args_iter = {}, iter(values)
        for node in r.graph.nodes:
            if node.op == "call_module" and node.target in self.convs and self.paired:
                name = join(self.attempt.name, node.target)
                args, kwargs = r.fetch_args_kwargs_from_env(node)
                eager = yield name, args, kwargs
                del args, kwargs  # held here, the input would outlive its last use
                if eager is None:
                    value = r.run_node(node)
                else:
                    with self.cost.window(name):
                        value = eager.clone()
                    node.meta["tensor_meta"] = TensorMeta(value.shape, value.dtype)
                del eager  # and eager's output would outlive eager's use of it
            else:
                value = r.run_node(node)
            r.env[node] = value
            for dead in r.user_to_last_uses.get(node, []):
                del r.env[dead]
            if node.op == "output":
                return value
        return None

    @contextlib.contextmanager
    def alongside(self, model: nn.Module, flow: DataFlow | None = None) -> Iterator[None]:
        """Pair the graph with the eager forward of ``model`` run inside the block; ``flow``
        (recorded on that forward) is paused whenever the graph runs the same modules."""
        self.flow = flow
        handles = []
        for target in self.convs:
            name = join(self.attempt.name, target)

            def hook(_m: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
                self._offer(name, inputs, output)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _offer(self, name: str, inputs: tuple, output: Any) -> None:
        if not self.paired:
            return
        start = time.perf_counter()
        try:
            with unobserved():  # the graph's work is not eager's
                self._pair(name, inputs, output)
        except Exception as exc:  # the graph's failure is the check's verdict, not eager's
            self._error, self.paired = one_line(exc), False
        finally:
            self.seconds += time.perf_counter() - start

    def _pair(self, name: str, inputs: tuple, output: Any) -> None:
        if self._waiting is None:
            self._advance(None)
        if not self.paired:  # the graph ended first: its output will disagree
            return
        agrees = self._agrees(name, inputs, output)
        self.hits += agrees
        self.paired = agrees
        self._advance(output if agrees else None)

    def _agrees(self, name: str, inputs: tuple, output: Any) -> bool:
        waiting, args, kwargs = self._waiting
        return (waiting == name and not kwargs and len(args) == len(inputs) == 1
                and isinstance(output, torch.Tensor) and _equal(args[0], inputs[0])
                and self.cost.preexisting_writes == 0)

    def _advance(self, answer: torch.Tensor | None) -> None:
        """Resume the graph with ``answer`` and run it to its next pause (or its end)."""
        self._waiting = None
        if self.flow is not None:
            self.flow.paused = True
        try:
            with self.cost:
                self._waiting = self._steps.send(answer)
        except StopIteration as done:
            self._output, self.paired = done.value, False
        finally:
            if self.flow is not None:
                self.flow.paused = False

    def region(self, expected: Any) -> tuple[Region, set[str]]:
        """Finish the graph and judge it against eager's ``expected`` output: the region
        (traced, or opaque with the reason) and its opaque leaves."""
        start = time.perf_counter()
        try:
            with preserved_state(self.attempt.module), torch.no_grad():
                while self._output is _UNFINISHED and not self._error:
                    self._advance(None)
        except Exception as exc:
            self._error = one_line(exc)
        self.seconds += time.perf_counter() - start
        if self._error:
            return self.attempt.refused(f"traced graph fails to run: {self._error}")
        if not same_output(self._output, expected):
            return self.attempt.refused("traced graph disagrees with eager")
        return self.attempt.accepted(self.cost.timeline)


def _equal(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)):
        return False
    if a.device.type == "cpu" and a.dtype in _NUMPY_FLOATS:  # 4x faster than torch.equal
        return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
    return torch.equal(a, b)


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)
