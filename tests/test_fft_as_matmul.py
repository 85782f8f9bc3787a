"""Real FFTs and the complex arithmetic between them as real matrix products
(deploy.fft_as_matmul): the same outputs, no complex value left, and ExecuTorch runs them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwcompile.deploy.fft_as_matmul import ffts_as_matmuls
from tests.helpers import runs_in_executorch_as_eager


class FourierConv(nn.Module):
    """LaMa's spectral transform: rfftn, a 1x1 conv over the real and imaginary parts,
    complex, irfftn back to the input's size."""

    def __init__(self, norm: str | None = "ortho") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = norm
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        spectrum = torch.fft.rfftn(x, dim=(-2, -1), norm=self.norm)
        re, im = self.conv(torch.cat([spectrum.real, spectrum.imag], 1)).chunk(2, 1)
        return torch.fft.irfftn(torch.complex(re, im), s=(h, w), dim=(-2, -1), norm=self.norm)


class SpectralAttention(nn.Module):
    """FFTformer's frequency-domain attention on 8x8 patches: a spectrum weighted by a real
    parameter, times another spectrum, irfft2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.rand(1, 4, 1, 1, 8, 5))

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        product = torch.fft.rfft2(q) * self.weight * torch.fft.rfft2(k)
        return torch.fft.irfft2(product, s=(8, 8))


def rewritten(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, int]:
    module = torch.export.export(model.eval(), inputs).module()
    return module, ffts_as_matmuls(module)


def complex_values(module: torch.fx.GraphModule) -> list:
    return [n for n in module.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
            and n.meta["val"].is_complex()]


@pytest.mark.parametrize("norm", [None, "ortho", "forward"])
@pytest.mark.parametrize("size", [(8, 8), (6, 7), (5, 10)])
def test_fourier_convolution_becomes_real_matmuls_with_the_same_output(norm, size):
    x = torch.randn(1, 4, *size)
    model = FourierConv(norm).eval()
    module, done = rewritten(model, x)
    assert done == 2
    module = torch.export.export(module, (x,)).module()  # as export_mobile exports it again
    assert complex_values(module) == []
    assert not [n for n in module.graph.nodes if "fft" in str(n.target) and n.op == "call_function"]
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


def test_products_of_spectra_become_real_matmuls_with_the_same_output():
    q, k = torch.randn(1, 4, 2, 2, 8, 8), torch.randn(1, 4, 2, 2, 8, 8)
    model = SpectralAttention()
    module, done = rewritten(model, q, k)
    assert done == 3
    with torch.no_grad():
        torch.testing.assert_close(module(q, k), model(q, k), rtol=1e-5, atol=1e-5)


class Magnitude(nn.Module):
    """A complex value read by an op the rewrite does not know (``abs``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x) * 2) + torch.fft.rfft2(x).abs().mean()


class AxesSwapped(nn.Module):
    """A transform over the last two axes in the other order: torch halves the height."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfftn(x, dim=(-1, -2)) * 2
        return torch.fft.irfftn(spectrum, s=(8, 8), dim=(-1, -2))


@pytest.mark.parametrize("model", [Magnitude(), AxesSwapped()], ids=["abs", "axes swapped"])
def test_a_graph_with_another_complex_op_or_order_is_left_unchanged(model):
    module, done = rewritten(model, torch.randn(1, 2, 8, 8))
    assert done == 0
    assert len(complex_values(module)) >= 2  # the transforms and the product kept


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_fourier_convolution_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    export = runs_in_executorch_as_eager(FourierConv().eval(), torch.randn(1, 4, 16, 16),
                                         tmp_path / "f.pte", tolerance=1e-4)
    assert export.forms["fft-as-matmul"] == 2


class BetweenConvs(nn.Module):
    """A Fourier convolution between two convs, as in LaMa: in int8 the convs are quantised
    and the transform reads and writes rounded values."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head, self.tail = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)
        self.fourier = FourierConv()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.fourier(torch.relu(self.head(x)))))


@pytest.mark.slow  # quantises and lowers to ExecuTorch
def test_a_fourier_convolution_between_int8_convs_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import export_mobile

    torch.manual_seed(0)
    # the quantised graph's rounding nodes record no shape: the transform's is found
    # through them (before, the rewrite did not apply and ExecuTorch refused the program)
    export = export_mobile(BetweenConvs().eval(), (torch.rand(1, 3, 16, 16),),
                           tmp_path / "f8.pte", precision="int8",
                           calibration=torch.rand(4, 3, 16, 16), calibration_count=3,
                           evaluation_count=1)
    assert export.forms["fft-as-matmul"] == 2
    assert export.int8_report.psnr_db > 40
