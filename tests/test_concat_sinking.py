"""Concat sinking: exact, parameter-neutral, and it removes the concats it can."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from lightened import inputs, light
from torch import nn

from lwcompile.concat_sinking import sink_concats
from lwcompile.cost import count_params
from lwcompile.emit import emit_fast


def cats(gm: fx.GraphModule) -> int:
    return sum(n.op == "call_function" and n.target is torch.cat for n in gm.graph.nodes)


def test_light_dncnn_keeps_only_the_concat_its_last_conv_needs():
    with torch.no_grad():
        fast = emit_fast(light("dncnn"), inputs("dncnn"), channels_last=False, sink=False)
        sunk = copy.deepcopy(fast)
        steps = sink_concats(sunk, inputs("dncnn"))
        lists = cats(fast)
        # each LIST's concat sinks through its grouped 1x1 and the ReLU, then into the next
        # squeeze (as a sum); the last one stops at the final 3x3 conv
        assert steps == 3 * (lists - 1) + 2 and cats(sunk) == 1
        assert count_params(sunk) == count_params(fast)
        torch.testing.assert_close(sunk(*inputs("dncnn")), fast(*inputs("dncnn")),
                                   rtol=1e-4, atol=1e-5)


class TwoReaders(nn.Module):
    """A concat read by a 1x1 conv and by the output: it must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 5, 1)
        self.fuse = nn.Conv2d(8, 6, 1)

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
