"""The ``lwcompile`` command line: exit codes, JSON output, MODEL specs, report pages.

One test runs the real command in a subprocess on a spandrel ESRGAN checkpoint; the others
call ``lwcompile.cli.main(argv)`` (what the console script runs) in-process, to stay fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lwcompile
from lwcompile.cli import main
from lwcompile.cli.loading import load_model
from lwcompile.cli.spandrel import torchvision_stub
from lwcompile.deploy import persist
from lwcompile.html_report import to_png
from tests.helpers import close

ROOT = Path(__file__).resolve().parents[1]
TINY = '''
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 3, 3, padding=1))


def big_tail():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 5, padding=2), nn.ReLU(),
                         nn.Conv2d(16, 3, 5, padding=2))


def not_a_model():
    return (1, 2)
'''


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding ``lwc_tiny.py`` (the factory ``lwc_tiny:build``)."""
    (tmp_path / "lwc_tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def needs_spandrel() -> None:
    try:
        with torchvision_stub():
            import spandrel  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"spandrel is not installed: {exc}")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``lwcompile ARGV`` in-process: the exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def esrgan_checkpoint(path: Path) -> int:
    """A small ESRGAN (RRDBNet: 16 features, 1 RRDB block, x2) saved as a plain state dict,
    the way released checkpoints are; spandrel identifies it from the keys alone."""
    with torchvision_stub():
        from spandrel.architectures.ESRGAN import ESRGAN
    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2)
    torch.save(model.state_dict(), path)
    return lwcompile.count_params(model)


@pytest.mark.slow  # a subprocess: the console path as a user runs it
def test_lighten_an_esrgan_checkpoint_end_to_end(tmp_path):
    needs_spandrel()
    params = esrgan_checkpoint(tmp_path / "esrgan.pth")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "lwcompile.cli", "lighten", "esrgan.pth", "-o", "out.pt",
         "--input", "1x3x16x16", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is the JSON alone; progress went to stderr
    assert "lightening RRDBNet" in done.stderr
    assert result["class_name"] == "RRDBNet" and result["output"] == "out.pt"
    rows = result["report"]["rows"]
    assert len(rows) == 20
    assert sum(r["outcome"] == "applied" for r in rows) == 18
    assert {r["site"] for r in rows if r["outcome"] == "kept"} == {"model.0", "model.7"}
    summary = result["report"]["summary"]
    assert summary["params_before"] == params == 291_667
    assert summary["params_after"] < params / 6
    light = persist.load(tmp_path / "out.pt", expected="RRDBNet",
                         original=load_model(str(tmp_path / "esrgan.pth")))
    assert lwcompile.count_params(light) == summary["params_after"]
    with torch.no_grad():
        assert light(torch.rand(1, 3, 12, 20)).shape == (1, 3, 24, 40)


def test_help_shows_examples(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "examples:" in out and "lwcompile lighten examples.dncnn:build" in out
    assert "exit codes: 0 ok, 1 lwcompile refused" in out
    code, out, _ = run_cli(capsys, "report", "--help")
    assert code == 0 and "--teacher" in out and "examples:" in out


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate", "x"],
    ["lighten", "lwc_tiny:build"],  # no -o
    ["lighten", "lwc_tiny:build", "-o", "o.pt", "--input", "1x3xfoo"],
    ["lighten", "lwc_tiny:build", "-o", "o.pt", "--input", "0x3x8x8"],
    ["lighten", "lwc_tiny:build", "-o", "o.pt", "--distill", "0"],
    ["lighten", "lwc_tiny:build", "-o", "o.pt", "--data", "photos"],  # --data needs --distill
    ["report", "o.pt", "--image", "a.png", "--data", "photos"],
])
def test_usage_errors_exit_2(capsys, workdir, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert "usage: lwcompile" in err and out == ""
    assert not (workdir / "o.pt").exists()


def test_refused_model_exits_1_with_the_reason(capsys, workdir):
    code, out, err = run_cli(capsys, "lighten", "torch.nn:Identity", "--input", "1x3x8x8",
                             "-o", "out.pt")
    assert code == 1 and out == ""
    assert "lightening Identity: failed" in err
    assert err.endswith("lwcompile: error: nothing to lighten in Identity: no conv the rules "
                        "apply to was found (see the error's .report)\n")
    assert not (workdir / "out.pt").exists()
    code, out, _ = run_cli(capsys, "lighten", "torch.nn:Identity", "--input", "1x3x8x8",
                           "-o", "out.pt", "--json", "-q")
    assert code == 1
    assert json.loads(out)["error"]["type"] == "NothingToLighten"


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_module_lwc:build", "cannot find 'no_such_module_lwc:build'.*No module named"),
    ("lwc_tiny:missing", "cannot find 'lwc_tiny:missing'.*has no attribute"),
    ("lwc_tiny", "'lwc_tiny' is no file, nor a factory"),
    ("math:pi", "is a float, not a factory"),
    ("lwc_tiny:not_a_model", "returned a tuple, not an nn.Module"),
    ("missing.pth", "'missing.pth' is no file"),
])
def test_model_spec_errors_exit_1(capsys, workdir, spec, message):
    code, _, err = run_cli(capsys, "plan", spec)
    assert code == 1
    assert err.startswith("lwcompile: error: ")
    assert __import__("re").search(message, err), err


