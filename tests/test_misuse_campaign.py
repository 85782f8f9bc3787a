"""Issue 20's second misuse campaign: cases none of the earlier suites tried, over the
deployment entry points, the helpers in ``lwcompile.__all__``, files, threads and the
command line (by the issue's classes). Each failed before its fix, or pins a promise."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.cli import app as cli_app
from lwcompile.cli import main
from tests.helpers import close, run, tiny_factory_in

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 3, 3, padding=1))


X = (torch.rand(1, 3, 16, 16),)


@pytest.fixture(scope="module")
def light() -> nn.Module:
    return lwcompile.lighten(tiny(), X).eval()


# --- Class 3: secondary arguments of the deployment entry points ----------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rtol": "tight"}, "rtol must be a number"), ({"atol": -1.0}, "atol must be >= 0"),
    ({"rtol": float("nan")}, "rtol must be >= 0"), ({"merge": "yes"}, "merge must be True"),
    ({"channels_last": 1}, r"channels_last must be True or False \(or None\)"),
    ({"phases": None}, "phases must be True or False"),
])
def test_emit_fast_options(kwargs, message, light):
    with pytest.raises(lwcompile.ArgumentError, match=f"emit_fast: {message}"):
        lwcompile.emit_fast(light, X, **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"opset": "17"}, "opset must be an int"), ({"opset": 2}, "opset must be from 7 to 20"),
    ({"opset": 99}, "opset must be from 7 to 20"), ({"dynamic_hw": "no"}, "dynamic_hw must"),
    ({"fast": None}, "fast must be True or False"), ({"dynamo": 1}, "dynamo must be True"),
])
def test_export_onnx_options(kwargs, message, light, tmp_path):
    with pytest.raises(lwcompile.ArgumentError, match=f"export_onnx: {message}"):
        lwcompile.export_onnx(light, X, tmp_path / "a.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("entry", "kwargs", "message"), [
    ("export_program", {"dynamic_hw": 2}, "dynamic_hw must be True or False"),
    ("export_program", {"fast": "x"}, "fast must be True or False"),
    ("export_mobile", {"optimize": "x"}, "optimize must be True or False"),
    ("export_mobile", {"verify": None}, "verify must be True or False"),
])
def test_export_program_and_mobile_options(entry, kwargs, message, light, tmp_path):
    with pytest.raises(lwcompile.ArgumentError, match=f"{entry}: {message}"):
        if entry == "export_mobile":
            lwcompile.export_mobile(light, X, tmp_path / "a.pte", **kwargs)
        else:
            lwcompile.export_program(light, X, **kwargs)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: lwcompile.random_inputs("1x3x8x8"), "random_inputs: shapes must be"),
    (lambda: lwcompile.random_inputs(None), "random_inputs: shapes must be"),
    (lambda: lwcompile.random_inputs([(1, "3")]), "random_inputs: shapes must be"),
    (lambda: lwcompile.random_inputs([(1, 3)], seed="0"), "random_inputs: seed must be"),
    (lambda: lwcompile.record_flow("model.pt", X), "record_flow: model must be an nn.Module"),
    (lambda: lwcompile.record_flow(tiny(), 5), "record_flow: args must be a tensor"),
    (lambda: lwcompile.structure_key(5), "structure_key: module must be an nn.Module"),
    (lambda: lwcompile.load_images(5), "load_images: names must be a string or a list"),
    (lambda: lwcompile.load_images(("no-such-image",)), "'no-such-image' is not one of"),
    (lambda: lwcompile.load_images(channels=0), "load_images: channels must be >= 1"),
    (lambda: lwcompile.load_folder(None), "load_folder: folder must be a file path"),
])
def test_helpers_in_all_check_their_arguments(call, message):
    with pytest.raises(lwcompile.LwCompileError, match=message):
        call()


# --- Class 4/7: files -----------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["export_onnx", "export_mobile", "write_html", "save"])
def test_a_destination_that_is_a_folder_is_refused(writer, light, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(lwcompile.LwCompileError, match=str(folder)):
        if writer == "export_onnx":
            lwcompile.export_onnx(light, X, folder)
        elif writer == "export_mobile":
            lwcompile.export_mobile(light, X, folder)
        elif writer == "write_html":
            lwcompile.write_html(light.lwcompile_report.to_dict(), folder)
        else:
            lwcompile.save(light, folder)
    assert folder.is_dir() and list(folder.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_fp32_onnx_export_leaves_no_partial_file(existing, light, tmp_path,
                                                            monkeypatch):
    pytest.importorskip("onnx")
    path = tmp_path / "a.onnx"
    if existing:
        path.write_bytes(b"the previous export")

    def half_written(model, args, f, **kwargs):
        Path(f).write_bytes(b"\x08\x07 half an onnx file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    with pytest.raises(lwcompile.ExportError, match="RuntimeError: exporter crashed"):
        lwcompile.export_onnx(light, X, path, fast=False)
    assert [p.name for p in tmp_path.iterdir()] == (["a.onnx"] if existing else [])
    if existing:
        assert path.read_bytes() == b"the previous export"


# --- Class 2: exports from several threads at once ------------------------------------------


def _in_threads(work, count: int = 3) -> list:
    results: list = [None] * count

    def one(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as exc:  # recorded and asserted by the caller
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_export_onnx_from_several_threads(light, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    paths = _in_threads(lambda i: lwcompile.export_onnx(light, X, tmp_path / f"{i}.onnx"))
    expected = run(light, X)
    for path in paths:
        assert isinstance(path, Path), path
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"input_0": X[0].numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def test_export_program_and_emit_fast_from_several_threads(light):
    def work(i: int):
        if i % 2:
            return lwcompile.export_program(light, X).module()(*X)
        return run(lwcompile.emit_fast(light, X, channels_last=False), X)

    expected = run(light, X)
    for got in _in_threads(work, 4):
        assert isinstance(got, torch.Tensor), got
        torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-4)


def test_export_mobile_neither_switches_nor_runs_the_users_model(light, tmp_path):
    pytest.importorskip("executorch")
    model = lwcompile.lighten(tiny(), X).train()
    model.get_submodule("0").eval()  # a frozen layer, as in fine-tuning
    flags = {n: m.training for n, m in model.named_modules()}
    calls: list[int] = []
    model.register_forward_hook(lambda m, a, out: calls.append(1))
    lwcompile.export_mobile(model, X, tmp_path / "a.pte", verify=False)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert calls == []


# --- Class 1/7: inputs --------------------------------------------------------------------------


class WritesIntoItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.2, 0.8)
        return self.net(x)


@pytest.mark.parametrize("entry", ["emit_fast", "export_program", "profile", "count_macs"])
def test_entry_points_never_write_into_the_callers_tensor(entry):
    model, x = WritesIntoItsInput().eval(), torch.rand(1, 3, 16, 16)
    before = x.clone()
    if entry == "profile":
        lwcompile.profile(model, (x,), runs=1, warmup=0)
    elif entry == "count_macs":
        lwcompile.count_macs(model, x)
    else:
        getattr(lwcompile, entry)(model, (x,))
    assert torch.equal(x, before)


def test_lighten_on_an_unbatched_example_input():
    model, image = tiny().eval(), torch.rand(3, 16, 16)
    light = lwcompile.lighten(model, (image,))
    assert run(light, (image,)).shape == (3, 16, 16)
    close(run(light, (image,)), run(light, (image[None],))[0])


def test_an_example_input_that_requires_grad_is_left_as_it_was():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    light = lwcompile.lighten(tiny(), (x,))
    assert x.grad is None and x.requires_grad and x.is_leaf
    assert run(light, (x.detach(),)).shape == x.shape


def test_a_forward_returning_a_dict_keeps_its_keys():
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"out": self.net(x), "skip": x}

    light = lwcompile.lighten(Dict().eval(), X)
    out = light(*X)
    assert set(out) == {"out", "skip"} and out["out"].shape == X[0].shape


@pytest.mark.parametrize("kwargs", [{"rules": []}, {"exclude": ["*"]}])
def test_nothing_left_to_rewrite_is_a_refusal_with_a_report(kwargs):
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(tiny(), X, **kwargs)
    assert caught.value.report is not None


# --- Class 6: the command line ------------------------------------------------------------------


def _factory(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_factory_in(folder, monkeypatch, "lwc_campaign")


def test_cli_output_path_that_is_a_folder_is_a_refusal(tmp_path, monkeypatch, capsys):
    _factory(tmp_path, monkeypatch)
    (tmp_path / "out").mkdir()
    code = main(["lighten", "lwc_campaign:build", "-o", "out", "--input", "1x3x16x16", "-q"])
    err = capsys.readouterr().err
    assert code == cli_app.EXIT_REFUSED, err
    assert "Traceback" not in err and "out" in err


@pytest.mark.parametrize("spec", ["axb", "1x3x16", "0x3x16x16"])
def test_cli_malformed_input_shape_is_not_a_crash(spec, tmp_path, monkeypatch, capsys):
    _factory(tmp_path, monkeypatch)
    try:
        code = main(["profile", "lwc_campaign:build", "--input", spec, "-q"])
    except SystemExit as exit_:  # argparse's own usage error
        code = exit_.code
    err = capsys.readouterr().err
    assert code in (cli_app.EXIT_REFUSED, 2), err
    assert "Traceback" not in err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"report_dict": {"rows": 5}}, "report_dict is not what Report.to_dict"),
    ({"report_dict": {"rows": [{"x": 1}]}}, "report_dict is not what Report.to_dict"),
    ({"title": 5}, "title must be a string"),
    ({"crops": 5}, "crops must be a dict or list"),
    ({"meta": ["a"]}, "meta must be a dict"),
])
def test_write_html_with_garbage_writes_nothing(kwargs, message, tmp_path):
    call = {"report_dict": {}, **kwargs}
    with pytest.raises(lwcompile.ArgumentError, match=f"write_html: {message}"):
        lwcompile.write_html(call.pop("report_dict"), tmp_path / "r.html", **call)
    assert list(tmp_path.iterdir()) == []
