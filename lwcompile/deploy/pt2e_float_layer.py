"""One conv of a pt2e-quantised (converted) graph made float by rewiring, without quantising
again: the XNNPACK counterpart of ``qdq_float_layer``.

The int8 search asks "what if this conv were float?" once per conv, and each real answer
prepares, calibrates and converts the whole graph again (most of an int8 export's time on a
large network). The quantiser's own annotation of the float graph says what leaving a conv
out changes, so the converted graph can be rewired to match:

- the conv's weight and bias are read in float (from the float graph) instead of through a
  dequantize of the stored int8 tensor;
- the tensor it reads stays quantised if the node producing it had its output annotated;
  otherwise only this conv's input edge was, and the conv reads the float tensor (the image
  a first conv reads);
- the tensor its pattern writes (the conv, or the ReLU fused with it) stays quantised if a
  reader annotated its input edge for it; otherwise every reader gets the float tensor;
- a layer is a module: every conv it calls is left out, and annotations of its own nodes
  count for nothing (two convs in one module's forward pass their tensor unrounded).

pt2e gives every reader its own dequantize and the search reuses each tensor's range, so
the rewired graph computes what quantising with the conv left out computes (tested); the
search still confirms the best few with real quantisations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from ..tracing.fx_helpers import ATEN_CONVS, stored_constant, stored_value


class Pt2eFloatLayers:
    """Copies of one converted graph, each with the convs of one module made float."""

    def __init__(self, converted: fx.GraphModule, prepared: fx.GraphModule,
                 module_path: Callable[[fx.Node], str | None]) -> None:
        """``converted``: the quantised graph; ``prepared``: the float graph it came from as
        ``prepare_pt2e`` leaves it with nothing left out (its nodes carry the quantiser's
        ``quantization_annotation``, its convs read the float weights the quantised ones
        were made from), node names as in ``converted``; ``module_path``: node -> the
        search's layer name."""
        self.converted = converted
        self.prepared = prepared
        self.prepared_nodes = {node.name: node for node in prepared.graph.nodes}
        self.annotation = {node.name: node.meta.get("quantization_annotation")
                           for node in prepared.graph.nodes}
        self.module_path = module_path

    def _float_value(self, conv: str, index: int) -> torch.Tensor:
        """The float tensor the prepared conv ``conv`` reads as argument ``index``."""
        node = self.prepared_nodes[conv].args[index]
        while node.op == "call_module":  # its observer
            node = node.args[0]
        return stored_value(self.prepared, node)

    def _output_annotated(self, name: str) -> bool:
        annotation = self.annotation.get(name)
        return annotation is not None and annotation.output_qspec is not None

    def _edge_annotated(self, reader: str, tensor: str) -> bool:
        annotation = self.annotation.get(reader)
        return annotation is not None and any(
            node.name == tensor for node in annotation.input_qspec_map)

    def with_float(self, layer: str) -> fx.GraphModule:
        """A copy of the converted graph with the convs of module ``layer`` run in float."""
        model = copy.deepcopy(self.converted)
        graph = model.graph
        convs = [node for node in graph.nodes if node.op == "call_function"
                 and node.target in ATEN_CONVS and self.module_path(node) == layer]
        # the module's nodes are all left out: their annotations ask for nothing
        left_out = {node.name for node in graph.nodes if self.module_path(node) == layer}
        for conv in convs:
            for index in (1, 2):
                stored = conv.args[index] if len(conv.args) > index else None
                if _dequantize(stored) and _get_attr(stored.args[0]):
                    with graph.inserting_before(conv):
                        value = self._float_value(conv.name, index)
                        conv.update_arg(index, stored_constant(model, value, "float_weight"))
            read = conv.args[0]
            if _dequantize(read) and _quantize(read.args[0]):
                source = read.args[0].args[0]
                if source.name in left_out or not self._output_annotated(source.name):
                    conv.update_arg(0, source)
            self._unround_output(conv, left_out)
        graph.eliminate_dead_code()
        model.recompile()
        return model

    def _unround_output(self, conv: fx.Node, left_out: set[str]) -> None:
        """Readers of the conv's pattern output get it unrounded where none of them (but
        those ``left_out``) had annotated their input edge for it."""
        written, users = conv, list(conv.users)
        if len(users) == 1 and not _quantize(users[0]) and \
                self._output_annotated(users[0].name):  # a ReLU fused into its pattern
            written, users = users[0], list(users[0].users)
        if len(users) != 1 or not _quantize(users[0]):
            return
        quantize = users[0]
        readers = [reader for dequantize in quantize.users for reader in dequantize.users]
        if any(self._edge_annotated(reader.name, written.name) for reader in readers
               if reader.name not in left_out):
            return
        for dequantize in list(quantize.users):
            dequantize.replace_all_uses_with(written)


def _calls(node: Any, *ops: str) -> bool:
    """``node`` calls one of the ``quantized_decomposed`` ops named (any overload)."""
    packet = getattr(getattr(node, "target", None), "overloadpacket", None)
    return isinstance(node, fx.Node) and node.op == "call_function" and packet is not None \
        and packet in [getattr(torch.ops.quantized_decomposed, op) for op in ops]


def _quantize(node: Any) -> bool:
    return _calls(node, "quantize_per_tensor")


def _dequantize(node: Any) -> bool:
    return _calls(node, "dequantize_per_tensor", "dequantize_per_channel")


def _get_attr(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"
