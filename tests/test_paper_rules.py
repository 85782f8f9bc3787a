"""The paper's rule set on its three kinds of network, and the guard that refuses the harmful
depthwise sub-pixel rewrite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwcompile
from examples import glcic, srresnet, unet
from examples.custom_rules import DepthwiseSeparable
from lwcompile import GSAT, LIST, Match, NoMatch, Resize, Rule, Site, count_params
from lwcompile.errors import RuleError
from lwcompile.report import APPLIED, KEPT
from lwcompile.rules.image_output_squeeze import ImageOutputSqueezeRule
from lwcompile.rules.split_concat_pointwise import SplitConcatPointwiseRule
from tests.helpers import depthwise_feeding_pixel_shuffle, image_and_mask


def lightened(example) -> tuple[nn.Module, nn.Module]:  # noqa: ANN001 - an examples module
    torch.manual_seed(0)
    model = example.build()
    return model, lwcompile.lighten(model, example.example_inputs())


def test_module_weights_match_the_paper():
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters()  # noqa: E731
                            if n.endswith("weight") and p.dim() == 4)
    assert count_params(LIST(64, 64)) == 2_288
    assert weights(GSAT(64, dilation=2)) == 5_120


def test_srresnet():
    model, light = lightened(srresnet)
    assert count_params(model) / count_params(light) >= 12
    x = srresnet.example_inputs()[0]
    assert light(x).shape == model(x).shape == (1, 3, 128, 128)
    rows = {r.site: r for r in light.lwcompile_report.rows}
    assert rows["upsample.0"].decided_by == rows["upsample.3"].decided_by == "subpixel"
    assert not any(isinstance(m, nn.PixelShuffle) for m in light.modules())
    assert depthwise_feeding_pixel_shuffle(light, (x,)) == set()


@pytest.mark.slow  # the paper's full-size completion network
def test_glcic():
    model, light = lightened(glcic)
    assert count_params(model) / count_params(light) >= 10
    by_site = {r.site: r for r in light.lwcompile_report.rows}
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d) and max(conv.dilation) > 1:
            assert by_site[name].decided_by == "gsat" and by_site[name].outcome == APPLIED
            assert isinstance(light.get_submodule(name), GSAT)
        elif isinstance(conv, nn.ConvTranspose2d) or (
                isinstance(conv, nn.Conv2d) and max(conv.stride) > 1):
            assert by_site[name].outcome == APPLIED
            resize, lst = light.get_submodule(name)
            assert isinstance(resize, Resize) and isinstance(lst, LIST)
    for h, w in ((64, 64), (67, 61), (33, 50)):
        image, mask = image_and_mask(h, w)
        assert light(image, mask).shape == model(image, mask).shape


@pytest.mark.parametrize("size", [(31, 17), (32, 32), (45, 64), (7, 9)])
@pytest.mark.parametrize("conv", [
    nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.Conv2d(32, 64, 4, stride=2, padding=1),
    nn.Conv2d(32, 64, 5, stride=3, padding=2, dilation=1),
    nn.ConvTranspose2d(32, 64, 4, stride=2, padding=1),
    nn.ConvTranspose2d(32, 64, 3, stride=2, padding=1, output_padding=1),
    nn.ConvTranspose2d(32, 64, 2, stride=2),
])
def test_resample_rewrites_keep_the_size_for_every_input(conv, size):
    model = nn.Sequential(conv)
    light = lwcompile.lighten(model, (torch.rand(1, 32, 16, 16),))
    assert light.lwcompile_report.applied
    x = torch.rand(2, 32, *size)
    assert light(x).shape == model(x).shape


def test_unet_lists_its_concat_skips():
    _, light = lightened(unet)
    skips = light.lwcompile_report.notes["concat_skips"]
    assert [s["channels"] for s in skips] == [(128, 128), (64, 64), (32, 32)]
    assert all(len(set(s["depths"])) == 2 for s in skips)
    assert "3 concat skips" in str(light.lwcompile_report)
    # convs that consume the concats kept their channel bookkeeping: the model runs
    x = torch.rand(1, 3, 48, 40)
    assert light(x).shape == x.shape


def test_split_1x1_over_concat_is_exact_and_lowers_peak_memory():
    torch.manual_seed(0)
    model = unet.build()
    x = unet.example_inputs()
    split = lwcompile.lighten(model, x, rules=[SplitConcatPointwiseRule()])
    assert [r.decided_by for r in split.lwcompile_report.applied] == ["split-concat-1x1"] * 3
    assert not any(n.target is torch.cat for n in split.graph.nodes)
    y = torch.rand(1, 3, 40, 56)
    torch.testing.assert_close(split(y), model(y), rtol=1e-5, atol=1e-5)
    s = split.lwcompile_report.summary
    assert s.params_after == s.params_before
    assert s.peak_activation_after < s.peak_activation_before


def test_list_over_a_concat_keeps_channel_bookkeeping():
    class Fuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 24, 3, padding=1), nn.Conv2d(3, 40, 3, padding=1)
            self.fuse = nn.Conv2d(64, 32, 3, padding=1)

        def forward(self, x):
            return self.fuse(torch.cat([self.a(x), self.b(x)], dim=1))

    light = lwcompile.lighten(Fuse())
    assert isinstance(light.fuse, LIST) and light.fuse.squeeze.in_channels == 64
    assert light(torch.rand(1, 3, 20, 20)).shape == (1, 32, 20, 20)


def test_guard_stops_depthwise_separable_exactly_at_the_subpixel_convs():
    model = srresnet.SRResNet(scale=4, features=32, blocks=2)
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(model, (x,), rules=[DepthwiseSeparable()])
    rows = light.lwcompile_report.rows
    vetoed = {r.site for r in rows if r.decided_by == "no-depthwise-subpixel"}
    assert vetoed == {"upsample.0", "upsample.3"}
    for r in rows:
        if r.site in vetoed:
            assert r.outcome == KEPT and "grid artifacts" in r.reason and "LIST" in r.reason
        else:
            assert r.outcome == APPLIED or r.decided_by == "image-boundary"
    assert sum(r.outcome == APPLIED for r in rows) == 5  # 2x2 block convs + fuse
    assert depthwise_feeding_pixel_shuffle(light, (x,)) == set()
    assert light(x).shape == model(x).shape


def test_guard_also_sees_a_pixel_shuffle_inside_the_replacement():
    class DepthwiseSubpixel(Rule):
        """Replaces conv -> pixel shuffle with a depthwise-separable conv -> pixel shuffle."""

        name = "dw-subpixel"
        priority = 0

        def match(self, site: Site):
            users = site.consumers
            if len(users) == 1 and users[0].op == "call_module" and "upsample" in site.name:
                return Match(site, nodes=(site.node, users[0]))
            return NoMatch("not followed by a pixel shuffle module")

        def build(self, match: Match) -> nn.Module:
            c = match.site.module
            return nn.Sequential(
                nn.Conv2d(c.in_channels, c.in_channels, 3, padding=1, groups=c.in_channels),
                nn.Conv2d(c.in_channels, c.out_channels, 1), nn.PixelShuffle(2))

    model = srresnet.SRResNet(scale=2, features=32, blocks=1)
    with pytest.raises(lwcompile.NothingToLighten, match="kept by no-depthwise-subpixel") as err:
        lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),), rules=[DepthwiseSubpixel()])
    (row,) = err.value.report.rows
    assert row.outcome == KEPT and row.decided_by == "no-depthwise-subpixel"
    assert "inside the replacement" in row.reason


def test_subpixel_rewrite_inside_untraceable_code():
    """Where fx cannot see the shuffle, the conv is swapped for resize + LIST + unshuffle:
    the shuffle that follows undoes the unshuffle exactly, so the result is resize + LIST."""

    class PaddedSR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(3, 32, 3, padding=1)
            self.up = nn.Conv2d(32, 32 * 4, 3, padding=1)
            self.shuffle = nn.PixelShuffle(2)
            self.tail = nn.Conv2d(32, 3, 3, padding=1)

        def forward(self, x):
            if x.shape[-1] % 2:  # shape-dependent control flow: nothing here traces
                x = nn.functional.pad(x, (0, 1))
            return self.tail(self.shuffle(torch.relu(self.up(self.head(x)))))

    model = PaddedSR()
    x = torch.rand(1, 3, 12, 15)
    light = lwcompile.lighten(model, (x,))
    (row,) = light.lwcompile_report.applied
    assert row.site == "up" and row.decided_by == "subpixel" and "unshuffle" in row.replacement
    resize, lst, unshuffle = light.up
    assert isinstance(unshuffle, nn.PixelUnshuffle) and unshuffle.downscale_factor == 2
    h = torch.rand(1, 32, 6, 8)
    torch.testing.assert_close(light.shuffle(light.up(h)), lst(resize(h)))
    assert light(x).shape == model(x).shape
    assert depthwise_feeding_pixel_shuffle(light, (x,)) == set()


def test_image_output_squeeze_is_default_and_takes_only_srresnets_9x9_output_conv():
    model = srresnet.build()
    x = srresnet.example_inputs()
    light = lwcompile.lighten(model, x)
    rows = {r.site: r for r in light.lwcompile_report.rows}
    assert rows["tail"].outcome == APPLIED and rows["tail"].decided_by == "image-output-squeeze"
    assert rows["head.0"].outcome == KEPT  # 3->64 9x9 reads the image: not this rule's
    assert rows["head.0"].decided_by == "image-boundary"
    squeeze, spatial = light.tail
    assert (squeeze.in_channels, squeeze.out_channels, spatial.kernel_size) == (64, 16, (9, 9))
    assert count_params(light.tail) == 64 * 16 + 16 * 3 * 81 + 3
    assert count_params(light) == 104_854
    assert light(*x).shape == (1, 3, 128, 128)
    # the paper's choice (every image-facing layer standard): leave the rule out, or the site
    paper = lwcompile.lighten(model, x, rules=lwcompile.default_rules(
        without=["image-output-squeeze"]))
    assert count_params(paper.tail) == 64 * 3 * 81 + 3
    assert (count_params(paper) == 104_854 - count_params(light.tail) + count_params(paper.tail)
            == 115_494)
    excluded = lwcompile.lighten(model, x, exclude=["tail"])
    assert {r.site: r.decided_by for r in excluded.lwcompile_report.rows}["tail"] == "exclude"
    assert count_params(excluded) == 115_494


def test_default_rules_without_leaves_named_rules_out_and_refuses_unknown_names():
    names = [r.name for r in lwcompile.default_rules()]
    assert "image-output-squeeze" in names and "list" in names
    assert [r.name for r in lwcompile.default_rules(without=["image-output-squeeze", "gsat"])
            ] == [n for n in names if n not in ("image-output-squeeze", "gsat")]
    with pytest.raises(RuleError, match="no default rule named 'lits'"):
        lwcompile.default_rules(without=["lits"])


def test_image_output_squeeze_starts_exact_when_the_conv_reads_a_low_rank_subspace():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 3, 7, padding=3)
    with torch.no_grad():  # weight[o, c] = sum_j spatial[o, j] squeeze[j, c], rank 8
        conv.weight.copy_(torch.einsum("ojhw,jc->ochw", torch.randn(3, 8, 7, 7),
                                       torch.randn(8, 32)))
    rule = ImageOutputSqueezeRule()
    site = Site("tail", conv, (torch.Size([1, 32, 20, 20]),), torch.Size([1, 3, 20, 20]))
    match = rule.match(site)
    assert match
    replacement = rule.build(match)
    x = torch.randn(2, 32, 20, 20)
    torch.testing.assert_close(replacement(x), conv(x), rtol=1e-4, atol=1e-4)
    assert not rule.match(Site("body", nn.Conv2d(32, 3, 3, padding=1), site.input_shapes,
                               site.output_shape))  # 3x3: left to the image-boundary guard
    # the same conv inside the network (another layer reads its output) writes no image
    inside = Site("tail", conv, site.input_shapes, site.output_shape, writes_output=False)
    assert "not an image-writing conv" in rule.match(inside).reason


def test_image_output_squeeze_takes_a_subpixel_conv_that_writes_the_image():
    """3x3 32 -> 3*16 before a x4 shuffle: LIST cannot split 3 colours, so `subpixel` refuses;
    the squeeze keeps a full 3x3 kernel per phase and colour (nothing depthwise)."""

    class TinySR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(3, 32, 3, padding=1)
            self.body = nn.Conv2d(32, 32, 3, padding=1)
            self.up = nn.Sequential(nn.Conv2d(32, 3 * 16, 3, padding=1), nn.PixelShuffle(4))

        def forward(self, x):
            return self.up(torch.relu(self.body(self.head(x))))

    torch.manual_seed(0)
    model = TinySR().eval()
    x = torch.rand(1, 3, 12, 10)
    light = lwcompile.lighten(model, (x,))
    row = {r.site: r for r in light.lwcompile_report.rows}["up.0"]
    assert row.outcome == APPLIED and row.decided_by == "image-output-squeeze"
    squeeze, spatial = light.get_submodule("up.0").children()
    assert (squeeze.in_channels, squeeze.out_channels) == (32, 8)
    assert (spatial.in_channels, spatial.out_channels, spatial.kernel_size) == (8, 48, (3, 3))
    assert count_params(light.up) == 32 * 8 + 8 * 48 * 9 + 48
    assert light(x).shape == model(x).shape == (1, 3, 48, 40)
    assert depthwise_feeding_pixel_shuffle(light, (x,)) == set()


def test_image_output_squeeze_leaves_convs_it_would_barely_shrink():
    rule = ImageOutputSqueezeRule()
    shapes = (torch.Size([1, 64, 20, 20]),)
    for conv, why in ((nn.Conv2d(64, 3, 3, padding=1), "kept as the paper keeps it"),
                      (nn.Conv2d(64, 1, 5, padding=2), "saves 1.12x of this conv's MACs")):
        verdict = rule.match(Site("tail", conv, shapes, torch.Size([1, conv.out_channels, 20, 20])))
        assert isinstance(verdict, NoMatch) and why in verdict.reason
    wide = nn.Conv2d(64, 3 * 4, 3, padding=1)  # x2 shuffle phases count only when it feeds one
    verdict = rule.match(Site("up", wide, shapes, torch.Size([1, 12, 20, 20])))
    assert isinstance(verdict, NoMatch) and "not an image-writing conv" in verdict.reason
    assert rule.match(Site("up", wide, shapes, torch.Size([1, 12, 20, 20]),
                           feeds_pixel_shuffle=True, pixel_shuffle_factor=2))


def test_list_squeezes_channel_counts_the_ratio_does_not_divide():
    """MoESR's 3x3 85 -> 32 conv: the squeeze keeps ceil(85 / 4) = 22 channels."""
    model = nn.Sequential(nn.Conv2d(16, 85, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(85, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 16, 3, padding=1))
    x = torch.rand(1, 16, 10, 10)
    light = lwcompile.lighten(model, (x,))
    row = {r.site: r for r in light.lwcompile_report.rows}["2"]
    assert row.outcome == APPLIED and row.decided_by == "list"
    lst = light.get_submodule("2")
    assert lst.squeeze.out_channels == 22 == LIST.squeeze_width(85, 4)
    assert count_params(lst) == (85 * 22 + 22) + (22 * 16 + 16) + (22 * 9 + 22) + (22 * 16 + 16)
    assert light(x).shape == model(x).shape
    with pytest.raises(ValueError, match="at least 4 in_channels"):
        LIST(3, 8)
