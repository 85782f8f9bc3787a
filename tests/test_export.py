"""ONNX (run in onnxruntime) and torch.export of lightened models, at a second input size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwcompile import Resize
from lwcompile.deploy.emit import emit_fast
from lwcompile.deploy.export import export_onnx, export_program
from tests.helpers import close, run
from tests.lightened import inputs, light, other_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


def run_ort(path, args: tuple) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {f"input_{i}": a.numpy()
                                               for i, a in enumerate(args)})[0])


def reference(name: str, args: tuple) -> torch.Tensor:
    return run(light(name), args)


@pytest.mark.parametrize(("name", "form"), [
    ("dncnn", "light"), ("srresnet", "emitted, channels_last"), ("glcic", "light"),
    ("unet", "emitted")])
def test_onnx_runs_in_onnxruntime_at_two_sizes(name, form, tmp_path):
    """Resize computes its size from the input: the export must keep that symbolic."""
    model = light(name) if form == "light" else emit_fast(
        light(name), inputs(name), channels_last=form == "emitted, channels_last")
    path = export_onnx(model, inputs(name), tmp_path / f"{name}.onnx")
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17
    for args in (inputs(name), other_inputs(name)):
        close(run_ort(path, args), reference(name, args))


@pytest.mark.parametrize("fast", [True, False])
def test_onnx_is_the_fast_form_by_default(fast, tmp_path):
    """BN folded and LIST concats sunk into the 1x1 convs that read them unless
    ``fast=False``; both export the same function."""
    path = export_onnx(light("dncnn"), inputs("dncnn"), tmp_path / "m.onnx", fast=fast)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    lists = sum(1 for m in light("dncnn").modules() if type(m).__name__ == "LIST")
    assert lists > 0
    assert ops.count("BatchNormalization") == (0 if fast else lists)
    # sunk: every LIST's concat, the last one into the 3x3 output conv as a sum
    assert ops.count("Concat") == (0 if fast else lists)
    close(run_ort(path, other_inputs("dncnn")), reference("dncnn", other_inputs("dncnn")))


@pytest.mark.parametrize("name", ["dncnn", "glcic", "srresnet"])  # srresnet: ThinConvPhases
def test_export_program_runs_at_another_size(name, tmp_path):
    fast = emit_fast(light(name), inputs(name), channels_last=False)
    program = export_program(fast, inputs(name))
    args = other_inputs(name)
    with torch.no_grad():
        close(program.module()(*args), reference(name, args))
    if name == "dncnn":  # the torch.export-based ONNX exporter, from that program
        pytest.importorskip("onnxscript")
        for opset, written in ((None, 18), (17, 17)):  # its own opset, or converted down
            path = export_onnx(program, inputs(name), tmp_path / "program.onnx", opset=opset)
            assert path.exporter == "torch.export"
            assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == \
                written
            close(run_ort(path, args), reference(name, args))


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resize = Resize("transposed", (4, 4), (2, 2), (1, 1))
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.resize(x))


@pytest.mark.parametrize("dynamic_hw", [True, False])
def test_dynamic_hw_decides_whether_the_size_is_fixed(dynamic_hw, tmp_path):
    torch.manual_seed(0)
    model = Upsample().eval()
    x, y = torch.rand(1, 3, 12, 10), torch.rand(1, 3, 7, 9)
    path = export_onnx(model, (x,), tmp_path / "up.onnx", dynamic_hw=dynamic_hw)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or None for d in dims][2:] == ([None, None] if dynamic_hw else [12, 10])
    for args in [(x,), (y,)] if dynamic_hw else [(x,)]:
        with torch.no_grad():
            close(run_ort(path, args), model(*args))


class Strength(nn.Module):
    """A restorer with a float strength argument and a default (as RealCUGAN's ``alpha``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, strength: float = 1.0, offset: float = 0.25):
        return self.conv(x) * strength + offset


@pytest.mark.parametrize("given", [(), (2.0,), (2.0, -1.0)])
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_numbers_and_defaults_are_baked_in_only_tensors_are_inputs(given, precision,
                                                                    tmp_path):
    """The TorchScript exporter makes a Python number, passed or left to its default, a
    graph input: the file then needed a feed its users could not know of."""
    x = torch.rand(1, 3, 16, 16)
    path = export_onnx(Strength().eval(), (x, *given), tmp_path / "s.onnx",
                       precision=precision, calibration=x, calibration_count=1,
                       evaluation_count=1)
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_0"]
    expected = run(Strength().eval(), (x, *given))
    tolerance = 1e-5 if precision == "fp32" else 0.05
    torch.testing.assert_close(run_ort(path, (x,)), expected, rtol=0, atol=tolerance)