def test_checkpoint_that_is_not_a_model_exits_1(capsys, workdir):
    needs_spandrel()
    torch.save({"mean": torch.zeros(3), "epoch": 7}, workdir / "stats.pth")
    code, _, err = run_cli(capsys, "lighten", "stats.pth", "-o", "out.pt")
    assert code == 1
    assert "stats.pth is not a model checkpoint spandrel can identify" in err
    (workdir / "notes.pth").write_text("not a checkpoint at all")
    code, _, err = run_cli(capsys, "plan", "notes.pth")
    assert code == 1 and "notes.pth is not a model checkpoint" in err
    assert "Traceback" not in err


def test_corrupt_saved_file_exits_1(capsys, workdir):
    (workdir / "noise.pt").write_bytes(bytes(range(256)) * 8)
    code, _, err = run_cli(capsys, "report", "noise.pt")
    assert code == 1 and "noise.pt is not an lwcompile model file" in err
    persist.save(torch.nn.Conv2d(1, 1, 3), workdir / "cut.pt", format="pickle")
    (workdir / "cut.pt").write_bytes((workdir / "cut.pt").read_bytes()[:-10])
    code, _, err = run_cli(capsys, "report", "cut.pt", "--html", "r.html")
    assert code == 1 and "cut.pt is truncated or corrupt" in err
    assert not (workdir / "r.html").exists()


def test_plan_of_a_factory(capsys, workdir):
    code, out, err = run_cli(capsys, "plan", "lwc_tiny:build", "--input", "1x3x16x16", "--json")
    assert code == 0, err
    report = json.loads(out)["report"]
    assert [(r["site"], r["outcome"]) for r in report["rows"]] == [
        ("0", "kept"), ("2", "applied"), ("4", "applied"), ("6", "kept")]
    assert report["summary"]["params_before"] == 448 + 2 * 2_320 + 435


def outcomes(out: str) -> list[tuple[str, str, str]]:
    return [(r["site"], r["outcome"], r["decided_by"]) for r in json.loads(out)["report"]["rows"]]


def test_rule_option_adds_a_user_rule_and_the_result_loads(capsys, workdir):
    rule = "examples.custom_rules:FiveByFiveToTwoThreeByThree"
    code, out, err = run_cli(capsys, "plan", "lwc_tiny:big_tail", "--input", "1x3x16x16", "--json")
    assert code == 0, err
    assert outcomes(out)[1:] == [("2", "applied", "list"),
                                 ("4", "applied", "image-output-squeeze")]
    code, out, err = run_cli(capsys, "lighten", "lwc_tiny:big_tail", "--input", "1x3x16x16",
                             "--rule", rule, "-o", "light.pt", "--json")
    assert code == 0, err
    assert outcomes(out)[1] == ("2", "applied", "5x5-to-2x3x3")
    from examples.custom_rules import FiveByFiveToTwoThreeByThree

    light = persist.load(workdir / "light.pt", original=load_model("lwc_tiny:big_tail"),
                         rules=[FiveByFiveToTwoThreeByThree()])
    assert light(torch.rand(1, 3, 20, 24)).shape == (1, 3, 20, 24)


