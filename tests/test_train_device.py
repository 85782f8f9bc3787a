"""Where training runs and in what precision: device checks, bf16 autocast on the CPU,
checkpoints that hold CPU tensors only, the process-group backend per device."""

from __future__ import annotations

import copy

import pytest
import torch

from lwcompile.errors import ArgumentError
from lwcompile.train.checkpoint import read_checkpoint
from lwcompile.train.data import add_noise
from lwcompile.train.device import (
    amp_dtype,
    model_device,
    process_group_backend,
    resolve_device,
    to_cpu,
)
from lwcompile.train.distill import distill
from lwcompile.train.layerwise import init_layerwise
from tests.helpers import small_dncnn_and_light

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return small_dncnn_and_light()


def test_the_default_device_is_the_students_and_a_missing_one_is_refused(pair):
    teacher, light = pair
    assert model_device(light) == torch.device("cpu")
    assert resolve_device("distill", None, light) == torch.device("cpu")
    assert resolve_device("distill", "cpu", light) == torch.device("cpu")
    with pytest.raises(ArgumentError, match="device"):
        resolve_device("distill", "not-a-device", light)
    if not torch.cuda.is_available():
        with pytest.raises(ArgumentError, match="no CUDA GPU"):
            distill(copy.deepcopy(light), teacher, steps=1, device="cuda")
        with pytest.raises(ArgumentError, match="no CUDA GPU"):
            init_layerwise(copy.deepcopy(light), teacher, device="cuda:1")


def test_amp_names_are_checked():
    cpu = torch.device("cpu")
    assert amp_dtype("distill", None, cpu) is None
    assert amp_dtype("distill", "bf16", cpu) is torch.bfloat16
    with pytest.raises(ArgumentError, match="fp16"):
        amp_dtype("distill", "fp16", cpu)  # CPU autocast is bfloat16
    with pytest.raises(ArgumentError, match="amp"):
        amp_dtype("distill", "fp8", cpu)


def test_process_group_backend_follows_the_device():
    assert process_group_backend(torch.device("cuda", 0)) == "nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_bf16_autocast_trains_on_the_cpu_and_checkpoints_hold_cpu_tensors(pair, tmp_path):
    teacher, light = pair
    data = torch.rand(8, 1, 32, 32)
    student = copy.deepcopy(light)
    errors = init_layerwise(student, teacher, data, steps=5, block_steps=5, batch_size=4,
                            crop=24, degrade=add_noise(25), amp="bf16")
    assert errors and all(errors[s] < errors.before[s] for s in errors)
    before = copy.deepcopy(student.state_dict())
    distill(student, teacher, data, steps=3, batch_size=4, crop=24, degrade=add_noise(25),
            amp="bf16", progress=False, checkpoint=tmp_path / "run.pt", loss="mse")
    after = student.state_dict()
    assert all(after[k].dtype == before[k].dtype for k in before)  # weights stay float32
    assert any(not torch.equal(after[k], before[k]) for k in before if "running" not in k)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    state = read_checkpoint(tmp_path / "run.pt")
    tensors = [t for t in _leaves(state) if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert state["step"] == 3


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_to_cpu_keeps_structure():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": (torch.ones(1), "x")}
    moved = to_cpu(state)
    assert moved["b"][1] == 3 and moved["c"][1] == "x" and isinstance(moved["c"], tuple)
    torch.testing.assert_close(moved["a"], torch.ones(2))
