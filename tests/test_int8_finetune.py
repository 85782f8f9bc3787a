"""Quantisation-aware fine-tuning before int8 export (``qat_steps``, ``deploy.int8_finetune``)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy import int8, int8_finetune, int8_inputs, int8_onnx
from lwcompile.deploy.export import export_onnx
from tests.lightened import inputs, light, original

pytest.importorskip("torchao")
pytestmark = pytest.mark.usefixtures("one_thread")


def _xnnpack_quantizer(qat: bool):
    quantizer = pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    config = quantizer.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat)
    return quantizer.XNNPACKQuantizer().set_global(config)


def _deployed(model: nn.Module, example: tuple) -> torch.fx.GraphModule:
    """The graph ``export_mobile`` quantises: BatchNorms folded, concats sunk."""
    from lwcompile.deploy.aten_rewrites import xnnpack_forms

    with torch.no_grad():
        graph = torch.export.export(copy.deepcopy(model), example).module()
        assert xnnpack_forms(graph)
        return torch.export.export(graph, example).module()


def _int8_psnr(graph: torch.fx.GraphModule, reference: nn.Module, calib: list[tuple],
               held: list[tuple]) -> float:
    """PSNR of the post-training int8 form of ``graph`` against ``reference`` on ``held``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(copy.deepcopy(graph), _xnnpack_quantizer(qat=False))
    with torch.no_grad():
        for args in calib:
            prepared(*args)
        converted = convert_pt2e(prepared)
        return int8.compare(int8.float_outputs(reference, held),
                            [converted(*a) for a in held])[0]


def test_trainable_makes_folded_buffers_trainable_but_not_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.register_buffer("folded", torch.ones(4))
    model.register_buffer("count", torch.zeros(1, dtype=torch.long))
    tuned, names = int8_finetune.trainable(model)
    assert set(names) == {"0.weight", "0.bias", "1.weight", "1.bias", "folded"}
    assert "folded" in dict(tuned.named_parameters())
    assert {"1.running_mean", "1.running_var", "count"} <= set(dict(tuned.named_buffers()))
    assert "folded" in dict(model.named_buffers())  # the original is untouched


def test_finetune_moves_the_weights_to_where_int8_reproduces_the_reference():
    """Fine-tuning trains the weights of the deployed graph, through fake int8, towards the
    reference's outputs: started from perturbed weights, the int8 model it leaves is much
    closer to the reference than the int8 model of the weights it started from."""
    example, dense = inputs("dncnn"), original("dncnn")
    torch.manual_seed(0)  # the light net's new layers, whatever ran before
    reference = lwcompile.lighten(dense, example).eval()
    graph = _deployed(reference, example)
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, value in graph.state_dict().items():
            if value.is_floating_point() and "running" not in name:
                value.add_(0.05 * value.abs().mean()
                           * torch.randn(value.shape, generator=noise))
    train = int8_inputs.calibration_inputs(None, example, 64)
    held = int8_inputs.evaluation_inputs(None, example, 4, 8)
    before = _int8_psnr(graph, reference, train[:8], held)
    tuned = int8_finetune.finetune(graph, reference, train, _xnnpack_quantizer(qat=True),
                                   64).graph
    after = _int8_psnr(tuned, reference, train[:8], held)
    assert after > before + 3.0
    assert isinstance(tuned, torch.fx.GraphModule)
    assert set(tuned.state_dict()) == set(graph.state_dict())  # the same form, new values


