"""compiler/workspace.py: the traced copy lighten rewrites, and what it installs in it."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile import LIST
from lwcompile.compiler.workspace import (
    copy_model,
    installed_graphs_run,
    prepare,
    uninstall_subregions,
)
from lwcompile.graph_check.graph_run import check_after

pytestmark = pytest.mark.usefixtures("one_thread")


class PadToMultiple(nn.Module):
    """Shape-dependent control flow at the top level: fx cannot trace forward."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % 8, (-w) % 8
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        y = self.tail(self.body(self.head(x)))
        return y[..., :h, :w]


def test_untraceable_top_level_still_lightens_inner_convs():
    model = PadToMultiple()
    light = lwcompile.lighten(model, (torch.rand(1, 3, 30, 27),))
    assert type(light) is PadToMultiple
    assert isinstance(light.body, torch.fx.GraphModule)
    assert [r.site for r in light.lwcompile_report.applied] == ["body.0", "body.2"]
    assert isinstance(light.body.get_submodule("0"), LIST)
    assert any("<root>: opaque" in line for line in light.lwcompile_report.log)
    assert light(torch.rand(1, 3, 17, 50)).shape == (1, 3, 17, 50)


def _workspace(model: nn.Module, *args):
    with torch.no_grad():
        out = model.eval()(*args)
    return prepare(model, args, {}, out, check_after)


def test_the_workspace_is_a_traced_copy_with_each_traced_region_installed():
    model, x = PadToMultiple().train(), torch.rand(1, 3, 30, 27)
    ws = _workspace(model, x)
    model.train()
    assert ws.root is not model and type(ws.root) is PadToMultiple and not ws.root.training
    assert [r.name for r in ws.traced.regions] == ["", "body"]
    assert not ws.traced.regions[0].traced  # the root's forward is untraceable
    assert ws.traced.opaque_leaves == ["head", "tail"]
    assert set(ws.installed) == {"body"} and ws.root.body is ws.installed["body"]
    assert isinstance(ws.root.body, torch.fx.GraphModule)
    assert type(model.body) is nn.Sequential and model.training  # the user's model: as it was
    assert installed_graphs_run(ws, (x,), {}) == ""


def test_uninstalling_puts_the_original_submodules_back():
    ws = _workspace(PadToMultiple(), torch.rand(1, 3, 16, 16))
    graph = ws.installed["body"]
    uninstall_subregions(ws)
    assert ws.installed == {}
    assert type(ws.root.body) is nn.Sequential and ws.root.body is ws.traced.region("body").module
    # still analysed as a graph: sites inside keep their nodes
    assert ws.traced.region("body").graph_module is graph


def test_a_region_traced_with_fixed_arguments_is_never_installed():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x, scale: float):
            return self.conv(x) * scale

    ws = _workspace(Scaled(), torch.rand(1, 3, 8, 8), 0.5)
    (region,) = ws.traced.regions
    assert region.traced and region.specialised
    assert ws.installed == {} and type(ws.root) is Scaled


def test_a_model_that_cannot_be_copied_is_refused_clearly():
    model = nn.Conv2d(3, 3, 3)
    model.lock = threading.Lock()
    with pytest.raises(lwcompile.LwCompileError, match="cannot copy the model to work on it"):
        copy_model(model)


def test_input_model_is_untouched_bit_for_bit():
    torch.manual_seed(1)
    model = dncnn.DnCNN(features=32, depth=5).train()  # train mode: BN stats must not move
    state = copy.deepcopy(model.state_dict())
    x = torch.rand(1, 1, 32, 32)
    before = model.eval()(x)
    model.train()
    light = lwcompile.lighten(model, (x,))
    assert model.training and light.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.eval()(x), before)
    assert all(not isinstance(m, LIST) for m in model.modules())


def test_extra_non_tensor_arguments():
    class NoiseLevel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 32, 3, padding=1)
            self.b = nn.Conv2d(32, 32, 3, padding=1)
            self.c = nn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x, sigma: float):
            return x - sigma * self.c(torch.relu(self.b(self.a(x))))

    light = lwcompile.lighten(NoiseLevel(), (torch.rand(1, 3, 24, 24), 0.1))
    assert [r.site for r in light.lwcompile_report.applied] == ["b"]
    x = torch.rand(1, 3, 24, 24)
    assert light(x, 0.1).shape == x.shape
    # the noise level is not baked in: a specialised graph is never installed
    assert not torch.equal(light(x, 0.1), light(x, 0.5))


def test_nothing_traceable():
    class Opaque(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow, and no submodules to fall back to
                return x * self.w
            return x

    with pytest.raises(lwcompile.UntraceableError, match="no part of the model"):
        lwcompile.lighten(Opaque(), (torch.rand(1, 3, 8, 8),))


def test_parent_code_that_needs_the_original_submodule():
    """An untraceable parent reads a plain attribute and calls a method of a traceable
    child: both survive on the installed graph, which keeps the child's attributes and
    methods (tracing.like_original)."""

    class Child(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 32
            self.conv = nn.Conv2d(32, 32, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

        def gain(self) -> float:
            return 0.5

    class Parent(nn.Module):
        def __init__(self, use_method: bool) -> None:
            super().__init__()
            self.use_method = use_method
            self.head, self.child = nn.Conv2d(3, 32, 3, padding=1), Child()
            self.tail = nn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x):
            if x.shape[-1] % 2:  # untraceable at the top
                x = F.pad(x, (0, 1))
            h = self.child(self.head(x))[:, : self.child.width]
            return self.tail(h * (self.child.gain() if self.use_method else 1.0))

    x = torch.rand(1, 3, 16, 15)
    for use_method in (False, True):
        light = lwcompile.lighten(Parent(use_method), (x,))
        # the installed graph keeps Child's methods and attributes (tracing.like_original)
        assert isinstance(light.child, torch.fx.GraphModule)
        assert light.child.gain() == 0.5 and light.child.width == 32
        assert isinstance(light.child.get_submodule("conv"), LIST)
        assert light(x).shape == (1, 3, 16, 16)
