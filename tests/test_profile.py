"""profile(): the same counts as lwcompile.cost, split per leaf layer; a table and JSON."""

from __future__ import annotations

import json

import torch

from examples.dncnn import DnCNN
from lwcompile import LIST
from lwcompile.measure.cost import count_macs, count_params, measure
from lwcompile.measure.profile import profile


def test_profile_counts_match_cost_and_split_per_layer():
    torch.manual_seed(0)
    model = DnCNN(features=16, depth=4).eval()
    model.body[2] = LIST(16, 16)  # a non-leaf module: its four convs are the leaves
    x = torch.rand(1, 1, 24, 20)
    p = profile(model, (x,), runs=3, warmup=1)
    # end convs 2 * 144; LIST(16, 16): squeeze 68 + 1x1 40 + depthwise 40 + 1x1 40;
    # the other middle conv 16*16*9; two BN of 32
    assert p.params == count_params(model) == 2 * 144 + 188 + 2_304 + 2 * 32 == 2_844
    assert p.macs == count_macs(model, x)
    assert p.peak_bytes == measure(model, (x,)).peak_bytes
    by_name = {layer.name: layer for layer in p.layers}
    assert "body.2" not in by_name and "body.2.squeeze" in by_name
    assert by_name["body.0"].macs == 24 * 20 * 16 * 9  # 1 -> 16 channels, 3x3
    assert by_name["body.2.squeeze"].macs == 24 * 20 * 16 * 4
    assert sum(layer.macs for layer in p.layers) == p.macs  # every MAC is in some conv
    assert sum(layer.params for layer in p.layers) == p.params
    assert all(layer.calls == 1 for layer in p.layers)
    assert len(p.runs_ms) == 3
    text = str(p)
    assert "body.2.spatial_branch.0" in text and "(outside leaf layers)" in text
    data = json.loads(json.dumps(p.to_dict()))
    assert data["macs"] == p.macs and len(data["layers"]) == len(p.layers)