def _percentile_prepared(graph: torch.fx.GraphModule, calib: list[tuple]) -> torch.fx.GraphModule:
    """``graph`` prepared for XNNPACK post-training int8 with percentile ranges, calibrated."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from lwcompile.deploy import int8_xnnpack

    quantizer = pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    config = int8_xnnpack._activation_config(
        quantizer.get_symmetric_quantization_config(is_per_channel=True),
        int8_xnnpack.CALIBRATIONS[1])
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer.XNNPACKQuantizer().set_global(config))
    with torch.no_grad():
        for args in calib:
            prepared(*args)
    return prepared


def _observer_nodes(prepared: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in prepared.graph.nodes
            if n.op == "call_module" and str(n.target).startswith("activation_post_process")]


def test_learnable_config_starts_activation_ranges_from_percentiles():
    from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize

    from lwcompile.deploy.percentile_observer import PercentileObserver

    quantizer = pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    config = quantizer.get_symmetric_quantization_config(is_per_channel=True, is_qat=True)
    learned = int8_finetune.learnable(config)
    for spec in (learned.input_activation, learned.output_activation):
        fake = spec.observer_or_fake_quant_ctr(quant_min=spec.quant_min,
                                               quant_max=spec.quant_max, dtype=spec.dtype,
                                               qscheme=spec.qscheme)
        assert isinstance(fake, LearnableFakeQuantize)
        assert isinstance(fake.activation_post_process, PercentileObserver)
    assert learned.weight == config.weight  # weights keep the runtime's own scheme


def _learnable_xnnpack_quantizer():
    quantizer = pytest.importorskip("executorch.backends.xnnpack.quantizer.xnnpack_quantizer")
    return quantizer.XNNPACKQuantizer().set_global(int8_finetune.learnable(
        quantizer.get_symmetric_quantization_config(is_per_channel=True, is_qat=True)))


class _Sizes(nn.Module):
    """``model``, recording the height and width of every image it is run on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.add(tuple(x.shape[-2:]))
        return self.model(x)


@pytest.fixture(scope="module")
def learned_ranges():
    """A light DnCNN's deployed graph fine-tuned with learnable ranges on crops of half the
    example's side (``finetune_on_crops``, its crop size lowered to fit the small example),
    with the calibration and held-out inputs it was measured on, and the sizes the graph was
    exported at and the reference run on while training."""
    example = inputs("dncnn")
    torch.manual_seed(0)
    reference = lwcompile.lighten(original("dncnn"), example).eval()
    graph = _deployed(reference, example)
    exported_at = []

    def export_at(args: tuple) -> torch.fx.GraphModule:
        exported_at.append(tuple(args[0].shape[-2:]))
        return _deployed(reference, args)

    watched = _Sizes(reference)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8_finetune, "TRAINING_CROP", example[0].shape[-1] // 2)
        tuned = int8_finetune.finetune_on_crops(graph, export_at, watched, example, None, None,
                                                _learnable_xnnpack_quantizer(), 64, 8)
    calib = int8_inputs.calibration_inputs(None, example, 8)
    held = int8_inputs.evaluation_inputs(None, example, 4, 8)
    return reference, graph, tuned, calib, held, exported_at, watched.sizes


def test_finetune_on_crops_trains_the_graph_exported_at_the_crop_size(learned_ranges):
    _, graph, tuned, _, _, exported_at, trained_at = learned_ranges
    side = inputs("dncnn")[0].shape[-1] // 2
    assert exported_at == [(side, side)]
    assert trained_at == {(side, side)}
    # what comes back is the deployed graph at the example's size, with tuned values
    assert int8_finetune.same_graph(tuned.graph, graph)
    changed = [n for n, v in tuned.graph.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, graph.state_dict()[n])]
    assert len(changed) > 10


def test_training_example_cuts_the_image_and_tensors_of_its_size(monkeypatch):
    monkeypatch.setattr(int8_finetune, "TRAINING_CROP", 16)
    image, mask, level = torch.rand(2, 3, 40, 30), torch.rand(2, 1, 40, 30), torch.rand(2, 1)
    small = int8_finetune.training_example((image, mask, level, 0.5))
    assert [tuple(a.shape) for a in small[:3]] == [(2, 3, 16, 16), (2, 1, 16, 16), (2, 1)]
    torch.testing.assert_close(small[0], image[..., :16, :16], rtol=0, atol=0)
    assert small[3] == 0.5
    assert int8_finetune.training_example((torch.rand(1, 1, 16, 64),)) is None
    assert int8_finetune.training_example((torch.rand(1, 1, 12, 12),)) is None


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def _wrong_graph(args: tuple) -> torch.fx.GraphModule:
    with torch.no_grad():
        return torch.export.export(nn.Conv2d(1, 1, 3, padding=1), args).module()


def _no_export(args: tuple) -> torch.fx.GraphModule:
    raise RuntimeError("this model exports at its example size only")


