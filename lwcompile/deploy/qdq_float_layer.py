"""One layer of a quantised (QDQ) ONNX graph made float by rewiring, without quantising again.

onnxruntime's quantiser leaves a node float when it is named in ``nodes_to_exclude``, but it
rewrites the whole graph to do so, which on a transformer's graph of thousands of nodes takes
seconds per call; the int8 search asks "what if this conv were float?" once per conv. This
module answers from the quantised graph itself, mirroring what the quantiser does to the
excluded node:

- its weight and bias (initializers behind a DequantizeLinear) are read in float, from the
  float file the graph was quantised from;
- an activation it reads or writes stays quantised where anything else asks the quantiser
  to quantise it: the node producing it or another reader, if of an op type the quantiser
  handles. Otherwise its QuantizeLinear / DequantizeLinear pair is bypassed: only the
  excluded node had asked for it (the image a first conv reads, the output a last conv
  writes).

One difference is left: where the quantiser had folded a ReLU or Clip into the node's output
range (removing it), the output stays quantised, since that range also clamps as the
activation did; the quantiser would keep the activation float and the output unrounded
unless a reader asks for it. Otherwise structure and arithmetic match the quantiser's (the
tests check this with onnxruntime's graph optimisations off); with them on, onnxruntime may
pick other kernels for the mixed graph. So this ranks layers, and
``int8.choose_float_layers`` confirms the best with real quantisations.
"""

from __future__ import annotations

from typing import Any

#: the suffixes onnxruntime's quantiser gives a tensor's dequantised value, and a graph
#: output's value before its quantisation
DEQUANTIZED = "_DequantizeLinear_Output"
BEFORE_QUANTIZE = "_QuantizeLinear_Input"


class FloatLayers:
    """Copies of one quantised graph, each with one layer made float."""

    def __init__(self, quantised: Any, float_model: Any, quantised_ops: set[str]) -> None:
        """``quantised``: an ``onnx.ModelProto`` in QDQ format, made from ``float_model``;
        ``quantised_ops``: the op types the quantiser handles (they ask for their
        activations to be quantised)."""
        self.quantised = quantised
        self.quantised_ops = quantised_ops
        self.float_weights = {tensor.name: tensor for tensor in float_model.graph.initializer}
        #: tensor -> the node writing it in the float file (a ReLU the quantiser folded
        #: into a conv's output range writes there what the conv writes here)
        self.float_writer = {name: node for node in float_model.graph.node
                             for name in node.output}

    def with_float(self, node_name: str) -> Any:
        """A copy of the quantised graph with ``node_name`` run in float."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.quantised)
        graph = model.graph
        producer = {name: node for node in graph.node for name in node.output}
        readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        initializers = {tensor.name for tensor in graph.initializer}
        (layer,) = [node for node in graph.node if node.name == node_name]

        def quantised_reader(dequantized: str) -> bool:
            return any(r.op_type in self.quantised_ops for r in readers.get(dequantized, [])
                       if r is not layer)

        def bypass(dequantized: str, to: str) -> None:
            for reader in readers.get(dequantized, []):
                reader.input[:] = [to if i == dequantized else i for i in reader.input]

        for index, name in enumerate(layer.input):
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            if dequantize.input[0] in initializers:  # a weight or bias, quantised offline
                original = name.removesuffix(DEQUANTIZED)
                weight = onnx.TensorProto()
                weight.CopyFrom(self.float_weights[original])
                weight.name = f"{original}_float"
                graph.initializer.append(weight)
                layer.input[index] = weight.name
                continue
            quantize = producer.get(dequantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue
            made_by = producer.get(quantize.input[0])
            if not quantised_reader(name) and (
                    made_by is None or made_by.op_type not in self.quantised_ops):
                bypass(name, quantize.input[0])

        written = layer.output[0]
        folded = self.float_writer.get(written.removesuffix(BEFORE_QUANTIZE))
        if folded is not None and folded.name != layer.name:
            return model  # its range also clamps as the folded activation did: kept
        quantizes = readers.get(written, [])
        if len(quantizes) != 1 or quantizes[0].op_type != "QuantizeLinear":
            return model
        dequantizes = readers.get(quantizes[0].output[0], [])
        if len(dequantizes) != 1 or dequantizes[0].op_type != "DequantizeLinear":
            return model
        dequantized = dequantizes[0].output[0]
        if quantised_reader(dequantized):
            return model
        if any(output.name == dequantized for output in graph.output):
            layer.output[0] = dequantized  # the pair wrote the graph's output
            for node in (quantizes[0], dequantizes[0]):
                graph.node.remove(node)
            still_read = {name for node in graph.node for name in node.input}
            for tensor in [t for t in graph.initializer if t.name not in still_read]:
                graph.initializer.remove(tensor)  # the pair's scale and zero point
        else:
            bypass(dequantized, written)
        return model
