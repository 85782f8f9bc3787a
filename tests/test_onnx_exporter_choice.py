"""``export_onnx`` writes with the TorchScript-based exporter and, where that one has no
translation for the model, with the torch.export-based one; the file says which
(``OnnxFile.exporter``), runs in onnxruntime as the model does, and a file the second
exporter writes invalid is refused, not written."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.deploy.export import OPSET, TORCH_EXPORT, TORCHSCRIPT

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

X = torch.rand(1, 3, 16, 16)


class PooledToHalf(nn.Module):
    """An adaptive max pool to a size computed from the input's (as SAFMN's): the
    TorchScript-based exporter refuses a non-constant output size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = F.adaptive_max_pool2d(self.conv(x), (h // 2, w // 2))
        return F.interpolate(pooled, size=(h, w), mode="nearest")


class Gated(nn.Module):
    """A chunk into two halves (NAFNet's SimpleGate): the torch.export-based exporter writes
    a ``Split`` that its conversion from opset 18 down to 17 leaves invalid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return a * b


class MixtureOfExperts(nn.Module):
    """A router picking one of two experts per image, the pick made in Python from tensor
    values, in a module lwcompile does not know (SeemoRe's it runs densely:
    ``deploy.dense_mixtures``): a trace keeps the example's pick."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(3, 2, bias=False)
        self.experts = nn.ModuleList([nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 3, padding=1)])
        with torch.no_grad():  # a red image goes to expert 0, a green one to expert 1
            self.router.weight.copy_(torch.tensor([[5.0, 0, 0], [0, 5.0, 0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, chosen = self.router(x.mean((2, 3))).softmax(1).topk(1)
        expert = [self.experts[i] for i in chosen.squeeze(0)][0]
        return x + expert(x) * weight[:, :, None, None]


class PaddedToEight(nn.Module):
    """Padding to a multiple of 8 decided in Python from the input's size (windowed
    attention's): the tracer warns, and the file is right at other sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="reflect")
        return self.conv(x)[..., :h, :w]


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])


def _opset(path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "")


def test_a_model_the_torchscript_exporter_takes_is_written_by_it(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()).eval()
    path = lwcompile.export_onnx(model, (X,), tmp_path / "a.onnx")
    assert path.exporter == TORCHSCRIPT and _opset(path) == OPSET[TORCHSCRIPT] == 17
    torch.testing.assert_close(_run(path, X), model(X).detach(), rtol=1e-5, atol=1e-5)


def test_what_the_torchscript_exporter_lacks_goes_to_the_torch_export_based_one(tmp_path,
                                                                               capfd):
    model = PooledToHalf().eval()
    path = lwcompile.export_onnx(model, (X,), tmp_path / "a.onnx")
    assert path.exporter == TORCH_EXPORT and _opset(path) == OPSET[TORCH_EXPORT] == 18
    # the TorchScript exporter's failure logged its whole graph to stdout (torch forces its
    # log on); now nothing is printed, and torch's flag is its function again
    assert "Torch IR graph" not in capfd.readouterr().out
    assert callable(torch._C._jit_is_onnx_log_enabled)
    for x in (X, torch.rand(1, 3, 24, 20)):  # height and width stay symbolic
        with torch.no_grad():
            torch.testing.assert_close(_run(path, x), model(x), rtol=1e-5, atol=1e-5)


def test_dynamo_false_keeps_to_the_torchscript_exporter_and_says_what_else_there_is(tmp_path):
    with pytest.raises(lwcompile.ExportError, match="adaptive pooling") as info:
        lwcompile.export_onnx(PooledToHalf(), (X,), tmp_path / "a.onnx", dynamo=False)
    assert "dynamo=None also tries the torch.export-based one" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_file_the_torch_export_based_exporter_writes_invalid_is_refused(tmp_path):
    with pytest.raises(lwcompile.ExportError, match=r"not valid ONNX at opset 17 \("
                       r"ValidationError: Unrecognized attribute: num_outputs") as info:
        lwcompile.export_onnx(Gated(), (X,), tmp_path / "a.onnx", dynamo=True, opset=17)
    assert "opset=18 is written without converting" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    model = Gated().eval()
    path = lwcompile.export_onnx(model, (X,), tmp_path / "b.onnx", dynamo=True)
    assert path.exporter == TORCH_EXPORT and _opset(path) == 18
    with torch.no_grad():
        torch.testing.assert_close(_run(path, X), model(X), rtol=1e-5, atol=1e-5)


def test_int8_export_falls_back_alike(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    path = lwcompile.export_onnx(PooledToHalf(), (x,), tmp_path / "a.onnx", fast=False,
                                 precision="int8", calibration_count=2, evaluation_count=1)
    assert path.exporter == TORCH_EXPORT
    assert path.int8_report.psnr_db > 35
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def test_a_model_choosing_its_computation_from_data_is_refused_not_traced(tmp_path):
    model = MixtureOfExperts().eval()
    red, green = torch.zeros(2, 1, 3, 8, 8)
    red[:, 0], green[:, 1] = 1, 1
    with torch.no_grad():  # the pick depends on the image
        assert model.router(red.mean((2, 3))).argmax() != model.router(green.mean((2, 3))).argmax()
    for options in ({}, {"dynamo": False}, {"precision": "int8", "calibration_count": 2,
                                            "evaluation_count": 1}):
        with pytest.raises(lwcompile.ExportError, match=r"chooses its computation in Python "
                           r"from tensor values .*Iterating over a tensor.*"
                           r"GuardOnDataDependentSymNode"):
            lwcompile.export_onnx(model, (red,), tmp_path / "a.onnx", **options)
        assert list(tmp_path.iterdir()) == []


def test_a_trace_that_reads_sizes_is_kept_and_right_at_other_sizes(tmp_path, monkeypatch):
    from lwcompile.deploy import export

    probed = []
    probe = export._refuse_data_dependent_trace
    monkeypatch.setattr(export, "_refuse_data_dependent_trace",
                        lambda *a: probed.append(a[2]) or probe(*a))
    model = PaddedToEight().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lwcompile.LwCompileWarning)  # sizes stay symbolic
        path = lwcompile.export_onnx(model, (torch.rand(1, 3, 12, 10),), tmp_path / "a.onnx")
    assert path.exporter == TORCHSCRIPT and len(probed) == 1  # the tracer warned; kept
    assert any("might cause the trace to be incorrect" in doubt for doubt in probed[0])
    for x in (torch.rand(1, 3, 12, 10), torch.rand(1, 3, 20, 14)):
        with torch.no_grad():
            torch.testing.assert_close(_run(path, x), model(x), rtol=1e-5, atol=1e-5)


def test_a_trace_wrong_at_other_sizes_keeps_the_examples_size(tmp_path):
    # at 16x16 the padding branch is not taken, so a traced file never pads
    model = PaddedToEight().eval()
    with pytest.warns(lwcompile.LwCompileWarning, match=r"fixed to the example's \(16x16\).*"
                      r"computed something else at 17x17"):
        path = lwcompile.export_onnx(model, (torch.rand(1, 3, 16, 16),), tmp_path / "a.onnx")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 16, 16]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_run(path, x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="invalid dimensions"):  # refused, not wrong
        _run(path, torch.rand(1, 3, 12, 10))


def test_only_the_exporters_torchvision_notices_are_left_out_of_the_log(caplog):
    from lwcompile.deploy.export import _without_torchvision_notices

    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    with caplog.at_level(logging.WARNING), _without_torchvision_notices():
        registry_log.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
        registry_log.warning("Failed to register '%s'. Skipped", "aten::foo")
    assert [r.getMessage() for r in caplog.records] == ["Failed to register 'aten::foo'. Skipped"]
    with caplog.at_level(logging.WARNING):  # outside an export, the log is as it was
        registry_log.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
    assert len(caplog.records) == 2
