"""When an exporter cannot take a model, the user gets an ``ExportError`` naming the model and
the exporter's complaint (cases met on the spandrel zoo: AuraSR, GFPGAN, MMRealSR), nothing
is written, and a program whose outputs nest is still checked against the model. A submodule
called with a keyword named ``mod`` (AuraSR), which torch.export's tracer took for its own,
exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile

X = (torch.rand(1, 3, 16, 16),)


class BesselOfConv(nn.Module):
    """``torch.special.i0`` has no ONNX translation in either exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.i0(self.conv(x))


class Scale(nn.Module):
    def forward(self, x: torch.Tensor, mod: float = 1.0) -> torch.Tensor:
        return x * mod


class CallsWithMod(nn.Module):
    """Calls a submodule with a keyword named ``mod``, as AuraSR does: torch.fx's patched
    module call, which torch.export traces with, names its own first parameter ``mod``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.scale = Scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x), mod=2.0)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_op_both_onnx_exporters_lack_is_an_export_error_naming_both(precision, tmp_path):
    pytest.importorskip("onnx")
    if precision == "int8":
        pytest.importorskip("onnxruntime")
    with pytest.raises(lwcompile.ExportError) as info:
        lwcompile.export_onnx(BesselOfConv(), X, tmp_path / "a.onnx", fast=False,
                              precision=precision)
    message = str(info.value)
    assert message.startswith("export_onnx: could not export BesselOfConv: ")
    assert "aten::i0" in message and "(TorchScript-based exporter); DispatchError: No ONNX " \
        "function found for <OpOverload(op='prims.bessel_i0'" in message
    assert message.endswith("(torch.export-based exporter)")
    assert list(tmp_path.iterdir()) == []


class BranchesOnData(nn.Module):
    """Branches on a value the input holds, which torch.export cannot trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class SortsFloats(nn.Module):
    """Sorts floats stably: ``aten.sort.stable`` is not a core ATen op, so ExecuTorch refuses
    it (sorts of integers are written as ``topk``, not these)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sort(x, dim=-1, stable=True)[0]


def test_torch_export_rejecting_the_model_is_an_export_error():
    with pytest.raises(lwcompile.ExportError, match="export_program: could not export "
                       "BranchesOnData: .*data-dependent"):
        lwcompile.export_program(BranchesOnData(), X)


def test_mobile_export_failures_are_export_errors(tmp_path):
    pytest.importorskip("executorch")
    with pytest.raises(lwcompile.ExportError, match="could not export for XNNPACK: "
                       "SpecViolationError: Operator torch._ops.aten.sort"):
        lwcompile.export_mobile(SortsFloats(), X, tmp_path / "a.pte")
    assert list(tmp_path.iterdir()) == []


def test_a_submodule_called_with_a_keyword_named_mod_exports(tmp_path):
    model = CallsWithMod().eval()
    with torch.no_grad():
        expected = model(*X)
    program = lwcompile.export_program(model, X)
    torch.testing.assert_close(program.module()(*X), expected)
    assert type(model.scale) is Scale  # the user's model is left as it was
    onnx_path = lwcompile.export_onnx(model, X, tmp_path / "a.onnx", dynamo=True)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_0": X[0].numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_an_input_the_model_rejects_is_still_named_as_such(tmp_path):
    with pytest.raises(lwcompile.ExampleInputError, match="rejects the example input"):
        lwcompile.export_program(BesselOfConv(), (torch.rand(1, 4, 16, 16),))
    with pytest.raises(lwcompile.ExampleInputError, match="rejects the example input"):
        lwcompile.export_onnx(BesselOfConv(), (torch.rand(1, 4, 16, 16),), tmp_path / "a.onnx")


class ImageAndDegrees(nn.Module):
    """Returns the image and a list of two tensors, as MMRealSR returns (image, degrees)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y = self.conv(x)
        return y, [y.mean(dim=(2, 3)), y.amax(dim=(2, 3))]


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_submodule_called_with_a_keyword_named_mod_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    model = CallsWithMod().eval()
    export = lwcompile.export_mobile(model, X, tmp_path / "a.pte")
    assert export.max_abs_error is not None and export.max_abs_error < 1e-5
    (got,) = load_pte(tmp_path / "a.pte")(*X)
    with torch.no_grad():
        torch.testing.assert_close(got, model(*X), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # lowers to ExecuTorch
def test_mobile_export_checks_nested_outputs(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    export = lwcompile.export_mobile(ImageAndDegrees(), X, tmp_path / "a.pte")
    assert export.max_abs_error is not None and export.max_abs_error < 1e-5
    got = load_pte(tmp_path / "a.pte")(*X)
    image, (mean, peak) = ImageAndDegrees()(*X)
    assert len(got) == 3
    for g, want in zip(got, (image, mean, peak), strict=True):
        torch.testing.assert_close(g, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_program_the_runtime_cannot_run_is_refused_and_not_written(tmp_path, monkeypatch):
    """As MoSR's int8 program met: lowered, then refused by the runtime (a delegate's
    output shape); the check runs before the file is written."""
    pytest.importorskip("executorch")
    from lwcompile.deploy import mobile

    def refusing(*inputs: torch.Tensor) -> list[torch.Tensor]:
        raise RuntimeError("method->execute() failed with error 0x10")

    monkeypatch.setattr(mobile, "load_pte", lambda path: refusing)
    with pytest.raises(lwcompile.ExportError, match="could not run the exported program: "
                       "RuntimeError: method->execute.*nothing was written"):
        lwcompile.export_mobile(nn.Conv2d(3, 3, 3), X, tmp_path / "a.pte")
    assert list(tmp_path.iterdir()) == []


class ModulatedConv(nn.Module):
    """A StyleGAN-style modulated conv between two plain ones: its weight is computed from
    the input (GFPGAN, AuraSR)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head, self.tail = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)
        self.style = nn.Linear(3, 8)
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.style(x.mean((2, 3))).view(1, 8, 1, 1)
        h = F.conv2d(torch.relu(self.head(x)), weight, padding=1)
        return self.tail(torch.relu(h))


@pytest.mark.slow  # quantises and lowers to ExecuTorch
def test_xnnpack_int8_of_a_modulated_conv_is_refused_naming_it(tmp_path):
    pytest.importorskip("executorch")
    with pytest.raises(lwcompile.ExportError, match=r"computes conv weights from its input "
                       r"\(conv2d_1: modulated convs\), which XNNPACK cannot run in int8"):
        lwcompile.export_mobile(ModulatedConv().eval(), X, tmp_path / "m.pte",
                                precision="int8", calibration=torch.rand(3, 3, 16, 16),
                                calibration_count=2, evaluation_count=1)
    assert list(tmp_path.iterdir()) == []
