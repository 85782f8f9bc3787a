"""Data-only model files rebuild exactly: the four reference networks, an ESRGAN checkpoint
identified by spandrel, and a model lightened with a user's own rule (torch.equal outputs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lwcompile
from examples.custom_rules import FiveByFiveToTwoThreeByThree
from lwcompile.cli.loading import load_model
from lwcompile.cli.spandrel import torchvision_stub
from tests import lightened

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_model(loaded: nn.Module, light: nn.Module, inputs: tuple) -> None:
    assert loaded.state_dict().keys() == light.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 light.state_dict().values(), strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), light(*inputs))


@pytest.mark.parametrize("name", lightened.NAMES)
def test_reference_networks_round_trip_exactly(name, tmp_path):
    light = lightened.light(name)
    path = lwcompile.save(light, tmp_path / f"{name}.safetensors")
    assert set(load_file(path)) == set(light.state_dict())
    torch.manual_seed(1)  # the original's own weights differ from the lightened ones: unused
    original = lightened.CASES[name][0]()
    loaded = lwcompile.load(path, original=original)
    assert_same_model(loaded.eval(), light.eval(), lightened.other_inputs(name))
    as_json = json.loads(json.dumps(light.lwcompile_report.to_dict()))  # tuples are lists
    assert loaded.lwcompile_report.to_dict() == as_json


def esrgan_checkpoint(path: Path) -> None:
    """A small ESRGAN (RRDBNet: 16 features, 1 RRDB block, x2) saved as a plain state dict,
    the way released checkpoints are; spandrel identifies it from the keys alone."""
    try:
        with torchvision_stub():
            from spandrel.architectures.ESRGAN import ESRGAN
    except ImportError as exc:
        pytest.skip(f"spandrel is not installed: {exc}")
    torch.manual_seed(0)
    torch.save(ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2).state_dict(),
               path)


def test_an_esrgan_checkpoint_round_trips_through_spandrel(tmp_path):
    checkpoint = tmp_path / "esrgan.pth"
    esrgan_checkpoint(checkpoint)
    light = lwcompile.lighten(load_model(str(checkpoint)), (torch.rand(1, 3, 16, 16),))
    path = lwcompile.save(light, tmp_path / "esrgan_light.safetensors", source=str(checkpoint))
    loaded = lwcompile.load(path, original=load_model(str(checkpoint)))
    assert type(loaded).__name__ == "RRDBNet"
    assert_same_model(loaded, light, (torch.rand(1, 3, 12, 20),))


class FiveByFiveNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.mid = nn.Conv2d(16, 16, 5, padding=2)
        self.tail = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(torch.relu(self.mid(torch.relu(self.head(x)))))


def test_a_users_rule_replays_only_when_passed(tmp_path):
    rules = [FiveByFiveToTwoThreeByThree(mid_channels=8), *lwcompile.default_rules()]
    light = lwcompile.lighten(FiveByFiveNet(), (torch.rand(1, 3, 16, 16),), rules=rules)
    assert [(r.site, r.decided_by) for r in light.lwcompile_report.applied] == [
        ("mid", "5x5-to-2x3x3")]
    path = lwcompile.save(light, tmp_path / "custom.safetensors")
    entry = next(r for r in lwcompile.info(path)["plan"]["rules"] if r["name"] == "5x5-to-2x3x3")
    assert entry == {"name": "5x5-to-2x3x3", "builtin": False, "params": {"mid_channels": 8},
                     "class": "examples.custom_rules:FiveByFiveToTwoThreeByThree"}
    with pytest.raises(lwcompile.UnknownRuleError, match="'5x5-to-2x3x3' \\(examples.custom_"
                       "rules:FiveByFiveToTwoThreeByThree\\), a rule of your own that lwcompile "
                       "never imports from a name in a file: pass it"):
        lwcompile.load(path, original=FiveByFiveNet())
    # the recorded parameter (8 middle channels) configures the rule passed with defaults
    loaded = lwcompile.load(path, original=FiveByFiveNet(), rules=[FiveByFiveToTwoThreeByThree()])
    assert loaded.get_submodule("mid")[0].out_channels == 8
    assert_same_model(loaded, light, (torch.rand(2, 3, 11, 13),))
