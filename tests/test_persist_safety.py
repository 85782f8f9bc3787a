"""No code runs when a model file is loaded, by default: crafted files in every format
lwcompile has written (the pickle format with a recomputed sha256, a raw torch.save pickle,
a .safetensors whose metadata names code to import) run nothing through the library or the
command line, and a normal load works with unrestricted unpickling made to raise."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.cli import main
from lwcompile.deploy import persist, pickle_file, weights_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("import torch\nfrom torch import nn\n\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),\n"
        "                         nn.Conv2d(16, 3, 3, padding=1))\n")


class RunsCode:
    """Unpickled, it writes a marker file: what an attacker's pickle would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding ``lwc_safe_tiny.py`` (the factory ``lwc_safe_tiny:build``)."""
    (tmp_path / "lwc_safe_tiny.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 3, 3, padding=1))


@pytest.fixture(scope="module")
def light() -> nn.Module:
    return lwcompile.lighten(tiny(), (torch.rand(1, 3, 16, 16),))


def cli(*argv: str) -> int:
    return main([*argv, "-q"])


def test_the_marker_payload_really_runs_code(tmp_path):
    """The payload used below does run code when unpickled: the tests that follow can fail."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))
    assert marker.read_text() == "code ran"


def test_a_crafted_pickle_format_file_runs_nothing(light, workdir, capsys):
    marker = workdir / "ran"
    path = persist.save(light, workdir / "evil.pt", format="pickle")
    header, _ = pickle_file.read(path, path.read_bytes())
    payload = pickle.dumps(RunsCode(marker))
    header.update(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    head = json.dumps(header).encode()
    path.write_bytes(pickle_file.MAGIC + len(head).to_bytes(8, "big") + head + payload)
    assert lwcompile.info(path)["class_name"] == "Sequential"  # the header checks pass
    for call in (lambda: lwcompile.load(path), lambda: lwcompile.load(path, original=tiny()),
                 lambda: lwcompile.convert(path, workdir / "new.safetensors", tiny())):
        with pytest.raises(lwcompile.UntrustedFileError, match="runs code chosen by whoever"):
            call()
    assert cli("report", "evil.pt") == 0  # the table is in the header: nothing unpickled
    for argv in (["export", "evil.pt", "-o", "evil.onnx"], ["profile", "evil.pt"],
                 ["report", "evil.pt", "--html", "r.html"],
                 ["convert", "evil.pt", "--original", "lwc_safe_tiny:build", "-o", "n.pt"]):
        assert cli(*argv) == 1, argv
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (workdir / "n.pt").exists()


def test_a_raw_torch_save_pickle_runs_nothing(workdir, capsys):
    marker = workdir / "ran"
    for name in ("evil.pt", "evil.pth"):
        torch.save(RunsCode(marker), workdir / name)
        with pytest.raises(lwcompile.SaveFileError, match="plain torch.save file"):
            lwcompile.load(workdir / name)
        with pytest.raises(lwcompile.SaveFileError):
            lwcompile.info(workdir / name)
        for argv in (["lighten", name, "-o", "out.safetensors"], ["profile", name],
                     ["export", name, "-o", "out.onnx"], ["report", name]):
            assert cli(*argv) == 1, argv
    err = capsys.readouterr().err
    assert "cannot be read as tensors only" in err and "Traceback" not in err
    assert not marker.exists()


def test_crafted_safetensors_metadata_imports_nothing(light, workdir, capsys):
    """A plan naming code (a rule class, the original's spec) is data: nothing is imported."""
    marker = workdir / "ran"
    (workdir / "lwc_evil_rules.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                               "def build():\n    return None\n")
    path = persist.save(light, workdir / "evil.safetensors")
    data = path.read_bytes()
    header, _ = weights_file.read(path, data)
    tensors = weights_file.tensors(path, data)
    for rule in header["plan"]["rules"]:
        if rule["name"] == "list":
            rule.update({"builtin": False, "class": "lwc_evil_rules:Rule"})
    header["plan"]["original"]["source"] = "lwc_evil_rules:build"
    header.pop("data_sha256")
    weights_file.write(path, tensors, header)
    with pytest.raises(lwcompile.UnknownRuleError, match="lwc_evil_rules:Rule.*pass it"):
        lwcompile.load(path, original=tiny())
    with pytest.raises(lwcompile.OriginalNeededError, match="lwc_evil_rules:build"):
        lwcompile.load(path)
    assert cli("export", "evil.safetensors", "-o", "evil.onnx") == 1
    err = capsys.readouterr().err
    assert "its author says it was made from 'lwc_evil_rules:build'" in err
    assert "never imports or loads from a file" in err
    assert cli("export", "evil.safetensors", "--original", "lwc_safe_tiny:build",
               "-o", "evil.onnx") == 1
    assert "a rule of your own" in capsys.readouterr().err
    assert cli("report", "evil.safetensors") == 0
    assert "lwc_evil_rules" not in sys.modules and not marker.exists()


def test_a_normal_load_never_unpickles(light, workdir, monkeypatch, capsys):
    path = persist.save(light, workdir / "light.safetensors", source="lwc_safe_tiny:build")

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during a data-only load")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = lwcompile.load(path, original=tiny())
    x = torch.rand(1, 3, 10, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
    assert cli("report", "light.safetensors") == 0
    assert cli("profile", "light.safetensors", "--original", "lwc_safe_tiny:build") == 0
    capsys.readouterr()


def test_a_damaged_or_foreign_file_through_the_cli(light, workdir, capsys):
    path = persist.save(light, workdir / "light.safetensors")
    path.write_bytes(path.read_bytes()[:-7])
    assert cli("export", "light.safetensors", "--original", "lwc_safe_tiny:build",
               "-o", "x.onnx") == 1
    assert "light.safetensors is truncated or corrupt" in capsys.readouterr().err
    (workdir / "junk.bin").write_bytes(io.BytesIO(b"\x00" * 64).getvalue())
    assert cli("report", "junk.bin") == 1
    assert "junk.bin is not an lwcompile model file" in capsys.readouterr().err
