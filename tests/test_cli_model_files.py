"""The command line with data-only model files: lighten -o X.safetensors, report without the
original, export and profile with --original, convert of a pickle file with --trust-pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lwcompile
from lwcompile.cli import main
from lwcompile.cli.loading import load_model
from tests.helpers import close
from tests.test_persist_round_trip import esrgan_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 3, 3, padding=1))\n")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding ``lwc_files_tiny.py`` (the factory ``lwc_files_tiny:build``)."""
    (tmp_path / "lwc_files_tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_lighten_report_profile_export(capsys, workdir):
    ort = pytest.importorskip("onnxruntime")
    code, out, err = run_cli(capsys, "lighten", "lwc_files_tiny:build", "-o", "light.safetensors",
                             "--input", "1x3x16x16")
    assert code == 0, err
    assert "saved to light.safetensors (weights and plan; load it with --original " \
           "lwc_files_tiny:build)" in out
    header = lwcompile.info(workdir / "light.safetensors")
    assert header["plan"]["original"]["source"] == "lwc_files_tiny:build"

    code, out, err = run_cli(capsys, "report", "light.safetensors")  # no original needed
    assert code == 0 and "2 rewritten, 2 kept" in out, err

    code, out, err = run_cli(capsys, "profile", "light.safetensors")
    assert code == 1 and out == ""
    assert ("its author says it was made from 'lwc_files_tiny:build' (a name lwcompile never "
            "imports or loads from a file: pass --original lwc_files_tiny:build yourself if you "
            "trust it)") in err

    code, out, err = run_cli(capsys, "profile", "light.safetensors", "--original",
                             "lwc_files_tiny:build", "--input", "1x3x16x16", "--json")
    assert code == 0, err
    original = load_model("lwc_files_tiny:build")
    light = lwcompile.load(workdir / "light.safetensors", original=original)
    assert json.loads(out)["profile"]["params"] == lwcompile.count_params(light)

    code, out, err = run_cli(capsys, "export", "light.safetensors", "--original",
                             "lwc_files_tiny:build", "-o", "light.onnx", "--input", "1x3x16x16")
    assert code == 0, err
    x = torch.rand(1, 3, 20, 12)
    session = ort.InferenceSession(str(workdir / "light.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        close(torch.from_numpy(got), light(x))


def test_convert_a_pickle_file(capsys, workdir):
    original = load_model("lwc_files_tiny:build")
    light = lwcompile.lighten(original, (torch.rand(1, 3, 16, 16),),
                              rule_params={"list": {"squeeze_ratio": 8}})
    lwcompile.save(light, workdir / "old.pt", format="pickle")
    argv = ["convert", "old.pt", "--original", "lwc_files_tiny:build", "-o", "new.safetensors",
            "--input", "1x3x16x16"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1 and "pass --trust-pickle" not in err and "trust=True" in err
    assert not (workdir / "new.safetensors").exists()
    code, _, err = run_cli(capsys, *argv, "--trust-pickle")  # rule parameters unknown: refused
    assert code == 1 and "the replacement at '2' (list) is built differently" in err, err
    assert "pass those lighten used" in err
    assert not (workdir / "new.safetensors").exists()
    plain = lwcompile.lighten(original, (torch.rand(1, 3, 16, 16),))
    lwcompile.save(plain, workdir / "old.pt", format="pickle")
    code, out, err = run_cli(capsys, *argv, "--trust-pickle")
    assert code == 0, err
    assert "wrote new.safetensors: Sequential, 2 rewritten sites replayed and checked" in out
    loaded = lwcompile.load(workdir / "new.safetensors", original=original)
    x = torch.rand(1, 3, 9, 14)
    with torch.no_grad():
        assert torch.equal(loaded(x), plain(x))


def test_an_esrgan_checkpoint_end_to_end(capsys, workdir):
    ort = pytest.importorskip("onnxruntime")
    esrgan_checkpoint(workdir / "esrgan.pth")
    code, _, err = run_cli(capsys, "lighten", "esrgan.pth", "-o", "light.safetensors",
                           "--input", "1x3x16x16")
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", "light.safetensors", "--original", "esrgan.pth",
                           "-o", "light.onnx", "--input", "1x3x16x16")
    assert code == 0, err
    light = lwcompile.load(workdir / "light.safetensors", original=load_model("esrgan.pth"))
    x = torch.rand(1, 3, 12, 20)
    session = ort.InferenceSession(str(workdir / "light.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        close(torch.from_numpy(got), light(x))
    assert got.shape == (1, 3, 24, 40)
