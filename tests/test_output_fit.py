"""train/output_fit.py: replacements fitted to the teacher's output, with the replacements
fitted before them plugged into the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.train.data import add_noise
from lwcompile.train.layerwise import init_layerwise
from lwcompile.train.output_fit import Plug, plugged
from tests.helpers import small_dncnn_and_light

pytestmark = pytest.mark.usefixtures("one_thread")


def _output_error(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return F.mse_loss(student.eval()(x), teacher(x)).item()


def test_output_fitting_brings_the_output_closer_and_leaves_the_teacher_as_it_was():
    teacher, light = small_dncnn_and_light()
    state = copy.deepcopy(teacher.state_dict())
    data = torch.rand(16, 1, 32, 32)
    generator = torch.Generator().manual_seed(1)
    held_out = add_noise(25)(torch.rand(8, 1, 32, 32), generator)
    options = dict(steps=20, batch_size=8, crop=24, degrade=add_noise(25), refit_kept=True)
    layer_only, with_output = copy.deepcopy(light), copy.deepcopy(light)
    init_layerwise(layer_only, teacher, data, output_steps=0, **options)
    init_layerwise(with_output, teacher, data, output_steps=30, **options)
    assert _output_error(with_output, teacher, held_out) < \
        0.9 * _output_error(layer_only, teacher, held_out)
    # the teacher is as it was: same modules, weights and trainable flags
    assert not any(type(m).__name__ == "_Plugged" for m in teacher.modules())
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


def test_a_plug_maps_permuted_channels_back_to_the_teachers_order():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 3, 5, 5)
    expected = teacher(x)
    order = torch.tensor([2, 0, 3, 1])  # the replacement's channel j is the teacher's order[j]
    permuted_first = nn.Conv2d(3, 4, 1)
    permuted_second = nn.Conv2d(4, 2, 1)
    with torch.no_grad():
        permuted_first.weight.copy_(teacher[0].weight[order])
        permuted_first.bias.copy_(teacher[0].bias[order])
        permuted_second.weight.copy_(teacher[2].weight[:, order])
        permuted_second.bias.copy_(teacher[2].bias)
    plugs = {"0": Plug(permuted_first, output_order=order),
             "2": Plug(permuted_second, input_order=order)}
    with plugged(teacher, plugs, trained=permuted_second):
        torch.testing.assert_close(teacher(x), expected)
        assert not any(p.requires_grad for p in permuted_first.parameters())
    assert teacher[0] is not permuted_first and isinstance(teacher[0], nn.Conv2d)
    assert all(p.requires_grad for p in permuted_first.parameters())