def test_without_leaves_out_a_default_rule_and_exclude_keeps_sites(capsys, workdir):
    code, out, err = run_cli(capsys, "plan", "lwc_tiny:big_tail", "--input", "1x3x16x16",
                             "--without", "image-output-squeeze", "--json")
    assert code == 0, err
    assert outcomes(out)[1:] == [("2", "applied", "list"), ("4", "kept", "image-boundary")]
    code, out, err = run_cli(capsys, "plan", "lwc_tiny:big_tail", "--input", "1x3x16x16",
                             "--exclude", "2", "--json")
    assert code == 0, err
    assert outcomes(out)[1:] == [("2", "kept", "exclude"),
                                 ("4", "applied", "image-output-squeeze")]
    code, _, err = run_cli(capsys, "plan", "lwc_tiny:big_tail", "--without", "lits")
    assert code == 1 and "no default rule named 'lits'" in err, err


@pytest.mark.parametrize(("spec", "message"), [
    ("math:pi", "'math:pi' gives a float, not an lwcompile Rule"),
    ("lwc_tiny", "'lwc_tiny' is not like 'package.module:RuleClass'"),
    ("lwc_tiny:nothing", "cannot find 'lwc_tiny:nothing'"),
])
def test_bad_rule_option_exits_1(capsys, workdir, spec, message):
    code, _, err = run_cli(capsys, "plan", "lwc_tiny:build", "--rule", spec)
    assert code == 1 and message in err, err


def test_profile_counts_each_layer(capsys, workdir):
    code, out, err = run_cli(capsys, "profile", "lwc_tiny:build", "--json")  # input inferred
    assert code == 0, err
    profile = json.loads(out)["profile"]
    assert profile["params"] == 5_523
    assert [x["name"] for x in profile["layers"] if x["params"]] == ["0", "2", "4", "6"]
    code, out, err = run_cli(capsys, "profile", "lwc_tiny:build", "--input", "1x3x16x16", "--json")
    assert code == 0, err
    layers = json.loads(out)["profile"]["layers"]
    assert [(x["name"], x["params"], x["macs"]) for x in layers if x["params"]] == [
        ("0", 448, 16 * 16 * 16 * 27), ("2", 2_320, 16 * 16 * 16 * 144),
        ("4", 2_320, 16 * 16 * 16 * 144), ("6", 435, 3 * 16 * 16 * 144)]
    code, out, _ = run_cli(capsys, "profile", "lwc_tiny:build", "--input", "1x3x16x16")
    assert code == 0 and "(outside leaf layers)" in out and "params 5.52k" in out


def test_profile_on_an_input_the_model_rejects_exits_1(capsys, workdir):
    code, out, err = run_cli(capsys, "profile", "lwc_tiny:build", "--input", "1x4x16x16")
    assert code == 1 and out == ""
    assert "lwcompile: error: profile: Sequential rejects the example input (1x4x16x16)" in err


def test_lighten_then_report_as_text_and_html(capsys, workdir):
    code, out, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "light.pt",
                             "--input", "1x3x16x16")
    assert code == 0, err
    assert "saved to light.pt" in out and "lightening Sequential: done" in err
    light = persist.load(workdir / "light.pt", original=load_model("lwc_tiny:build"))
    assert [r.site for r in light.lwcompile_report.applied] == ["2", "4"]

    code, out, _ = run_cli(capsys, "report", "light.pt")
    assert code == 0 and "2 rewritten, 2 kept" in out

    code, out, err = run_cli(capsys, "report", "light.pt", "--html", "r.html",
                             "--teacher", "lwc_tiny:build", "--json")
    assert code == 0, err
    page = (workdir / "r.html").read_text()
    assert "<svg" in page and "lwcompile report: Sequential" in page
    if importlib.util.find_spec("skimage") is None:  # its camera is the default image
        assert json.loads(out)["crops"] == 0 and "scikit-image is not installed" in err
    else:
        assert json.loads(out)["crops"] == 3 and page.count("data:image/png;base64,") == 3
        assert "teacher (original)" in page and "student (lightened)" in page

    image = workdir / "patch.png"
    image.write_bytes(to_png(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0))))
    code, out, err = run_cli(capsys, "report", "light.pt", "--html", "r2.html", "--image",
                             "patch.png", "--original", "lwc_tiny:build", "--json")
    assert code == 0, err
    assert json.loads(out)["crops"] == 2  # input and student: no teacher given
    code, out, _ = run_cli(capsys, "report", "light.pt", "--html", "r3.html", "--no-crops",
                           "--json")
    assert json.loads(out)["crops"] == 0
    assert "data:image/png" not in (workdir / "r3.html").read_text()


