"""preserved_state: whatever a forward assigns to its modules is undone afterwards; eval_mode:
modes come back module by module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwcompile.measure.snapshot import eval_mode, preserved_state


class Assigns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.zeros(3))
        self.scale = 2.0

    def forward(self, x):
        self.mean = self.mean + x.mean()  # replaces a buffer
        self.scale = 3.0  # rebinds a plain attribute
        self.cache = x  # a new attribute
        self.conv.extra = nn.ReLU()  # a new child module, one level down
        self.conv.weight = nn.Parameter(self.conv.weight * 2)  # replaces a parameter
        self.conv.bias = None
        return self.conv(x)


def test_every_attribute_table_and_child_is_restored():
    model = Assigns()
    weight, bias, mean = model.conv.weight, model.conv.bias, model.mean
    before = {name: dict(vars(m)) for name, m in model.named_modules()}
    with preserved_state(model):
        model(torch.rand(1, 3, 4, 4))
        assert model.scale == 3.0 and hasattr(model, "cache") and "extra" in model.conv._modules
    assert model.conv.weight is weight and model.conv.bias is bias and model.mean is mean
    assert model.scale == 2.0 and not hasattr(model, "cache")
    assert "extra" not in model.conv._modules
    after = {name: dict(vars(m)) for name, m in model.named_modules()}
    assert after.keys() == before.keys()
    for name, attributes in after.items():
        assert attributes.keys() == before[name].keys()
        for key in ("_parameters", "_buffers", "_modules"):
            assert attributes[key] is before[name][key]  # the tables themselves, refilled
            assert dict(attributes[key]) == dict(before[name][key])


def test_eval_mode_gives_every_submodule_back_its_own_mode():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm2d(2)))
    model[1].eval()  # a frozen part in eval mode inside a model in training mode
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, False]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a failing run")
    assert [m.training for m in model.modules()] == [True, True, False, False]
