"""train/layout.py: distillation in channels-last memory order, the models left as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lwcompile.errors import ArgumentError, LwCompileWarning, TrainingError
from lwcompile.train.data import add_noise
from lwcompile.train.distill import distill
from tests.helpers import small_dncnn_and_light

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = dict(steps=3, batch_size=4, crop=24, degrade=add_noise(25), progress=False)


def _standard_layout(model: nn.Module) -> bool:
    return all(t.is_contiguous() for t in [*model.parameters(), *model.buffers()])


def test_distilling_in_channels_last_leaves_both_models_in_their_layout_and_learns_the_same():
    teacher, light = small_dncnn_and_light()
    data = torch.rand(4, 1, 32, 32)
    fast, standard = copy.deepcopy(light), copy.deepcopy(light)
    seen = []
    conv = fast.get_submodule("body.0")
    hook = conv.register_forward_pre_hook(lambda _m, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    distill(fast, teacher, data, **OPTIONS)  # the default: channels-last for a conv net
    hook.remove()
    distill(standard, teacher, data, channels_last=False, **OPTIONS)
    assert seen and all(seen)
    assert _standard_layout(fast) and _standard_layout(teacher)
    x = add_noise(25)(torch.rand(2, 1, 24, 24), torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same training up to rounding (Adam's first steps are
        # +-lr wherever a gradient is near zero, so parameters are compared by their output)
        torch.testing.assert_close(fast.eval()(x), standard.eval()(x), rtol=0, atol=1e-4)


class Flattening(nn.Module):
    """A forward that views a conv's output as rows: fails on a channels-last tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        rows = y.view(y.shape[0], -1)  # needs the standard layout
        return self.out(rows.view_as(y))


def test_a_model_that_cannot_run_in_channels_last_trains_in_the_standard_layout():
    torch.manual_seed(0)
    teacher = Flattening().eval()
    student = copy.deepcopy(teacher)
    with pytest.warns(LwCompileWarning, match="standard memory layout"):
        distill(student, teacher, torch.rand(4, 3, 32, 32), **OPTIONS)
    assert _standard_layout(student) and _standard_layout(teacher)
    with pytest.raises(TrainingError, match="cannot run on a training batch"):
        distill(copy.deepcopy(teacher), teacher, torch.rand(4, 3, 32, 32),
                channels_last=True, **OPTIONS)
    assert _standard_layout(teacher)


def test_channels_last_must_be_a_bool_or_none():
    teacher, light = small_dncnn_and_light()
    with pytest.raises(ArgumentError, match="channels_last"):
        distill(light, teacher, torch.rand(2, 1, 32, 32), channels_last="yes", **OPTIONS)
