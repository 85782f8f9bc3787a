"""``lwcompile distill`` and ``lwcompile eval`` on a tiny denoiser, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lwcompile.cli import main

TINY = '''
import torch
from examples.dncnn import DnCNN

def build():
    torch.manual_seed(0)
    return DnCNN(features=16, depth=4).eval()
'''

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``lwcompile ARGV`` in-process: the exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Path:
    (tmp_path / "lwc_tiny_denoiser.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    for folder, n, size in (("train", 3, (40, 48)), ("val", 2, (36, 36))):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray((rng.random(size) * 255).astype(np.uint8)).save(
                tmp_path / folder / f"{i}.png")
    code, _, err = run_cli(capsys, "lighten", "lwc_tiny_denoiser:build", "-o", "light.safetensors",
                           "-q")
    assert code == 0, err
    return tmp_path


def test_distill_then_eval(workdir, capsys):
    base = ["distill", "light.safetensors", "--teacher", "lwc_tiny_denoiser:build", "--data",
            "train", "--noise", "25", "--crop", "24", "--batch-size", "4", "-o",
            "out.safetensors", "-q"]
    code, out, err = run_cli(capsys, *base, "--steps", "4", "--val", "val", "--val-every", "2",
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [v["step"] for v in result["validation"]] == [2, 4]
    assert (workdir / "out.safetensors").is_file() and (workdir / "out.best.pt").is_file()
    assert (workdir / "out.run.pt").is_file()
    # an existing run is not overwritten without --resume; --resume continues it
    code, _, err = run_cli(capsys, *base, "--steps", "6")
    assert code == 1 and "--resume" in err
    code, out, err = run_cli(capsys, *base, "--steps", "6", "--resume", "--json")
    assert code == 0, err
    import torch

    assert torch.load(workdir / "out.run.pt", weights_only=True)["step"] == 6

    code, out, err = run_cli(capsys, "eval", "out.safetensors", "--teacher",
                             "lwc_tiny_denoiser:build", "--data", "val", "--noise", "25",
                             "--json")
    assert code == 0, err
    scores = json.loads(out)
    assert scores["images"] == 2 and set(scores["scores"]) == {"input", "teacher", "model"}
    assert len(scores["scores"]["model"]["per_image"]) == 2
    code, out, err = run_cli(capsys, "eval", "out.safetensors", "--teacher",
                             "lwc_tiny_denoiser:build", "--data", "val", "--noise", "25")
    assert code == 0 and "model vs teacher" in out


def test_bad_device_and_missing_degradation_are_refusals(workdir, capsys):
    code, _, err = run_cli(capsys, "distill", "light.safetensors", "--teacher",
                           "lwc_tiny_denoiser:build", "--data", "train", "--noise", "25",
                           "--device", "cuda:3", "-o", "o.safetensors", "--steps", "1", "-q")
    import torch

    if not torch.cuda.is_available():
        assert code == 1 and "cuda" in err
    code, _, err = run_cli(capsys, "eval", "light.safetensors", "--teacher",
                           "lwc_tiny_denoiser:build", "--data", "val")
    assert code == 1 and "--noise" in err
    code, _, err = run_cli(capsys, "eval", "light.safetensors", "--teacher",
                           "lwc_tiny_denoiser:build", "--data", "empty_missing", "--noise", "5")
    assert code == 1 and "not a folder" in err


def test_ground_truth_flag_reaches_distill(workdir, capsys):
    base = ["distill", "light.safetensors", "--teacher", "lwc_tiny_denoiser:build", "--data",
            "train", "--noise", "25", "--crop", "24", "--batch-size", "4", "--steps", "2",
            "-q"]
    code, _, err = run_cli(capsys, *base, "-o", "gt.safetensors", "--ground-truth", "0.5")
    assert code == 0, err
    assert (workdir / "gt.safetensors").is_file()
    code, _, err = run_cli(capsys, *base, "-o", "bad.safetensors", "--ground-truth", "2")
    assert code == 1 and "ground_truth must be a weight in [0, 1]" in err
    assert not (workdir / "bad.safetensors").exists()
