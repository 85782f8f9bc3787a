"""The low-rank rules: nn.Linear (token MLPs, attention projections) and 1x1 convs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lwcompile
from lwcompile.report import REFUSED
from lwcompile.rules.low_rank import (
    LowRankLinear,
    LowRankPointwise,
    reduced_rank_regression,
)
from lwcompile.rules.low_rank_linear import LowRankLinearRule
from lwcompile.rules.low_rank_pointwise import LowRankPointwiseRule


class TokenMLP(nn.Module):
    """A transformer-style MLP over tokens, plus a relative-position MLP fed 2 coordinates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)
        self.position = nn.Linear(2, 64)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x))) + self.position(coords)


def test_linear_layers_become_two_thin_ones_and_small_ones_are_refused_with_a_reason():
    torch.manual_seed(0)
    model = TokenMLP().eval()
    inputs = (torch.rand(1, 16, 64), torch.rand(1, 16, 2))
    light = lwcompile.lighten(model, inputs, rules=[LowRankLinearRule()])
    report = light.lwcompile_report
    assert [(r.site, r.decided_by) for r in report.applied] == [
        ("fc1", "low-rank-linear"), ("fc2", "low-rank-linear")]
    # rank 64 // 4 = 16: 64*16 + 16*128 + 128 and 128*16 + 16*64 + 64
    assert [(r.params_before, r.params_after) for r in report.applied] == [
        (8_320, 3_200), (8_256, 3_136)]
    (refused,) = report.not_applied
    assert (refused.site, refused.outcome, refused.decided_by) == (
        "position", REFUSED, "low-rank-linear")
    assert "fewer than 16" in refused.reason
    assert isinstance(light.get_submodule("fc1"), LowRankLinear)
    assert light(*inputs).shape == model(*inputs).shape


def test_a_factorisation_that_saves_too_little_is_refused():
    model = nn.Sequential(nn.Linear(40, 40)).eval()
    report = lwcompile.plan(model, (torch.rand(1, 8, 40),),
                            rules=[LowRankLinearRule(rank_ratio=2)])
    (row,) = report.not_applied
    assert row.outcome == REFUSED and "less than 1.5x saved" in row.reason


def test_the_svd_start_is_exact_for_a_weight_of_low_enough_rank():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 8) @ torch.randn(8, 64))
    light = lwcompile.lighten(nn.Sequential(linear).eval(), (torch.rand(2, 5, 64),),
                              rules=[LowRankLinearRule()])
    x = torch.rand(3, 7, 64)
    torch.testing.assert_close(light(x), linear(x), rtol=1e-4, atol=1e-4)


def test_reduced_rank_regression_recovers_a_low_rank_affine_map_and_beats_the_svd_start():
    torch.manual_seed(0)
    x = torch.randn(500, 32) * torch.linspace(0.5, 3, 32)  # unevenly used input directions
    w = torch.randn(48, 4) @ torch.randn(4, 32)
    reduce, expand, bias = reduced_rank_regression(x, x @ w.T + 0.5, rank=4)
    torch.testing.assert_close((expand @ reduce).float(), w, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(bias.float(), torch.full((48,), 0.5), rtol=1e-3, atol=1e-3)

    full = torch.randn(48, 32)
    y = x @ full.T
    reduce, expand, bias = reduced_rank_regression(x, y, rank=8)
    fitted = x.double() @ reduce.T @ expand.T + bias
    with torch.no_grad():
        lin = nn.Linear(32, 48, bias=False)
        lin.weight.copy_(full)
        svd = LowRankLinear.from_linear(lin, 8)
        svd_error = (svd(x) - y).pow(2).sum()
    assert (fitted - y.double()).pow(2).sum() < 0.9 * svd_error


def test_pointwise_convs_are_factored_but_channel_attention_gates_are_not():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project_in = nn.Conv2d(32, 64, 1)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 64, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.project_in(x)
            return y * self.gate(y)

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.rand(1, 32, 8, 8)
    light = lwcompile.lighten(model, (x,), rules=[LowRankPointwiseRule()])
    (row,) = light.lwcompile_report.applied
    # rank 32 // 4 = 8: 32*8 + 8*64 + 64
    assert (row.site, row.params_before, row.params_after) == ("project_in", 2_112, 832)
    assert isinstance(light.get_submodule("project_in"), LowRankPointwise)
    assert type(light.get_submodule("gate.1")) is nn.Conv2d
    assert light(x).shape == model(x).shape


def test_init_layerwise_fits_the_factors_by_reduced_rank_regression():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(32, 32, 1), nn.ReLU(),
                            nn.Conv2d(32, 3, 3, padding=1)).eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 3, 16, 16),),
                              rules=[LowRankPointwiseRule()])
    assert [r.site for r in light.lwcompile_report.applied] == ["2"]
    errors = lwcompile.init_layerwise(light, teacher, torch.rand(4, 3, 24, 24), batch_size=2,
                                      crop=16, steps=10)
    assert errors["2"] <= errors.before["2"] + 1e-6