@pytest.mark.parametrize("export_at", [None, _no_export, _wrong_graph])
def test_finetune_on_crops_trains_at_the_example_size_where_the_crop_graph_is_unusable(
        export_at, monkeypatch):
    monkeypatch.setattr(int8_finetune, "TRAINING_CROP", 16)
    torch.manual_seed(0)
    model, example = _Tiny().eval(), (torch.rand(1, 1, 32, 32),)
    with torch.no_grad():
        graph = torch.export.export(model, example).module()
    watched = _Sizes(model)
    tuned = int8_finetune.finetune_on_crops(graph, export_at, watched, example, None, None,
                                            _learnable_xnnpack_quantizer(), 3, 2)
    assert watched.sizes == {(32, 32)}
    assert int8_finetune.same_graph(tuned.graph, graph) and tuned.ranges


def test_finetune_refuses_a_training_graph_that_is_another_model():
    model, example = _Tiny().eval(), (torch.rand(1, 1, 32, 32),)
    with torch.no_grad():
        graph = torch.export.export(model, example).module()
    train = [(torch.rand(1, 1, 16, 16),)]
    with pytest.raises(int8_finetune.FinetuneError, match="not the deployed graph"):
        int8_finetune.finetune(graph, model, train, _learnable_xnnpack_quantizer(), 1,
                               training_graph=_wrong_graph(train[0]))


def test_finetune_learns_a_range_for_each_quantised_activation(learned_ranges):
    _, graph, tuned, calib, *_ = learned_ranges
    nodes = {n.name for n in graph.graph.nodes}
    assert len(tuned.ranges) > 10 and set(tuned.ranges) <= nodes
    for scale, zero_point in tuned.ranges.values():
        assert scale > 0 and -128 <= zero_point <= 127
    start = _percentile_prepared(graph, calib)  # where training started: percentile ranges
    started = {n.args[0].name: getattr(start, n.target).calculate_qparams()
               for n in _observer_nodes(start)}
    moved = [name for name, (scale, _) in tuned.ranges.items()
             if abs(scale - float(started[name][0])) > 1e-3 * scale]
    assert len(moved) > len(tuned.ranges) // 2  # the ranges were trained, not only calibrated


def test_apply_ranges_makes_conversion_quantise_with_the_learned_ranges(learned_ranges):
    _, _, tuned, calib, *_ = learned_ranges
    prepared = _percentile_prepared(tuned.graph, calib)
    applied = int8_finetune.apply_ranges(prepared, tuned.ranges)
    assert applied > 10
    checked = 0
    for node in _observer_nodes(prepared):
        observer = getattr(prepared, node.target)
        if node.args[0].name in tuned.ranges and observer.qscheme == torch.per_tensor_affine:
            scale, zero_point = observer.calculate_qparams()
            want_scale, want_zero_point = tuned.ranges[node.args[0].name]
            assert int(zero_point) == want_zero_point
            assert float(scale) == pytest.approx(want_scale, rel=1e-5)
            checked += 1
    assert checked >= applied


def test_learned_overrides_find_each_nodes_tensor_in_the_onnx_file(tmp_path):
    """Ranges keyed by torch node name reach the ONNX tensors that hold the same values."""
    from lwcompile.deploy.export import _write_onnx

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 3, padding=1)).eval()
    example = (torch.rand(1, 1, 8, 8),)
    graph = torch.export.export(model, example).module()
    computing = [n.name for n in graph.graph.nodes if n.op in ("placeholder", "call_function")]
    ranges = {name: (0.01 * (i + 1), 3 + i) for i, name in enumerate(computing)}
    path = tmp_path / "m.onnx"
    _write_onnx(model, example, path, False, 17, False, fast=False)
    overrides = int8_onnx.learned_overrides(path, int8_finetune.Tuned(graph, ranges), example,
                                            ["input_0"])
    got = sorted((round(float(o[0]["scale"]), 6), int(o[0]["zero_point"]))
                 for o in overrides.values())
    assert got == sorted((round(s, 6), z) for s, z in ranges.values())


