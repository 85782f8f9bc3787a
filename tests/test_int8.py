"""int8 deployment: onnxruntime QDQ and XNNPACK pt2e, calibration data, the measured report,
float fallback of the most sensitive convs, and refusal below ``min_psnr``."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy import int8, int8_inputs, int8_onnx
from lwcompile.deploy.export import export_onnx
from tests.helpers import ConvThen, image_and_mask
from tests.lightened import inputs, light, original

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {"original": lambda: original("dncnn"), "light": lambda: light("dncnn")}


def run_ort(path, args: tuple) -> torch.Tensor:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {f"input_{i}": a.numpy() for i, a in enumerate(
        [a for a in args if isinstance(a, torch.Tensor)])}
    return torch.from_numpy(session.run(None, feed)[0])


def held_out(example: tuple, report: lwcompile.Int8Report, data=None) -> list[tuple]:
    """The crops the export measured on: drawn deterministically, so they can be redrawn."""
    return int8_inputs.evaluation_inputs(data, example, report.evaluation_count,
                                  report.calibration_count)


def psnr(reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    ref = torch.cat([r.flatten() for r in reference])
    out = torch.cat([g.flatten() for g in got])
    peak = float(ref.max() - ref.min())
    return 10 * math.log10(peak ** 2 / float((out - ref).pow(2).mean()))


@pytest.fixture(scope="module", params=sorted(MODELS))
def onnx_int8(request, tmp_path_factory):
    model = MODELS[request.param]()
    path = export_onnx(model, inputs("dncnn"),
                       tmp_path_factory.mktemp("int8") / "m.onnx", precision="int8")
    return model, path


def test_onnx_int8_is_qdq_with_per_channel_weight_scales(onnx_int8):
    _, path = onnx_int8
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    initializers = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:
        dq = producers[conv.input[1]]  # the weight arrives dequantised
        assert dq.op_type == "DequantizeLinear"
        weight, scale = (initializers[dq.input[0]], initializers[dq.input[1]])
        assert weight.data_type == onnx.TensorProto.INT8
        out_channels = weight.dims[0]
        assert list(scale.dims) == [out_channels]  # one scale per output channel
        groups = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if out_channels > 1 and groups == 1:  # a depthwise-sum's kernels share one peak
            scales = onnx.numpy_helper.to_array(scale)
            assert len(np.unique(scales)) > 1


def test_onnx_int8_report_is_the_measured_psnr(onnx_int8):
    model, path = onnx_int8
    report = path.int8_report
    assert isinstance(report, lwcompile.Int8Report)
    assert report.calibration_count == 8 and report.evaluation_count == 4
    assert report.float_layers == []  # a tiny net is well within the default target
    args = held_out(inputs("dncnn"), report)
    assert args[0][0].shape == inputs("dncnn")[0].shape
    with torch.no_grad():
        reference = [model(*a) for a in args]
    got = [run_ort(path, a) for a in args]
    assert psnr(reference, got) == pytest.approx(report.psnr_db, abs=1e-3)
    max_error = max(float((g - r).abs().max()) for g, r in zip(got, reference, strict=True))
    assert max_error == pytest.approx(report.max_abs_error, rel=1e-4)
    assert 30 < report.psnr_db < 100  # int8 really changed the output, and not by much
    # the file runs at another size too (height and width stay symbolic)
    assert run_ort(path, (torch.rand(1, 1, 24, 40),)).shape == (1, 1, 24, 40)


def test_onnx_int8_keeps_the_calibration_that_measured_best(onnx_int8):
    _, path = onnx_int8
    report = path.int8_report
    assert set(report.calibration_psnr_db) == set(int8_onnx.CALIBRATIONS)
    best = max(report.calibration_psnr_db, key=report.calibration_psnr_db.get)
    assert report.calibration_method == best
    # no layer was kept float, so the file is the chosen calibration's all-int8 model
    assert report.psnr_db == pytest.approx(report.calibration_psnr_db[best], abs=1e-6)
    assert report.to_dict()["calibration_method"] == best and f"({best})" in str(report)


def test_fp32_export_is_unchanged_and_has_no_int8_report(tmp_path):
    path = export_onnx(light("dncnn"), inputs("dncnn"), tmp_path / "f.onnx")
    assert path.int8_report is None
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" not in ops


def test_most_sensitive_conv_stays_float_when_target_is_missed(tmp_path):
    model = light("dncnn")
    path = export_onnx(model, inputs("dncnn"), tmp_path / "g.onnx", precision="int8",
                       target_psnr=500, max_float_layers=1)
    report = path.int8_report
    assert len(report.float_layers) == 1
    (layer,) = report.float_layers
    name, restored_psnr = report.restorations[0]
    assert name == layer and restored_psnr == report.psnr_db
    graph = onnx.load(str(path)).graph
    conv = next(n for n in graph.node if n.name == layer)
    initializers = {i.name: i for i in graph.initializer}
    assert initializers[conv.input[1]].data_type == onnx.TensorProto.FLOAT  # not quantised
    # every other conv is; the screen ranked every conv (there are more than
    # SCREEN_ABOVE) and the real trials measured its best few, the kept one among them
    others = [n for n in graph.node if n.op_type == "Conv" and n.name != layer]
    assert all(n.input[1] not in initializers for n in others)
    assert len(others) + 1 > int8.SCREEN_ABOVE
    assert set(report.screened) == {n.name for n in others} | {layer}
    assert set(report.sensitivity) | {layer} == set(
        list(report.screened)[:int8.SCREEN_CONFIRMED])
    args = held_out(inputs("dncnn"), report)
    with torch.no_grad():
        reference = [model(*a) for a in args]
    assert psnr(reference, [run_ort(path, a) for a in args]) == pytest.approx(
        report.psnr_db, abs=1e-3)


def test_min_psnr_refuses_naming_the_worst_layers_and_writes_nothing(tmp_path):
    target = tmp_path / "r.onnx"
    with pytest.raises(lwcompile.Int8QualityError, match="min_psnr=500") as info:
        export_onnx(light("dncnn"), inputs("dncnn"), target, precision="int8", min_psnr=500,
                    max_float_layers=0)
    assert isinstance(info.value, lwcompile.LwCompileError)
    worst = list(info.value.report.sensitivity)[:3]
    assert len(worst) == 3 and all(name in str(info.value) for name in worst)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_int8_works_on_a_model_with_a_mask_input(tmp_path):
    """GLCIC reads an image and a mask: the data fills the image, the mask keeps its value."""
    from examples import glcic

    torch.manual_seed(0)
    model = glcic.build().eval()
    example = image_and_mask(32, 32)
    path = export_onnx(model, example, tmp_path / "g.onnx", precision="int8",
                       calibration_count=2, evaluation_count=2)
    args = held_out(example, path.int8_report)
    assert torch.equal(args[0][1], example[1]) and args[0][0].shape == example[0].shape
    with torch.no_grad():
        reference = [model(*a) for a in args]
    assert psnr(reference, [run_ort(path, a) for a in args]) == pytest.approx(
        path.int8_report.psnr_db, abs=1e-3)


def test_calibration_from_a_tensor_a_loader_and_a_folder(tmp_path):
    skimage_io = pytest.importorskip("skimage.io")
    example = (torch.rand(1, 1, 16, 16),)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    rgb = torch.rand(5, 3, 20, 20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rgb), batch_size=2)
    for image in range(3):
        skimage_io.imsave(tmp_path / f"{image}.png", (rgb[image].permute(1, 2, 0).numpy() * 255
                                                      ).astype(np.uint8), check_contrast=False)
    for data in (rgb, loader, tmp_path):
        calib = int8_inputs.calibration_inputs(data, example, 3)
        assert len(calib) == 3 and all(a[0].shape == (1, 1, 16, 16) for a in calib)
        path = export_onnx(model, example, tmp_path / "m.onnx", precision="int8",
                           calibration=data, calibration_count=3, evaluation_count=2)
        assert path.int8_report.calibration_count == 3
    # a loader's batches for measurement come after those calibrated on
    calib = int8_inputs.calibration_inputs(loader, example, 2)
    held = int8_inputs.evaluation_inputs(loader, example, 2, 2)
    assert not any(torch.equal(c[0], h[0]) for c in calib for h in held)


@pytest.mark.parametrize(("data", "message"), [
    (torch.rand(4, 2, 16, 16), "2 channels"),
    (torch.rand(16, 16), "must be .N,C,H,W."),
    (torch.rand(4, 1, 8, 8), "smaller than the example"),
    ([torch.rand(2, 4, 16, 16)], "4-channel images to 1"),
    ([torch.rand(2, 16, 16)], "must be .N,C,H,W."),
    ([], "gave no batch"),
])
def test_calibration_data_that_does_not_fit_is_refused(data, message, tmp_path):
    model = nn.Conv2d(1, 1, 3, padding=1)
    with pytest.raises(lwcompile.CalibrationDataError, match=message):
        export_onnx(model, (torch.rand(1, 1, 16, 16),), tmp_path / "m.onnx", precision="int8",
                    calibration=data)
    assert not (tmp_path / "m.onnx").exists()


def test_a_model_reading_other_than_grey_or_rgb_needs_its_own_calibration_data(tmp_path):
    """FDnCNN reads an RGB image and its noise map: the bundled images cannot stand in."""
    model, example = nn.Conv2d(4, 3, 3, padding=1), (torch.rand(1, 4, 16, 16),)
    with pytest.raises(lwcompile.CalibrationDataError,
                       match="reads 4 channels .* pass calibration= data with 4 channels"):
        export_onnx(model, example, tmp_path / "m.onnx", precision="int8")
    assert list(tmp_path.iterdir()) == []
    path = export_onnx(model, example, tmp_path / "m.onnx", precision="int8",
                       calibration=torch.rand(8, 4, 16, 16))
    assert path.int8_report.calibration_count == 8


def test_unknown_precision_lists_the_valid_ones(tmp_path):
    model, example = nn.Conv2d(1, 1, 3), (torch.rand(1, 1, 8, 8),)
    with pytest.raises(lwcompile.Int8Error, match="fp32, int8"):
        export_onnx(model, example, tmp_path / "m.onnx", precision="fp16")
    with pytest.raises(lwcompile.Int8Error, match="fp32, int8"):
        lwcompile.export_mobile(model, example, tmp_path / "m.pte", precision="int4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qat_steps", [0, 2])
def test_int8_without_onnxruntime_names_the_extra(qat_steps, monkeypatch, tmp_path):
    """Also where fine-tuning, which reads onnxruntime's placement first, comes before."""
    if qat_steps:
        pytest.importorskip("torchao")
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(lwcompile.Int8Error, match=r"pip install lwcompile\[export\]"):
        export_onnx(nn.Conv2d(1, 1, 3), (torch.rand(1, 1, 8, 8),), tmp_path / "m.onnx",
                    precision="int8", qat_steps=qat_steps)
    assert not (tmp_path / "m.onnx").exists()


