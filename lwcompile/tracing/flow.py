"""Runtime data flow, seen from one real forward: which module outputs reach a pixel shuffle,
and which modules face the image.

fx cannot see inside code it failed to trace, so a guard asking "does this conv feed a
pixel shuffle?" would be blind there. Instead we run the model once under a
``TorchFunctionMode`` and tag tensors with the watched modules whose output reaches them
through *pointwise* operations only (activations, norms, 1x1 convs, adds, concats, slicing).
Any op that mixes neighbouring pixels clears the tag. When a tagged tensor enters a pixel
shuffle, its tagged modules are recorded as feeding one. This works identically in traced
graphs, opaque code and replacement modules, and needs no tracing at all.

A second tag follows every op, pointwise or not, and is replaced at each watched module's
output by that module alone: it tells which watched modules read the model's inputs and
which write its output with no other learned layer in between, the layers that face the
image. Watched modules that keep the channel count pass the tag on as well
(``channel_preserving``): between the image and the first layer that widens it to features
(or the last that narrows features to it) there may be a colour shift (RCAN's mean-shift
1x1 conv) or the depthwise half of a separable conv, and the layer after them still faces
the image.

Known blind spot: a pixel shuffle hand-written with ``view``/``permute`` (or einops) is not
recognised as one.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode

from ..measure.snapshot import preserved_state
from .fx_helpers import linear_arguments

_TAG = "_lwcompile_origins"
#: the second tag: the watched modules (or ``INPUT``) a tensor comes from through any ops
_SOURCES = "_lwcompile_sources"
#: the model's inputs, as a source
INPUT = "<input>"

#: torch functions / Tensor methods (by ``__name__``) that do not mix neighbouring pixels
POINTWISE = frozenset("""
add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ mul mul_ __mul__ __rmul__
__imul__ div div_ __truediv__ __rtruediv__ neg abs clamp clamp_ clip pow __pow__
relu relu_ relu6 leaky_relu leaky_relu_ prelu gelu silu silu_ sigmoid sigmoid_ tanh tanh_
hardtanh hardtanh_ hardswish hardsigmoid elu elu_ selu mish softplus
batch_norm layer_norm group_norm instance_norm dropout dropout2d
cat concat concatenate stack split chunk narrow __getitem__ select
clone contiguous to float half double type_as detach
""".split())
PIXEL_SHUFFLE = frozenset({"pixel_shuffle"})
CONCAT = frozenset({"cat", "concat", "concatenate"})


def is_depthwise(module: nn.Module) -> bool:
    """A spatial conv with one filter group per input channel: its channels share no kernel
    mixing, so every channel that follows pointwise shares its spatial filter."""
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            and max(module.kernel_size) > 1)


def _pointwise_conv(args: tuple, kwargs: dict) -> bool:
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
    return (isinstance(weight, torch.Tensor) and tuple(weight.shape[-2:]) == (1, 1)
            and stride in (1, (1, 1), [1, 1]))


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or result (a plain walk: pytree is slower here, and
    this runs for every op of a forward)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)


def _origins(value: Any, tag: str = _TAG) -> frozenset[str]:
    return frozenset().union(*(getattr(t, tag, frozenset()) for t in tensors(value)))


_tagged: list[weakref.ref] = []  # so tags never outlive a run (ops may return a parameter)


def _tag(value: Any, origins: frozenset[str], tag: str = _TAG) -> None:
    for t in tensors(value):
        if not origins and not hasattr(t, tag):
            continue  # nothing to record, nothing to clear
        try:
            setattr(t, tag, origins)
            _tagged.append(weakref.ref(t))
        except (AttributeError, RuntimeError, TypeError):  # some subclasses refuse
            pass


def _untag_all() -> None:
    while _tagged:
        t = _tagged.pop()()
        for tag in (_TAG, _SOURCES):
            if t is not None and hasattr(t, tag):
                delattr(t, tag)


@dataclass
class DataFlow:
    """What one forward showed: watched modules that feed a pixel shuffle, a concat or the
    model's output (through pointwise ops only), and those that face the image."""

    feeds_pixel_shuffle: set[str] = field(default_factory=set)
    #: watched module -> upscale factor of the (first) pixel shuffle it feeds
    pixel_shuffle_factor: dict[str, int] = field(default_factory=dict)
    feeds_concat: set[str] = field(default_factory=set)
    feeds_output: set[str] = field(default_factory=set)
    #: watched modules that read a model input with no watched module between that changes
    #: the channel count (any other op may be: pools, resizes, concats)
    reads_input: set[str] = field(default_factory=set)
    #: watched modules whose output reaches the model's output with no watched module
    #: between that changes the channel count (pixel shuffles and resizes may be)
    writes_output: set[str] = field(default_factory=set)
    #: watched module -> (input shapes, output shape) of its first call, in call order
    shapes: dict[str, tuple[tuple[torch.Size, ...], torch.Size | None]] = field(
        default_factory=dict)
    #: watched module -> how many times it was called
    calls: Counter[str] = field(default_factory=Counter)
    #: set while other code runs the same modules (lockstep.py's graph): calls not recorded
    paused: bool = False


