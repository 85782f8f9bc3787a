"""Mobile export: each lightened example runs as an XNNPACK-delegated .pte in ExecuTorch.

Lowering is slow (ExecuTorch's passes, not ours, grow with the number of ops), so each
network is exported once per module and shared by the tests that read it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from examples import dncnn, glcic, srresnet, unet
from lwcompile.deploy.mobile import MobileExport, MobileUnavailableError, export_mobile, load_pte
from tests.helpers import close, runs_in_executorch_as_eager

DNCNN_BLOCKS = 6  # LIST blocks: DnCNN-17 has 15 of the same block (its 100% share is in
# benchmarks/results/mobile.json); 6 keep this file's lowering time within budget

NETWORKS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "dncnn": (lambda: dncnn.DnCNN(depth=DNCNN_BLOCKS + 2), dncnn.example_inputs),
    # x4 with both sub-pixel stages, narrowed to keep lowering short
    "srresnet": (lambda: srresnet.SRResNet(scale=4, features=16, blocks=1),
                 srresnet.example_inputs),
    "glcic": (glcic.build, glcic.example_inputs),
    "unet": (unet.build, unet.example_inputs),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple]:
    """name -> (light model, its training flags after export, MobileExport), built once."""
    pytest.importorskip("executorch")
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple[nn.Module, list[bool], MobileExport]:
        if name not in cache:
            build, example_inputs = NETWORKS[name]
            torch.manual_seed(0)
            light = lwcompile.lighten(build(), example_inputs()).train()
            export = export_mobile(light, example_inputs(),
                                   tmp_path_factory.mktemp(name) / f"{name}.pte")
            cache[name] = (light, [m.training for m in light.modules()], export)
        return cache[name]

    return get


@pytest.mark.slow  # lowers to ExecuTorch (the fixture, once per network)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_pte_runs_in_executorch_and_matches_pytorch(exported, name):
    light, _, export = exported(name)
    # every light example runs entirely inside XNNPACK, resizes and shuffles included
    assert export.report.fully_delegated and export.report.partitions == 1
    assert export.path.stat().st_size == export.size_bytes > 0
    assert export.max_abs_error is not None and export.max_abs_error < 1e-4
    # fresh inputs of the exported shapes, not the ones the export was checked on
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.rand(shape, generator=generator) for shape in export.input_shapes]
    (got,) = load_pte(export.path)(*inputs)
    with torch.no_grad():
        want = light.eval()(*inputs)
    close(got, want)


@pytest.mark.slow
def test_export_restores_training_mode(exported):
    light, flags_after_export, _ = exported("dncnn")
    assert all(flags_after_export)  # trained-mode model in, trained-mode model out


@pytest.mark.slow
def test_light_dncnn_is_fully_delegated(exported):
    light, _, export = exported("dncnn")
    report = export.report
    assert report.fully_delegated and report.portable == {}
    assert report.op_share == report.mac_share == 1.0
    assert report.partitions == 1  # one uninterrupted XNNPACK subgraph
    # every LIST's BatchNorm, ReLU and concat were rewritten into forms XNNPACK fuses
    n = DNCNN_BLOCKS
    # and the gray output conv, split over the last concat's halves, runs as a depthwise
    # conv and a channel sum per half (a conv to one channel is padded to the SIMD width)
    assert export.forms == {"bn-into-cat-convs": n, "relu-into-cat-parts": n,
                            "conv-over-cat-split": n, "depthwise-sum": 2}
    assert "aten.cat" not in report.delegated
    assert "aten._native_batch_norm_legit_no_training" not in report.delegated
    # 2 dense end convs + 4 convs per LIST, + each LIST's consumer split in two over the
    # halves, + the output conv's halves each a depthwise conv and a sum
    assert report.delegated["aten.convolution"] == 2 + n * 4 + n + 2
    assert report.delegated["aten.add.Tensor"] == n
    # the split convs together cost what the original ones did; the sums add one MAC per
    # channel and pixel of the output conv's input
    channels, height, width = 64, *export.input_shapes[0][-2:]
    assert report.delegated_macs == (light.lwcompile_report.summary.macs_after
                                     + channels * height * width)
    assert "(100.0%)" in str(report)
    assert export.to_dict()["report"]["op_share"] == 1.0


@pytest.mark.slow
def test_light_glcic_resizes_shuffles_and_mask_arithmetic_are_delegated(exported):
    _, _, export = exported("glcic")
    report = export.report
    # GSAT's channel shuffle becomes view/permute/clone; the two upsamplings stay bilinear,
    # the two halvings (the sizes are even) become strided convs
    assert report.delegated["aten.upsample_bilinear2d.vec"] == 2
    assert export.forms["halving-bilinear-as-conv"] == 2
    assert report.delegated["aten.permute_copy"] == 4
    # without constant folding, the scalar of `1 - mask` stays outside as a portable copy
    assert report.portable == {} and report.partitions == 1


class ScaledDenoiser(nn.Module):
    """A denoiser with a noise-level argument, as ``lighten(denoiser, (noisy, 25.0))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x - self.conv(x) * (sigma / 25.0)