def test_int8_without_the_pt2e_quantiser_names_the_extra(monkeypatch):
    from lwcompile.deploy import int8_xnnpack

    monkeypatch.setitem(sys.modules, "torchao.quantization.pt2e.quantize_pt2e", None)
    with pytest.raises(lwcompile.Int8Error, match=r"pip install lwcompile\[mobile\]"):
        int8_xnnpack._pt2e()


def test_compare_is_psnr_over_the_reference_range():
    reference = [torch.tensor([0.0, 2.0])]
    db, max_error = int8.compare(reference, [torch.tensor([0.1, 2.0])])
    assert db == pytest.approx(10 * math.log10(4 / 0.005)) and max_error == pytest.approx(0.1)
    assert int8.compare(reference, reference)[0] == math.inf
    # int8 rounding a divisor to zero: infinitely far, not a math domain error
    assert int8.compare(reference, [torch.tensor([0.0, math.inf])])[0] == -math.inf
    assert int8.compare(reference, [torch.tensor([math.nan, 2.0])])[0] == -math.inf
    assert int8.compare(reference, [torch.tensor([0.0, 3e38])])[0] == -math.inf


@pytest.mark.slow
def test_int8_that_makes_outputs_infinite_is_measured_not_a_crash(tmp_path):
    """A division by a tensor int8 can round to zero: its calibrations were each refused
    with a bare "math domain error" and the export failed."""

    pytest.importorskip("executorch")
    relative_change = ConvThen(lambda y, x: (y - x) / (y.abs() + 1e-8)).eval()
    x = (torch.rand(1, 3, 8, 8),)
    export = lwcompile.export_mobile(relative_change, x, tmp_path / "r.pte", precision="int8",
                                     calibration_count=2, evaluation_count=1)
    assert export.int8_report.psnr_db == -math.inf
    with pytest.raises(lwcompile.Int8QualityError):
        lwcompile.export_mobile(relative_change, x, tmp_path / "s.pte", precision="int8",
                                min_psnr=20, calibration_count=2, evaluation_count=1)
    assert not (tmp_path / "s.pte").exists()


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(MODELS))
def test_mobile_int8_lowers_to_xnnpack_and_is_measured(which, tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    model = MODELS[which]()
    export = lwcompile.export_mobile(model, inputs("dncnn"), tmp_path / "m.pte",
                                     precision="int8")
    report = export.int8_report
    assert report.float_layers == [] and 30 < report.psnr_db < 100
    delegated = export.report.delegated
    assert export.report.fully_delegated
    assert delegated["quantized_decomposed.dequantize_per_channel"] == delegated[
        "aten.convolution"]  # every conv's weight is int8, per channel
    assert export.to_dict()["int8"]["psnr_db"] == round(report.psnr_db, 3)
    args = held_out(inputs("dncnn"), report)
    with torch.no_grad():
        reference = [model(*a) for a in args]
    got = [load_pte(export.path)(*a)[0] for a in args]
    # the report measures the converted pt2e model; XNNPACK's kernels round alike
    assert psnr(reference, got) == pytest.approx(report.psnr_db, abs=1.0)
    # both activation calibrations were measured and the closer one kept
    from lwcompile.deploy import int8_xnnpack

    assert set(report.calibration_psnr_db) == set(int8_xnnpack.CALIBRATIONS)
    best = max(report.calibration_psnr_db, key=report.calibration_psnr_db.get)
    assert report.calibration_method == best
    assert report.psnr_db == pytest.approx(report.calibration_psnr_db[best], abs=1e-6)


def test_percentile_range_clips_rare_outliers_and_averages_batches():
    pytest.importorskip("torchao")
    from lwcompile.deploy.percentile_observer import PercentileObserver, percentile_range

    x = torch.linspace(0, 1, 20_001)
    x[:5], x[-5:] = -100.0, 100.0  # five outliers at each end: 0.025 % of the values
    low, high = percentile_range(x, 99.95)
    # 0.05 % of 20,001 values is 10: the 10th smallest and the 10th largest
    assert float(low) == float(x.sort().values[9]) and float(high) == float(x.sort().values[-11])
    assert -0.001 < float(low) < 0.001 and 0.999 < float(high) < 1.0
    observer = PercentileObserver(dtype=torch.qint8, quant_min=-128, quant_max=127,
                                  percentile=99.95)
    observer(x)
    observer(2 * x)  # a second batch: the range is the mean of both batches' percentiles
    assert float(observer.max_val) == pytest.approx(1.5 * float(high))
    assert float(observer.min_val) == pytest.approx(1.5 * float(low))
    scale, _ = observer.calculate_qparams()
    assert float(scale) < 0.02  # min/max over the outliers would give (200 + 200) / 255
    observer.reset_min_max_vals()
    observer(x)
    assert float(observer.max_val) == float(high)
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=30)