class _FlowMode(TorchFunctionMode):
    """Tags tensors by the watched modules they come from. ``weight_of`` maps the weights of
    watched bias-free ``nn.Linear``s to their names: a forward that applies one through its
    weight (``F.linear(x, self.qkv.weight, b)``) is recorded as a call of that module, which
    is how the traced graph writes it (``fx_helpers.linear_weight_calls``)."""

    def __init__(self, flow: DataFlow, weight_of: dict[int, str], inside: set[str]) -> None:
        super().__init__()
        self.flow = flow
        self.weight_of = weight_of
        self.inside = inside  # watched modules whose own forward is running

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__" or not isinstance(out, (torch.Tensor, tuple, list)):
            return out
        origins = _origins((args, kwargs))
        _tag(out, _origins((args, kwargs), _SOURCES), _SOURCES)
        if name in CONCAT:
            self.flow.feeds_concat |= origins
        if name in PIXEL_SHUFFLE:
            self.flow.feeds_pixel_shuffle |= origins
            factor = args[1] if len(args) > 1 else kwargs.get("upscale_factor")
            for origin in origins:
                self.flow.pixel_shuffle_factor.setdefault(origin, int(factor))
            _tag(out, frozenset())
        elif name in POINTWISE or (name == "conv2d" and _pointwise_conv(args, kwargs)):
            _tag(out, origins)
        else:
            _tag(out, frozenset())
        if name == "linear" and self.weight_of:
            self._functional_linear(args, kwargs, out)
        return out

    def _functional_linear(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        x, weight, _ = linear_arguments(args, kwargs)
        name = self.weight_of.get(id(weight))
        if name is None or name in self.inside or self.flow.paused:
            return
        self.flow.calls[name] += 1
        if name not in self.flow.shapes and isinstance(x, torch.Tensor):
            self.flow.shapes[name] = ((x.shape,), out.shape)
        _called(self.flow, name, x, out)


def channel_preserving(module: nn.Module | None) -> bool:
    """Whether ``module`` gives as many channels (features) as it takes."""
    if module is None:
        return False
    if isinstance(module, nn.Linear):
        return module.in_features == module.out_features
    return getattr(module, "in_channels", None) == getattr(module, "out_channels", False)


def _called(flow: DataFlow, name: str, inputs: Any, out: Any,
            module: nn.Module | None = None) -> None:
    """Record that watched module ``name`` read ``inputs`` and produced ``out``."""
    sources = _origins(inputs, _SOURCES)
    if INPUT in sources:
        flow.reads_input.add(name)
    _tag(out, _origins(out) | {name})
    passed_on = sources if channel_preserving(module) else frozenset()
    _tag(out, frozenset({name}) | passed_on, _SOURCES)


def structure_key(module: nn.Module) -> tuple:
    """What decides how ``module`` routes data and what shapes it gives: the classes,
    configuration, plain attributes and parameter/buffer shapes of it and its submodules
    (and a GraphModule's code), not parameter values. Equal keys, equal flows and shapes,
    so the result for one replacement holds for its identical twins.
    """
    from .. import arguments as check

    check.module("structure_key", "module", module)
    def own(m: nn.Module) -> tuple:
        plain = tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                             if k[0] != "_" and not isinstance(v, (torch.Tensor, nn.Module))))
        # the tables themselves: named_parameters() walks submodules to find them (slower)
        tensors = tuple((n, tuple(t.shape), t.dtype) for table in (m._parameters, m._buffers)
                        for n, t in table.items() if t is not None)
        code = m.code if isinstance(m, torch.fx.GraphModule) else ""
        return type(m), m.extra_repr(), plain, tensors, code

    return tuple((name, *own(m)) for name, m in module.named_modules())


