"""Misuse and unusual models: each gets a clear LwCompileError, or works as documented.

(Bad files, for ``load`` and the command line, are in test_persist.py and test_cli.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lwcompile
from examples import dncnn

pytestmark = pytest.mark.usefixtures("one_thread")


def small_dncnn(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return dncnn.DnCNN(in_channels=channels, features=32, depth=4)


@pytest.mark.parametrize("thing", ["model.pth", None, 42, {"weight": torch.ones(1)},
                                   torch.nn.functional.relu])
@pytest.mark.parametrize("entry", [lwcompile.lighten, lwcompile.plan])
def test_not_a_module(entry, thing):
    with pytest.raises(lwcompile.NotAModuleError, match="needs an nn.Module, got"):
        entry(thing)


def test_model_without_any_conv():
    model = nn.Sequential(nn.ReLU(), nn.Identity())
    with pytest.raises(lwcompile.ExampleInputError, match="no Conv2d to infer"):
        lwcompile.lighten(model)
    with pytest.raises(lwcompile.NothingToLighten, match="nothing to lighten in Sequential") \
            as caught:
        lwcompile.lighten(model, (torch.rand(1, 3, 8, 8),))
    assert caught.value.report.rows == []


@pytest.mark.parametrize(("conv", "shape"), [(nn.Conv1d, (1, 3, 32)),
                                             (nn.Conv3d, (1, 3, 6, 8, 8))])
def test_1d_and_3d_convs_are_not_rewritten(conv, shape):
    """The rules rewrite 2-D image convs only: other ranks are refused as a whole, clearly."""
    model = nn.Sequential(conv(3, 32, 3, padding=1), nn.ReLU(), conv(32, 32, 3, padding=1),
                          nn.ReLU(), conv(32, 3, 3, padding=1))
    with pytest.raises(lwcompile.ExampleInputError, match="no Conv2d"):
        lwcompile.lighten(model)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(lwcompile.NothingToLighten, match="no conv the rules apply to"):
        lwcompile.lighten(model, (torch.rand(*shape),))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("inputs", "message"), [
    ((torch.rand(1, 1, 16, 16),), r"rejects the example input \(1x1x16x16\).*3 channels"),
    ((torch.rand(16, 16),), r"rejects the example input \(16x16\)"),
    ((torch.rand(1, 3, 16, 16, dtype=torch.float64),), "Double"),
    ((torch.zeros(1, 3, 16, 16, dtype=torch.uint8),), "Byte"),
    ((5,), r"rejects the example input \(5\)"),
    ((torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)), "positional arguments"),
])
def test_example_inputs_of_the_wrong_shape_or_dtype(inputs, message):
    with pytest.raises(lwcompile.ExampleInputError, match=message):
        lwcompile.lighten(small_dncnn(), inputs)


def test_a_lone_tensor_counts_as_one_example_input():
    light = lwcompile.lighten(small_dncnn(), torch.rand(1, 3, 16, 16))
    assert [r.site for r in light.lwcompile_report.applied] == ["body.2", "body.5"]


def test_model_in_train_mode_stays_in_train_mode_and_bn_stats_do_not_move():
    model = small_dncnn().train()
    state = copy.deepcopy(model.state_dict())
    light = lwcompile.lighten(model, (torch.rand(2, 3, 16, 16),))
    assert model.training and light.training
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # running stats and batch counters too
        assert torch.equal(state[key], value), key
    bn = next(m for m in light.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0
    assert [r.site for r in light.lwcompile_report.applied] == ["body.2", "body.5"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_with_a_float32_input_is_a_clear_error(dtype):
    model = small_dncnn().to(dtype)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(lwcompile.ExampleInputError, match="expected scalar type Float"):
        lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),))  # float32 input, half model
    assert all(torch.equal(state[k], v) and v.dtype == state[k].dtype
               for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_is_lightened_in_its_dtype(dtype):
    model = small_dncnn().to(dtype)
    light = lwcompile.lighten(model, (torch.rand(1, 3, 16, 16).to(dtype),))
    assert {p.dtype for p in light.parameters()} == {dtype}
    assert light(torch.rand(1, 3, 8, 8).to(dtype)).dtype == dtype
