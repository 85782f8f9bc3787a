"""Saving and loading lightened models as data-only files: round trip, the plan, refusal of
bad files and of replays that do not match, atomic writes, and the pickle format behind trust."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lwcompile
from examples import dncnn, srresnet
from lwcompile.deploy import persist, weights_file
from lwcompile.deploy.file_errors import (
    NotSavableError,
    OriginalNeededError,
    PersistError,
    SaveFileError,
    UnknownRuleError,
    UntrustedFileError,
    WeightMismatchError,
    WrongArchitectureError,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_dncnn() -> nn.Module:
    return dncnn.DnCNN(features=32, depth=5)


@pytest.fixture(scope="module")
def light() -> nn.Module:
    torch.manual_seed(0)
    return lwcompile.lighten(small_dncnn(), (torch.rand(1, 1, 16, 16),))


@pytest.fixture
def saved(light: nn.Module, tmp_path: Path) -> Path:
    return persist.save(light, tmp_path / "light.safetensors", source="examples.dncnn:build")


def rewrite(path: Path, change) -> None:
    """Rewrite a saved file's header and tensors through ``change(header, tensors)``, with
    a valid sha256: what someone crafting a file can do."""
    data = path.read_bytes()
    header, _ = weights_file.read(path, data)
    tensors = weights_file.tensors(path, data)
    change(header, tensors)
    header.pop("data_sha256")
    weights_file.write(path, tensors, header)


def test_round_trip_gives_identical_outputs_and_report(light, saved):
    code = light.code
    loaded = persist.load(saved, original=small_dncnn())  # other random weights: unused
    assert light.code == code  # saving left the model as it was
    assert type(loaded).__name__ == "DnCNN" and isinstance(loaded, torch.fx.GraphModule)
    assert loaded.code == light.code
    x = torch.rand(2, 1, 23, 31)  # another size than the example input
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
    assert loaded.state_dict().keys() == light.state_dict().keys()
    assert loaded.lwcompile_report.to_dict() == light.lwcompile_report.to_dict()
    assert [type(m).__name__ for m in loaded.body.children()].count("LIST") == 3
    assert loaded.training == light.training


def test_the_file_is_plain_safetensors(light, saved):
    tensors = load_file(saved)  # the safetensors package alone
    state = light.state_dict()
    assert set(tensors) == set(state) and len(tensors) == 41
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    assert sum(t.numel() for k, t in tensors.items() if k in dict(light.named_parameters())) \
        == 2_664


def test_the_loaded_model_trains_and_saves_again(saved, tmp_path):
    loaded = persist.load(saved, original=small_dncnn())
    loaded.train()
    loaded(torch.rand(1, 1, 8, 8)).square().mean().backward()
    assert all(p.grad is not None for p in loaded.parameters())
    again = persist.save(loaded, tmp_path / "again.safetensors")
    assert persist.info(again)["plan"]["result"]["training"] is True
    assert persist.load(again, original=small_dncnn()).training is True


def test_header_describes_the_file(light, saved):
    header = persist.info(saved)
    assert header["format"] == "lwcompile-plan"
    assert header["class_name"] == "DnCNN"
    assert header["params"] == lwcompile.count_params(light) == 2_664
    assert header["torch_version"] == torch.__version__
    assert header["report"]["summary"]["params_after"] == 2_664
    assert header["architecture"] == persist.architecture(light)
    plan = header["plan"]
    assert plan["original"] == {**plan["original"], "class_name": "DnCNN", "params": 28_416,
                                "source": "examples.dncnn:build"}
    assert plan["original"]["tensors"]["body.2.weight"] == [32, 32, 3, 3]
    assert [(s["site"], s["rule"]) for s in plan["sites"]] == [
        ("body.2", "list"), ("body.5", "list"), ("body.8", "list")]
    assert [(v["site"], v["by"], v["outcome"]) for v in plan["vetoes"]] == [
        ("body.0", "image-boundary", "kept"), ("body.11", "image-boundary", "kept")]
    assert plan["inputs"] == {"args": [{"tensor": {"shape": [1, 1, 16, 16],
                                                   "dtype": "float32"}}], "kwargs": {}}
    assert [r["name"] for r in plan["rules"] if r["params"] is not None] == ["list"]
    assert plan["rules"][[r["name"] for r in plan["rules"]].index("list")]["builtin"] is True


def test_rule_parameters_replay(tmp_path):
    model = small_dncnn()
    light = lwcompile.lighten(model, (torch.rand(1, 1, 16, 16),),
                              rule_params={"list": {"squeeze_ratio": 8}})
    path = persist.save(light, tmp_path / "r8.safetensors")
    params = next(r for r in persist.info(path)["plan"]["rules"] if r["name"] == "list")
    assert params["params"]["squeeze_ratio"] == 8
    loaded = persist.load(path, original=model)
    assert lwcompile.count_params(loaded) == lwcompile.count_params(light) == 1_764  # not 2,664
    x = torch.rand(1, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))


def test_a_pt_name_still_holds_data_only(light, tmp_path):
    path = persist.save(light, tmp_path / "light.pt")
    assert persist.file_kind(path) == "safetensors" and load_file(path).keys()
    with pytest.raises(OriginalNeededError):
        persist.load(path)


def test_without_the_original_the_error_says_what_to_pass(saved):
    with pytest.raises(OriginalNeededError, match="a DnCNN \\(its author says: "
                       "'examples.dncnn:build'\\): pass it, lwcompile.load\\(path, "
                       "original=model\\)"):
        persist.load(saved)


def test_another_original_architecture_is_refused_naming_the_difference(saved, monkeypatch):
    monkeypatch.setattr(weights_file, "tensors", no_weights_loaded)
    with pytest.raises(WrongArchitectureError, match="made from a DnCNN .*a SRResNet"):
        persist.load(saved, original=srresnet.SRResNet(scale=2, features=8, blocks=1))
    with pytest.raises(WrongArchitectureError, match="tensor 'body.0.weight' is \\[32, 1, 3, "
                       "3\\] in the file, \\[16, 1, 3, 3\\] in the given model"):
        persist.load(saved, original=dncnn.DnCNN(features=16, depth=5))
    with pytest.raises(WrongArchitectureError, match="tensor 'body.11.weight' is \\[1, 32, 3, "
                       "3\\] in the file, \\[32, 32, 3, 3\\] in the given model"):
        persist.load(saved, original=dncnn.DnCNN(features=32, depth=6))


def no_weights_loaded(*args, **kwargs):
    raise AssertionError("a refused replay must not load any weight")


def test_a_rule_this_version_lacks_is_refused(saved, monkeypatch):
    def newer_rule(header, tensors):
        for entry in header["plan"]["rules"] + header["plan"]["sites"]:
            if entry.get("name", entry.get("rule")) == "list":
                entry["name" if "name" in entry else "rule"] = "list-v9"
        header["lwcompile_version"] = header["plan"]["lwcompile_version"] = "9.0"

    rewrite(saved, newer_rule)
    monkeypatch.setattr(weights_file, "tensors", no_weights_loaded)
    with pytest.raises(UnknownRuleError, match="rule 'list-v9', which this lwcompile does not "
                       "have \\(it was written by lwcompile 9.0\\): upgrade"):
        persist.load(saved, original=small_dncnn())


def test_unknown_rule_parameter_is_refused(saved):
    def extra(header, tensors):
        next(r for r in header["plan"]["rules"] if r["name"] == "list")["params"]["x"] = 1

    rewrite(saved, extra)
    with pytest.raises(UnknownRuleError, match="parameter 'x' of the rule 'list'"):
        persist.load(saved, original=small_dncnn())


@pytest.mark.parametrize(("change", "message"), [
    (lambda h, t: t.update({"body.2.conv.weight": torch.zeros(8, 8, 3, 3)}),
     "has tensor 'body.2.conv.weight'|'body.2.conv.weight'"),
    (lambda h, t: t.pop("body.3.bias"), "the rebuilt model has tensor 'body.3.bias', which "
     "the file lacks"),
    (lambda h, t: t.update({"body.3.bias": torch.zeros(31)}),
     "tensor 'body.3.bias' is \\[31\\] in the file, \\[32\\] in the rebuilt model"),
    (lambda h, t: h["plan"]["sites"][1].update(structure="0" * 16),
     "replacement at 'body.5' \\(list\\) is built differently"),
    (lambda h, t: h["plan"]["sites"].pop(1), "the file's tensor 'body.5.[a-z_.]+' \\[\\d+.*\\] is "
     "missing from the rebuilt model"),
])
def test_weights_that_do_not_fit_are_refused_before_loading(saved, monkeypatch, change,
                                                            message):
    rewrite(saved, change)
    monkeypatch.setattr(weights_file, "tensors", no_weights_loaded)
    with pytest.raises(WeightMismatchError, match=message):
        persist.load(saved, original=small_dncnn())


def test_half_precision_round_trip(light, tmp_path):
    try:
        half = persist.save(light.half(), tmp_path / "half.safetensors")
    finally:
        light.float()
    loaded = persist.load(half, original=small_dncnn())
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert all(torch.equal(a, b.half()) for a, b in zip(loaded.state_dict().values(),
                                                         light.state_dict().values(),
                                                         strict=True)
               if a.is_floating_point())


def test_tied_weights_are_stored_once():
    conv = nn.Conv2d(2, 2, 1)
    state = {"a.weight": conv.weight, "b.weight": conv.weight, "a.bias": conv.bias}
    tensors, aliases = persist._unshared(state)
    assert sorted(tensors) == ["a.bias", "a.weight"] and aliases == {"b.weight": "a.weight"}


def test_nested_graph_modules_under_an_untraceable_root(tmp_path):
    light = lwcompile.lighten(PadToEight(), (torch.rand(1, 3, 13, 10),))
    assert type(light) is PadToEight and isinstance(light.body, torch.fx.GraphModule)
    loaded = persist.load(persist.save(light, tmp_path / "pad.safetensors"),
                          original=PadToEight())
    assert type(loaded) is PadToEight and isinstance(loaded.body, torch.fx.GraphModule)
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
    (0, "not an lwcompile model file \\(it is empty\\)"),
    (5, "not an lwcompile model file"),
    (12, "truncated or corrupt: the safetensors header is incomplete"),
    (-1, "truncated or corrupt: the tensor data is"),
])
def test_truncated_file_is_refused(saved, keep, message):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep])
    with pytest.raises(SaveFileError, match=message):
        persist.load(saved, original=small_dncnn())


def test_flipped_byte_fails_the_checksum(saved):
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(SaveFileError, match="sha256"):
        persist.load(saved, original=small_dncnn())


@pytest.mark.parametrize(("change", "message"), [
    (lambda h: h.update(params="many"), "params is str, not int"),
    (lambda h: h["plan"].update(sites="all"), "plan.sites is str"),
    (lambda h: h["plan"]["sites"][0].pop("rule"), "plan.sites\\[0\\].rule is NoneType"),
    (lambda h: h["plan"].update(version=3), "plan version 3 is newer"),
    (lambda h: h["plan"]["sites"][0].update(params=[4]), "plan.sites\\[0\\].params is list"),
    (lambda h: h["plan"]["original"]["tensors"].update(x=["a"]), "tensors\\['x'\\]\\[0\\]"),
    (lambda h: h.update(report=[1]), "report is list"),
])
def test_crafted_header_fields_are_refused(saved, change, message):
    rewrite(saved, lambda header, tensors: change(header))
    with pytest.raises(SaveFileError, match=f"corrupt: its lwcompile header is unreadable.*"
                       f"{message}"):
        persist.load(saved, original=small_dncnn())


def test_foreign_files_are_refused(light, tmp_path):
    plain = tmp_path / "state.pt"
    torch.save(light.state_dict(), plain)
    with pytest.raises(SaveFileError, match="plain torch.save file.*load_state_dict"):
        persist.load(plain)
    checkpoint = tmp_path / "checkpoint.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, checkpoint)
    with pytest.raises(SaveFileError, match="safetensors file, but not one lwcompile wrote"):
        persist.load(checkpoint)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                      .to(torch.uint8).numpy().tobytes())
    with pytest.raises(SaveFileError, match="not an lwcompile model file"):
        persist.load(noise)
    with pytest.raises(SaveFileError, match="cannot read"):
        persist.load(tmp_path / "absent.pt")


def test_expected_architecture_is_checked_first(light, saved, monkeypatch):
    monkeypatch.setattr(weights_file, "tensors", no_weights_loaded)
    with pytest.raises(WrongArchitectureError, match="class_name 'DnCNN'.*'SRResNet'"):
        persist.load(saved, original=small_dncnn(), expected="SRResNet")
    with pytest.raises(WrongArchitectureError, match=r"params 2664 \(expected 37392\)"):
        persist.load(saved, original=small_dncnn(), expected={"params": 37_392})
    with pytest.raises(PersistError, match="unknown key 'layers'"):
        persist.load(saved, expected={"layers": 5})
    monkeypatch.undo()
    assert persist.load(saved, original=small_dncnn(), expected=light) is not None


def test_save_refuses_what_it_cannot_write_as_data(light, tmp_path):
    with pytest.raises(lwcompile.NotAModuleError):
        persist.save({"weights": torch.ones(1)}, tmp_path / "x.safetensors")
    with pytest.raises(NotSavableError, match="no lighten plan.*format='pickle'"):
        persist.save(nn.Conv2d(1, 1, 1), tmp_path / "conv.safetensors")
    edited = lwcompile.lighten(small_dncnn(), (torch.rand(1, 1, 16, 16),))
    squeeze = edited.body.get_submodule("2").squeeze
    channels, squeeze.out_channels = squeeze.out_channels, 7  # a hand edit after lighten
    with pytest.raises(NotSavableError, match="changed after lighten \\(the replacement at "
                       "'body.2' differs\\)"):
        persist.save(edited, tmp_path / "edited.safetensors")
    squeeze.out_channels = channels
    edited.body.add_module("extra", nn.Conv2d(32, 1, 1))
    with pytest.raises(NotSavableError, match="names or shapes differ"):
        persist.save(edited, tmp_path / "edited.safetensors")
    with pytest.raises(SaveFileError, match="does not exist"):
        persist.save(light, tmp_path / "no" / "such" / "dir.safetensors")
    with pytest.raises(lwcompile.ArgumentError, match="format must be one of"):
        persist.save(light, tmp_path / "x.onnx", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_the_pickle_format_loads_only_with_trust(light, tmp_path, monkeypatch):
    path = persist.save(light, tmp_path / "old.pt", format="pickle")
    assert persist.file_kind(path) == "pickle" and persist.info(path)["class_name"] == "DnCNN"

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must not run without trust")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(UntrustedFileError, match="runs code chosen by whoever wrote it; .*"
                       "trust=True.*lwcompile convert OLD --original MODEL --trust-pickle"):
        persist.load(path)
    with pytest.raises(UntrustedFileError):
        persist.load(path, original=small_dncnn(), trust="yes")
    with pytest.raises(WrongArchitectureError, match="class_name 'DnCNN'.*'SRResNet'"):
        persist.load(path, expected="SRResNet", trust=True)
    monkeypatch.undo()
    loaded = persist.load(path, trust=True)
    x = torch.rand(1, 1, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
    assert loaded.lwcompile_report.to_dict() == light.lwcompile_report.to_dict()


def test_pickle_format_truncation_and_checksum(light, tmp_path):
    path = persist.save(light, tmp_path / "old.pt", format="pickle")
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(SaveFileError, match="truncated or corrupt: the model data is"):
        persist.load(path, trust=True)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(SaveFileError, match="sha256"):
        persist.info(path)


@pytest.mark.parametrize("crash", ["replace", "fsync"])
def test_interrupted_save_keeps_the_previous_file(light, saved, monkeypatch, crash):
    """A crash while writing (here: a power cut simulated in fsync or the rename) leaves the
    previous save readable and no temporary file behind."""
    before = saved.read_bytes()

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(os, crash, power_cut)
    with pytest.raises(KeyboardInterrupt):
        persist.save(light, saved, source="another")
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    assert persist.info(saved)["plan"]["original"]["source"] == "examples.dncnn:build"


def test_failing_rename_is_a_save_error(light, saved, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(SaveFileError, match="No space left"):
        persist.save(light, saved)
    monkeypatch.undo()
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    assert persist.info(saved)["class_name"] == "DnCNN"


def test_info_never_needs_the_original(saved):
    header = persist.info(saved)
    assert json.loads(json.dumps(header)) == header  # plain JSON data


@pytest.mark.parametrize(("entry", "error", "message"), [
    ({"tensor": {"shape": [1, 1, 10**6, 10**6], "dtype": "float32"}}, lwcompile.ReplayError,
     "not one to make \\(negative or too large\\)"),
    ({"tensor": {"shape": [1, 1, 16, 16], "dtype": "system"}}, lwcompile.ReplayError,
     "unknown dtype 'system'"),
    ({"tensor": {"shape": "all", "dtype": "float32"}}, SaveFileError,
     "its plan cannot be used \\(ValueError"),
    ({"unknown": "Mask"}, lwcompile.ReplayError, "included a Mask.*example_inputs"),
])
def test_crafted_example_inputs_are_refused(saved, monkeypatch, entry, error, message):
    rewrite(saved, lambda header, tensors: header["plan"]["inputs"].update(args=[entry]))
    monkeypatch.setattr(weights_file, "tensors", no_weights_loaded)
    with pytest.raises(error, match=message):
        persist.load(saved, original=small_dncnn())


def test_example_inputs_passed_to_load_replace_the_recorded_ones(light, saved):
    loaded = persist.load(saved, original=small_dncnn(), example_inputs=(torch.rand(1, 1, 16, 16),))
    x = torch.rand(1, 1, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
