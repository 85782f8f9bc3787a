"""The XNNPACK rewrites of deploy.aten_rewrites: same outputs, and the slow ops are gone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.deploy.aten_rewrites import (
    float_op_forms,
    strided_views_made_contiguous,
    xnnpack_forms,
)
from lwcompile.deploy.identities import phase_weight
from lwcompile.nn import LIST, Resize
from tests.helpers import ConvThen, image_and_mask, runs_in_executorch_as_eager

aten = torch.ops.aten


def with_statistics(bn: nn.BatchNorm2d) -> None:
    """Give ``bn`` non-trivial eval statistics and affine parameters, in place."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)


class ListBlocks(nn.Module):
    """Two LIST-BN-ReLU blocks and a 3x3 output conv, as in the light DnCNN."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(LIST(32, 32), nn.BatchNorm2d(32), nn.ReLU(),
                                  LIST(32, 32), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 3, 3, padding=1))
        for bn in (self.body[1], self.body[4]):
            with_statistics(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class WideAfterCat(nn.Module):
    """A concat of thin inputs feeding a wide conv (GLCIC's image+mask input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 64, 5, padding=2)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([image * (1 - mask), mask], dim=1))


def rewrite(model: nn.Module, *inputs: torch.Tensor) -> tuple[torch.fx.GraphModule, dict]:
    module = torch.export.export(model.eval(), inputs).module()
    return module, xnnpack_forms(module)


def ops(module: torch.fx.GraphModule) -> list:
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


def test_list_blocks_lose_their_concat_batchnorm_and_outer_relu():
    torch.manual_seed(0)
    model = ListBlocks()
    x = torch.rand(1, 32, 16, 16)
    module, forms = rewrite(model, x)
    # block 1's concat feeds block 2's squeeze, block 2's the 3x3 output conv: both split
    assert forms == {"bn-into-cat-convs": 2, "relu-into-cat-parts": 2, "conv-over-cat-split": 2}
    targets = ops(module)
    assert aten.cat.default not in targets and aten.batch_norm.default not in targets
    assert targets.count(aten.relu.default) == 4  # one per branch, fused into its conv
    # 8 LIST convs + the output conv, and each of the 2 split convs became two
    assert targets.count(aten.conv2d.default) == 2 * 4 + 1 + 2
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-6)


def test_concat_feeding_a_wider_conv_is_kept():
    model = WideAfterCat()
    image, mask = image_and_mask(8, 8)
    module, forms = rewrite(model, image, mask)
    assert forms == {}  # 64 output channels to add would move more memory than the concat
    assert aten.cat.default in ops(module)
    with torch.no_grad():
        torch.testing.assert_close(module(image, mask), model(image, mask))


def test_batchnorm_after_a_concat_of_non_convs_is_kept():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(torch.cat([self.conv(x), x], dim=1))

    model = Mixed()
    x = torch.rand(1, 4, 8, 8)
    module, forms = rewrite(model, x)
    assert forms == {}
    assert aten.batch_norm.default in ops(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x))


def test_per_channel_prelu_moves_into_the_branches_and_the_concat_goes():
    torch.manual_seed(0)
    prelu = nn.PReLU(32)
    with torch.no_grad():
        prelu.weight.uniform_(0.05, 0.5)  # a different slope per channel
    model = nn.Sequential(LIST(32, 32), prelu, nn.Conv2d(32, 8, 1))
    x = torch.randn(1, 32, 8, 8)
    module, forms = rewrite(model, x)
    assert forms == {"prelu-into-cat-parts": 1, "conv-over-cat-split": 1}
    assert aten.cat.default not in ops(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-6)


