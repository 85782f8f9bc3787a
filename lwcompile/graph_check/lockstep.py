"""Check the root's traced graph against eager while the eager forward runs.

A traced graph is trusted only once it gives eager's output on the same input. Run after
eager (graph_run.py), that check is a second forward. Run alongside eager, it computes almost
nothing: wherever the graph calls what eager called, on the same values, it takes eager's
result (eager_calls.py). What it must compute (the Python that tracing may have baked in or
dropped, which is what the check is for) runs for real, and the final outputs are compared
as before.

Algorithm:
1. The graph runs as a generator that pauses at each conv it calls directly. A forward hook
   on each of those convs hands over eager's call; the graph then runs its nodes up to its
   own next conv, all of which eager has run by then.
2. Each of those nodes that calls a function or module eager called (recorded since the
   last conv) on the same values, with equal other arguments, takes eager's result: an
   alias, not a copy (a copy only where eager wrote in place and the graph allocates:
   fx records ``y += x`` as ``y + x``). Any other node is computed, and so is a call that
   wrote in place into a tensor the graph holds in a copy of its own (its inputs).
3. At the conv, the graph's call is compared with eager's: same module, no keyword
   arguments, one input holding eager's input value (or equal to it, element by element,
   if the graph computed it), and no in-place write by the graph into a weight, buffer or
   input so far (the graph shares the model's weights with eager). Then it takes eager's
   output and stops until the next conv.
4. The first call that disagrees ends the pairing: the graph computes everything after it
   itself. Whatever is left runs once eager has returned.

Sharing storage with eager is safe because neither side can spoil the other unseen: the
graph's memory count raises before any op of the graph writes into a shared storage
(``cost.SharedWrite``), and a computed node refuses to read a shared tensor that eager has
written since the graph took it (its version moved).

One file past ~300 lines on purpose: the pairing is one algorithm whose steps share the
paused generator, the hooks and the alias guards; split, neither half reads on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import one_line
from ..measure.cost import CostMode, preexisting, storage_id, storages, unobserved
from ..measure.snapshot import preserved_state
from ..tracing.flow import DataFlow, tensors
from ..tracing.trace import Attempt, Region, TensorMeta, join
from .eager_calls import EagerCalls, Unknown, Value, call_key, eager_call
from .graph_run import GraphRun, same_output
from .replay import REPLAYABLE

_UNFINISHED = object()
_COMPUTE = object()
_CALLS = frozenset({"call_function", "call_method", "call_module"})


class Stale(RuntimeError):
    """The graph needs a tensor it shares with eager, which eager has written since."""


class Lockstep:
    """One traced graph, run alongside the eager forward of its module."""

    def __init__(self, attempt: Attempt) -> None:
        self.attempt = attempt
        gm = attempt.graph_module
        self.eager = EagerCalls()
        #: graph tensor -> the eager value it holds, and its own version then (None for an
        #: alias of eager's tensor, whose version is its storage's, ``seen`` below)
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        #: shared storage -> the version the graph has seen it reach (by taking eager's
        #: results): a higher one means eager wrote into it behind the graph's back
        self.seen: dict[int, int] = {}
        #: serials of eager tensors whose value the graph holds in a copy of its own: a
        #: call whose result is one of them wrote into it in place, which the graph's copy
        #: must see, so the graph makes that call itself
        self.owned: set[int] = set()
        # the graph's own copies (an eager forward may write into its inputs), holding the
        # values of eager's
        values = []
        for v in attempt.values:
            if isinstance(v, torch.Tensor):
                copy, value = v.clone(), self.eager.value(v)
                self.values[copy] = (value, copy._version)
                self.owned.add(value[0])
                v = copy
            values.append(v)
        eager_inputs = storages(tensors(attempt.values))
        self.cost = CostMode(preexisting(attempt.module, values) | eager_inputs)
        self.cost.shared |= eager_inputs.keys()
        self.recorder = GraphRun(gm, prefix=attempt.name, cost=self.cost)
        self.called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        self.convs = {t for t in self.called if isinstance(gm.get_submodule(t), REPLAYABLE)}
        #: conv calls paired; graph nodes that took eager's result instead of computing
        self.paired, self.hits, self.reused, self.seconds = True, 0, 0, 0.0
        self._steps = self._run(values)
        self._waiting: tuple[str, tuple, dict] | None = None
        self._output: Any = _UNFINISHED
        self._error = ""
        self.flow: DataFlow | None = None

    def _run(self, values: list[Any]) -> Generator[tuple[str, tuple, dict] | None, Any, Any]:
        """fx.Interpreter.run, pausing at each conv while paired with eager (yielding the
        call, then None once it has eager's answer)."""
        r = self.recorder
        r.env, r.args_iter = {}, iter(values)
        for node in r.graph.nodes:
            if node.op == "call_module" and node.target in self.convs and self.paired:
                name = join(self.attempt.name, node.target)
                args, kwargs = r.fetch_args_kwargs_from_env(node)
                eager = yield name, args, kwargs
                del args, kwargs  # held here, the input would outlive its last use
                if eager is None:
                    value = self._compute(node)
                else:
                    with self.cost.window(name):
                        value = self._take(eager, self.eager.value(eager))
                    node.meta["tensor_meta"] = TensorMeta(value.shape, value.dtype)
                del eager  # and eager's output would outlive eager's use of it
                r.env[node] = value
                yield None
            else:
                value = self._reused(node)
                r.env[node] = value if value is not _COMPUTE else self._compute(node)
            for dead in r.user_to_last_uses.get(node, []):
                del r.env[dead]
            if node.op == "output":
                return r.env[node]
        return None

    def _reused(self, node: fx.Node) -> Any:
        """Eager's result for ``node`` if eager made the same call on the same values."""
        if not self.paired or node.op not in _CALLS:
            return _COMPUTE
        args, kwargs = self.recorder.fetch_args_kwargs_from_env(node)
        call = eager_call(node.op, node.target, args, self.attempt.name)
        key = call and call_key(call[0], call[1], kwargs, self._value)
        found = self.eager.results.get(key) if key is not None else None
        if found is None:
            return _COMPUTE
        values, alias, copy = found
        results = values if isinstance(alias, (tuple, list)) else (values,)
        if self.owned.intersection(serial for serial, _ in results):
            return _COMPUTE  # eager wrote into a tensor the graph holds its own copy of
        window = self.cost.window(call[0][1]) if node.op == "call_module" else None
        with window or contextlib.nullcontext():
            if isinstance(alias, torch.Tensor):
                value = self._copy(alias, values) if copy else self._take(alias, values)
                node.meta["tensor_meta"] = TensorMeta(value.shape, value.dtype)
            else:
                value = type(alias)(self._take(a, v) for a, v in zip(alias, values, strict=True))
        self.reused += 1
        return value

    def _take(self, eager: torch.Tensor, value: Value) -> torch.Tensor:
        """An alias of eager's tensor for the graph, holding ``value``: allocated, as the
        graph's memory count sees it, where the graph would have computed it. A result
        written in place moves what the graph has seen of its storage."""
        mine = eager.detach()
        storage = storage_id(mine)
        seen = self.seen.get(storage) if storage in self.cost.shared else None
        if seen is not None and value[1] < seen:
            raise Stale("eager's result predates a write the graph has already taken")
        self.cost.shared.add(storage)
        self.seen[storage] = value[1]
        self.values[mine] = (value, None)
        return mine

    def _copy(self, eager: torch.Tensor, value: Value) -> torch.Tensor:
        """A copy of eager's tensor, holding ``value``, for a call that allocates its result
        where eager's wrote in place (the graph's memory count sees the allocation)."""
        if eager._version != value[1]:
            raise Stale("eager wrote again into a result the graph needs a copy of")
        mine = eager.clone()
        self.values[mine] = (value, mine._version)
        self.owned.add(value[0])
        return mine

    def _value(self, t: torch.Tensor) -> Value:
        """The eager value ``t`` holds in the graph's eyes, else Unknown."""
        held = self.values.get(t)
        if held is None:
            return self.eager.known_value(t)  # the weights the graph shares with eager
        value, version = held
        if version is None:
            return value[0], self.seen[storage_id(t)]
        if t._version != version:
            raise Unknown("the graph wrote into its copy")
        return value

    def _compute(self, node: fx.Node) -> Any:
        if self.cost.shared:
            args = self.recorder.fetch_args_kwargs_from_env(node)
            if not all(self._intact(t) for t in tensors(args)):
                raise Stale(f"{node.name}: eager wrote into a tensor the graph shares "
                            "with it before the graph had read it")
            del args
        return self.recorder.run_node(node)

    def _intact(self, t: torch.Tensor) -> bool:
        """Whether ``t`` holds what the graph thinks (eager has not written into its
        storage since the graph last saw it)."""
        storage = storage_id(t)
        return storage not in self.cost.shared or self.seen.get(storage) == t._version

    @contextlib.contextmanager
    def alongside(self, model: nn.Module, flow: DataFlow | None = None) -> Iterator[None]:
        """Pair the graph with the eager forward of ``model`` run inside the block; ``flow``
        (recorded on that forward) is paused whenever the graph runs the same modules."""
        self.flow = flow
        names = {t: join(self.attempt.name, t) for t in self.called}
        handles = self.eager.watching(
            {name: model.get_submodule(name) for name in names.values()},
            recorded={names[t] for t in self.called - self.convs})
        for target in self.convs:
            name = names[target]

            def hook(_m: nn.Module, inputs: tuple, output: Any, name: str = name) -> None:
                self._offer(name, inputs, output)

            handles.append(model.get_submodule(name).register_forward_hook(hook))
        try:
            with self.eager:
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
            if not self.paired:
                self.eager.recording = False
            self.eager.forget()  # what eager computed before this conv, the graph has read
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
        if not (waiting == name and not kwargs and len(args) == len(inputs) == 1
                and isinstance(output, torch.Tensor) and self.cost.preexisting_writes == 0):
            return False
        mine, theirs = args[0], inputs[0]
        try:
            if self._value(mine) == self.eager.value(theirs):
                return True
        except Unknown:
            pass
        return self._intact(mine) and _equal(mine, theirs)

    def _advance(self, answer: torch.Tensor | None) -> None:
        """Resume the graph with ``answer`` and run it to its next pause (or its end)."""
        self._waiting = None
        if self.flow is not None:
            self.flow.paused = True
        recording, self.eager.recording = self.eager.recording, False
        try:
            with self.cost:
                self._waiting = self._steps.send(answer)
        except StopIteration as done:
            self._output, self.paired = done.value, False
        finally:
            self.eager.recording = recording
            if self.flow is not None:
                self.flow.paused = False

    def region(self, expected: Any, *, eager_read_values: bool) -> tuple[Region, set[str]]:
        """Finish the graph and judge it against eager's ``expected`` output: the region
        (traced, or opaque with the reason) and its opaque leaves. ``eager_read_values``:
        the eager run read a tensor value into Python (the graph, which took eager's
        results, may not have)."""
        start = time.perf_counter()
        try:
            with preserved_state(self.attempt.module), torch.no_grad():
                while self._output is _UNFINISHED and not self._error:
                    self._advance(None)
        except Exception as exc:
            self._error = one_line(exc)
        finally:
            self.eager.recording = False
            self.eager.forget()
        self.seconds += time.perf_counter() - start
        if self._error:
            return self.attempt.refused(f"traced graph fails to run: {self._error}")
        if not same_output(self._output, expected):
            return self.attempt.refused("traced graph disagrees with eager")
        self.cost.timeline.value_dependent |= eager_read_values
        return self.attempt.accepted(self.cost.timeline)


def _equal(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)):
        return False
    if a.device.type == "cpu" and a.dtype in _NUMPY_FLOATS:  # 4x faster than torch.equal
        return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
    return torch.equal(a, b)


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)
