"""Re-parameterised blocks are folded into the conv they compute before lighten traces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile import LIST, count_params
from lwcompile.compiler.folding import fold_reparameterised
from lwcompile.deploy import persist


class Conv3XC(nn.Module):
    """SPAN's re-parameterised conv, reduced: 1x1 -> unpadded 3x3 -> 1x1 plus a 1x1 skip in
    training; in eval mode the forward composes them into ``eval_conv`` on every call."""

    def __init__(self, c_in: int, c_out: int, relu: bool = False, wrong: bool = False) -> None:
        super().__init__()
        self.has_relu, self.wrong = relu, wrong
        self.sk = nn.Conv2d(c_in, c_out, 1)
        self.conv = nn.Sequential(nn.Conv2d(c_in, 2 * c_in, 1), nn.Conv2d(2 * c_in, 2 * c_out, 3),
                                  nn.Conv2d(2 * c_out, c_out, 1))
        self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.eval_conv.weight.requires_grad = False
        self.eval_conv.bias.requires_grad = False

    def update_params(self) -> None:
        (w1, b1), (w2, b2), (w3, b3) = ((c.weight.data, c.bias.data) for c in self.conv)
        w = torch.einsum("om,mnhw,ni->oihw", w3[:, :, 0, 0], w2, w1[:, :, 0, 0])
        b = w3[:, :, 0, 0] @ (w2.sum((2, 3)) @ b1 + b2) + b3
        w = w + F.pad(self.sk.weight.data, [1, 1, 1, 1])
        self.eval_conv.weight.data = w.contiguous()
        self.eval_conv.bias.data = b + self.sk.bias.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            out = self.conv(F.pad(x, (1, 1, 1, 1))) + self.sk(x)
        else:
            self.update_params()
            out = self.eval_conv(x) + (x if self.wrong else 0)  # wrong: a skip no fold knows
        return F.leaky_relu(out, 0.05) if self.has_relu else out


class RepNet(nn.Module):
    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.rep1 = Conv3XC(32, 32, relu=True)
        self.rep2 = Conv3XC(32, 32, wrong=wrong)
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.rep2(self.rep1(self.head(x)))) + x


def rep_net(wrong: bool = False) -> RepNet:
    torch.manual_seed(0)
    return RepNet(wrong).eval()


def test_fold_is_exact_and_leaves_the_model_alone():
    model = rep_net()
    x = torch.rand(2, 3, 12, 14)
    folded, log = fold_reparameterised(model, (x,), {})
    assert isinstance(model.rep1, Conv3XC) and isinstance(model.rep2, Conv3XC)
    conv, act = folded.rep1
    assert type(conv) is nn.Conv2d and isinstance(act, nn.LeakyReLU) and act.negative_slope == 0.05
    assert type(folded.rep2) is nn.Conv2d and folded.rep2.weight.requires_grad
    assert count_params(folded.rep2) == 32 * 32 * 9 + 32
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert log == ["rep1: Conv3XC folded into the Sequential it computes in eval mode",
                   "rep2: Conv3XC folded into the Conv2d it computes in eval mode"]


def test_lighten_folds_then_lightens_the_folded_convs():
    model = rep_net()
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(model, (x,))
    report = light.lwcompile_report
    assert {r.site: r.decided_by for r in report.applied} == {"rep1.0": "list", "rep2": "list"}
    assert isinstance(light.get_submodule("rep2"), LIST)
    assert any("rep2: Conv3XC folded" in line for line in report.log)
    # the totals count from the folded network: the fold's own saving is not claimed
    folded, _ = fold_reparameterised(model, (x,), {})
    assert report.summary.params_before == count_params(folded) < count_params(model)
    assert light(x).shape == model(x).shape


def test_a_fold_that_does_not_reproduce_the_block_is_not_applied():
    model = rep_net(wrong=True)  # rep2's eval forward adds a skip that eval_conv lacks
    x = torch.rand(1, 3, 16, 16)
    folded, log = fold_reparameterised(model, (x,), {})
    assert isinstance(folded.rep2, Conv3XC) and not isinstance(folded.rep1, Conv3XC)
    assert "rep2: not folded, its folded form does not return what it returns" in log


def test_a_block_the_example_run_never_calls_is_not_folded():
    model = rep_net()
    model.spare = Conv3XC(8, 8)
    folded, log = fold_reparameterised(model, (torch.rand(1, 3, 8, 8),), {})
    assert isinstance(folded.spare, Conv3XC)
    assert any(line.startswith("spare: not folded, it was not called") for line in log)


def test_a_lightened_folded_model_saves_and_loads(tmp_path):
    model = rep_net()
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(model, (x,))
    persist.save(light, tmp_path / "light.safetensors")
    loaded = persist.load(tmp_path / "light.safetensors", original=rep_net())
    with torch.no_grad():
        assert torch.equal(loaded(x), light(x))