@pytest.mark.parametrize("saturating", [True, False])
def test_onnx_qat_trains_the_weight_bits_the_export_writes(saturating, monkeypatch):
    """Where onnxruntime's kernels saturate the export writes 7-bit weights (|q| <= 64), so
    fine-tuning simulates 7-bit weights there and 8-bit elsewhere."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    monkeypatch.setattr(int8_onnx, "saturating_cpu", lambda: saturating)
    config = int8_onnx.qat_config(get_default_x86_inductor_quantization_config(is_qat=True))
    weight = config.weight
    assert (weight.quant_min, weight.quant_max) == ((-64, 64) if saturating else (-128, 127))
    fake = weight.observer_or_fake_quant_ctr(quant_min=weight.quant_min,
                                             quant_max=weight.quant_max, dtype=weight.dtype,
                                             qscheme=weight.qscheme, ch_axis=weight.ch_axis)
    fake(torch.tensor([[-1.0], [0.5]]).reshape(2, 1, 1, 1))
    scale, _ = fake.calculate_qparams()
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.5]) / (64 if saturating else 127.5))


def test_load_values_refuses_a_name_the_model_lacks():
    with pytest.raises(int8_finetune.FinetuneError, match="no place in the model"):
        int8_finetune.load_values(nn.Conv2d(1, 1, 1), {"other.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def onnx_qat(tmp_path_factory):
    model = light("dncnn")
    state = copy.deepcopy(model.state_dict())
    path = export_onnx(model, inputs("dncnn"), tmp_path_factory.mktemp("qat") / "m.onnx",
                       precision="int8", qat_steps=20, max_float_layers=0)
    return model, state, path


def test_onnx_qat_measures_tuned_and_untuned_weights_and_keeps_the_closer(onnx_qat):
    model, state, path = onnx_qat
    report = path.int8_report
    names = set(int8_onnx.CALIBRATIONS)
    assert set(report.calibration_psnr_db) == names | {
        int8_finetune.LEARNED, list(int8_onnx.CALIBRATIONS)[1] + int8_finetune.TUNED}
    best = max(report.calibration_psnr_db, key=report.calibration_psnr_db.get)
    assert report.calibration_method == best
    assert report.psnr_db == pytest.approx(report.calibration_psnr_db[best], abs=1e-6)
    # the model given is neither trained nor switched
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_onnx_qat_file_is_measured_against_the_model_given(onnx_qat):
    model, _, path = onnx_qat
    report = path.int8_report
    held = int8_inputs.evaluation_inputs(None, inputs("dncnn"), report.evaluation_count,
                                         report.calibration_count)
    session = int8_onnx.session(path, threads=1)
    got = [torch.from_numpy(session.run(None, {"input_0": a[0].numpy()})[0]) for a in held]
    psnr, _ = int8.compare(int8.float_outputs(model, held), got)
    assert psnr == pytest.approx(report.psnr_db, abs=1e-3)


@pytest.mark.slow
def test_mobile_qat_measures_tuned_and_untuned_weights(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy import int8_xnnpack

    export = lwcompile.export_mobile(light("dncnn"), inputs("dncnn"), tmp_path / "m.pte",
                                     precision="int8", qat_steps=10, max_float_layers=0,
                                     verify=False)
    report = export.int8_report
    names = set(int8_xnnpack.CALIBRATIONS)
    assert set(report.calibration_psnr_db) == names | {int8_finetune.LEARNED}
    assert report.calibration_method == max(report.calibration_psnr_db,
                                            key=report.calibration_psnr_db.get)
    assert export.report.fully_delegated


@pytest.mark.parametrize(("steps", "precision", "message"), [
    (-1, "int8", "qat_steps must be an int >= 0"),
    (2.5, "int8", "qat_steps must be an int >= 0"),
    (True, "int8", "qat_steps must be an int >= 0"),
    (5, "fp32", "precision is 'fp32'"),
])
def test_bad_qat_steps_are_refused_and_nothing_is_written(steps, precision, message, tmp_path):
    model, example = nn.Conv2d(1, 1, 3), (torch.rand(1, 1, 8, 8),)
    with pytest.raises(lwcompile.Int8Error, match=message):
        export_onnx(model, example, tmp_path / "m.onnx", precision=precision, qat_steps=steps)
    with pytest.raises(lwcompile.Int8Error, match=message):
        lwcompile.export_mobile(model, example, tmp_path / "m.pte", precision=precision,
                                qat_steps=steps)
    assert list(tmp_path.iterdir()) == []


def test_qat_without_torchao_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(
        sys.modules, "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", None)
    with pytest.raises(lwcompile.Int8Error, match=r"pip install lwcompile\[export\]"):
        export_onnx(light("dncnn"), inputs("dncnn"), tmp_path / "m.onnx", precision="int8",
                    qat_steps=2)
    assert not (tmp_path / "m.onnx").exists()
