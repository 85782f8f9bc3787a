"""A mixture of experts that picks its experts in Python (SeemoRe's ``MoELayer``) is
deployed as one running every expert with zero gates for the unpicked: the same outputs
whichever experts the router picks, and files that pick as the model does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy.dense_mixtures import DenseMixture, dense_mixtures


class Expert(nn.Module):
    """SeemoRe's expert: two 1x1 convs of ``x`` and ``k`` multiplied, then a 1x1 back."""

    def __init__(self, low: int) -> None:
        super().__init__()
        self.conv_1, self.conv_2 = nn.Conv2d(3, low, 1), nn.Conv2d(3, low, 1)
        self.conv_3 = nn.Conv2d(low, 3, 1)

    def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.conv_3(self.conv_2(k) * self.conv_1(x))


class MoELayer(nn.Module):
    """SeemoRe's mixture, its inference path as written there: the top ``num_expert``
    experts of a router picking by colour (red: expert 0, green: 1, blue: 2)."""

    def __init__(self, num_expert: int = 1) -> None:
        super().__init__()
        self.experts = nn.ModuleList([Expert(2), Expert(4), Expert(6)])
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(3, 3, bias=False))
        self.num_expert = num_expert
        with torch.no_grad():
            self.gate[2].weight.copy_(torch.eye(3) * 5)

    def forward(self, inputs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(inputs), dim=1, dtype=torch.float)
        top, picked = torch.topk(weights, self.num_expert)
        out = inputs.clone()
        for i, expert in enumerate([self.experts[j] for j in picked.squeeze(dim=0)]):
            out += expert(inputs, k) * top[:, i:i + 1, None, None]
        return out


class Block(nn.Module):
    def __init__(self, num_expert: int = 1) -> None:
        super().__init__()
        self.conv, self.moe = nn.Conv2d(3, 3, 3, padding=1), MoELayer(num_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x, torch.relu(self.conv(x)))


def colour(channel: int) -> torch.Tensor:
    image = torch.rand(1, 3, 8, 8) * 0.2
    image[:, channel] += 0.8
    return image


@pytest.mark.parametrize("num_expert", [1, 2])
def test_the_dense_mixture_computes_what_the_picking_one_does_for_every_pick(num_expert):
    torch.manual_seed(0)
    model = Block(num_expert).eval()
    dense = Block(num_expert).eval()
    dense.load_state_dict(model.state_dict())
    assert dense_mixtures(dense) == 1 and isinstance(dense.moe, DenseMixture)
    picks = set()
    for channel in range(3):
        x = colour(channel)
        with torch.no_grad():
            picks.add(int(model.moe.gate(x).argmax()))
            want, got = model(x), dense(x)
        if num_expert == 1:  # one nonzero term: the same sum exactly
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:  # the same products, summed in expert order
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert picks == {0, 1, 2}


def test_training_mode_and_other_classes_are_left_alone():
    model = Block()
    assert dense_mixtures(model) == 0  # training mode: not its inference path
    assert dense_mixtures(nn.Sequential(nn.Conv2d(3, 3, 1)).eval()) == 0


def test_the_onnx_file_picks_the_expert_the_model_picks(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Block().eval()
    path = lwcompile.export_onnx(model, (colour(0),), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for channel in range(3):  # each colour another expert; the file follows
        x = colour(channel)
        got = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(model.moe, MoELayer)  # the model given is left as it was


@pytest.mark.slow  # lowers to ExecuTorch
def test_the_executorch_program_picks_the_expert_the_model_picks(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import load_pte

    torch.manual_seed(0)
    model = Block().eval()
    export = lwcompile.export_mobile(model, (colour(0),), tmp_path / "m.pte")
    assert export.forms["dense-mixture"] == 1
    program = load_pte(tmp_path / "m.pte")
    for channel in range(3):
        x = colour(channel)
        with torch.no_grad():
            torch.testing.assert_close(program(x)[0], model(x), rtol=1e-5, atol=1e-5)
