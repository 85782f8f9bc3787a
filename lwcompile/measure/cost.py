"""What a module costs: parameters, multiply-accumulates and peak activation memory.

MACs come from ``torch.utils.flop_counter``'s formulas (half their FLOP count) rather than
hand formulas, so grouped, dilated and transposed convs and matmuls are all counted by the
same authority. They are applied by one light dispatch mode of ours (``CostMode``), which
also tracks memory: ``FlopCounterMode`` attributes FLOPs to modules through global module
hooks, which made counting cost 40% of a forward; lighten only needs the totals.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry

from .. import arguments as check
from .snapshot import preserved_state


def count_params(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    check.module("count_params", "module", module)
    return sum(p.numel() for p in module.parameters())


_CONVOLUTION = torch.ops.aten.convolution.default
_VALUE_DEPENDENT = frozenset({torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape})
#: op -> whether ATen tags it value-dependent (``func.tags`` builds a new list per call)
_value_dependent: dict[Any, bool] = {}


def _reads_values(func: Any) -> bool:
    if func not in _value_dependent:
        _value_dependent[func] = bool(_VALUE_DEPENDENT.intersection(func.tags))
    return _value_dependent[func]


class SharedWrite(RuntimeError):
    """An op was about to write into a storage the run shares with another (lockstep.py)."""


@contextlib.contextmanager
def unobserved() -> Iterator[None]:
    """Run the block unseen by the active modes (``CostMode``, the data flow's function
    mode): work lighten does beside a measured forward is not the model's."""
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


_PYTHON_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.Python)


def unseen_alias(t: torch.Tensor) -> torch.Tensor:
    """``t.detach()`` made below every mode: what ``unobserved`` does, without entering and
    leaving each mode (this runs for every call an eager forward records, eager_calls.py)."""
    with torch._C._ExcludeDispatchKeyGuard(_PYTHON_KEY), torch._C.DisableTorchFunction():
        return t.detach()


def storage_id(t: torch.Tensor) -> int:
    """Which storage ``t`` views: the same for real and fake tensors (a fake tensor's data
    pointer is 0), so memory is counted alike on both."""
    return t.untyped_storage()._cdata


@dataclass
class Window:
    """One call of a module, as the memory count saw it."""

    #: activation bytes alive when the call began (its inputs among them)
    live_at_entry: int
    #: the most bytes alive above that during the call (its output among them)
    transient: int


@dataclass
class Timeline:
    """A run's memory, split into its module calls and the code between them: the peak of
    a run in which some calls are swapped is composed from it (compiler/result_cost.py)."""

    #: the most bytes alive when code between the windowed calls allocated (what is alive
    #: as a call ends is never more than its window's entry + transient)
    outside_peak: int = 0
    #: qualified module name -> its calls, in order
    calls: dict[str, list[Window]] = field(default_factory=dict)
    #: an op read tensor values into Python or sized its output by them (ATen's own tags):
    #: on other values the run could take another course
    value_dependent: bool = False


class CostMode(TorchDispatchMode):
    """Count FLOPs, and the bytes of tensor storages created and alive at once.

    Weights, buffers and inputs existed before and are not counted: the peak is the
    activation memory the forward needs, which is what a concat-free rewrite lowers.
    Calls wrapped in ``window(name)`` are also accounted on their own (``timeline``).
    """

    def __init__(self, preexisting: dict[int, Any] | None = None) -> None:
        super().__init__()
        #: storages that existed before, by ``storage_id`` (None: count FLOPs only), held
        #: (``storages``)
        self.preexisting = preexisting
        self.flops = 0
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0
        #: in-place writes into storages that existed before (weights, buffers, inputs)
        self.preexisting_writes = 0
        self.timeline = Timeline()
        self._window: Window | None = None
        #: storages this run shares with another run that still uses them: an op that
        #: would write into one raises ``SharedWrite`` before it runs
        self.shared: set[int] = set()

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[None]:
        """Account the block as one call of ``name`` (calls do not nest: an inner one is
        part of the outer)."""
        if self._window is not None:
            yield
            return
        self._window = Window(self.current, 0)
        try:
            yield
        finally:
            self.timeline.calls.setdefault(name, []).append(self._window)
            self._window = None

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.current -= self.live.pop(ptr)
            del self.refs[ptr]
            self.shared.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        mutable = func._schema.is_mutable
        if mutable and self.shared:
            self._refuse_shared_writes(func, args, kwargs)
        out = func(*args, **kwargs)
        if not self.timeline.value_dependent and _reads_values(func):
            self.timeline.value_dependent = True
        if func is _CONVOLUTION:  # most ops of an image network: skip the generic wrapper
            self.flops += conv_flop_count(args[0].shape, args[1].shape, out.shape,
                                          transposed=args[6])
        elif (formula := flop_registry.get(func._overloadpacket)) is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if mutable and self.preexisting is not None:
            self._count_writes(func, args, kwargs)
        if self.preexisting is not None:
            for t in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def _count_writes(self, func: Any, args: tuple, kwargs: dict) -> None:
        self.preexisting_writes += sum(storage_id(t) in self.preexisting
                                       for t in _written(func, args, kwargs))

    def _refuse_shared_writes(self, func: Any, args: tuple, kwargs: dict) -> None:
        if any(storage_id(t) in self.shared for t in _written(func, args, kwargs)):
            raise SharedWrite(f"{func} would write into a storage another run still uses")

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage._cdata
        if ptr in self.preexisting:
            return
        if ptr not in self.live:
            self.live[ptr], self.refs[ptr] = storage.nbytes(), 0
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            if self._window is None:
                self.timeline.outside_peak = max(self.timeline.outside_peak, self.current)
            else:
                self._window.transient = max(self._window.transient,
                                             self.current - self._window.live_at_entry)
        self.refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    def allocated(self, value: Any) -> bool:
        """Whether ``value`` is a tensor whose storage this run allocated and still holds."""
        return isinstance(value, torch.Tensor) and storage_id(value) in self.live

    @property
    def macs(self) -> int:
        return self.flops // 2