@contextlib.contextmanager
def flow_recording(model: nn.Module, watch: Iterable[str] | None = None) -> Iterator[DataFlow]:
    """Record the data flow of whatever runs ``model`` inside the block.

    Lets a forward that is needed anyway (lighten's reference run) record the flow too.
    Mark the model's inputs inside the block (``note_inputs``) before running it, and set
    ``feeds_output`` there (``note_output``): tags are gone after it.
    """
    flow = DataFlow()
    modules = dict(model.named_modules())
    names = list(watch) if watch is not None else [
        n for n, m in modules.items() if not list(m.children())]
    handles = []
    inside: set[str] = set()
    weight_of = {id(modules[n].weight): n for n in names
                 if type(modules[n]) is nn.Linear and modules[n].bias is None}
    for name in names:
        def enter(_m, _inputs, name=name):
            inside.add(name)

        def hook(_m, inputs, kwargs, out, name=name):
            inside.discard(name)
            if flow.paused:
                return
            flow.calls[name] += 1
            if name not in flow.shapes:  # a keyword input (conv(input=h)) counts as well
                flow.shapes[name] = (
                    tuple(a.shape for a in (*inputs, *kwargs.values())
                          if isinstance(a, torch.Tensor)),
                    out.shape if isinstance(out, torch.Tensor) else None)
            _called(flow, name, (inputs, kwargs), out, _m)
        handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
        if id(getattr(modules[name], "weight", None)) in weight_of:
            handles.append(modules[name].register_forward_pre_hook(enter))
    try:
        with _FlowMode(flow, weight_of, inside):
            yield flow
    finally:
        for h in handles:
            h.remove()
        _untag_all()


def note_inputs(*inputs: Any) -> None:
    """Mark the tensors in ``inputs`` (the model's arguments) as model inputs (inside
    ``flow_recording``, before the forward)."""
    _tag(inputs, frozenset({INPUT}), _SOURCES)


def note_output(flow: DataFlow, output: Any) -> None:
    """Record which watched modules reach the model's output (inside ``flow_recording``)."""
    flow.feeds_output = set(_origins(output))
    flow.writes_output = set(_origins(output, _SOURCES) - {INPUT})


def record_flow(model: nn.Module, args: tuple, kwargs: dict | None = None,
                watch: Iterable[str] | None = None) -> DataFlow:
    """Run ``model`` once and report which watched submodules feed a pixel shuffle.

    ``watch`` names submodules (qualified names); by default every leaf module.
    """
    from .. import arguments as check

    check.module("record_flow", "model", model)
    args = check.inputs("record_flow", "args", args)
    kwargs = check.mapping("record_flow", "kwargs", kwargs)
    if watch is not None:
        watch = check.strings("record_flow", "watch", watch)
    with preserved_state(model), torch.no_grad(), flow_recording(model, watch) as flow:
        note_inputs(args, kwargs)
        note_output(flow, model(*args, **(kwargs or {})))
    return flow