def test_distill_option_calls_lwcompile_distill(capsys, workdir, monkeypatch):
    calls = []

    def distill(student, teacher, data, steps):
        calls.append((type(teacher).__name__, data, steps))
        with torch.no_grad():
            student.get_submodule("6").bias.fill_(0.5)  # visible in the saved file
        print("distill progress")  # must not reach stdout: --json stays parseable
        return student

    monkeypatch.setattr(lwcompile, "distill", distill, raising=False)
    code, out, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "light.pt", "--input",
                             "1x3x16x16", "--distill", "3", "--data", "photos", "--json")
    assert code == 0, err
    assert calls == [("Sequential", "photos", 3)]
    assert json.loads(out)["distill_steps"] == 3 and "distill progress" in err
    light = persist.load(workdir / "light.pt", original=load_model("lwc_tiny:build"))
    assert torch.all(light.get_submodule("6").bias == 0.5)


def test_distill_for_real(capsys, workdir):
    """One real distillation step on a folder of one image changes the saved weights."""
    (workdir / "photos").mkdir()
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1))
    (workdir / "photos" / "a.png").write_bytes(to_png(image))
    for argv in (["-o", "plain.pt"], ["-o", "distilled.pt", "--distill", "1", "--data",
                                      "photos"]):
        code, _, err = run_cli(capsys, "lighten", "lwc_tiny:build", "--input", "1x3x16x16", *argv)
        assert code == 0, err
    original = load_model("lwc_tiny:build")
    plain = persist.load(workdir / "plain.pt", original=original).state_dict()
    distilled = persist.load(workdir / "distilled.pt", original=original).state_dict()
    assert plain.keys() == distilled.keys()
    assert any(not torch.equal(plain[k], distilled[k]) for k in plain)


@pytest.mark.slow  # ExecuTorch lowering
def test_export_writes_a_pte_that_executorch_runs(capsys, workdir):
    mobile = pytest.importorskip("lwcompile.deploy.mobile")
    pytest.importorskip("executorch")
    code, out, err = run_cli(capsys, "lighten", "lwc_tiny:build", "--input", "1x3x16x16",
                             "-o", "light.pt")
    assert code == 0, err
    code, out, err = run_cli(capsys, "export", "light.pt", "--original", "lwc_tiny:build",
                             "-o", "light.pte", "--input", "1x3x16x16", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["runtime"] == "executorch-xnnpack"
    assert result["export"]["report"]["op_share"] == 1.0  # every op on XNNPACK
    x = torch.rand(1, 3, 16, 16)
    (got,) = mobile.load_pte(workdir / "light.pte")(x)
    with torch.no_grad():
        close(got, persist.load(workdir / "light.pt", original=load_model("lwc_tiny:build"))(x))


def test_export_onnx_keeps_height_and_width_free(capsys, workdir):
    ort = pytest.importorskip("onnxruntime")
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "--onnx", "-o", "tiny.model",
                             "--input", "1x3x16x16")
    assert code == 0, err
    assert "height and width dynamic; torchscript exporter)" in out
    session = ort.InferenceSession(str(workdir / "tiny.model"),
                                   providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        expected = load_model("lwc_tiny:build")(x)
    close(torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0]), expected)


def test_export_int8_onnx_reports_its_measured_error(capsys, workdir):
    ort = pytest.importorskip("onnxruntime")
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "tiny.onnx", "--input",
                             "1x3x16x16", "--precision", "int8", "--json")
    assert code == 0, err
    result = json.loads(out)["export"]
    assert result["precision"] == "int8" and result["int8"]["calibration_count"] == 8
    assert result["exporter"] == "torchscript"
    assert result["int8"]["psnr_db"] > 20
    session = ort.InferenceSession(str(workdir / "tiny.onnx"),
                                   providers=["CPUExecutionProvider"])
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load(str(workdir / "tiny.onnx")).graph.node}
    assert "QuantizeLinear" in ops
    assert session.run(None, {"input_0": torch.rand(1, 3, 16, 16).numpy()})[0].shape[1] == 3
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "bad.onnx", "--input",
                             "1x3x16x16", "--precision", "int8", "--min-psnr", "500")
    assert code == 1 and "min_psnr=500" in err and not (workdir / "bad.onnx").exists()
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "x.onnx",
                             "--calibration", "photos")
    assert code == 2 and "only used with --precision int8" in err