@pytest.mark.slow
def test_mobile_int8_keeps_the_most_sensitive_conv_float_and_refuses(tmp_path):
    pytest.importorskip("executorch")
    model = original("dncnn")
    export = lwcompile.export_mobile(model, inputs("dncnn"), tmp_path / "m.pte",
                                     precision="int8", target_psnr=500, max_float_layers=1)
    (layer,) = export.int8_report.float_layers
    assert layer in dict(model.named_modules())
    delegated = export.report.delegated
    assert delegated["quantized_decomposed.dequantize_per_channel"] == delegated[
        "aten.convolution"] - 1
    with pytest.raises(lwcompile.Int8QualityError, match="min_psnr=500"):
        lwcompile.export_mobile(model, inputs("dncnn"), tmp_path / "r.pte", precision="int8",
                                min_psnr=500, max_float_layers=0)
    assert not (tmp_path / "r.pte").exists()


def test_degrade_is_applied_to_calibration_and_held_out_crops():
    example = (torch.rand(1, 1, 16, 16),)
    clean = int8_inputs.evaluation_inputs(None, example, 2, 0)
    noisy = int8_inputs.evaluation_inputs(None, example, 2, 0, degrade=lwcompile.add_noise(25))
    noise = torch.cat([n[0] - c[0] for n, c in zip(noisy, clean, strict=True)])
    assert float(noise.std()) == pytest.approx(25 / 255, rel=0.15)
    again = int8_inputs.evaluation_inputs(None, example, 2, 0, degrade=lwcompile.add_noise(25))
    assert all(torch.equal(a[0], n[0]) for a, n in zip(again, noisy, strict=True))
    calib = int8_inputs.calibration_inputs(None, example, 2, degrade=lwcompile.add_noise(25))
    assert not torch.equal(calib[0][0], noisy[0][0])


