"""Fake quantisation of exactly the tensors onnxruntime quantises, for fine-tuning.

Quantisation-aware fine-tuning helps only where it rounds what the runtime rounds: a tensor
the runtime quantises but training never rounded keeps a calibrated range the weights were
not trained for, and its rounding error is met for the first time in the deployed file.
onnxruntime's QDQ quantiser decides op by ONNX op (a conv's input and output, an add's inputs
and output, a ReLU folded into the tensor before it), and no quantiser for torch graphs
places fake quantisation that way: the x86 one fuses a conv with the add after it and leaves
the conv's output float, where onnxruntime quantises both, so on lwcompile's fast form (whose
sunk concats feed each squeeze conv through such adds) a third of the tensors onnxruntime
rounds went untrained.

So the placement is read from onnxruntime itself:

1. the float ONNX file is quantised by onnxruntime with the export's own options
   (``int8_onnx``); which tensors get a ``QuantizeLinear`` does not depend on the ranges;
2. ``quantised_activations`` reads those tensors from the quantised file;
3. ``onnx_values.node_of_tensor`` finds the torch node computing each;
4. ``OnnxruntimeQuantizer`` annotates those nodes' outputs with the activation spec, and the
   weights of the convs and linears that read one of them with the weight spec.

It needs torchao (an extra): ``int8_onnx`` imports it only after checking for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

#: the ops whose weight onnxruntime quantises when it quantises their input
_WEIGHTED = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}


#: what onnxruntime's quantiser appends to the name of a graph output it quantises (the
#: dequantised tensor takes the output's name)
_RENAMED_OUTPUT = "_QuantizeLinear_Input"


def quantised_activations(quantised: Any) -> set[str]:
    """The names, as in the float file, of the tensors that a QDQ ONNX model (an
    ``onnx.ModelProto``) quantises other than its initialisers (weights, biases, scales):
    its quantised activations."""
    constants = {t.name for t in quantised.graph.initializer}
    constants |= {out for n in quantised.graph.node if n.op_type == "Constant" for out in n.output}
    outputs = {o.name for o in quantised.graph.output}
    found = set()
    for node in quantised.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        name = node.input[0]
        original = name.removesuffix(_RENAMED_OUTPUT)
        found.add(original if original in outputs else name)
    return found


class OnnxruntimeQuantizer(Quantizer):
    """A pt2e quantizer that quantises the outputs of the nodes named ``nodes`` with
    ``config.output_activation`` and the weights of the convs and linears reading one of
    them with ``config.weight`` (a pt2e ``QuantizationConfig``); biases stay float, as
    onnxruntime's int32 biases round far below the activations' grid."""

    def __init__(self, nodes: set[str], config: Any) -> None:
        super().__init__()
        self.nodes = set(nodes)
        self.config = config

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        for node in model.graph.nodes:
            annotation = QuantizationAnnotation(_annotated=True)
            if node.name in self.nodes:
                annotation.output_qspec = self.config.output_activation
            if (node.target in _WEIGHTED and isinstance(node.args[0], torch.fx.Node)
                    and node.args[0].name in self.nodes):
                annotation.input_qspec_map[node.args[1]] = self.config.weight
            if annotation.output_qspec is not None or annotation.input_qspec_map:
                node.meta["quantization_annotation"] = annotation
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        """Nothing to check: every annotation names a node of ``model``."""
