"""Small torch.fx helpers shared by tracing, the rules and deployment.

- ``channel_concat_parts``: is this node a concatenation along channels of 4-D tensors? The
  one test for it, at both graph levels lwcompile works on: the module-level graph of
  ``torch.fx`` tracing (``torch.cat``, shapes in ``meta["tensor_meta"]``) and the ATen graph
  of ``torch.export`` (``aten.cat``, shapes in ``meta["val"]``).
- ``positional_module_calls``: a submodule called with keyword arguments
  (``self.conv(input=h)``) gets them as positional ones, so that a replacement whose
  ``forward`` names its argument differently can take the call's place.
- ``linear_weight_calls``: ``F.linear(x, self.qkv.weight, bias)`` (Swin2SR's attention adds
  a bias it builds on the fly) becomes a call of the ``nn.Linear`` module itself plus that
  bias, so the layer is a site a rule can rewrite like any other module call.
- ``ThreadConfinedTracer``: the base of lwcompile's fx tracers, whose patches act in the
  tracing thread only.
- ``one_at_a_time``: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` for the
  whole process while it traces, so a model run in another thread meanwhile goes through the
  tracer. lwcompile's entry points that trace hold one lock for their whole run (traces and
  eager runs alike); they are safe to call from several threads, one proceeding at a time.
- ``make_picklable`` / ``picklable``: let ``torch.save`` pickle GraphModules whatever traced
  them, for good or for the duration of one save.
- ``argument``, ``unrounded``, ``tidied``: reading and finishing the ATen graphs the
  deployment forms rewrite.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import fx, nn
from torch.nn import functional as F

_CATS = (torch.cat, torch.concat, torch.ops.aten.cat.default)
_T = TypeVar("_T")
#: held by every entry point that traces with fx (reentrant: an entry point may call another)
_FX_PATCHES_PROCESS = threading.RLock()


class ThreadConfinedTracer(fx.Tracer):
    """An fx tracer whose process-wide patches of ``nn.Module.__call__`` and ``__getattr__``
    act in the tracing thread only: a model run meanwhile in another thread runs as plain
    eager code (fx alone would record its calls into this trace, or fail them)."""

    _thread: int | None = None

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._thread = threading.get_ident()
        return super().trace(root, concrete_args)

    def foreign_thread(self) -> bool:
        """Is the running code another thread's, reaching this tracer through the patches?"""
        return self._thread is not None and threading.get_ident() != self._thread

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self.foreign_thread():
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.foreign_thread():
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def one_at_a_time(entry_point: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``entry_point`` while no other lwcompile entry point that traces is running."""

    @functools.wraps(entry_point)
    def wrapper(*args: object, **kwargs: object) -> _T:
        with _FX_PATCHES_PROCESS:
            return entry_point(*args, **kwargs)

    return wrapper


#: the convolutions of an exported (ATen) graph: 2-D, general and transposed
ATEN_CONVS = frozenset({torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default,
                        torch.ops.aten.conv_transpose2d.input})


def stored_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr ``node`` of ``gm`` reads, detached."""
    return functools.reduce(getattr, node.target.split("."), gm).detach()


def stored_constant(gm: fx.GraphModule, value: torch.Tensor, prefix: str) -> fx.Node:
    """A new buffer of ``gm`` holding a copy of ``value`` under a free name starting with
    ``prefix``, read by a get_attr node at the graph's cursor."""
    name = f"{prefix}_{sum(1 for _ in gm.buffers())}"
    while hasattr(gm, name):
        name += "_"
    gm.register_buffer(name, value.detach().contiguous().clone())
    return gm.graph.get_attr(name)


def argument(node: fx.Node, i: int, default: object = None) -> object:
    """The ``i``-th positional argument of ``node``, or ``default`` where it has fewer."""
    return node.args[i] if len(node.args) > i else default


def unrounded(node: object) -> object:
    """The value ``node`` rounds through a chain of pt2e's quantize and dequantize nodes
    (``quantized_decomposed`` ops, which record no shape in a converted graph); ``node``
    itself where it is none of them."""
    while isinstance(node, fx.Node) and node.args \
            and str(node.target).startswith("quantized_decomposed."):
        node = node.args[0]
    return node


def tidied(gm: fx.GraphModule) -> None:
    """Drop the nodes a rewrite left unread, check the graph and regenerate its code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def node_shape(node: object) -> torch.Size | None:
    """The shape recorded on a graph node (``tensor_meta`` or ``val``), or None."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is None:
        meta = node.meta.get("val")
    shape = getattr(meta, "shape", None)
    return torch.Size(shape) if shape is not None else None


def positional_module_calls(graph: fx.Graph, root: nn.Module) -> None:
    """Pass the keyword arguments of ``call_module`` nodes positionally where the module's
    ``forward`` takes them as positional-or-keyword parameters (all of them, in order)."""
    for node in graph.nodes:
        if node.op != "call_module" or not node.kwargs:
            continue
        try:
            signature = inspect.signature(root.get_submodule(node.target).forward)
            bound = signature.bind(*node.args, **node.kwargs)
        except (AttributeError, TypeError, ValueError):
            continue
        if all(signature.parameters[n].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
               for n in bound.arguments):
            node.args, node.kwargs = tuple(bound.arguments.values()), {}


_LINEARS = (F.linear, torch._C._nn.linear)


def linear_arguments(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """``(input, weight, bias)`` of a call of ``F.linear`` (a builtin, so
    ``inspect.signature`` cannot bind it), whether passed by position or by keyword."""
    bound = dict(zip(("input", "weight", "bias"), args, strict=False)) | kwargs
    return bound.get("input"), bound.get("weight"), bound.get("bias")


def linear_weight_calls(graph: fx.Graph, root: nn.Module) -> None:
    """Write ``linear(x, <m>.weight, b)`` as ``m(x) + b`` (``m(x)`` where ``b`` is None)
    wherever ``m`` is a plain ``nn.Linear`` without a bias of its own.

    The forward reads the layer's weight instead of calling it, so without this the layer
    is never a module call and no rule sees it. ``m(x) + b`` is the same affine map."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEARS:
            continue
        x, weight, bias = linear_arguments(node.args, node.kwargs)
        owner_path = (weight.target.removesuffix(".weight") if isinstance(weight, fx.Node)
                      and weight.op == "get_attr" and weight.target.endswith(".weight")
                      else None)
        try:
            owner = root.get_submodule(owner_path) if owner_path else None
        except AttributeError:
            continue
        if type(owner) is not nn.Linear or owner.bias is not None:
            continue
        with graph.inserting_before(node):
            call = graph.call_module(owner_path, (x,))
            out = call if bias is None else graph.call_function(operator.add, (call, bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not weight.users:
            graph.erase_node(weight)


def channel_concat_parts(node: object) -> list[fx.Node] | None:
    """The parts of ``node`` if it concatenates 4-D tensors along channels (dim 1 or -3)
    and every part's shape is recorded; else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in _CATS):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = node_shape(node)
    if (shape is None or len(shape) != 4 or not isinstance(dim, int) or dim % 4 != 1
            or not isinstance(parts, (list, tuple))):
        return None
    if not all(node_shape(p) is not None for p in parts):
        return None
    return list(parts)


def strip_string_annotations(graph: fx.Graph) -> dict[fx.Node, str]:
    """Drop the node annotations that are strings (``from __future__ import annotations``
    in the traced file): fx cannot pickle them, and they are cosmetic. Returns what was
    dropped; a GraphModule already made from ``graph`` needs a recompile."""
    dropped = {n: n.type for n in graph.nodes if isinstance(n.type, str)}
    for node in dropped:
        node.type = None
    return dropped


def make_picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """Let ``torch.save(gm)`` work from now on.

    Unpickling re-traces with the tracer class that made the graph, created with no
    arguments; lwcompile's tracers take some, so the plain fx tracer is used instead (it
    treats every submodule as a leaf either way).
    """
    strip_string_annotations(gm.graph)
    gm._tracer_cls = gm.graph._tracer_cls = None
    gm.recompile()
    return gm


@contextlib.contextmanager
def picklable(model: nn.Module) -> Iterator[None]:
    """Every GraphModule in ``model`` picklable for the duration, as ``make_picklable``
    makes it, and as it was afterwards. The class name is kept (fx pickles it only for
    torch.package), so a loaded graph is not renamed "GraphModule"."""
    saved = []
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        saved.append((gm, gm.__dict__.get("_tracer_cls"), strip_string_annotations(gm.graph)))
        gm._tracer_cls = None
        gm._graphmodule_cls_name = type(gm).__name__
        if saved[-1][2]:
            gm.recompile()  # the pickle holds the code as last compiled
    try:
        yield
    finally:
        for gm, tracer_cls, types in saved:
            gm._tracer_cls = tracer_cls
            gm.__dict__.pop("_graphmodule_cls_name", None)
            for node, annotation in types.items():
                node.type = annotation
            if types:
                gm.recompile()
