"""Saving and loading lightened models: round trip, refusal of bad files, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile.deploy import persist
from lwcompile.deploy.persist import PersistError, SaveFileError, WrongArchitectureError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def light() -> nn.Module:
    torch.manual_seed(0)
    return lwcompile.lighten(dncnn.DnCNN(features=32, depth=5), (torch.rand(1, 1, 16, 16),))


@pytest.fixture
def saved(light: nn.Module, tmp_path: Path) -> Path:
    return persist.save(light, tmp_path / "light.pt")


def test_round_trip_gives_identical_outputs_and_report(light, saved):
    code = light.code
    loaded = persist.load(saved)
    assert light.code == code  # saving left the model as it was
    assert type(loaded).__name__ == "DnCNN" and isinstance(loaded, torch.fx.GraphModule)
    x = torch.rand(2, 1, 23, 31)  # another size than the example input
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
    assert loaded.state_dict().keys() == light.state_dict().keys()
    assert loaded.lwcompile_report.to_dict() == light.lwcompile_report.to_dict()
    assert [type(m).__name__ for m in loaded.body.children()].count("LIST") == 3


def test_the_loaded_model_trains(saved):
    loaded = persist.load(saved)
    loaded(torch.rand(1, 1, 8, 8)).square().mean().backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_header_describes_the_file(light, saved):
    header = persist.info(saved)
    assert header["class_name"] == "DnCNN"
    assert header["params"] == lwcompile.count_params(light) == 2_664
    assert header["torch_version"] == torch.__version__
    assert header["report"]["summary"]["params_after"] == 2_664
    assert header["architecture"] == persist.architecture(light)
    assert header["payload_bytes"] + len(persist.MAGIC) < saved.stat().st_size


def test_nested_graph_modules_under_an_untraceable_root(tmp_path):
    model = PadToEight()
    light = lwcompile.lighten(model, (torch.rand(1, 3, 13, 10),))
    assert type(light) is PadToEight and isinstance(light.body, torch.fx.GraphModule)
    loaded = persist.load(persist.save(light, tmp_path / "pad.pt"))
    assert isinstance(loaded.body, torch.fx.GraphModule)
    x = torch.rand(1, 3, 9, 17)
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
    assert loaded.lwcompile_report.to_dict() == light.lwcompile_report.to_dict()


class PadToEight(nn.Module):
    """Shape-dependent padding at the root: only ``body`` becomes a GraphModule."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 8 or w % 8:
            x = F.pad(x, (0, -w % 8, 0, -h % 8), mode="reflect")
        return self.tail(self.body(self.head(x)))[..., :h, :w]


@pytest.mark.parametrize(("keep", "message"), [
    (0, "not an lwcompile save file \\(it is empty\\)"),
    (5, "not an lwcompile save file"),
    (len(persist.MAGIC) + 3, "truncated: the header is incomplete"),
    (200, "truncated or corrupt: the header is incomplete"),
    (-1, "truncated or corrupt: the model data is"),
])
def test_truncated_file_is_refused(saved, keep, message):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep])
    with pytest.raises(SaveFileError, match=message):
        persist.load(saved)


def test_flipped_byte_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(SaveFileError, match="sha256"):
        persist.load(saved)


@pytest.mark.parametrize("header", [b"[1, 2]", b"{not json", b'{"format": 1}'])
def test_malformed_header_is_refused(tmp_path, header):
    path = tmp_path / "odd.pt"
    path.write_bytes(persist.MAGIC + len(header).to_bytes(8, "big") + header + b"payload")
    with pytest.raises(SaveFileError, match="corrupt: unreadable header"):
        persist.load(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                     .to(torch.uint8).numpy().tobytes())
    with pytest.raises(SaveFileError, match="not an lwcompile save file"):
        persist.load(path)


def test_plain_state_dict_is_refused_with_a_hint(light, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(light.state_dict(), path)
    with pytest.raises(SaveFileError, match="plain torch.save file.*load_state_dict"):
        persist.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(SaveFileError, match="cannot read"):
        persist.load(tmp_path / "absent.pt")


def test_wrong_architecture_is_refused_before_unpickling(light, saved, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not run for a wrong architecture")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WrongArchitectureError, match="class_name 'DnCNN'.*'SRResNet'"):
        persist.load(saved, expected="SRResNet")
    with pytest.raises(WrongArchitectureError, match=r"params 2664 \(expected 37392\)"):
        persist.load(saved, expected={"params": 37_392})
    original = dncnn.DnCNN(features=32, depth=5)  # same class, not lightened
    with pytest.raises(WrongArchitectureError, match="params 2664 \\(expected 28416\\)"):
        persist.load(saved, expected=original)
    with pytest.raises(PersistError, match="unknown key 'layers'"):
        persist.load(saved, expected={"layers": 5})


def test_expected_architecture_accepts_the_right_one(light, saved):
    assert persist.load(saved, expected="DnCNN").lwcompile_report is not None
    assert persist.load(saved, expected={"class_name": "DnCNN", "params": 2_664}) is not None
    assert persist.load(saved, expected=light) is not None


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(lwcompile.NotAModuleError):
        persist.save({"weights": torch.ones(1)}, tmp_path / "x.pt")

    class Local(nn.Module):  # defined in a function: pickle cannot import it again
        def forward(self, x):
            return x

    with pytest.raises(SaveFileError, match="module level"):
        persist.save(Local(), tmp_path / "local.pt")
    with pytest.raises(SaveFileError, match="does not exist"):
        persist.save(nn.Conv2d(1, 1, 1), tmp_path / "no" / "such" / "dir.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("crash", ["replace", "fsync"])
def test_interrupted_save_keeps_the_previous_file(light, saved, monkeypatch, crash):
    """A crash while writing (here: a power cut simulated in fsync or the rename) leaves the
    previous save readable and no temporary file behind."""
    before = saved.read_bytes()
    other = nn.Sequential(nn.Conv2d(1, 4, 3))

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(os, crash, power_cut)
    with pytest.raises(KeyboardInterrupt):
        persist.save(other, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(persist.load(saved)(x), light(x))


def test_failing_rename_is_a_save_error(saved, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SaveFileError, match="No space left"):
        persist.save(nn.Conv2d(1, 1, 1), saved)
    monkeypatch.undo()
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    assert persist.info(saved)["class_name"] == "DnCNN"


def test_overwrite_replaces_the_file(saved):
    persist.save(nn.Conv2d(1, 2, 3), saved)
    loaded = persist.load(saved, expected="Conv2d")
    assert loaded.weight.shape == (2, 1, 3, 3)
    assert persist.info(saved)["report"] is None
