"""Hierarchical torch.fx tracing that survives real restoration networks.

Algorithm:
1. Try to trace a module whole. If tracing raises inside a submodule, that submodule is
   marked as a leaf (opaque) and tracing is retried, so one bad block costs only itself.
2. A graph that traces is handed to the caller's ``check`` with eager's output for the same
   call: fx can trace without error and still be wrong (a Python ``if`` baked in, a
   forward that assigns attributes). The check (``lwcompile.graph_check``) says whether
   the graph stands as a region or the module becomes opaque; tracing does not know how.
3. A module whose own ``forward`` cannot be traced becomes an opaque region; its children
   are visited in turn. Convs met directly inside opaque code become module-only sites: they
   can still be swapped, but nothing is known about what feeds or consumes them.

Module state (``__dict__``) is snapshotted and restored around every trace and run, because
some forwards assign attributes (``self.mean = self.mean.type_as(x)``, fused weights).
Tracing knows nothing of rewrites, of how graphs are checked, or of cost counting.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _assert_is_none

from ..errors import one_line
from ..measure.snapshot import preserved_state
from .frozen import describe_frozen, frozen_attributes
from .fx_helpers import (
    ThreadConfinedTracer,
    linear_weight_calls,
    positional_module_calls,
    strip_string_annotations,
)
from .like_original import has_hooks


@dataclass(frozen=True)
class TensorMeta:
    """What rules read from ``node.meta["tensor_meta"]``: the value's shape and dtype."""

    shape: torch.Size
    dtype: torch.dtype