def test_int8_needs_the_module_not_an_exported_program(tmp_path):
    model, example = nn.Conv2d(1, 1, 3, padding=1).eval(), (torch.rand(1, 1, 8, 8),)
    program = torch.export.export(model, example)
    with pytest.raises(lwcompile.Int8Error, match="needs the nn.Module"):
        export_onnx(program, example, tmp_path / "m.onnx", precision="int8")
    assert not (tmp_path / "m.onnx").exists()


def test_calibration_crops_are_taken_at_the_size_the_degradation_turns_into_the_example():
    """An SR model's example is the low-resolution input: with a x2 downscale as ``degrade``
    the crops are taken at twice its size, so every input has the example's shape."""
    from lwcompile.train.data import add_noise, downscale

    example = (torch.rand(1, 3, 24, 20),)
    for degrade in (downscale(2), add_noise(25), None):
        calib = int8_inputs.calibration_inputs(None, example, 3, degrade)
        held = int8_inputs.evaluation_inputs(None, example, 2, 3, degrade)
        assert len(calib) == 3 and len(held) == 2
        assert {tuple(args[0].shape) for args in calib + held} == {(1, 3, 24, 20)}
    with pytest.raises(int8.CalibrationDataError, match="no crop size gives"):
        int8_inputs.calibration_inputs(None, example, 1,
                                       lambda x, g: x[..., ::3])


