"""One conv of a quantised ONNX graph made float by rewiring (``deploy.qdq_float_layer``)
computes what onnxruntime's quantiser gives with that conv excluded, and the int8 search
uses it to quantise a large graph only a few times."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy import int8, int8_inputs, int8_onnx, onnx_values
from lwcompile.deploy.qdq_float_layer import FloatLayers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
registry = pytest.importorskip("onnxruntime.quantization.registry")

pytestmark = pytest.mark.usefixtures("one_thread")


class Mixed(nn.Module):
    """Every place a conv's quantised activations can come from: the image it alone reads
    quantised (the residual add beside it does not quantise), a ReLU the quantiser folds into
    a conv's range, an input two convs read, outputs only a non-quantised add reads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.folded = nn.Conv2d(8, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 1)
        self.right = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.folded(self.head(x)))
        return self.tail(self.left(r) + self.right(r)) + x


def run(model_bytes: bytes, x: torch.Tensor) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    # the kernels onnxruntime picks for a mixed graph differ by optimisation, not the graph
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq")
    model, x = Mixed().eval(), torch.rand(1, 3, 16, 16)
    path = lwcompile.export_onnx(model, (x,), folder / "float.onnx")
    int8_onnx.prepare(path)
    feeds = onnx_values.feeds(int8_inputs.calibration_inputs(None, (x,), 2, None), ["input_0"])
    cache = folder / "ranges.json"

    def quantize(excluded: frozenset[str]) -> bytes:
        out = folder / "int8.onnx"
        int8_onnx._quantize_static(path, out, feeds, "minmax", excluded=excluded, cache=cache)
        return out.read_bytes()

    return path, quantize


def test_each_conv_made_float_matches_the_quantisers_exclusion(quantised):
    path, quantize = quantised
    float_model = onnx.load(str(path))
    convs = [n.name for n in float_model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 5
    all_int8 = quantize(frozenset())
    layers = FloatLayers(onnx.load_from_string(all_int8), float_model,
                         set(registry.QDQRegistry) | set(registry.QLinearOpsRegistry))
    x = torch.rand(1, 3, 16, 16)
    reference = run(all_int8, x)
    for conv in convs:
        want = run(quantize(frozenset({conv})), x)
        got = run(layers.with_float(conv).SerializeToString(), x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=conv)
        assert (want - reference).abs().max() > 1e-4, conv  # each exclusion changes something
    assert onnx.load_from_string(all_int8) == layers.quantised  # the graph given is untouched


def test_a_large_graph_quantises_only_the_screens_best(tmp_path, monkeypatch):
    """The int8 export of a chain of 21 convs: every conv screened, only the best few quantised
    for real, and the same float layer chosen as by quantising once per conv."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()]
    for _ in range(19):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(16, 1, 3, padding=1)).eval()
    calls: list[frozenset[str]] = []
    quantize_static = int8_onnx._quantize_static

    def counted(*args, excluded=frozenset(), **kwargs):
        calls.append(excluded)
        return quantize_static(*args, excluded=excluded, **kwargs)

    def export(name: str) -> lwcompile.Int8Report:
        calls.clear()
        return lwcompile.export_onnx(model, (x,), tmp_path / name, precision="int8",
                                     target_psnr=99.0, max_float_layers=1, calibration_count=2,
                                     evaluation_count=1).int8_report

    monkeypatch.setattr(int8_onnx, "_quantize_static", counted)
    x = torch.rand(1, 1, 32, 32)
    report = export("screened.onnx")
    convs = len(report.screened)  # 22: the last conv writes one channel (depthwise + sum)
    assert convs >= 21 and convs > int8.SCREEN_ABOVE
    # one per calibration, then only the screen's best: not one per conv
    assert len(calls) == len(int8_onnx.CALIBRATIONS) + int8.SCREEN_CONFIRMED
    confirmed = set(list(report.screened)[:int8.SCREEN_CONFIRMED])
    assert set(report.sensitivity) | set(report.float_layers) == confirmed
    assert report.psnr_db > report.all_int8_psnr_db + int8.MIN_GAIN_DB

    monkeypatch.setattr(int8, "SCREEN_ABOVE", 100)
    full = export("full.onnx")
    assert len(calls) == len(int8_onnx.CALIBRATIONS) + convs and not full.screened
    assert full.float_layers == report.float_layers
    assert full.psnr_db == pytest.approx(report.psnr_db, abs=1e-9)
