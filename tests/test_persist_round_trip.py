"""Data-only model files rebuild exactly: the four reference networks, an ESRGAN checkpoint
identified by spandrel, and a model lightened with a user's own rule (torch.equal outputs)."""

from __future__ import annotations

import json
import sys
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


NEW_BUILTIN = '''
from dataclasses import dataclass

from torch import nn

from lwcompile import Match, NoMatch, Rule


@dataclass
class PointwiseThenFiveByFive(Rule):
    """A stand-in for a built-in rule added after this test was written."""

    name = "test-new-builtin"
    priority = 10
    mid: int = 4

    def match(self, site):
        conv = site.module
        if type(conv) is not nn.Conv2d or conv.kernel_size != (5, 5) or conv.groups != 1:
            return NoMatch("not a 5x5 conv")
        return Match(site)

    def build(self, match):
        conv = match.site.module
        return nn.Sequential(nn.Conv2d(conv.in_channels, self.mid, 1),
                             nn.Conv2d(self.mid, conv.out_channels, 5, padding=2))
'''


def test_any_rule_of_the_builtin_package_replays_by_name(tmp_path, monkeypatch):
    """Built-in rules are found by scanning lwcompile/rules, so a rule added there replays
    without being listed anywhere (here: a module put on the package's path)."""
    from lwcompile import rules as package
    from lwcompile.deploy import rebuild

    folder = tmp_path / "more_rules"
    folder.mkdir()
    (folder / "zz_test_new_builtin.py").write_text(NEW_BUILTIN)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    rebuild.builtin_rule_classes.cache_clear()
    try:
        import importlib

        module = importlib.import_module("lwcompile.rules.zz_test_new_builtin")
        rule = module.PointwiseThenFiveByFive(mid=6)
        light = lwcompile.lighten(FiveByFiveNet(), (torch.rand(1, 3, 16, 16),),
                                  rules=[rule, *lwcompile.default_rules()])
        path = lwcompile.save(light, tmp_path / "new.safetensors")
        entry = next(r for r in lwcompile.info(path)["plan"]["rules"]
                     if r["name"] == "test-new-builtin")
        assert entry["builtin"] is True and entry["params"] == {"mid": 6}
        assert {r.name for r in lwcompile.default_rules()} <= set(rebuild.builtin_rule_classes())
        loaded = lwcompile.load(path, original=FiveByFiveNet())  # no rules passed
        assert loaded.get_submodule("mid")[0].out_channels == 6
        assert_same_model(loaded, light, (torch.rand(1, 3, 9, 9),))
    finally:
        rebuild.builtin_rule_classes.cache_clear()
        sys.modules.pop("lwcompile.rules.zz_test_new_builtin", None)
