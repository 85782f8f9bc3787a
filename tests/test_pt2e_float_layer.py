"""One conv of a pt2e-quantised graph made float by rewiring (``deploy.pt2e_float_layer``)
computes what XNNPACK's quantiser gives with that conv left out, and the XNNPACK int8 search
uses it to quantise a large graph only a few times."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.deploy import int8, int8_xnnpack
from lwcompile.deploy.pt2e_float_layer import Pt2eFloatLayers
from tests.test_qdq_float_layer import Mixed

pytest.importorskip("executorch")
pytest.importorskip("torchao")

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoConvs(nn.Module):
    """Two convs in one module's forward (as a lightened block's functional convs): leaving
    the module out leaves both out, and what passes between them is not rounded."""

    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.first = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.2)
        self.second = nn.Parameter(torch.randn(out, channels, 1, 1) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.first, padding=1), self.second)


class GatedWithNorm(nn.Module):
    """A conv + BatchNorm + ReLU block (prepare folds the norm into the conv's weights), a
    conv read by a float op (sigmoid) and a multiply, an upsampled image read by a module of
    two convs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = nn.Conv2d(8, 8, 1)
        self.tail = TwoConvs(8, 3)
        with torch.no_grad():
            self.block[1].running_mean.uniform_(-0.5, 0.5)
            self.block[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        gated = torch.sigmoid(self.gate(y)) * y
        return self.tail(F.interpolate(gated, scale_factor=2, mode="nearest"))


@pytest.mark.parametrize("model_class", [Mixed, GatedWithNorm])
def test_each_conv_made_float_matches_leaving_it_out_of_the_quantiser(model_class):
    XNNPACKQuantizer, config_for, prepare_pt2e, convert_pt2e = int8_xnnpack._pt2e()
    model, x = model_class().eval(), torch.rand(1, 3, 16, 16)
    graph = torch.export.export(model, (x,)).module()
    config = config_for(is_per_channel=True)
    ranges: dict = {}

    def quantize(excluded: frozenset[str]) -> torch.fx.GraphModule:
        """As ``int8_xnnpack.quantize_pt2e`` does, ranges reused across trials."""
        annotator = XNNPACKQuantizer().set_global(config)
        if excluded:
            annotator.set_filter_function(lambda n: int8_xnnpack._module_path(n) not in excluded)
        prepared = prepare_pt2e(copy.deepcopy(graph), annotator)
        with torch.no_grad():
            prepared(x)
        int8_xnnpack._reuse_ranges(prepared, ranges)
        return convert_pt2e(prepared)

    all_int8 = quantize(frozenset())
    layers = Pt2eFloatLayers(all_int8, prepare_pt2e(copy.deepcopy(graph), XNNPACKQuantizer(
        ).set_global(config)), int8_xnnpack._module_path)
    convs = int8_xnnpack.conv_layers(graph)
    assert len(convs) == (5 if model_class is Mixed else 3)
    probe = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        reference = all_int8(probe)
        for conv in convs:
            want = quantize(frozenset({conv}))(probe)
            torch.testing.assert_close(layers.with_float(conv)(probe), want, rtol=0, atol=0,
                                       msg=conv)
            assert (want - reference).abs().max() > 1e-4, conv  # leaving it out changes it
        torch.testing.assert_close(all_int8(probe), reference)  # the graph given is untouched


@pytest.mark.slow
def test_a_large_graph_quantises_only_the_screens_best(tmp_path, monkeypatch):
    """XNNPACK int8 export of a chain of 8 convs, screened above 4 (so that the test stays
    small): one preparation per calibration, one for the screen, then only the screen's best
    2; the same float layer as the search quantising once per conv."""
    monkeypatch.setattr(int8, "SCREEN_ABOVE", 4)
    monkeypatch.setattr(int8, "SCREEN_CONFIRMED", 2)
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.rand(1, 1, 32, 32)
    pt2e = int8_xnnpack._pt2e()
    prepared: list[int] = []

    def counted_prepare(*args, **kwargs):
        prepared.append(1)
        return pt2e[2](*args, **kwargs)

    monkeypatch.setattr(int8_xnnpack, "_pt2e", lambda: (pt2e[0], pt2e[1], counted_prepare,
                                                         pt2e[3]))

    def export(name: str) -> lwcompile.Int8Report:
        prepared.clear()
        return lwcompile.export_mobile(model, (x,), tmp_path / name, precision="int8",
                                       target_psnr=99.0, max_float_layers=1,
                                       calibration_count=2, evaluation_count=1).int8_report

    report = export("screened.pte")
    assert len(report.screened) == 8
    assert len(prepared) == len(int8_xnnpack.CALIBRATIONS) + 1 + 2
    assert set(report.sensitivity) | set(report.float_layers) == set(list(report.screened)[:2])
    monkeypatch.setattr(int8, "SCREEN_ABOVE", 100)
    full = export("full.pte")
    assert len(prepared) == len(int8_xnnpack.CALIBRATIONS) + 8 and not full.screened
    assert full.float_layers == report.float_layers
    assert full.psnr_db == pytest.approx(report.psnr_db, abs=1e-9)
