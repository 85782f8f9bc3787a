"""What the eager forward computed, by what it computed it from.

Checked alongside eager (lockstep.py), a traced graph need not recompute what eager has just
computed: the same function of the same values is the same value. This module records, for
one eager forward, each torch function call and each call of chosen modules under a key
made of the function and its arguments, with an alias of the result.

Values, not tensors, are compared. Each tensor eager handles gets a serial number, and a
value is ``(serial, version)``: ATen bumps a tensor's version counter (shared by its views)
at every in-place write, so a tensor written in place holds a new value. Other arguments
enter the key as they are (with their type: ``True`` is not ``1``); a call with an argument
that cannot be keyed is not recorded.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..measure.cost import unseen_alias
from ..tracing.flow import tensors
from ..tracing.trace import join

#: a tensor's content at one moment: (serial number, version)
Value = tuple[int, int]


class Unknown(Exception):
    """An argument no key can be made of (a tensor without a value, an unhashable object)."""


def call_key(target: Any, args: tuple, kwargs: dict,
             value_of: Callable[[torch.Tensor], Value]) -> Hashable | None:
    """The key of calling ``target`` on these arguments, or None if one cannot be keyed.

    Keying runs inside the user's forward and only saves work: whatever an argument raises
    (a dict whose keys do not sort, a ``__hash__`` that fails) means no key, never a failed
    forward."""
    try:
        key = target, _frozen(args, value_of), _frozen(kwargs, value_of)
        hash(key)  # the function itself too
        return key
    except Exception:  # Unknown, or anything a user's object raises
        return None


def _frozen(value: Any, value_of: Callable[[torch.Tensor], Value]) -> Hashable:
    if isinstance(value, torch.Tensor):
        return "tensor", value_of(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(_frozen(v, value_of) for v in value)
    if isinstance(value, dict):
        return "dict", tuple(sorted((k, _frozen(v, value_of)) for k, v in value.items()))
    if isinstance(value, slice):  # unhashable before Python 3.12; indexing is common
        return "slice", _frozen((value.start, value.stop, value.step), value_of)
    try:
        hash(value)
    except TypeError as exc:
        raise Unknown(type(value).__name__) from exc
    return type(value), value


#: fx records Python operators; eager's torch function mode sees the Tensor methods
#: they call (checked on torch 2.13; an operator missing here only costs recomputation)
_OPERATOR_METHODS = {
    operator.add: torch.Tensor.add, operator.sub: torch.Tensor.sub,
    operator.mul: torch.Tensor.mul, operator.truediv: torch.Tensor.div,
    operator.neg: torch.Tensor.neg, operator.matmul: torch.Tensor.matmul,
    operator.getitem: torch.Tensor.__getitem__,
    operator.iadd: torch.Tensor.add_, operator.isub: torch.Tensor.sub_,
    operator.imul: torch.Tensor.mul_, operator.itruediv: torch.Tensor.div_,
}
_COMMUTATIVE = frozenset({operator.add, operator.mul})


def eager_call(op: str, target: Any, args: tuple, prefix: str) -> tuple[Any, tuple] | None:
    """What eager calls for an fx node (op, target, args), with its arguments in eager's
    order; None for nodes eager's record cannot hold (placeholders, attributes)."""
    if op == "call_module":
        return ("module", join(prefix, target)), args
    if op == "call_method":
        method = getattr(torch.Tensor, target, None)
        return (method, args) if method is not None else None
    if op != "call_function":
        return None
    if target in _COMMUTATIVE and len(args) == 2 and not isinstance(args[0], torch.Tensor):
        args = (args[1], args[0])  # eager calls Tensor.mul(x, 0.2) for 0.2 * x
    return _OPERATOR_METHODS.get(target, target), args


_twins: dict[Any, Any] = {}


def _functional_twin(func: Any) -> Any:
    """``Tensor.add`` for ``Tensor.add_``: fx records ``y += x`` as ``y + x``, so a graph
    asks for the functional call where eager made the in-place one."""
    if func not in _twins:
        name = getattr(func, "__name__", "")
        twin = None
        if name.endswith("_") and not name.startswith("_") and \
                getattr(torch.Tensor, name, None) is func:
            twin = getattr(torch.Tensor, name[:-1], None)
        _twins[func] = twin
    return _twins[func]


