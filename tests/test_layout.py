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


def _strides(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: t.stride() for name, t in [*model.named_parameters(),
                                             *model.named_buffers()]}


def _channels_last_strides(t: torch.Tensor) -> tuple[int, ...]:
    """The strides oneDNN reads as channels-last (a 1x1 or depthwise weight is also
    "contiguous" in the standard layout, with other strides)."""
    return torch.empty_like(t, memory_format=torch.channels_last).stride()


def test_distilling_in_channels_last_leaves_both_models_in_their_layout_and_learns_the_same():
    teacher, light = small_dncnn_and_light()
    data = torch.rand(4, 1, 32, 32)
    fast, standard = copy.deepcopy(light), copy.deepcopy(light)
    before = _strides(fast), _strides(teacher)
    seen = []
    squeeze = fast.get_submodule("body.2.squeeze")  # a 1x1 conv inside a LIST
    hook = squeeze.register_forward_pre_hook(lambda m, args: seen.append(
        args[0].stride() == _channels_last_strides(args[0])
        and m.weight.stride() == _channels_last_strides(m.weight)))
    distill(fast, teacher, data, **OPTIONS)  # the default: channels-last for a conv net
    hook.remove()
    distill(standard, teacher, data, channels_last=False, **OPTIONS)
    assert seen and all(seen)
    assert (_strides(fast), _strides(teacher)) == before  # each tensor's own strides back
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
