"""emit_fast: same outputs as the lightened model, fewer BN layers, no more memory."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.fx as fx
from torch import nn

from lwcompile import LIST, Resize
from lwcompile.deploy.emit import emit_fast
from lwcompile.deploy.module_rewrites import (
    fold_batchnorm,
    fold_bn_into,
    pointwise_before_upsampling,
)
from lwcompile.measure.cost import count_params, measure
from lwcompile.nn import ChannelsLast, FusedLIST
from tests.helpers import close, run
from tests.lightened import NAMES, inputs, light, original, other_inputs, randomise_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_emitted_equals_light_at_two_sizes(name):
    model = light(name)
    before = copy.deepcopy(model.state_dict())
    fast = emit_fast(model, inputs(name), channels_last=False)
    for args in (inputs(name), other_inputs(name)):
        close(run(fast, args), run(model, args))
    called = _called_modules(fast, inputs(name))
    assert not any(isinstance(m, LIST) for m in called)  # all merged
    # every BN is folded but GLCIC's four after a GSAT (GSAT ends in a ReLU)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in called)
    assert bns == (4 if name == "glcic" else 0)
    for key, value in model.state_dict().items():  # the input model is untouched
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert fast.lwcompile_report is model.lwcompile_report


@pytest.mark.parametrize("name", NAMES)
def test_emitted_peak_memory_not_above_the_original(name):
    """LIST's squeezed tensor, both branches and the concat used to be alive at once; the
    emitted graph frees them early and convolves before upsampling."""
    fast = emit_fast(light(name), inputs(name), channels_last=False)
    peak = {k: measure(m, other_inputs(name)).peak_bytes
            for k, m in (("original", original(name)), ("light", light(name)), ("fast", fast))}
    assert peak["fast"] <= peak["original"], peak
    assert peak["fast"] <= peak["light"], peak


def test_dncnn_parameter_counts():
    # DnCNN(features=32, depth=5): end convs 2 * 32*9; LIST(32, 32) = squeeze 32*8+8 (264),
    # 1x1 branch 8*16+16 (144), depthwise 8*9+8 (80), its 1x1 144 -> 632; BN 64.
    model = light("dncnn")
    assert count_params(model) == 2 * 288 + 3 * (632 + 64) == 2_664
    merged = emit_fast(model, inputs("dncnn"), fold_bn=False, channels_last=False,
                       depthwise_sum=False)
    assert count_params(merged) == 2_664  # FusedLIST has LIST's parameters
    assert count_params(emit_fast(model, inputs("dncnn"), channels_last=False,
                                  depthwise_sum=False)) == 2 * 288 + 3 * 632
    # the output conv (32 -> 1, split over the last concat's halves) as a depthwise conv and
    # a sum per half: each half's 16 kernels keep their 16 * 9 weights, plus 16 sum weights
    assert count_params(emit_fast(model, inputs("dncnn"), channels_last=False)) == (
        2 * 288 + 3 * 632 + 2 * 16)


def test_fused_list_has_lists_parameters_and_output():
    torch.manual_seed(0)
    lst = LIST(64, 48, kernel_size=5, padding_mode="reflect").eval()
    fused = FusedLIST(lst)
    assert count_params(fused) == count_params(lst)
    x = torch.randn(2, 64, 19, 23)
    close(run(fused, (x,)), run(lst, (x,)))


@pytest.mark.parametrize("kind", [nn.Conv2d, nn.ConvTranspose2d, LIST, FusedLIST])
def test_fold_bn_into(kind):
    torch.manual_seed(0)
    producer = {nn.Conv2d: lambda: nn.Conv2d(16, 32, 3, padding=1, bias=False),
                nn.ConvTranspose2d: lambda: nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1),
                LIST: lambda: LIST(16, 32), FusedLIST: lambda: FusedLIST(LIST(16, 32))}[kind]()
    bn = randomise_batchnorm(nn.BatchNorm2d(32)).eval()
    producer.eval()
    fused = fold_bn_into(producer, bn)
    x = torch.randn(1, 16, 12, 12)
    close(run(fused, (x,)), run(nn.Sequential(producer, bn), (x,)))


class _ConvBnSkip(nn.Module):
    """The conv's output is also read by the skip: folding the BN would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.block(self.bn(y) + y)


@pytest.mark.parametrize("traced", [True, False])
def test_fold_batchnorm_only_where_exact(traced):
    model = randomise_batchnorm(_ConvBnSkip()).eval()
    target = fx.symbolic_trace(model) if traced else copy.deepcopy(model)
    x = torch.randn(1, 8, 10, 10)
    folded = fold_batchnorm(target, (x,))
    close(run(folded, (x,)), run(model, (x,)))
    called = _called_modules(folded, (x,))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in called) == 1  # self.bn stays


def test_pointwise_moves_before_upsampling():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = Resize("scale", stride=(2, 2))
            self.conv = nn.Conv2d(32, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.up(x))

    torch.manual_seed(0)
    model = Up().eval()
    gm = pointwise_before_upsampling(fx.GraphModule(model, _OneLevel().trace(model)))
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order == ["conv", "up"]
    x = torch.randn(1, 32, 9, 7)
    close(run(gm, (x,)), run(model, (x,)))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_pointwise_moves_before_an_upsample_module(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(16, 4, 1)).eval()
    gm = pointwise_before_upsampling(fx.GraphModule(model, _OneLevel().trace(model)))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["1", "0"]
    x = torch.randn(1, 16, 5, 6)
    close(run(gm, (x,)), run(model, (x,)))


def test_channels_last_and_saving(tmp_path):
    model = light("srresnet")
    fast = emit_fast(model, inputs("srresnet"), channels_last=True)
    assert isinstance(fast, ChannelsLast)
    args = other_inputs("srresnet")
    expected = run(model, args)
    close(run(fast, args), expected)
    buffer = io.BytesIO()
    torch.save(fast, buffer)  # an ordinary module: pickles whole, GraphModule included
    buffer.seek(0)
    close(run(torch.load(buffer, weights_only=False), args), expected)


def _called_modules(model: nn.Module, args: tuple) -> list[nn.Module]:
    called: list[nn.Module] = []
    handles = [m.register_forward_pre_hook(lambda m, _a: called.append(m))
               for m in model.modules()]
    try:
        run(model, args)
    finally:
        for h in handles:
            h.remove()
    return called


class _OneLevel(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def test_emit_fast_of_a_model_that_writes_its_input_is_checked_on_the_same_inputs():
    """Each run of the check (and of the timing, folding and sinking before it) gets its own
    copy of the example: a model scaling its input in place (RCAN) would otherwise be
    compared on inputs its earlier runs had scaled, and wrongly refused."""

    class WritesItsInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4).eval()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x *= 255.0
            return self.norm(self.conv(x))

    model, x = WritesItsInput().eval(), torch.rand(1, 1, 16, 16)
    fast = emit_fast(model, (x,), channels_last=None)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.clone()), model(x.clone()), rtol=1e-4, atol=1e-3)
