"""list-unpadded: LIST for kxk convs that shrink their input (RealCUGAN's padding=0 convs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile import LIST
from lwcompile.report import REFUSED
from lwcompile.rules.list_unpadded import UnpaddedLIST, UnpaddedListRule


class Shrinking(nn.Module):
    """Two unpadded 3x3 convs and a crop of the skip to match, as in RealCUGAN's U-Net."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(32, 32, 3), nn.LeakyReLU(0.1),
                                  nn.Conv2d(32, 32, 5, padding=1))
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        return self.tail(self.body(feat) + feat[..., 2:-2, 2:-2])


def test_unpadded_convs_become_lists_with_the_original_output_size():
    torch.manual_seed(0)
    model = Shrinking().eval()
    x = torch.rand(1, 3, 20, 18)
    light = lwcompile.lighten(model, (x,), rules=[UnpaddedListRule()])
    report = light.lwcompile_report
    assert [(r.site, r.decided_by) for r in report.applied] == [
        ("body.0", "list-unpadded"), ("body.2", "list-unpadded")]
    # LIST(32, 32, k, 4): squeeze 264, 1x1 branch 144, depthwise 8 k^2 + 8, its 1x1 144
    assert [(r.params_before, r.params_after) for r in report.applied] == [
        (9_248, 632), (25_632, 760)]
    assert light(x).shape == model(x).shape == (1, 3, 16, 14)
    assert light(torch.rand(2, 3, 11, 13)).shape == (2, 3, 7, 9)


@pytest.mark.parametrize("kernel,padding", [(3, 0), (5, 0), (5, 1)])
def test_it_computes_a_same_padded_list_on_the_pixels_an_unpadded_conv_keeps(kernel, padding):
    torch.manual_seed(0)
    unpadded = UnpaddedLIST(16, 8, kernel, 4, padding)
    same = LIST(16, 8, kernel, 4)
    same.load_state_dict(unpadded.state_dict())
    x = torch.rand(2, 16, 12, 15)
    crop = kernel // 2 - padding
    torch.testing.assert_close(unpadded(x), same(x)[..., crop:-crop, crop:-crop])


def test_an_unbatched_input_gives_what_the_unpadded_conv_gives_it():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 5, padding=1)
    unpadded = UnpaddedLIST(16, 8, 5, 4, padding=1)
    x = torch.rand(16, 12, 15)  # CxHxW, as nn.Conv2d accepts
    assert unpadded(x).shape == conv(x).shape == (8, 10, 13)
    torch.testing.assert_close(unpadded(x), unpadded(x[None])[0])


def test_channels_that_do_not_split_are_refused_and_same_convs_left_to_list():
    model = nn.Sequential(nn.Conv2d(32, 31, 3), nn.Conv2d(31, 32, 3, padding=1)).eval()
    report = lwcompile.plan(model, (torch.rand(1, 32, 12, 12),), rules=[UnpaddedListRule()])
    (row,) = report.not_applied
    assert (row.site, row.outcome) == ("0", REFUSED)
    assert "do not split into two equal branches" in row.reason


def test_init_layerwise_solves_both_heads():
    torch.manual_seed(0)
    teacher = Shrinking().eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 3, 20, 20),), rules=[UnpaddedListRule()])
    errors = lwcompile.init_layerwise(light, teacher, torch.rand(4, 3, 28, 28), batch_size=2,
                                      crop=24, steps=5)
    assert set(errors) == {"body.0", "body.2"}
    assert all(errors[site] < errors.before[site] for site in errors)