class UpsampleThenSqueeze(nn.Module):
    """The light form of a transposed conv: bilinear x2, then a LIST (whose squeeze is 1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = Resize("scale", stride=(2, 2))
        self.list = LIST(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.list(self.up(x))


def test_squeeze_moves_before_the_upsample_and_the_output_stays():
    torch.manual_seed(0)
    model = UpsampleThenSqueeze().eval()
    x = torch.rand(1, 32, 12, 10)
    module, forms = rewrite(model, x)
    assert forms == {"conv-before-upsample": 1}
    squeeze = next(n for n in module.graph.nodes if n.target is aten.conv2d.default)
    assert squeeze.args[0].op == "placeholder"  # the squeeze now reads the low-res input
    upsample = next(n for n in module.graph.nodes if "upsample" in str(n.target))
    assert upsample.args[0] is squeeze
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [9, 11])
def test_thin_large_kernel_conv_runs_on_pixel_phases_with_the_same_output(k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 3, k, padding=k // 2), nn.Conv2d(3, 3, 9, padding=4,
                                                                           bias=False))
    x = torch.rand(2, 16, 24, 20)
    module, forms = rewrite(model, x)
    assert forms == {"thin-conv-phases": 2}
    assert aten.pixel_unshuffle.default in ops(module)
    torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-4)


def test_small_kernels_and_wide_convs_keep_the_plain_conv():
    assert rewrite(nn.Conv2d(16, 3, 3, padding=1), torch.rand(1, 16, 24, 20))[1] == {}
    assert rewrite(nn.Conv2d(16, 8, 9, padding=4), torch.rand(1, 16, 24, 20))[1] == {}


@pytest.mark.parametrize("size", [(22, 20), (13, 9)])
def test_sizes_not_divisible_by_four_are_padded_and_cropped(size):
    torch.manual_seed(0)
    model = nn.Conv2d(16, 3, 9, padding=4)
    x = torch.rand(1, 16, *size)
    module, forms = rewrite(model, x)
    assert forms == {"thin-conv-phases": 1}
    assert aten.constant_pad_nd.default in ops(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("k", "r"), [(5, 2), (9, 4), (7, 3)])
def test_phase_weight_reproduces_the_same_conv_for_any_kernel_and_phase_count(k, r):
    torch.manual_seed(0)
    w, x = torch.randn(2, 3, k, k), torch.randn(1, 3, 6 * r, 4 * r)
    phased, d = phase_weight(w, r)
    on_phases = F.pixel_shuffle(F.conv2d(F.pixel_unshuffle(x, r), phased, padding=d), r)
    torch.testing.assert_close(on_phases, F.conv2d(x, w, padding=k // 2), rtol=1e-4, atol=1e-4)


def test_single_output_conv_becomes_depthwise_and_sum_with_the_same_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 1, 5, padding=2))
    x = torch.rand(1, 1, 23, 18)
    module, forms = rewrite(model, x)
    assert forms == {"depthwise-sum": 1}
    convs = [n for n in module.graph.nodes if n.target is aten.conv2d.default]
    depthwise, total = convs[1:]
    assert depthwise.args[6] == 32 and total.args[0] is depthwise  # groups: one per channel
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
    # int8 keeps the conv: each depthwise output would be rounded before the sum
    assert xnnpack_forms(torch.export.export(model, (x,)).module(), quantized=True) == {}


def test_narrow_or_multi_output_or_strided_convs_keep_the_plain_conv():
    for conv, channels in ((nn.Conv2d(8, 1, 3, padding=1), 8),
                           (nn.Conv2d(32, 2, 3, padding=1), 32),
                           (nn.Conv2d(32, 1, 3, stride=2, padding=1), 32),
                           (nn.Conv2d(32, 1, 1), 32)):
        assert rewrite(conv, torch.rand(1, channels, 16, 16))[1] == {}


class Crops(nn.Module):
    """``F.pad`` by negative amounts crops (RealCUGAN crops its U-Net's skips this way);
    mixed with positive amounts, and a reflect pad that must stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cropped = F.pad(x, (-2, -2, -1, -3))
        mixed = F.pad(x, (-1, 3, 2, -2), value=0.5)
        return cropped.sum() + mixed * 2 + F.pad(x, (1, 1, 1, 1), mode="reflect")[..., 2:, :]


def test_negative_pads_become_slices_with_the_same_output():
    x = torch.rand(1, 3, 12, 12)
    module, forms = rewrite(Crops(), x)
    assert forms == {"negative-pad-as-slice": 2}
    pads = [n for n in module.graph.nodes
            if n.target in (aten.pad.default, aten.constant_pad_nd.default)]
    # the reflect pad, and the positive part of the mixed one; no negative amount is left
    assert len(pads) == 2 and all(min(n.args[1]) >= 0 for n in pads)
    torch.testing.assert_close(module(x), Crops()(x), rtol=1e-6, atol=0)  # sums reordered


class WindowPadding(nn.Module):
    """Windowed attention's padding to a multiple of the window (DAT, RGT): by nothing when
    the size already is one, by zeros where it is not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = 4
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, -w % window, 0, -h % window))
        return padded[..., :h, :w] * 2


def test_pads_by_nothing_are_removed_and_others_kept():
    for size, removed in (((12, 8), 1), ((10, 8), 0)):
        x = torch.rand(1, 3, *size)
        module, forms = rewrite(WindowPadding(), x)
        assert forms == ({"empty-pad-removed": 1} if removed else {})
        pads = [n for n in module.graph.nodes
                if n.target in (aten.pad.default, aten.constant_pad_nd.default)]
        assert len(pads) == 1 - removed
        torch.testing.assert_close(module(x), WindowPadding()(x), rtol=0, atol=0)


class Pyramid(nn.Module):
    """SAFMN's feature pyramid: adaptive max pools to a half and a quarter of the size, and
    one whose size does not divide the input's (kept), upsampled back and summed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = x
        for size in ((h // 2, w // 2), (h // 4, w // 4), (5, 5)):
            out = out + F.interpolate(F.adaptive_max_pool2d(x, size), size=(h, w))
        return out


def test_adaptive_max_pools_that_divide_become_max_pools_with_the_same_output():
    x = torch.rand(1, 3, 12, 16)
    module, forms = rewrite(Pyramid(), x)
    assert forms == {"adaptive-max-pool-as-pool": 2}
    assert ops(module).count(aten.max_pool2d.default) == 2
    assert ops(module).count(aten.adaptive_max_pool2d.default) == 1  # 12 is no multiple of 5
    torch.testing.assert_close(module(x), Pyramid()(x), rtol=0, atol=0)


class GridAttention(nn.Module):
    """OmniSR's grid attention layout: an image of a batch of one to tokens and back through
    7-D reshapes and permutes; ``elementwise_7d`` also scales the 7-D tensor itself."""

    def __init__(self, elementwise_7d: bool = False) -> None:
        super().__init__()
        self.elementwise_7d = elementwise_7d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        grid = x.reshape(n, c // 2, 2, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4, 6)
        if self.elementwise_7d:
            grid = grid * 2
        tokens = torch.relu(grid.reshape(n, h // 4 * w // 4, c * 16))
        grid = tokens.reshape(n, h // 4, w // 4, c // 2, 2, 4, 4).permute(0, 3, 4, 1, 5, 2, 6)
        return grid.contiguous().reshape(n, c, h, w)


def _ranks(module: torch.fx.GraphModule, x: torch.Tensor) -> set[int]:
    return {len(n.meta["val"].shape) for n in torch.export.export(module, (x,)).graph.nodes
            if isinstance(n.meta.get("val"), torch.Tensor)}


def test_seven_dimensional_layouts_of_one_image_drop_their_leading_unit_dimension():
    x = torch.rand(1, 4, 8, 8)
    module, forms = rewrite(GridAttention(), x)
    assert forms == {"unit-dims-dropped": 2}
    assert max(_ranks(module, x)) == 6
    torch.testing.assert_close(module(x), GridAttention()(x), rtol=0, atol=0)
    # an op other than a layout change reads the 7-D shape back
    module, forms = rewrite(GridAttention(elementwise_7d=True), x)
    assert forms == {"unit-dims-dropped": 2} and 7 in _ranks(module, x)
    torch.testing.assert_close(module(x), GridAttention(elementwise_7d=True)(x), rtol=0, atol=0)


class DownsampleThenSqueeze(nn.Module):
    """The light form of a strided conv: a bilinear resize to the conv's output size, then a
    LIST (whose squeeze is 1x1); ``plain`` also returns the resized tensor itself."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        self.down = Resize("conv", kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
        self.list = LIST(16, 32)
        self.plain = plain

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        low = self.down(x)
        return (self.list(low), low) if self.plain else self.list(low)


def test_halving_resize_and_squeeze_become_one_strided_conv_with_the_same_output():
    torch.manual_seed(0)
    model = DownsampleThenSqueeze().eval()
    x = torch.rand(1, 16, 12, 10)
    module, forms = rewrite(model, x)
    assert forms == {"halving-bilinear-as-conv": 1}
    assert not any("upsample" in str(t) for t in ops(module))
    strided = next(n for n in module.graph.nodes if n.target is aten.conv2d.default)
    assert strided.args[0].op == "placeholder" and list(strided.args[3]) == [2, 2]
    assert tuple(strided.meta["val"].shape) == (1, 4, 6, 5)  # the squeeze's output
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_halving_resize_read_elsewhere_becomes_a_depthwise_average():
    torch.manual_seed(0)
    model = DownsampleThenSqueeze(plain=True).eval()
    x = torch.rand(1, 16, 12, 10)
    module, forms = rewrite(model, x)
    assert forms == {"halving-bilinear-as-conv": 1}
    average = next(n for n in module.graph.nodes if n.target is aten.conv2d.default)
    assert average.args[0].op == "placeholder" and average.args[6] == 16  # depthwise
    for got, want in zip(module(x), model(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(13, 10), (12, 9)])
def test_resizes_that_do_not_halve_exactly_are_kept(size):
    """At an odd size the resize samples between other pixels: no average."""
    model = DownsampleThenSqueeze().eval()
    x = torch.rand(1, 16, *size)
    module, forms = rewrite(model, x)
    assert forms == {}
    assert any("upsample" in str(t) for t in ops(module))
    model = nn.Upsample(scale_factor=0.4, mode="bilinear")  # 10 -> 4: not a halving
    assert rewrite(model, torch.rand(1, 2, 10, 10))[1] == {}


class NormAfterActivation(nn.Module):
    """GSAT's tail: a residual add and ReLU, then a BatchNorm no conv can absorb; and a
    conv-BN pair (the quantiser folds that one itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.after = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.BatchNorm2d(8)
        for bn in (self.bn, self.after):
            with_statistics(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.after(torch.relu(self.bn(self.conv(x)) + x)))


def test_a_lone_batchnorm_becomes_a_depthwise_conv_for_int8_only():
    torch.manual_seed(0)
    model = NormAfterActivation().eval()
    x = torch.randn(1, 8, 6, 6)
    module, forms = rewrite(model, x)
    assert forms == {}  # fp32: ExecuTorch makes the conv itself
    module = torch.export.export(model, (x,)).module()
    assert xnnpack_forms(module, quantized=True) == {"batchnorm-as-depthwise": 1}
    assert ops(module).count(aten.batch_norm.default) == 1  # the conv's, left to fold
    depthwise = [n for n in module.graph.nodes
                 if n.target is aten.conv2d.default and len(n.args) > 6 and n.args[6] == 8]
    assert len(depthwise) == 1 and depthwise[0].args[0].target is aten.relu.default
    torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-6)


def test_mish_becomes_xnnpack_ops_with_the_same_output_over_the_whole_range():
    """ExecuTorch's softplus left XNNPACK at every Mish (MoSR's int8 program then failed to
    run); the exp form is all XNNPACK ops, and equal to Mish from -1e30 to 1e30."""
    x = torch.cat([torch.linspace(-100, 100, 20001),
                   torch.tensor([-1e30, -88.0, 19.99, 20.0, 20.01, 1e30])]).view(1, 1, 1, -1)
    module, forms = rewrite(nn.Mish(), x)
    assert forms == {"mish-as-exp": 1}
    assert aten.mish.default not in ops(module)
    assert set(ops(module)) <= {aten.clamp.default, aten.exp.default, aten.add.Tensor,
                                aten.mul.Tensor, aten.div.Tensor}
    torch.testing.assert_close(module(x), F.mish(x), rtol=1e-6, atol=1e-6)


def test_mish_stays_for_the_quantiser_and_is_rewritten_after_it():
    """Rewritten before quantising, Mish's adds and muls would be annotated for int8."""
    module = torch.export.export(nn.Mish(), (torch.rand(1, 2, 4, 4),)).module()
    assert xnnpack_forms(module, quantized=True) == {}
    assert aten.mish.default in ops(module)
    assert float_op_forms(module) == {"mish-as-exp": 1}
    assert aten.mish.default not in ops(module)


class ChannelNorm(nn.Module):
    """NAFNet's and MoSR's LayerNorm over the channels of an image, beside means XNNPACK
    takes itself (over height and width) or that drop the dimension (kept)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        var = (x - u).pow(2).mean(-3, keepdim=True)
        return (x - u) / torch.sqrt(var + 1e-6) + x.mean((2, 3), keepdim=True) \
            + x.mean(1).unsqueeze(1)


def test_channel_means_become_one_output_convs_with_the_same_output():
    x = torch.randn(1, 24, 9, 7)
    module, forms = rewrite(ChannelNorm(), x)
    assert forms == {"channel-mean-as-conv": 2}
    assert ops(module).count(aten.mean.dim) == 2  # over (2, 3), and the one without keepdim
    assert ops(module).count(aten.conv2d.default) == 2
    torch.testing.assert_close(module(x), ChannelNorm()(x), rtol=1e-5, atol=1e-5)
    # in int8 they stay means for the quantiser, as Mish does
    module = torch.export.export(ChannelNorm(), (x,)).module()
    assert xnnpack_forms(module, quantized=True) == {}
    assert float_op_forms(module) == {"channel-mean-as-conv": 2}


class Splits(nn.Module):
    """NAFNet's SimpleGate (a chunk in two), MoSR's three-way split by sizes, a split by a
    size that leaves a shorter last part, and a chunk that does."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = x.chunk(2, dim=1)
        c, d, e = torch.split(x, [4, 6, 2], dim=1)
        f = torch.split(x, 5, dim=-1)
        g = x.chunk(3, dim=-1)
        return a * b, c * 2 + d[:, :4] + e.sum(1, keepdim=True), f[-1], f[0], g[2]


def test_splits_and_chunks_become_slices_with_the_same_output():
    x = torch.randn(1, 12, 5, 11)
    module, forms = rewrite(Splits(), x)
    assert forms == {"split-as-slices": 4}
    assert {str(t) for t in ops(module)} == {"aten.slice.Tensor", "aten.mul.Tensor",
                                              "aten.add.Tensor", "aten.sum.dim_IntList"}
    for got, want in zip(module(x), Splits()(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class ChannelExtremes(nn.Module):
    """HVICIDNet's HSV value (``x.max(1)[0]``), a max over the width kept for XNNPACK, and a
    max whose indices are read."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        value = x.max(1)[0]
        widest = x.max(3, keepdim=True)[0]
        peak, where = x.max(2)
        return value * 2, widest, peak + where


def test_maxes_xnnpack_cannot_lower_become_amax_with_the_same_output():
    x = torch.randn(1, 3, 6, 5)
    module, forms = rewrite(ChannelExtremes(), x)
    assert forms == {"max-dim-as-amax": 1}
    assert ops(module).count(aten.amax.default) == 1
    assert ops(module).count(aten.max.dim) == 2
    for got, want in zip(module(x), ChannelExtremes()(x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_channel_max_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    model = ConvThen(lambda y, x: y * x.max(1, keepdim=True)[0]).eval()
    export = runs_in_executorch_as_eager(model, torch.rand(1, 3, 8, 8), tmp_path / "v.pte")
    assert export.forms == {"max-dim-as-amax": 1}


class MatrixAsImage(nn.Module):
    """A per-pixel matrix product viewed back as an image through a transpose (KBNet's
    kernel-basis attention): the view's strides are channels-last. The second view is of
    a contiguous tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.randn(4, 4))
        self.beta = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pixels = x.reshape(b, c, h * w).transpose(1, 2) @ self.mix
        image = pixels.transpose(1, 2).reshape(b, c, h, w)
        return x + image * self.beta + pixels.reshape(b, c, h, w)


def test_a_strided_view_gets_a_contiguous_copy():
    x = torch.randn(1, 4, 5, 6)
    model = MatrixAsImage().eval()
    module = torch.export.export(model, (x,)).module()
    assert strided_views_made_contiguous(module) == {"strided-view-made-contiguous": 1}
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)
    again = torch.export.export(module, (x,)).module()
    images = [n for n in again.graph.nodes if n.op == "call_function"
              and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4]
    strided = [n for n in images if not n.meta["val"].is_contiguous()]
    assert [n.target for n in strided] == [aten.reshape.default]  # the view itself
    assert [u.target for u in strided[0].users] == [aten.clone.default]
    assert len(images) > 4
    # not a form of its own: export_mobile applies it only to an int8 program that failed
    assert xnnpack_forms(torch.export.export(model, (x,)).module(), quantized=True) == {}


@pytest.mark.slow  # quantises and lowers to ExecuTorch
def test_an_int8_program_that_does_not_run_is_lowered_again_with_contiguous_views(
        tmp_path, monkeypatch):
    pytest.importorskip("executorch")
    from lwcompile.deploy import mobile

    runs = []

    def first_run_fails(buffer, inputs, leading):
        runs.append(buffer)
        if len(runs) == 1:
            raise mobile.MobileExportError("the ExecuTorch runtime could not run it")
        return run_program(buffer, inputs, leading)

    run_program = mobile._run_program
    monkeypatch.setattr(mobile, "_run_program", first_run_fails)
    x = torch.rand(1, 4, 6, 6)
    export = mobile.export_mobile(MatrixAsImage().eval(), (x,), tmp_path / "m.pte",
                                  precision="int8", calibration=torch.rand(2, 4, 6, 6),
                                  evaluation_count=1)
    assert len(runs) == 2 and runs[0] != runs[1]
    assert export.forms["strided-view-made-contiguous"] == 1
    assert (tmp_path / "m.pte").read_bytes() == runs[1]
    assert export.int8_report.psnr_db > 30

    runs.clear()  # nothing to copy: the failure stands, and no file
    with pytest.raises(mobile.MobileExportError, match="could not run"):
        mobile.export_mobile(ConvThen(lambda y, x: torch.relu(y)).eval(), (x[:, :3],),
                             tmp_path / "c.pte", precision="int8",
                             calibration=torch.rand(2, 3, 6, 6), evaluation_count=1)
    assert len(runs) == 1 and not (tmp_path / "c.pte").exists()


class Codebook(nn.Module):
    """A vector quantiser as RestoreFormer's: latents permuted to channels-last order,
    flattened to (N*H*W, C) for the distances to a codebook, the nearest entries put back."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(16, 16, 1))
        self.codes = nn.Embedding(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x).permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, 16)
        distance = (flat ** 2).sum(1, keepdim=True) + (self.codes.weight ** 2).sum(1) \
            - 2 * flat @ self.codes.weight.t()
        nearest = self.codes(distance.argmin(1)).view(z.shape)
        return (z + (nearest - z)).permute(0, 3, 1, 2)


class TokensOnly(nn.Module):
    """An image permuted to channels-last order and read by reshapes only (windowed
    attention, HAT's and DAT's): left as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 1).reshape(1, -1, 4)
        return tokens.softmax(-1).reshape(x.shape[0], x.shape[2], x.shape[3], 4)


def test_a_channels_last_flatten_reads_a_3d_transpose_for_int8_only():
    torch.manual_seed(0)
    model = Codebook().eval()
    x = torch.rand(1, 3, 8, 6)
    assert rewrite(model, x)[1] == {}  # fp32 lowers the 4-D form
    module = torch.export.export(model, (x,)).module()
    assert xnnpack_forms(module, quantized=True) == {"channels-last-flatten-as-transpose": 1}
    flat = next(n for n in module.graph.nodes if n.target is aten.pow.Tensor_Scalar).args[0]
    tokens = flat.args[0]
    assert flat.target is aten.reshape.default and tokens.target is aten.permute.default
    assert list(tokens.args[1]) == [0, 2, 1] and tokens.args[0].meta["val"].shape == (1, 16, 48)
    # the permuted image itself stays for its other readers
    assert [list(n.args[1]) for n in module.graph.nodes if n.target is aten.permute.default] \
        == [[0, 2, 3, 1], [0, 2, 1], [0, 3, 1, 2]]
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)
    tokens = torch.export.export(TokensOnly(), (x[:, :1].expand(1, 4, 8, 6),)).module()
    assert xnnpack_forms(tokens, quantized=True) == {}


@pytest.mark.slow  # quantises and lowers to ExecuTorch
def test_a_codebook_lookup_deploys_to_xnnpack_int8(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import MobileExportError, export_mobile

    torch.manual_seed(0)
    x, data = torch.rand(1, 3, 16, 16), torch.rand(4, 3, 16, 16)
    options = {"precision": "int8", "calibration": data, "evaluation_count": 1,
               "max_float_layers": 0}
    # why the form exists: without it ExecuTorch's layout pass fails on this model
    with pytest.raises(MobileExportError, match="ChannelsLastTaggedReshapePass"):
        export_mobile(Codebook().eval(), (x,), tmp_path / "plain.pte", optimize=False,
                      **options)
    assert not (tmp_path / "plain.pte").exists()
    export = export_mobile(Codebook().eval(), (x,), tmp_path / "m.pte", **options)
    assert export.forms["channels-last-flatten-as-transpose"] == 1
    assert (tmp_path / "m.pte").stat().st_size == export.size_bytes
    assert export.int8_report.psnr_db > 20



class NormThenCrop(nn.Module):
    """A token LayerNorm (run by ExecuTorch's own kernel), a conv and a pixel shuffle, the
    mean added back and a crop to the whole size (ATD's tail): torch.export writes the
    crop as an alias."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv2d(8, 48, 3, padding=1)
        self.register_buffer("mean", torch.rand(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        image = tokens.transpose(1, 2).reshape(b, c, h, w)
        y = torch.pixel_shuffle(self.conv(image), 4) / 1.0 + self.mean.type_as(x)
        return y[:, :, :h * 4, :w * 4]


def test_aliases_of_computed_tensors_are_removed_and_the_output_kept():
    x = torch.rand(1, 8, 6, 5)
    model = NormThenCrop().eval()
    module, forms = rewrite(model, x)
    assert forms == {"alias-removed": 1}
    assert aten.alias.default not in ops(module)
    torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)
    # an alias of an input is left alone: returning the input itself would alias it
    module, forms = rewrite(ConvThen(lambda y, x: (y, x[:, :, :6, :5])), x[:, :3])
    assert "alias-removed" not in forms and aten.alias.default in ops(module)


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_whole_size_crop_after_a_delegate_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    # without the form ExecuTorch's alias kernel refused the channels-last tensor XNNPACK
    # returned, and the program did not run
    export = runs_in_executorch_as_eager(NormThenCrop().eval(), torch.rand(1, 8, 16, 16),
                                         tmp_path / "c.pte")
    assert export.forms == {"alias-removed": 1}


class Noise(nn.Module):
    """Noise drawn like a tensor, both ways StyleGAN-style generators draw it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn_like(x), x.new_empty(x.shape).normal_(2.0, 3.0)


def statistics(t: torch.Tensor) -> tuple[float, float]:
    return float(t.mean()), float(t.std())


def test_noise_drawn_like_a_tensor_becomes_randn_of_the_same_distribution():
    x = torch.rand(1, 1, 64, 64)  # 4096 draws: the mean within 0.016 std, 0.1 is 6 of those
    module, forms = rewrite(Noise(), x)
    assert forms == {"noise-as-randn": 2}
    assert ops(module).count(aten.randn.default) == 2
    assert not {aten.randn_like.default, aten.normal_.default} & set(ops(module))
    standard, scaled = module(x)
    assert standard.shape == scaled.shape == x.shape
    for got, (mean, std) in ((standard, (0.0, 1.0)), (scaled, (2.0, 3.0))):
        got_mean, got_std = statistics(got)
        assert abs(got_mean - mean) < 0.1 * std and abs(got_std - std) < 0.1 * std
    assert not torch.equal(module(x)[0], standard)  # drawn anew on each run


@pytest.mark.slow  # lowers to ExecuTorch
def test_noise_drawn_in_executorch_is_new_standard_noise_on_each_run(tmp_path):
    pytest.importorskip("executorch")
    from lwcompile.deploy.mobile import export_mobile, load_pte

    model = ConvThen(lambda y, x: y + torch.randn_like(y)).eval()
    x = torch.rand(1, 3, 32, 32)
    export = export_mobile(model, (x,), tmp_path / "n.pte")  # refused before the form
    assert export.forms["noise-as-randn"] == 1
    run = load_pte(export.path)
    with torch.no_grad():
        first, second = (run(x)[0] - model.conv(x) for _ in range(2))
    mean, std = statistics(first)
    assert abs(mean) < 0.1 and abs(std - 1.0) < 0.1
    assert not torch.equal(first, second)