class ShapeRecorder(fx.Interpreter):
    """Run a graph and store each tensor value's shape on its node (quietly, unlike
    ShapeProp, which prints a traceback for every failing node)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = TensorMeta(result.shape, result.dtype)
        return result


@dataclass
class Region:
    """A module of the model seen as one unit of tracing."""

    name: str
    module: nn.Module
    graph_module: fx.GraphModule | None = None
    opaque_reason: str = ""
    #: traced with some non-tensor arguments fixed: the graph is for analysis only and is
    #: never installed in the result (it would bake those values in).
    specialised: bool = False
    #: traced with these arguments fixed to None (and nothing else fixed): installed behind
    #: a guard that runs the module's own forward when one of them is not None
    none_only: tuple[str, ...] = ()
    #: the memory of the graph's checking run, call by call (replayed calls allocate their
    #: output like computed ones): what the result's peak is composed from. A
    #: ``measure.cost.Timeline`` the graph check recorded (tracing does not count memory),
    #: or None where it was not timed
    timeline: Any = None
    #: plain attributes the traced forward read, frozen into the graph ("path.attr" -> value)
    frozen: dict[str, Any] = field(default_factory=dict)

    @property
    def traced(self) -> bool:
        return self.graph_module is not None


@dataclass
class TracedModel:
    """The outcome of tracing: regions (traced or opaque) and leaf modules met in opaque code."""

    regions: list[Region] = field(default_factory=list)
    #: qualified names of leaf modules called from opaque (untraced) code
    opaque_leaves: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)


class _LeafTracer(ThreadConfinedTracer):
    """An fx tracer that treats chosen submodules as leaves and remembers where it failed."""

    def __init__(self, opaque: frozenset[str] | set[str] = frozenset()) -> None:
        # a default, because fx re-creates the tracer class when unpickling a GraphModule
        super().__init__()
        self.opaque = opaque
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.opaque or super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):  # noqa: ANN001 - fx signature
        if self.foreign_thread():  # another thread's eager run: not this trace's failure
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # the innermost failing module sees the exception first
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclass
class Call:
    """The first call of a module in an eager forward: its arguments and result."""

    args: tuple
    kwargs: dict
    output: Any


def record_calls(
    root: nn.Module, targets: dict[str, nn.Module], args: tuple, kwargs: dict
) -> dict[str, Call]:
    """Run ``root`` once and record the first call of each target module."""
    calls: dict[str, Call] = {}
    handles = []
    for name, module in targets.items():
        def hook(_m, a, kw, out, name=name):
            calls.setdefault(name, Call(a, kw, out))
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with preserved_state(root), torch.no_grad():
            root(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _split_concrete(module: nn.Module, call: Call) -> tuple[dict[str, Any], list[Any]]:
    """Bind a call to ``forward``'s parameters; non-tensor arguments become concrete args.

    None is concrete too (``if mask is not None`` then takes the branch eager took). The
    same call may pass a tensor at another input size (SwinIR computes a mask for its
    unshifted blocks when the size differs from the one it was built for), so such a graph
    is installed behind a guard that runs the module's own forward when it does
    (``like_original``, ``none_only``)."""
    sig = inspect.signature(module.forward)
    bound = sig.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    concrete = {
        k: v for k, v in bound.arguments.items()
        if sig.parameters[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                      inspect.Parameter.KEYWORD_ONLY)
        and not isinstance(v, torch.Tensor)
    }
    return concrete, list(bound.arguments.values())


@dataclass
class Attempt:
    """A module traced (or not) and not yet checked against eager."""

    name: str
    module: nn.Module
    graph_module: fx.GraphModule | None
    #: submodules kept as leaves because tracing failed inside them
    opaque: set[str] = field(default_factory=set)
    #: the recorded call's arguments, as the graph takes them
    values: list[Any] = field(default_factory=list)
    specialised: bool = False
    #: parameters fixed to None while tracing (and nothing else fixed): the graph holds
    #: only while they are None
    none_only: tuple[str, ...] = ()
    failure: str = ""  # why it could not be traced

    @property
    def whole(self) -> bool:
        """The root, traced as one graph with no opaque leaves: the only graph that can be
        checked alongside eager (graph_check.lockstep) and a result's cost composed from
        (compiler.result_cost)."""
        return self.name == "" and self.graph_module is not None and not self.opaque

    def refused(self, reason: str) -> tuple[Region, set[str]]:
        return Region(self.name, self.module, opaque_reason=reason), set()

    def accepted(self, timeline: Any) -> tuple[Region, set[str]]:
        return Region(self.name, self.module, self.graph_module, specialised=self.specialised,
                      none_only=self.none_only, timeline=timeline), self.opaque


def trace_graph(name: str, module: nn.Module, call: Call, both_modes: bool = False) -> Attempt:
    """Trace one module, marking failing submodules opaque (leaves) and retrying.

    Tracing bakes in the module's mode (the compiler's copies are in eval). With
    ``both_modes`` (the user's model is in training mode), a forward that branches on
    ``self.training`` is not traced: it stays Python code and keeps both behaviours."""
    opaque = hooked_submodules(module)  # traced through, their hooks would be baked in
    try:
        concrete, values = _split_concrete(module, call)
    except TypeError as exc:
        return Attempt(name, module, None, failure=f"cannot bind recorded call: {exc}")
    while True:
        tracer = _LeafTracer(opaque)
        try:
            with preserved_state(module):
                graph = tracer.trace(module, concrete_args=concrete or None)
                constants = _tensor_constants(graph, module)
            strip_string_annotations(graph)  # else the GraphModule cannot be pickled
            _concrete_parameter_names(graph, concrete)
            positional_module_calls(graph, module)
            linear_weight_calls(graph, module)
            with preserved_state(module):
                for attr, value in constants.items():
                    setattr(module, attr, value)
                gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
            break
        except Exception as exc:  # fx raises anything the user's forward raises
            culprit = tracer.failed_in
            if not culprit or culprit in opaque:
                return Attempt(name, module, None, failure=one_line(exc))
            opaque.add(culprit)
    if both_modes and _branches_on_training(module, opaque, concrete,
                                                 graph.python_code("self").src):
        return Attempt(name, module, None, failure="its forward branches on self.training: "
                       "a traced graph would keep only its eval behaviour")
    values_for_graph = [
        v for v, p in zip(values, inspect.signature(module.forward).parameters.values(),
                          strict=False)
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    fixed = {k for k, v in concrete.items() if v is not None}
    none_only = () if fixed else tuple(concrete)
    return Attempt(name, module, gm, opaque, values_for_graph, specialised=bool(fixed),
                   none_only=none_only)


def _concrete_parameter_names(graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """fx names the parameter of a concrete argument ``mask_1``; give it back its name, so
    that the parent's call ``self.attn(x, mask=...)`` still binds to the installed graph.
    fx's assertions that a None argument is None go: the graph is installed behind a guard
    that checks it (or not installed), and fx cannot re-trace them when unpickling."""
    for node in graph.find_nodes(op="placeholder"):
        original = node.target.removesuffix("_1")
        if original != node.target and original in concrete:
            node.target = original
    for node in graph.find_nodes(op="call_function", target=_assert_is_none):
        graph.erase_node(node)


def _tensor_constants(graph: fx.Graph, module: nn.Module) -> dict[str, Any]:
    """The tensor constants fx stored on ``module`` while tracing (``torch.tensor(0.5)`` in
    a forward becomes ``_tensor_constant0``). They go when the module's state is restored
    after the trace (which also drops what the forward assigned, possibly proxies), so they
    are kept here and given back only while the GraphModule copies them."""
    return {n.target: getattr(module, n.target) for n in graph.find_nodes(op="get_attr")
            if n.target.startswith("_tensor_constant") and hasattr(module, n.target)}


def hooked_submodules(module: nn.Module) -> set[str]:
    """The outermost submodules fx would trace through that have hooks of their own: kept
    as leaves, so their hooks run as Python (they are visited as regions of their own)."""
    hooked: set[str] = set()
    for path, sub in module.named_modules():
        if path and not is_leaf(sub) and has_hooks(sub) and not any(
                path.startswith(f"{h}.") for h in hooked):
            hooked.add(path)
    return hooked


def _branches_on_training(module: nn.Module, opaque: set[str], concrete: dict[str, Any],
                          eval_code: str) -> bool:
    """Does tracing in training mode give other code than ``eval_code``, when tracing in
    eval mode again gives the same? (A forward that bakes in other Python state, such as a
    call counter, differs on every trace: the graph check rejects it, not this.)"""
    return (_code_in(module, True, opaque, concrete) != eval_code
            and _code_in(module, False, opaque, concrete) == eval_code)


def _code_in(module: nn.Module, training: bool, opaque: set[str],
             concrete: dict[str, Any]) -> str:
    """The module's graph code traced in that mode ('' if the trace fails)."""
    try:
        with preserved_state(module):
            module.train(training)
            graph = _LeafTracer(opaque).trace(module, concrete_args=concrete or None)
        strip_string_annotations(graph)
        _concrete_parameter_names(graph, concrete)
        positional_module_calls(graph, module)
        linear_weight_calls(graph, module)
        return graph.python_code("self").src
    except Exception:  # fx raises anything the user's forward raises
        return ""


def is_leaf(module: nn.Module) -> bool:
    """fx's own notion of a leaf: torch.nn built-ins other than containers."""
    return fx.Tracer().is_leaf_module(module, "")


#: judges a traced module against eager's output for its call: the region (traced, or
#: opaque with the reason) and the submodules left opaque inside it
Check = Callable[[Attempt, Any], tuple[Region, set[str]]]


def trace_model(model: nn.Module, args: tuple, kwargs: dict, output: Any, check: Check,
                root: tuple[Region, set[str]] | None = None,
                both_modes: bool = False) -> TracedModel:
    """Trace ``model`` hierarchically, level by level, one eager forward per level below
    the root (``output`` is the root's eager output on ``args``, already known), each
    traced module judged by ``check``. ``root`` is the root's region and opaque leaves
    when it was already traced and checked; ``both_modes`` as in ``trace_graph``."""
    result = TracedModel()
    pending: dict[str, nn.Module] = {"": model}
    calls = {"": Call(args, kwargs, output)}
    while pending:
        if set(pending) != {""}:
            calls = record_calls(model, pending, args, kwargs)
        next_level: dict[str, nn.Module] = {}
        for name, module in pending.items():
            if name not in calls:
                # containers (ModuleList, ModuleDict) are iterated, not called: visit inside
                children = {join(name, n): c for n, c in module.named_children()}
                if not children:
                    result.log.append(f"{name}: never called in the forward pass; skipped")
                next_level.update(children)
                continue
            if is_leaf(module):
                result.opaque_leaves.append(name)
                continue
            if name == "" and root is not None:
                region, opaque = root
            else:
                call = calls[name]
                region, opaque = check(trace_graph(name, module, call, both_modes),
                                       call.output)
            result.regions.append(region)
            if region.traced:
                region.frozen = frozen_attributes(module, opaque, is_leaf)
                if region.frozen:
                    result.log.append(describe_frozen(name, region.frozen))
                children = {join(name, p): module.get_submodule(p) for p in sorted(opaque)}
            else:
                result.log.append(f"{name or '<root>'}: opaque ({region.opaque_reason})")
                children = {join(name, n): c for n, c in module.named_children()}
            next_level.update(children)
        pending = next_level
    return result