@pytest.mark.parametrize("saturating", [True, False])
def test_onnx_int8_weights_use_7_bits_where_the_cpu_would_saturate(saturating, monkeypatch,
                                                                   tmp_path):
    """Without VNNI, onnxruntime's uint8 x int8 pair sums fit 16 bits only with 7-bit weights."""
    monkeypatch.setattr(int8_onnx, "saturating_cpu", lambda: saturating)
    path = export_onnx(original("dncnn"), inputs("dncnn"), tmp_path / "m.onnx",
                       precision="int8", max_float_layers=0)
    assert path.int8_report.weight_bits == (7 if saturating else 8)
    assert path.int8_report.to_dict()["weight_bits"] == path.int8_report.weight_bits
    graph = onnx.load(str(path)).graph
    consumers = {i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.input[:1]}
    weights = [onnx.numpy_helper.to_array(i) for i in graph.initializer
               if i.name in consumers and i.data_type == onnx.TensorProto.INT8]
    assert weights
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest <= 64 if saturating else largest == 127


class _ShapeArithmetic(nn.Module):
    """A conv whose output is reshaped by sizes read at run time (as windowed attention
    does): the exporter writes the sizes as Shape/Gather/Constant nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        b, c, h, w = y.shape
        tokens = self.mix(y.flatten(2).transpose(1, 2))
        return self.out(tokens.transpose(1, 2).reshape(b, c, h, w))


def test_onnx_int8_quantises_the_graph_onnxruntime_prepared(tmp_path):
    model, x = _ShapeArithmetic().eval(), (torch.rand(1, 1, 16, 16),)
    plain = export_onnx(model, x, tmp_path / "fp32.onnx")
    assert [n for n in onnx.load(str(plain)).graph.node if n.op_type == "Constant"]
    path = export_onnx(model, x, tmp_path / "int8.onnx", precision="int8")
    graph = onnx.load(str(path)).graph
    # the exporter's constants became initializers before the quantiser walked the graph
    assert not [n for n in graph.node if n.op_type in ("Constant", "Identity")]
    assert {"QuantizeLinear", "MatMul", "Conv"} <= {n.op_type for n in graph.node}
    args = held_out(x, path.int8_report)
    with torch.no_grad():
        want = [model(*a) for a in args]
    got = [run_ort(path, a) for a in args]
    assert psnr(want, got) == pytest.approx(path.int8_report.psnr_db, abs=1e-3)


def test_prepare_leaves_a_graph_onnxruntime_cannot_optimise_as_exported(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]),
              str(path))
    before = onnx.load(str(path)).graph.node
    int8_onnx.prepare(path)  # onnxruntime cannot load the op, so cannot optimise the graph
    assert onnx.load(str(path)).graph.node == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_xnnpack_search_trials_reuse_each_activation_range(monkeypatch):
    """Trials that keep a conv float observe the same float values as the all-int8 model:
    each activation's range is computed once, and a trial converted with the reused ranges
    is the one a fresh calibration gives."""
    pytest.importorskip("executorch")
    import copy

    from torchao.quantization.pt2e.observer import HistogramObserver

    from lwcompile.deploy import int8_xnnpack

    quantizer, config_for, prepare_pt2e, convert_pt2e = int8_xnnpack._pt2e()
    model, x = original("dncnn").eval(), inputs("dncnn")
    graph = torch.export.export(model, x).module()
    calibration = int8_inputs.calibration_inputs(None, x, 2, None)
    convs = int8_xnnpack.conv_layers(graph)

    def calibrated(excluded: frozenset[str]) -> torch.fx.GraphModule:
        annotator = quantizer().set_global(config_for(is_per_channel=True))
        annotator.set_filter_function(lambda n: int8_xnnpack._module_path(n) not in excluded)
        prepared = prepare_pt2e(copy.deepcopy(graph), annotator)
        with torch.no_grad():
            for args in calibration:
                prepared(*args)
        return prepared

    computed = []
    search = HistogramObserver.calculate_qparams
    monkeypatch.setattr(HistogramObserver, "calculate_qparams",
                        lambda self: computed.append(self) or search(self))
    known: dict = {}
    int8_xnnpack._reuse_ranges(calibrated(frozenset()), known)
    assert len(computed) == len(known) > len(convs)  # every activation, once
    trial = calibrated(frozenset({convs[1]}))
    int8_xnnpack._reuse_ranges(trial, known)
    assert len(computed) == len(known)  # the trial computed none again
    with torch.no_grad():
        got = convert_pt2e(trial)(*calibration[0])
        want = convert_pt2e(calibrated(frozenset({convs[1]})))(*calibration[0])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


class _WritesItsInput(nn.Module):
    """Scales its input in place first, as RCAN does (``x *= rgb_range``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x *= 4.0
        return self.out(torch.relu(self.conv(x))) / 4.0


@pytest.mark.parametrize("runtime", ["onnxruntime", "xnnpack"])
def test_int8_of_a_model_that_writes_its_input_measures_the_same_inputs(runtime, tmp_path):
    """Calibration, the float reference and every int8 run each see the crops as drawn: a
    run on inputs an earlier run wrote into would measure (and calibrate) other inputs."""
    torch.manual_seed(0)
    model, x = _WritesItsInput().eval(), (torch.rand(1, 1, 16, 16),)
    if runtime == "onnxruntime":
        path = export_onnx(model, x, tmp_path / "m.onnx", precision="int8")
        report = path.int8_report

        def run(args: tuple) -> torch.Tensor:
            return run_ort(path, args)
    else:
        pytest.importorskip("executorch")
        from lwcompile.deploy.mobile import load_pte

        export = lwcompile.export_mobile(model, x, tmp_path / "m.pte", precision="int8")
        report = export.int8_report

        def run(args: tuple) -> torch.Tensor:
            return load_pte(export.path)(*args)[-1]
    args = held_out(x, report)
    drawn = [a[0].clone() for a in args]
    with torch.no_grad():
        want = [model(a.clone()) for a in drawn]
    got = [run((a.clone(),)) for a in drawn]
    assert all(torch.equal(a[0], d) for a, d in zip(args, drawn, strict=True))
    assert report.psnr_db > 35  # int8 of two small convs, on the inputs it was calibrated for
    tolerance = 1e-3 if runtime == "onnxruntime" else 1.0  # XNNPACK rounds like pt2e, nearly
    assert psnr(want, got) == pytest.approx(report.psnr_db, abs=tolerance)


class _ConvCalledTwice(nn.Module):
    """One depthwise conv module applied to two branches, as RGT's ``reduction1``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.reduce = nn.Conv2d(8, 8, 2, stride=2, groups=8)
        self.tail = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.head(x))
        a, b = self.reduce(y), self.reduce(torch.relu(self.mid(y)))
        return self.tail(a + b)


def test_each_conv_reads_its_own_parameters_before_pt2e():
    pytest.importorskip("torchao")
    from lwcompile.deploy.int8_xnnpack import own_parameter_reads

    model, x = _ConvCalledTwice().eval(), torch.rand(1, 1, 16, 16)
    graph = torch.export.export(model, (x,)).module()
    assert own_parameter_reads(graph) == 2  # the second call's weight and bias
    convs = [n for n in graph.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    reads = [n.args[1] for n in convs] + [n.args[2] for n in convs]
    assert len(set(reads)) == len(reads) == 10
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)


@pytest.mark.slow
def test_mobile_int8_of_a_conv_module_called_twice_loads_and_runs(tmp_path):
    """The quantiser annotated the shared parameters for the first call only: the second
    conv stayed float between int8 activations and XNNPACK refused to build the program."""
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    torch.manual_seed(0)
    model, x = _ConvCalledTwice().eval(), (torch.rand(1, 1, 16, 16),)
    export = lwcompile.export_mobile(model, x, tmp_path / "m.pte", precision="int8",
                                     max_float_layers=0)
    delegated = export.report.delegated
    assert delegated["quantized_decomposed.dequantize_per_channel"] == delegated[
        "aten.convolution"] == 5  # every conv call's weight is int8
    args = held_out(x, export.int8_report)
    with torch.no_grad():
        want = [model(*a) for a in args]
    got = [load_pte(export.path)(*a)[0] for a in args]
    assert psnr(want, got) == pytest.approx(export.int8_report.psnr_db, abs=1.0)


@pytest.mark.slow
def test_mobile_int8_program_that_computes_something_else_is_refused(monkeypatch, tmp_path):
    """A program further from float than the quantised model it was lowered from is not
    written: here the second call of a conv reads the first call's weight tensor, which
    XNNPACK packs once with the first call's input zero point."""
    pytest.importorskip("executorch")
    from lwcompile.deploy import int8_xnnpack

    def shared_reads(graph_module: torch.fx.GraphModule) -> int:
        for node in list(graph_module.graph.nodes):
            convs = [u for u in node.users if u.target is torch.ops.aten.conv2d.default
                     and node in u.args[1:3]] if node.op == "get_attr" else []
            for conv in convs[1:]:
                with graph_module.graph.inserting_before(conv):
                    again = graph_module.graph.get_attr(node.target)
                again.meta = dict(node.meta)
                conv.replace_input_with(node, again)
        graph_module.recompile()
        return 0

    monkeypatch.setattr(int8_xnnpack, "own_parameter_reads", shared_reads)
    torch.manual_seed(0)
    model, x = _ConvCalledTwice().eval(), (torch.rand(1, 1, 16, 16),)
    from lwcompile.deploy.mobile import MobileExportError

    with pytest.raises(MobileExportError, match="computes something else"):
        lwcompile.export_mobile(model, x, tmp_path / "m.pte", precision="int8",
                                max_float_layers=0)
    assert not (tmp_path / "m.pte").exists()


class _ZeroPads(nn.Module):
    """Zero pads of quantised activations: an explicit one (windowed attention padding to a
    multiple of the window) or the one ExecuTorch's decomposition of an unfold starts with
    (IPT's non-overlapping patches, folded back)."""

    def __init__(self, unfold: bool) -> None:
        super().__init__()
        self.head, self.tail = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)
        self.unfold = unfold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.head(x))
        h, w = y.shape[-2:]
        if self.unfold:
            y = torch.nn.functional.fold(torch.nn.functional.unfold(y, 2, stride=2) * 2,
                                         (h, w), 2, stride=2)
        else:
            y = torch.nn.functional.pad(y, (1, 2, 1, 2))[..., 1:-2, 1:-2] * 2
        return self.tail(y)


