"""Which node of a torch graph computes which tensor of an ONNX file, found by value.

The ONNX exporter names tensors its own way and onnxruntime's quantiser renames some again,
so names cannot pair a torch node (where fine-tuning keeps what it learned about a tensor)
with an ONNX tensor (where onnxruntime's quantiser takes it). Values can: one input runs
through both, and a node and a tensor of the same shape whose values agree to a relative
``TOLERANCE`` are taken to be one tensor. Where several nodes agree with one tensor (a ReLU
of a tensor that happened to be positive everywhere), the last in graph order is taken:
onnxruntime's quantiser folds a ReLU into the tensor before it under the ReLU's name. The
input should be a real image crop: on zeros many tensors are alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..measure.inputs import fresh

#: largest difference, as a fraction of the node's largest magnitude, of values taken as equal
TOLERANCE = 1e-4


def feeds(inputs: list[tuple], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """onnxruntime input dicts for argument tuples: their tensors under ``names``."""
    return [dict(zip(names, [a.numpy() for a in args if isinstance(a, Tensor)], strict=True))
            for args in inputs]


def node_values(graph: torch.fx.GraphModule, args: tuple,
                wanted: set[str] | None = None) -> dict[str, Tensor]:
    """The tensor outputs, by node name, of the nodes of ``graph`` named in ``wanted`` (every
    placeholder and call where None) when it runs on ``args``, in graph order."""
    values: dict[str, Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            out = super().run_node(node)
            chosen = (node.op in ("placeholder", "call_function", "call_module")
                      if wanted is None else node.name in wanted)
            if chosen and isinstance(out, Tensor) and out.is_floating_point():
                values[node.name] = out.detach().float()
            return out

    with torch.no_grad():
        Recorder(graph).run(*fresh(args))
    return values


def tensor_values(path: Path, args: tuple, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Every float tensor of the ONNX file at ``path`` on ``args``, its inputs included."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(path))
    known = {o.name for o in proto.graph.output}
    produced = [out for node in proto.graph.node for out in node.output if out and out not in known]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in produced)
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    feed = feeds([args], names)[0]
    values = dict(zip(outputs, session.run(outputs, feed), strict=True)) | feed
    return {n: v for n, v in values.items()
            if isinstance(v, np.ndarray) and v.dtype == np.float32}


def node_of_tensor(graph: torch.fx.GraphModule, path: Path, args: tuple,
                   names: Sequence[str], nodes: set[str] | None = None) -> dict[str, str]:
    """For each tensor of the ONNX file at ``path`` (exported from ``graph``'s model, inputs
    named ``names``) that a node of ``graph`` computes, that node's name; only nodes named
    in ``nodes`` are considered where it is given. Tensors no node computes are left out."""
    computed = node_values(graph, args, nodes)
    tensors = tensor_values(path, args, names)
    found: dict[str, str] = {}
    for node, value in computed.items():  # graph order: a later equal node wins
        want = value.numpy()
        tolerance = TOLERANCE * max(float(np.abs(want).max()), 1e-6)
        for tensor, got in tensors.items():
            if got.shape == want.shape and _close(got, want, tolerance):
                found[tensor] = node
    return found


def _close(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """Whether ``a`` and ``b`` differ by at most ``tolerance`` anywhere; a sample of every
    1009th value rules most pairs out before the full comparison."""
    sample = slice(None, None, 1009)
    return (float(np.abs(a.reshape(-1)[sample] - b.reshape(-1)[sample]).max()) <= tolerance
            and float(np.abs(a - b).max()) <= tolerance)