@pytest.mark.slow
def test_non_tensor_argument_is_fixed_to_its_example_value_but_still_passed(exported, tmp_path):
    model = ScaledDenoiser()
    export = export_mobile(model, (torch.rand(1, 1, 8, 8), 50.0), tmp_path / "d.pte")
    assert export.input_shapes == [(1, 1, 8, 8)]
    x = torch.rand(1, 1, 8, 8)
    (got,) = load_pte(export.path)(x, 50.0)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x, 50.0))


class CropsItsSkip(nn.Module):
    """Crops by ``F.pad`` with negative amounts, as RealCUGAN does: ExecuTorch's pad kernel
    refuses those, so the program only runs once they are slices."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)  # unpadded: 2 pixels smaller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + F.pad(x, (-1, -1, -1, -1))


@pytest.mark.slow
def test_a_crop_by_negative_padding_runs_in_executorch(exported, tmp_path):
    model, x = CropsItsSkip().eval(), torch.rand(1, 3, 12, 12)
    export = runs_in_executorch_as_eager(model, x, tmp_path / "c.pte")
    assert export.forms == {"negative-pad-as-slice": 1}


class ScalesItsInput(nn.Module):
    """Writes into its input, as spandrel's RCAN does (``x *= self.rgb_range``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x *= 255
        return self.conv(x) / 255


@pytest.mark.slow
def test_a_model_writing_into_its_input_is_checked_on_its_own_output(exported, tmp_path):
    x = torch.rand(1, 3, 8, 8)
    export = export_mobile(ScalesItsInput(), (x,), tmp_path / "w.pte")
    assert export.leading_outputs == 1 and export.max_abs_error < 1e-4
    written, got = load_pte(export.path)(x.clone())
    torch.testing.assert_close(written, x * 255)
    with torch.no_grad():
        torch.testing.assert_close(got, ScalesItsInput()(x.clone()), rtol=1e-5, atol=1e-5)


class LearnedExponent(nn.Module):
    """Raises its input to a number read from a parameter (``.item()``), as HVICIDNet's
    ``density_k``: ExecuTorch's constant folding made the number and could not store it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.k = nn.Parameter(torch.tensor(0.2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).abs() ** self.k.item()


@pytest.mark.slow
def test_a_number_read_from_a_parameter_is_written_into_the_program(exported, tmp_path):
    model, x = LearnedExponent().eval(), torch.rand(1, 3, 8, 8)
    runs_in_executorch_as_eager(model, x, tmp_path / "k.pte")


class TimesAQuantisedConstant(nn.Module):
    """Multiplies its int8-rounded input by a constant quantised in the graph, as XNNPACK's
    quantiser leaves the numbers it writes as 0-d tensors beside int8 operands
    (HVICIDNet): ExecuTorch's channels-last pass could not read such a constant's layout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("c", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd, int8 = torch.ops.quantized_decomposed, (0, -128, 127, torch.int8)
        q = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, 0.01, *int8), 0.01, *int8)
        c = qd.dequantize_per_tensor(qd.quantize_per_tensor(self.c, 0.01, *int8), 0.01, *int8)
        return q * c


@pytest.mark.slow
def test_a_constant_quantised_in_the_graph_is_quantised_once_at_export(exported, tmp_path):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  the quantized_decomposed ops

    model, x = TimesAQuantisedConstant().eval(), torch.rand(1, 3, 8, 8)
    export = runs_in_executorch_as_eager(model, x, tmp_path / "q.pte", tolerance=0)
    assert export.report.delegated["quantized_decomposed.quantize_per_tensor"] == 1  # x only


def test_missing_executorch_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch.exir", None)  # makes the import fail
    with pytest.raises(MobileUnavailableError, match=r"pip install lwcompile\[mobile\]") as info:
        export_mobile(nn.Conv2d(1, 1, 3), (torch.rand(1, 1, 8, 8),), tmp_path / "m.pte")
    assert isinstance(info.value, lwcompile.LwCompileError)
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "m.pte").exists()
