"""Fine-tuning for onnxruntime int8 rounds exactly the tensors onnxruntime quantises
(``deploy.onnxruntime_simulation``, ``deploy.onnx_values``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lwcompile.deploy import int8_inputs, int8_onnx, onnx_values
from lwcompile.deploy.export import _for_onnx, _tensor_names, _write_onnx
from tests.lightened import inputs, light

pytest.importorskip("torchao")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _written(model: nn.Module, example: tuple, path) -> torch.fx.GraphModule:
    """``model`` written as float ONNX to ``path``, and its exported graph."""
    _write_onnx(model, example, path, True, 17, False, fast=False)
    return torch.export.export(model, example).module()


def _quantised(path, example: tuple, out) -> set[str]:
    """The activations onnxruntime quantises in the float file at ``path``."""
    from lwcompile.deploy.onnxruntime_simulation import quantised_activations

    int8_onnx._quantize_static(path, out, onnx_values.feeds([example], _tensor_names(example)),
                               "minmax")
    return quantised_activations(onnx.load(str(out)))


def test_the_quantised_activations_are_the_ones_before_a_quantizelinear(tmp_path):
    """A conv, its ReLU and a last conv: onnxruntime quantises the input, the ReLU's output
    (the conv's folded into it) and the graph output, which it renames; weights and biases
    are not activations."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 3, padding=1)).eval()
    example = (torch.rand(1, 1, 8, 8),)
    _written(model, example, tmp_path / "f.onnx")
    float_graph = onnx.load(str(tmp_path / "f.onnx")).graph
    relu = next(n.output[0] for n in float_graph.node if n.op_type == "Relu")
    assert _quantised(tmp_path / "f.onnx", example, tmp_path / "q.onnx") == {
        "input_0", relu, "output"}


def test_a_tensor_is_matched_to_the_last_node_computing_its_values(tmp_path):
    """A ReLU of a tensor positive everywhere equals it: both tensors are matched to the
    ReLU's node (where onnxruntime's quantiser folds a ReLU, the tensor has the ReLU's
    name); on an input where they differ each has its own node."""
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(2.0)
    model = nn.Sequential(conv, nn.ReLU()).eval()
    example = (torch.rand(1, 1, 4, 4),)
    graph = _written(model, example, tmp_path / "f.onnx")
    conv_tensor = next(n.output[0] for n in onnx.load(str(tmp_path / "f.onnx")).graph.node
                       if n.op_type == "Conv")
    node = {n.target: n.name for n in graph.graph.nodes if n.op == "call_function"}
    placeholder = next(n.name for n in graph.graph.nodes if n.op == "placeholder")
    found = onnx_values.node_of_tensor(graph, tmp_path / "f.onnx", example, ["input_0"])
    relu = node[torch.ops.aten.relu.default]
    assert found == {"input_0": placeholder, conv_tensor: relu, "output": relu}
    negative = (torch.rand(1, 1, 4, 4) - 5,)
    found = onnx_values.node_of_tensor(graph, tmp_path / "f.onnx", negative, ["input_0"])
    assert found == {"input_0": placeholder, conv_tensor: node[torch.ops.aten.conv2d.default],
                     "output": relu}


@pytest.fixture(scope="module")
def light_dncnn(tmp_path_factory):
    """The tests' light DnCNN in the form written to ONNX, its float file, exported graph
    and the nodes onnxruntime quantises."""
    example = inputs("dncnn")
    path = tmp_path_factory.mktemp("sim") / "f.onnx"
    deployed = _for_onnx(light("dncnn"), example, True)
    graph = _written(deployed, example, path)
    nodes = int8_onnx.quantised_nodes(graph, path, example, _tensor_names(example), None, None)
    return deployed, path, graph, nodes


def test_every_tensor_onnxruntime_quantises_has_a_node(light_dncnn, tmp_path):
    """Including both inputs and the output of each add that sums a squeeze conv split
    over a sunk concat, which the x86 quantiser fuses and leaves float."""
    _, path, graph, nodes = light_dncnn
    example = inputs("dncnn")
    quantised = _quantised(path, example, tmp_path / "q.onnx")
    matched = onnx_values.node_of_tensor(graph, path, example, _tensor_names(example))
    assert quantised <= set(matched)
    assert nodes == {matched[t] for t in quantised}
    adds = [n for n in graph.graph.nodes if n.target == torch.ops.aten.add.Tensor
            and all(a.target == torch.ops.aten.conv2d.default for a in n.args)]
    assert adds
    for add in adds:
        assert {add.name, add.args[0].name, add.args[1].name} <= nodes


def test_the_quantizer_fake_quantises_those_outputs_and_their_readers_weights(light_dncnn):
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    from lwcompile.deploy.onnxruntime_simulation import OnnxruntimeQuantizer

    _, _, graph, nodes = light_dncnn
    graph = copy.deepcopy(graph)
    conv_weights = [n.args[1].name for n in graph.graph.nodes
                    if n.target == torch.ops.aten.conv2d.default]
    config = int8_onnx.qat_config(get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, OnnxruntimeQuantizer(nodes, config))
    fakes = {n.args[0].name: getattr(prepared, n.target) for n in prepared.graph.nodes
             if n.op == "call_module" and isinstance(getattr(prepared, n.target),
                                                     FakeQuantizeBase)}
    activations = {name for name, f in fakes.items() if f.qscheme == torch.per_tensor_affine}
    weights = {name for name, f in fakes.items() if f.qscheme == torch.per_channel_symmetric}
    assert activations == nodes
    assert weights == set(conv_weights)
    # the first conv; 4 for the first LIST (squeeze, depthwise, two 1x1s), 5 for the next two
    # (their squeezes split over the previous concat's halves); the output conv split over
    # the last halves, each half a depthwise conv and a sum: 1 + 4 + 5 + 5 + 2 * 2
    assert len(conv_weights) == 19


def test_fine_tuning_learns_a_range_for_every_tensor_onnxruntime_quantises(light_dncnn,
                                                                          tmp_path):
    """The ranges learned reach every quantised tensor of the tuned file
    (``learned_overrides``): none is left to a calibration the weights were not trained
    for."""
    from lwcompile.deploy.int8_finetune import Tuned

    deployed, path, _, nodes = light_dncnn
    example = inputs("dncnn")
    names = _tensor_names(example)
    tuned = int8_onnx.quantization_aware(deployed, deployed, example, None, None, 2, 2, path,
                                         names)
    assert isinstance(tuned, Tuned)
    assert set(tuned.ranges) == nodes
    tuned_path = tmp_path / "t.onnx"
    _write_onnx(deployed, example, tuned_path, True, 17, False, fast=False)
    calib = int8_inputs.calibration_inputs(None, example, 1)
    overrides = int8_onnx.learned_overrides(tuned_path, tuned, calib[0], names)
    assert set(overrides) == _quantised(tuned_path, example, tmp_path / "q.onnx")


def test_fine_tuning_a_model_onnxruntime_does_not_quantise_is_refused(light_dncnn,
                                                                     monkeypatch):
    from lwcompile.deploy import onnxruntime_simulation
    from lwcompile.deploy.int8_finetune import FinetuneError

    deployed, path, _, _ = light_dncnn
    example = inputs("dncnn")
    monkeypatch.setattr(onnxruntime_simulation, "quantised_activations", lambda proto: set())
    with pytest.raises(FinetuneError, match="no tensor of the model that onnxruntime"):
        int8_onnx.quantization_aware(deployed, deployed, example, None, None, 2, 2, path,
                                     _tensor_names(example))