@pytest.mark.slow
@pytest.mark.parametrize("unfold", [False, True])
def test_mobile_int8_with_zero_pads_of_quantised_tensors_loads_and_runs(unfold, tmp_path):
    """XNNPACK took the pad in float with a dequantised int8 input and refused to build it:
    the program did not load (HAT, IPT). The pad now runs on the int8 tensor, exactly."""
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    torch.manual_seed(0)
    model, x = _ZeroPads(unfold).eval(), (torch.rand(1, 1, 16, 16),)
    export = lwcompile.export_mobile(model, x, tmp_path / "m.pte", precision="int8",
                                     max_float_layers=0)
    assert export.report.portable.get("aten.constant_pad_nd", 0) >= 1  # on int8, outside XNNPACK
    args = held_out(x, export.int8_report)
    with torch.no_grad():
        want = [model(*a) for a in args]
    got = [load_pte(export.path)(*a)[0] for a in args]
    assert psnr(want, got) == pytest.approx(export.int8_report.psnr_db, abs=1.0)


class _MishGating(nn.Module):
    """MoSR's block: a channel mean subtracted, a conv split three ways, Mish gating one
    part, a concat of the others, Mish again, a residual."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, 64, 3, padding=1)
        self.conv = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.fc2 = nn.Conv2d(32, dim, 3, padding=1)
        self.act = nn.Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.fc1(x - x.mean(1, keepdim=True)), [32, 16, 16], dim=1)
        return self.act(self.fc2(self.act(g) * torch.cat((i, self.conv(c)), dim=1))) + x


@pytest.mark.slow
def test_mobile_int8_with_mish_runs(tmp_path):
    """ExecuTorch's softplus split the program at every Mish, and a tensor crossing one of
    those boundaries came back from the int8 program with two dimensions swapped, so it
    failed to run (MoSR, MoESR). Mish is now XNNPACK ops, rewritten after quantising."""
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _MishGating(), _MishGating(),
                          nn.Conv2d(16, 3, 3, padding=1)).eval()
    x = (torch.rand(1, 3, 32, 32),)
    export = lwcompile.export_mobile(model, x, tmp_path / "m.pte", precision="int8",
                                     max_float_layers=0)
    assert export.forms["mish-as-exp"] == 4
    args = held_out(x, export.int8_report)
    with torch.no_grad():
        want = [model(*a) for a in args]
    got = [load_pte(export.path)(*a)[0] for a in args]
    assert psnr(want, got) == pytest.approx(export.int8_report.psnr_db, abs=1.0)
    assert export.int8_report.psnr_db > 40


class _IndexArithmetic(nn.Module):
    """SCUNet's relative position bias: an integer index computed with Python numbers
    (``coords + window - 1``), then used to gather a learned table."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.table = nn.Parameter(torch.rand(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coords = torch.arange(4)
        index = (coords[:, None] - coords[None, :]) + 4 - 1  # 0..6, int64
        bias = self.table[index[..., 0] * 1]
        return self.conv(x) + bias.sum()


def test_integer_arithmetic_stays_integer_through_pt2e_preparation():
    """The quantiser wrote the numbers as float32 tensors: the index became float and the
    prepared graph failed torch.export's dtype assertion (SCUNet's int8 export)."""
    pytest.importorskip("torchao")
    import copy

    from lwcompile.deploy import int8_xnnpack

    quantizer, config, prepare_pt2e, _ = int8_xnnpack._pt2e()
    model, x = _IndexArithmetic().eval(), torch.rand(1, 1, 8, 8)
    graph = torch.export.export(model, (x,)).module()
    assert int8_xnnpack.integer_scalars_as_tensors(graph) == 2  # "+ 4 - 1" and "* 1"
    prepared = prepare_pt2e(copy.deepcopy(graph),
                            quantizer().set_global(config(is_per_channel=True)))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=0)
