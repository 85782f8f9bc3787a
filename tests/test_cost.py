"""lighten's own cost counting agrees with torch's flop counter, on real and fake tensors."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lwcompile
from lwcompile.measure.cost import measure, measure_on_shapes
from lwcompile.tracing.flow import structure_key


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4),
        nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1),
        nn.Flatten(), nn.Linear(4 * 32 * 32, 10)).eval()


def test_macs_equal_the_flop_counters():
    model, x = _model(), torch.rand(2, 3, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        expected = model(x)
    run = measure(model, (x,))
    assert run.macs == counter.get_total_flops() // 2 > 0
    torch.testing.assert_close(run.output, expected)
    # activations only: the largest moment holds at least the 2x8x16x16 conv output
    assert run.peak_bytes >= 2 * 8 * 16 * 16 * 4


def test_measuring_on_shapes_does_no_arithmetic_and_agrees():
    model, x = _model(), torch.rand(2, 3, 16, 16)
    fake, real = measure_on_shapes(model, (x.shape,)), measure(model, (x,))
    assert (fake.macs, fake.peak_bytes) == (real.macs, real.peak_bytes)
    assert fake.output.shape == (2, 10)
    assert type(fake.output).__name__ == "FakeTensor"
    assert all(type(p) is nn.Parameter for p in model.parameters())  # model left real


def test_structure_key_tells_twins_from_lookalikes():
    a, b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    assert structure_key(a) == structure_key(b)  # weights differ, structure does not
    assert structure_key(a) != structure_key(nn.Conv2d(8, 8, 3, padding=2))
    assert structure_key(lwcompile.LIST(8, 8)) != structure_key(lwcompile.LIST(8, 16))

    class Scale(nn.Module):  # a custom module that says nothing in its repr
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    assert structure_key(Scale(3)) != structure_key(Scale(4))  # parameter shapes count


def test_a_proposal_keys_its_replacement_once():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    site = lwcompile.Site("conv", conv, (torch.Size([1, 8, 8, 8]),), torch.Size([1, 8, 8, 8]))
    rule = lwcompile.default_rules()[0]
    proposal = lwcompile.Proposal(rule, lwcompile.Match(site), lwcompile.LIST(8, 8))
    assert proposal.replacement_key == structure_key(proposal.replacement)
    assert proposal.replacement_key is proposal.replacement_key  # computed once
    assert lwcompile.Proposal(rule, lwcompile.Match(site), None).replacement_key == ()


class SwapsItsWeight(nn.Module):
    """Re-parametrised blocks (SPAN's Conv3XC) replace a weight's storage in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(1, 4, 32, 32))

    def forward(self, x):
        new = self.w.data * 1.0
        self.w.data = new  # the weight's old storage is freed here
        return x * new, new


def test_a_freed_weight_storage_does_not_hide_the_activation_that_takes_its_place():
    """Counted storages are told apart by identity; a freed one's identity could be reused."""
    model, x = SwapsItsWeight().eval(), torch.rand(1, 4, 32, 32)
    assert measure(model, (x,)).peak_bytes == 2 * x.numel() * 4  # ``new`` and the product
