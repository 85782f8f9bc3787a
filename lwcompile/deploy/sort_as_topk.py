"""Sorts of integer tensors written as ``topk``, for runtimes that have no sort.

ATD's category attention orders its tokens by category (``torch.sort`` of an ``argmax``).
Neither ONNX exporter translates ``aten.sort`` and ExecuTorch has no kernel for it, but
onnxruntime and ExecuTorch both run ``topk``. The identity, along a dimension of length n:
the keys ``x_i * n + i`` (``x_i * n - i`` for a descending sort) are distinct, and ordering
them orders ``x`` with equal values in index order, so ``topk`` of all n keys returns the
indices of a stable sort; the values are ``x`` gathered at them. It holds while the keys fit
in int64: ``x`` of an integer type up to 32 bits (|x| < 2^31, n < 2^31), or int64 made by an
``argmax``/``argmin`` over a dimension of known length D (0 <= x < D, D n < 2^63). Other
sorts are left to the exporter, which names them.

A sort asked to be unstable (``stable=False``, torch's default) leaves the order of equal
values unspecified: eager PyTorch on a CPU keeps index order for short rows and not for long
ones (ATD's rows of 4096 tokens at 64x64), so where equal values straddle a boundary the
model reads (ATD's groups of tokens) the deployed program and eager PyTorch differ a little,
both within what the model asked for. Such a rewrite warns.
"""

from __future__ import annotations

import operator
import warnings

import torch
from torch import fx

from ..errors import LwCompileWarning
from ..tracing.fx_helpers import node_shape, tidied

aten = torch.ops.aten
_SORTS = (aten.sort.default, aten.sort.stable)
_SMALL_INTEGERS = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.bool)
_ARG_EXTREMES = (aten.argmax.default, aten.argmin.default)
_INT64_LIMIT = 2 ** 63


def sorts_as_topk(gm: fx.GraphModule) -> int:
    """Rewrite, in place, each sort of ``gm`` (an ATen graph: ``ExportedProgram.module()``)
    whose keys fit (module docstring) as ``topk``; returns how many were rewritten."""
    done, unstable = 0, 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _SORTS and _keys_fit(node):
            unstable += not _sort_arguments(node)[0]
            done += _as_topk(gm, node)
    if done:
        tidied(gm)
    if unstable:
        warnings.warn(f"{unstable} unstable sort(s) (torch.sort with stable=False) deployed "
                      "with equal values in index order; eager PyTorch may order them "
                      "otherwise on long rows, so outputs can differ slightly where that "
                      "order matters", LwCompileWarning, stacklevel=3)
    return done


def _sort_arguments(sort: fx.Node) -> tuple[bool, int, bool]:
    """(stable, dim, descending) of an ``aten.sort`` node, either overload."""
    if sort.target is aten.sort.stable:
        kwargs = {"stable": None, "dim": -1, "descending": False, **sort.kwargs}
        return bool(kwargs["stable"]), kwargs["dim"], kwargs["descending"]
    args = [*sort.args[1:], *(None,) * 2]
    dim = sort.kwargs.get("dim", args[0] if args[0] is not None else -1)
    return False, dim, bool(sort.kwargs.get("descending", args[1] or False))


def _keys_fit(sort: fx.Node) -> bool:
    x = sort.args[0]
    shape, dtype = node_shape(x), getattr(x.meta.get("val"), "dtype", None)
    if shape is None or dtype is None:
        return False
    n = shape[_sort_arguments(sort)[1]]
    if not isinstance(n, int):  # symbolic: image tokens, far below 2^31
        n = 2 ** 31
    if dtype in _SMALL_INTEGERS:
        return n <= 2 ** 31
    if dtype is torch.int64 and x.target in _ARG_EXTREMES:
        reduced = _reduced_length(x)
        return isinstance(reduced, int) and reduced * (n + 1) < _INT64_LIMIT
    return False


def _reduced_length(arg_extreme: fx.Node) -> object:
    """The length of the dimension an argmax/argmin reduces (all elements when it has none),
    None where unknown."""
    source = node_shape(arg_extreme.args[0])
    dim = arg_extreme.args[1] if len(arg_extreme.args) > 1 else arg_extreme.kwargs.get("dim")
    if source is None:
        return None
    return source.numel() if dim is None else source[dim]


def _as_topk(gm: fx.GraphModule, sort: fx.Node) -> int:
    x = sort.args[0]
    _, dim, descending = _sort_arguments(sort)
    rank = len(node_shape(x))
    dim %= rank
    graph = gm.graph
    with graph.inserting_before(sort):
        n = node_shape(x)[dim]
        if not isinstance(n, int):  # a symbolic length, read at run time
            n = graph.call_function(aten.sym_size.int, (x, dim))
        keys = x
        if x.meta["val"].dtype is not torch.int64:
            keys = graph.call_function(aten._to_copy.default, (x,), {"dtype": torch.int64})
        keys = graph.call_function(aten.mul.Tensor, (keys, n))
        positions = graph.call_function(
            aten.arange.start_step, (0, n, 1),
            {"dtype": torch.int64, "device": x.meta["val"].device})
        along = [1] * rank
        along[dim] = -1
        positions = graph.call_function(aten.view.default, (positions, along))
        keys = graph.call_function(aten.sub.Tensor if descending else aten.add.Tensor,
                                   (keys, positions))
        top = graph.call_function(aten.topk.default, (keys, n, dim, descending, True))
        indices = graph.call_function(operator.getitem, (top, 1))
    for user in list(sort.users):
        if user.args[1] == 1:
            user.replace_all_uses_with(indices)
        elif user.users:
            with graph.inserting_before(user):
                values = graph.call_function(aten.gather.default, (x, dim, indices))
            user.replace_all_uses_with(values)
        graph.erase_node(user)
    graph.erase_node(sort)
    return 1