@pytest.mark.parametrize("ratio,rank", [(4, 8), (8, 4)])
def test_rank_is_a_plain_parameter(ratio: int, rank: int):
    model = nn.Sequential(nn.Conv2d(32, 32, 1)).eval()
    light = lwcompile.lighten(model, (torch.rand(1, 32, 4, 4),),
                              rule_params={"low-rank-1x1": {"rank_ratio": ratio}},
                              rules=[LowRankPointwiseRule()])
    assert light.get_submodule("0").reduce.out_channels == rank


class WeightReadAttention(nn.Module):
    """Swin2SR's projection: the qkv layer is applied through its weight, with a bias built
    on the fly, and a mask that is None in unshifted windows."""

    def __init__(self, dim: int = 48) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)
        self.scale = torch.tensor(dim ** -0.5)  # becomes a tensor constant of the graph

    def forward(self, x, mask=None):
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = F.linear(input=x, weight=self.qkv.weight, bias=bias).chunk(3, dim=-1)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        return self.proj(attn.softmax(-1) @ v)


class UntraceableBlock(nn.Module):
    """A parent fx cannot trace (an int() of a shape), calling its attention by keyword; an
    unshifted block passes no mask at the size it was built for, and a mask at any other
    (as SwinIR's do)."""

    def __init__(self, shifted: bool, tokens: int = 64) -> None:
        super().__init__()
        self.attn = WeightReadAttention()
        self.shifted, self.tokens = shifted, tokens

    def forward(self, x):
        tokens = int(x.shape[1])
        masked = self.shifted or tokens != self.tokens
        return x + self.attn(x, mask=torch.zeros(tokens, tokens) if masked else None)


def test_a_linear_applied_through_its_weight_is_factored_where_it_is_applied():
    torch.manual_seed(0)
    model = nn.Sequential(UntraceableBlock(shifted=False), UntraceableBlock(shifted=True))
    x = torch.randn(2, 64, 48)
    light = lwcompile.lighten(model, (x,))
    rows = {r.site: r for r in light.lwcompile_report.rows}
    for block in ("0", "1"):  # mask=None (block 0) or a mask (block 1): both traced
        row = rows[f"{block}.attn.qkv"]
        assert row.decided_by == "low-rank-linear", row
        assert (row.params_before, row.params_after) == (48 * 144, 12 * (48 + 144))
        assert isinstance(light.get_submodule(f"{block}.attn.qkv"), LowRankLinear)
    assert light(x).shape == x.shape
    other_size = torch.randn(2, 32, 48)  # block 0 now passes a mask
    assert light(other_size).shape == other_size.shape
    # the rewrite is where the forward applies the layer: factors of full rank give the
    # original's output (the per-call bias is added to the factored product), at the size
    # traced and, through the guarded graph's fallback to the block's own forward, at another
    exact = lwcompile.lighten(model, (x,), rule_params={"low-rank-linear": {
        "rank_ratio": 1, "min_saving": 0.1}})
    assert isinstance(exact.get_submodule("0.attn.qkv"), LowRankLinear)
    with torch.no_grad():
        for inputs in (x, other_size):
            torch.testing.assert_close(exact(inputs), model(inputs), rtol=1e-4, atol=1e-4)


def test_a_graph_traced_with_a_none_argument_runs_the_original_forward_when_it_is_not():
    """The graph of block 0's attention holds while its mask is None; it keeps the module's
    own forward (and all its members) for calls that pass one, through copy and pickle."""
    torch.manual_seed(0)
    model = nn.Sequential(UntraceableBlock(shifted=False), UntraceableBlock(shifted=True))
    x, other_size = torch.randn(2, 64, 48), torch.randn(2, 32, 48)
    light = lwcompile.lighten(model, (x,))
    attn = light.get_submodule("0.attn")
    assert isinstance(attn, torch.fx.GraphModule)
    assert {"qkv", "proj"} <= dict(attn.named_children()).keys()
    assert {"q_bias", "v_bias"} <= dict(attn.named_parameters(recurse=False)).keys()
    calls = []
    hook = attn.qkv.register_forward_hook(lambda *_: calls.append("graph"))
    with torch.no_grad():
        light(x)
        assert calls == ["graph"]  # the graph calls the factored layer
        light(other_size)
        assert calls == ["graph"]  # the original forward reads its weight instead
        hook.remove()
        expected = light(other_size), light(x)
        for again in (copy.deepcopy(light), _pickled(light)):
            torch.testing.assert_close((again(other_size), again(x)), expected)


def _pickled(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_the_reference_run_counts_a_weight_application_as_one_call_of_the_layer():
    from lwcompile.tracing.flow import record_flow

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.read = nn.Linear(8, 16, bias=False)  # applied through its weight
            self.called = nn.Linear(16, 8, bias=False)  # called as a module

        def forward(self, x):
            return self.called(F.linear(x, self.read.weight, torch.ones(16)))

    flow = record_flow(Both(), (torch.randn(3, 8),), watch=["read", "called"])
    assert dict(flow.calls) == {"read": 1, "called": 1}
    assert flow.shapes["read"] == ((torch.Size([3, 8]),), torch.Size([3, 16]))
    assert flow.feeds_output == {"called"}