def test_export_int8_qat_steps_measures_the_fine_tuned_weights_too(capsys, workdir):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torchao")
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "tiny.onnx", "--input",
                             "1x3x16x16", "--precision", "int8", "--qat-steps", "3", "--json")
    assert code == 0, err
    measured = json.loads(out)["export"]["int8"]["calibration_psnr_db"]
    assert len(measured) == 4 and "learned in QAT" in measured
    assert sum(name.endswith(" after QAT") for name in measured) == 1
    code, _, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "x.onnx", "--qat-steps",
                           "3")
    assert code == 2 and "--qat-steps are only used with --precision int8" in err
    code, _, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "y.onnx", "--input",
                           "1x3x16x16", "--precision", "int8", "--qat-steps", "-2")
    assert code == 1 and "qat_steps must be an int >= 0" in err
    assert not (workdir / "x.onnx").exists() and not (workdir / "y.onnx").exists()


def test_export_needs_a_runtime_it_can_tell(capsys, workdir):
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "tiny.bin")
    assert code == 2 and "cannot tell the runtime from 'tiny.bin'" in err and out == ""
    assert not (workdir / "tiny.bin").exists()


def test_export_tune_times_the_forms_and_reports_them(capsys, workdir):
    ort = pytest.importorskip("onnxruntime")
    code, _, err = run_cli(capsys, "lighten", "lwc_tiny:build", "--input", "1x3x16x16",
                           "-o", "light.safetensors")
    assert code == 0, err
    code, out, err = run_cli(capsys, "export", "light.safetensors", "--original",
                             "lwc_tiny:build", "-o", "tuned.onnx", "--input", "1x3x16x16",
                             "--tune", "--json")
    assert code == 0, err
    result = json.loads(out)
    tune = result["tune"]
    assert tune["target"] == "onnxruntime" and tune["precision"] == "fp32"
    # the two 16->16 convs became LISTs alike: one group, one form
    assert [(s["site"], s["group"]) for s in tune["sites"]] == [("2", 0), ("4", 0)]
    assert tune["sites"][0]["form_after"] == tune["sites"][1]["form_after"]
    assert result["export"]["precision"] == "fp32"
    session = ort.InferenceSession(str(workdir / "tuned.onnx"),
                                   providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 16, 16)
    light = persist.load(workdir / "light.safetensors", original=load_model("lwc_tiny:build"))
    with torch.no_grad():
        close(torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0]), light(x))


def test_precision_auto_needs_tune(capsys, workdir):
    code, out, err = run_cli(capsys, "export", "lwc_tiny:build", "-o", "t.onnx",
                             "--precision", "auto")
    assert code == 2 and "--precision auto needs --tune" in err and out == ""


def test_lighten_within_a_latency_budget_saves_the_chosen_widths(capsys, workdir):
    code, out, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "wide.safetensors",
                             "--input", "1x3x16x16", "--budget-ms", "1e6", "--target",
                             "torch", "--json")
    assert code == 0, err
    tune = json.loads(out)["tune"]
    assert tune["exact"] and tune["budget_ms"] == 1e6
    assert {(s["squeeze_before"], s["squeeze_after"]) for s in tune["sites"]} == {(4, 8)}
    light = persist.load(workdir / "wide.safetensors", original=load_model("lwc_tiny:build"))
    assert [light.get_submodule(s).squeeze.out_channels for s in ("2", "4")] == [8, 8]

    code, _, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "x.safetensors",
                           "--input", "1x3x16x16", "--budget-ms", "1e-6", "--target", "torch")
    assert code != 0 and "out of reach" in err and not (workdir / "x.safetensors").exists()
    code, _, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "y.safetensors",
                           "--budget-ms", "nan")
    assert code == 2 and "'nan' is not a positive number" in err
    code, _, err = run_cli(capsys, "lighten", "lwc_tiny:build", "-o", "z.safetensors",
                           "--target", "torch")
    assert code == 2 and "--target and --precision are only used with --budget-ms" in err
