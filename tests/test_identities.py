"""The deployment identities (deploy.identities) against the computation they rewrite, and
the channel-concat test shared by both graph levels (tracing.fx_helpers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lwcompile import channel_concat_parts
from lwcompile.deploy import identities
from lwcompile.files import write_atomic
from lwcompile.tracing.trace import ShapeRecorder
from tests.helpers import close


@pytest.mark.parametrize(("k", "padding_mode"), [(1, "zeros"), (3, "zeros"), (3, "reflect")])
def test_conv_of_a_concat_is_the_sum_of_convs_of_its_parts(k, padding_mode):
    torch.manual_seed(0)
    sizes = [3, 5, 2]
    conv = nn.Conv2d(sum(sizes), 4, k, padding=k // 2, padding_mode=padding_mode)
    parts = [torch.randn(1, c, 9, 7) for c in sizes]
    terms = identities.split_inputs(conv.weight.detach(), conv.bias.detach(), sizes)
    assert [b is None for _, b in terms] == [False, True, True]  # the bias once
    total = sum(F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect") if padding_mode == "reflect"
                         else x, w, b, padding=0 if padding_mode == "reflect" else k // 2)
                for x, (w, b) in zip(parts, terms, strict=True))
    with torch.no_grad():
        close(total, conv(torch.cat(parts, dim=1)))


def test_grouped_conv_of_a_concat_is_the_concat_of_per_part_convs():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 1, groups=2)
    parts = [torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)]
    split = identities.split_groups(conv.weight.detach(), conv.bias.detach(), 2)
    with torch.no_grad():
        close(torch.cat([F.conv2d(x, w, b) for x, (w, b) in zip(parts, split, strict=True)], 1),
              conv(torch.cat(parts, dim=1)))


@pytest.mark.parametrize("channels", [1, 7])
def test_prelu_of_a_concat_is_the_concat_of_per_part_prelus(channels):
    torch.manual_seed(0)
    slopes = torch.rand(channels)
    parts = [torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3)]
    pieces = identities.split_per_channel(slopes, [4, 3])
    close(torch.cat([F.prelu(x, s) for x, s in zip(parts, pieces, strict=True)], 1),
          F.prelu(torch.cat(parts, 1), slopes))


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _stats(bn: nn.BatchNorm2d) -> identities.BatchNormStats:
    return identities.BatchNormStats(bn.running_mean, bn.running_var, bn.eps,
                                     bn.weight.detach(), bn.bias.detach())


@pytest.mark.parametrize("transpose", [False, True])
def test_batchnorm_folds_into_the_conv_before_it(transpose):
    torch.manual_seed(0)
    conv = (nn.ConvTranspose2d(4, 6, 3, stride=2, bias=False) if transpose
            else nn.Conv2d(4, 6, 3, bias=False))
    bn = _batchnorm(6)
    w, b = identities.fold_bn(conv.weight.detach(), None, _stats(bn), transpose=transpose)
    x = torch.randn(1, 4, 8, 8)
    folded = (F.conv_transpose2d(x, w, b, stride=2) if transpose else F.conv2d(x, w, b))
    with torch.no_grad():
        close(folded, bn(conv(x)))


def test_batchnorm_after_a_concat_folds_into_each_part():
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 2, 1), nn.Conv2d(4, 5, 3, padding=1)]
    bn = _batchnorm(7)
    folded = identities.fold_bn_into_parts(
        [(c.weight.detach(), c.bias.detach()) for c in convs], _stats(bn))
    x = torch.randn(1, 4, 6, 6)
    got = torch.cat([F.conv2d(x, w, b, padding=c.padding)
                     for c, (w, b) in zip(convs, folded, strict=True)], 1)
    with torch.no_grad():
        close(got, bn(torch.cat([c(x) for c in convs], 1)))


@pytest.mark.parametrize("mode", sorted(identities.COMMUTING_UPSAMPLE_MODES))
def test_pointwise_conv_commutes_with_the_upsampling_modes_named(mode):
    torch.manual_seed(0)
    conv, x = nn.Conv2d(8, 3, 1), torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        close(F.interpolate(conv(x), scale_factor=2, mode=mode),
              conv(F.interpolate(x, scale_factor=2, mode=mode)))


@pytest.mark.parametrize(("k", "r", "size"), [(9, 4, (16, 12)), (5, 2, (6, 8)), (7, 3, (9, 12))])
def test_both_phase_forms_equal_the_same_conv(k, r, size):
    torch.manual_seed(0)
    w, bias, x = torch.randn(2, 3, k, k), torch.randn(2), torch.randn(1, 3, *size)
    expected = F.conv2d(x, w, bias, padding=k // 2)
    phased, d = identities.phase_weight(w, r)
    b = identities.phase_bias(bias, r)
    close(F.pixel_shuffle(F.conv2d(F.pixel_unshuffle(x, r), phased, b, padding=d), r),
          expected)
    strided, padding = identities.strided_phase_weight(w, r)
    close(F.pixel_shuffle(F.conv2d(x, strided, b, stride=r, padding=padding), r), expected)


def test_thin_means_large_kernel_few_outputs_same_padding():
    assert identities.thin_conv(3, (9, 9), (4, 4), (1, 1), (1, 1), 1)
    assert not identities.thin_conv(3, (3, 3), (1, 1), (1, 1), (1, 1), 1)  # small kernel
    assert not identities.thin_conv(8, (9, 9), (4, 4), (1, 1), (1, 1), 1)  # 8 outputs
    assert not identities.thin_conv(3, (9, 9), (0, 0), (1, 1), (1, 1), 1)  # not "same"
    assert not identities.thin_conv(3, (9, 9), (4, 4), (2, 2), (1, 1), 1)  # strided


def test_a_sum_pays_off_for_a_squeezing_conv_only():
    # 64 channels concatenated, two parts: a 1x1 to 16 (a LIST squeeze) vs a conv to 64
    pixels = 32 * 32
    assert identities.sum_of_parts_pays_off(64 * pixels, 16 * pixels, 2)
    assert not identities.sum_of_parts_pays_off(64 * pixels, 64 * pixels, 2)


class _Cats(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
        return (torch.cat([a, b], dim=1), torch.cat([a, b], -3), torch.cat([a, a], dim=0),
                torch.cat([a.flatten(1), b.flatten(1)], 1))


def test_channel_concat_parts_at_module_and_aten_level():
    a, b = torch.rand(1, 2, 4, 4), torch.rand(1, 3, 4, 4)
    gm = fx.symbolic_trace(_Cats())
    ShapeRecorder(gm).run(a, b)
    found = [channel_concat_parts(n) for n in gm.graph.nodes if n.target is torch.cat]
    assert [p is not None for p in found] == [True, True, False, False]
    assert [p.name for p in found[0]] == ["a", "b"]  # dim 0: a batch concat, not channels
    exported = torch.export.export(_Cats(), (a, b)).module()
    found = [channel_concat_parts(n) for n in exported.graph.nodes
             if n.target is torch.ops.aten.cat.default]
    assert [p is not None for p in found] == [True, True, False, False]
    unrecorded = fx.symbolic_trace(_Cats())  # no shapes: nothing can be said
    assert all(channel_concat_parts(n) is None for n in unrecorded.graph.nodes)


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "f.bin"
    write_atomic(path, lambda f: f.write(b"old"))

    def fails(f: object) -> None:
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_atomic(path, fails)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
