"""Concat sinking: exact, parameter-neutral, and it removes the concats it can."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

from lwcompile.deploy.concat_sinking import sink_concats
from lwcompile.deploy.emit import emit_fast
from lwcompile.measure.cost import count_params
from tests.lightened import inputs, light


def cats(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is torch.cat for n in gm.graph.nodes)


def test_light_dncnn_loses_every_concat():
    with torch.no_grad():
        fast = emit_fast(light("dncnn"), inputs("dncnn"), channels_last=False, sink=False,
                         depthwise_sum=False)
        sunk = copy.deepcopy(fast)
        steps = sink_concats(sunk, inputs("dncnn"))
        lists = cats(fast)
        # each LIST's concat sinks through its grouped 1x1 and the ReLU, then into the next
        # squeeze as a sum; the last one into the final 3x3 conv (one output channel)
        assert lists > 1 and steps == 3 * lists and cats(sunk) == 0
        assert count_params(sunk) == count_params(fast)
        torch.testing.assert_close(sunk(*inputs("dncnn")), fast(*inputs("dncnn")),
                                   rtol=1e-4, atol=1e-5)


class TwoReaders(nn.Module):
    """A concat read by a 1x1 conv and by the output: it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 5, 1)
        self.fuse = nn.Conv2d(8, 2, 1)  # squeezing: the sum moves less than the concat

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([self.a(x), self.b(x)], dim=1)
        single = torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)
        return self.mix(both) + 0, (both, self.fuse(torch.relu(single)))


def test_only_single_reader_concats_sink_and_results_stay_equal():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(TwoReaders().eval())
    x = (torch.rand(1, 3, 8, 8),)
    with torch.no_grad():
        expected = gm(*x)
        assert sink_concats(gm, x) == 2  # relu, then the dense 1x1 becomes a sum
        assert cats(gm) == 1
        torch.testing.assert_close(gm(*x), expected)


class Widening(nn.Module):
    """A concat of 4 channels feeding a 3x3 conv to 16: the sum would move more memory."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        self.conv = nn.Conv2d(4, out, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.a(x), self.b(x)], dim=1))


@pytest.mark.parametrize(("out", "steps"), [(16, 0), (1, 1)])
def test_a_concat_sinks_into_any_conv_where_the_sum_moves_less(out, steps):
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Widening(out).eval())
    x = (torch.rand(1, 3, 9, 7),)
    with torch.no_grad():
        expected = gm(*x)
        assert sink_concats(gm, x) == steps  # 3 * out * (2 - 1) vs 2 * 4 elements a pixel
        assert cats(gm) == 1 - steps
        torch.testing.assert_close(gm(*x), expected)


class PReLUChain(nn.Module):
    """LIST-like concats read through a shared-slope and a per-channel PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 3, padding=1)
        self.c, self.d = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.shared, self.per_channel = nn.PReLU(), nn.PReLU(6)
        self.mix, self.out = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(self.shared(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.out(self.per_channel(torch.cat([self.c(y[:, :1]), self.d(y[:, 1:])], 1)))


def test_concats_sink_through_shared_and_per_channel_prelu():
    torch.manual_seed(0)
    model = PReLUChain().eval()
    with torch.no_grad():
        model.per_channel.weight.copy_(torch.linspace(-0.5, 0.5, 6))
        gm = fx.symbolic_trace(model)
        x = (torch.randn(1, 3, 8, 8),)
        expected = gm(*x)
        assert sink_concats(gm, x) == 4  # each concat: through its PReLU, into its 1x1
        assert cats(gm) == 0
        torch.testing.assert_close(gm(*x), expected)
    slopes = [m.weight.tolist() for n, m in gm.named_modules() if "per_channel_part" in n]
    assert slopes == [pytest.approx([-0.5, -0.3, -0.1, 0.1]), pytest.approx([0.3, 0.5])]