def _written(func: Any, args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    """The tensors a mutable op writes into, by its schema."""
    for i, spec in enumerate(func._schema.arguments):
        if spec.alias_info is None or not spec.alias_info.is_write:
            continue
        value = kwargs.get(spec.name) if spec.kwarg_only or i >= len(args) else args[i]
        if isinstance(value, torch.Tensor):
            yield value


def storages(tensors: Iterable[torch.Tensor]) -> dict[int, Any]:
    """The storages of ``tensors`` by ``storage_id``, held: a forward that replaces a
    weight's storage (``conv.weight.data = ...``, re-parametrised blocks) frees the old one,
    and a new activation could take its id and go uncounted."""
    return {storage_id(t): t.untyped_storage() for t in tensors}


def preexisting(module: nn.Module, values: Any) -> dict[int, Any]:
    """The storages a forward of ``module`` on ``values`` finds already there: its weights,
    buffers and inputs (what ``CostMode`` does not count as activations)."""
    return storages([*module.parameters(), *module.buffers(),
                     *(a for a in tree_flatten(values)[0] if isinstance(a, torch.Tensor))])


@dataclass
class Measured:
    output: Any
    macs: int
    peak_bytes: int
    #: the output is one tensor in a storage the run allocated (not an input, not a weight)
    fresh_output: bool = False
    #: an op read tensor values into Python or sized its output by them (``Timeline``)
    reads_values: bool = False


def measure(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Measured:
    """Run ``module`` once (no grad, state restored): output, MACs and peak activation bytes.

    MACs are half the flop counter's FLOPs; bilinear resizes and elementwise ops count as
    zero there. Measuring rides along forwards we need anyway (verification).
    """
    cost = CostMode(preexisting(module, (args, kwargs)))
    with preserved_state(module), torch.no_grad(), cost:
        out = module(*args, **(kwargs or {}))
    return Measured(out, cost.macs, cost.peak, cost.allocated(out),
                    cost.timeline.value_dependent)


def count_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of one forward of ``module`` on these inputs."""
    check.module("count_macs", "module", module)
    args = check.inputs("count_macs", "inputs", args)  # copies: a forward may write into them
    from .inputs import blamed_on_inputs  # inputs builds on this module

    with blamed_on_inputs("count_macs", module, args):
        return measure(module, args, kwargs).macs


def measure_on_shapes(module: nn.Module, shapes: tuple[torch.Size, ...],
                      dtype: torch.dtype = torch.float32) -> Measured:
    """``measure`` on inputs of these shapes, without the arithmetic.

    Runs on fake tensors (shapes and dtypes only), so checking a rewrite's shapes and
    counting its MACs and memory costs microseconds per op instead of a real convolution.
    The output is a fake tensor. Raises what the forward raises, including for code that
    needs real values (``.item()``): callers fall back to ``measure`` on real inputs.
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        inputs = tuple(torch.empty(s, dtype=dtype) for s in shapes)
        # weights become fake when first used: their fake storages existed before too
        weights = [mode.from_tensor(t) for t in (*module.parameters(), *module.buffers())]
        cost = CostMode(storages((*inputs, *weights)))
        with preserved_state(module), torch.no_grad(), cost:
            out = module(*inputs)
    return Measured(out, cost.macs, cost.peak, cost.allocated(out))


def random_inputs(shapes: tuple[torch.Size, ...], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Reproducible random tensors of these shapes (the site's dtype: half models too)."""
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) and all(isinstance(n, int) and n >= 0 for n in s)
            for s in shapes):
        raise check.ArgumentError(f"random_inputs: shapes must be a list of shapes (tuples of "
                                  f"sizes >= 0), got {shapes!r}"[:200])
    check.integer("random_inputs", "seed", seed)
    if not isinstance(dtype, torch.dtype):
        raise check.ArgumentError(f"random_inputs: dtype must be a torch.dtype, got {dtype!r}")
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator).to(dtype) for s in shapes)