def _same_dtypes(out: Any, args: tuple, kwargs: dict) -> bool:
    """Whether an in-place call's result is what its functional twin gives: only if no
    type promotion could have made the two differ (all tensors of the result's dtype, no
    complex scalar)."""
    if not isinstance(out, torch.Tensor):
        return False
    return (all(t.dtype == out.dtype for t in tensors((args, kwargs)))
            and not any(isinstance(a, complex) for a in (*args, *kwargs.values())))


class EagerCalls(TorchFunctionMode):
    """Records the eager forward run inside it: call key -> (result's values, alias,
    whether it must be copied).

    The alias (a detached view, sharing storage and version counter) keeps a result for
    the graph after eager has dropped it, without changing what eager's own memory count
    sees. ``forget()`` drops the aliases held so far. Calls made inside the watched
    modules are not recorded: the graph calls the module, not what is inside it.
    """

    def __init__(self) -> None:
        super().__init__()
        #: id(tensor) -> (weak reference to it, serial): a plain dict (a weak-key one costs
        #: more than the rest of a call's record); a dead entry's id may be reused, so an
        #: entry counts only while its reference still gives the same tensor
        self._serials: dict[int, tuple[weakref.ref, int]] = {}
        self._next = itertools.count()
        self.results: dict[Hashable, tuple[Any, Any, bool]] = {}
        self.recording = True
        self._pending: list[Hashable | None] = []
        self._inside = 0  # depth of watched module calls

    def _serial(self, t: torch.Tensor) -> int | None:
        entry = self._serials.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def value(self, t: torch.Tensor) -> Value:
        """``t``'s value as eager holds it (a new serial the first time it is seen)."""
        serial = self._serial(t)
        if serial is None:
            serial = next(self._next)
            self._serials[id(t)] = weakref.ref(t), serial
        return serial, t._version

    def known_value(self, t: torch.Tensor) -> Value:
        """``t``'s value if eager has seen ``t`` (a weight the graph shares), else Unknown."""
        serial = self._serial(t)
        if serial is None:
            raise Unknown("a tensor eager has not seen")
        return serial, t._version

    def forget(self) -> None:
        self.results.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not self.recording or self._inside or getattr(func, "__name__", "") == "__get__":
            return func(*args, **kwargs)
        key = call_key(func, args, kwargs, self.value)  # before: in place, versions move
        out = func(*args, **kwargs)
        if key is not None:
            self._remember(key, out)
            twin = _functional_twin(func)
            if twin is not None and _same_dtypes(out, args, kwargs):
                self._remember((twin, *key[1:]), out, in_place=True)
        return out

    def _remember(self, key: Hashable, out: Any, in_place: bool = False) -> None:
        """Keep ``out`` under ``key``. ``in_place``: the call asked for allocates its result,
        eager's wrote into an argument (a functional twin), so a graph must copy it."""
        if isinstance(out, torch.Tensor):
            self.results[key] = self.value(out), unseen_alias(out), in_place
        elif isinstance(out, (tuple, list)) and out and all(
                isinstance(t, torch.Tensor) for t in out):
            self.results[key] = (tuple(self.value(t) for t in out),
                                 type(out)(unseen_alias(t) for t in out), False)

    def watching(self, modules: dict[str, nn.Module],
                 recorded: set[str]) -> list[Any]:
        """Watch calls of these modules (qualified name -> module): what runs inside them
        is not recorded, and the calls of those in ``recorded`` are, keyed as
        ``eager_call`` keys a graph's ``call_module``. Returns the hook handles."""
        handles = []
        for name, module in modules.items():
            def before(_m: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
                record = self.recording and not self._inside and name in recorded
                self._pending.append(call_key(("module", name), args, kwargs, self.value)
                                     if record else None)
                self._inside += 1

            def after(_m: nn.Module, _args: tuple, _kwargs: dict, out: Any) -> None:
                self._inside -= 1
                key = self._pending.pop()
                if key is not None and self.recording:
                    self._remember(key, out)

            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        return handles
