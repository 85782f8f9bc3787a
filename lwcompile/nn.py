"""Lightweight building blocks from Lahiri et al. (TCSVT 2021).

Plain ``nn.Module`` classes: they know nothing of the compiler, so users can also build
light networks by hand with them. Below them, their deployed forms (and a thin conv's),
which compute the same function in the shape that runs fastest.

Like ``nn.Conv2d``, every block accepts an unbatched CxHxW input as well as NxCxHxW: LIST
concatenates on dim -3 (channels in both), and blocks whose torch ops need a batch (BatchNorm,
ChannelShuffle, interpolate) add one in eager runs (``_unbatched``). A graph traced through
them (fx, export) is for the batched inputs it was traced with; ``accept_unbatched`` lets
such a graph take unbatched inputs too.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .deploy import identities  # the deployed forms' arithmetic, written once


class LIST(nn.Module):
    """Drop-in for a dense kxk conv (stride 1): squeeze, then a 1x1 and a spatial branch.

    Squeezing to ``in_channels / squeeze_ratio`` first (rounded up: 85 -> 22) is where the
    savings come from; the depthwise kxk branch keeps the receptive field, the 1x1 branch keeps
    cheap channel mixing. All four convs carry a bias, as in the authors' reference code.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        squeeze_ratio: int = 4,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if in_channels < squeeze_ratio or out_channels % 2 or kernel_size % 2 == 0:
            raise ValueError(
                f"LIST needs at least {squeeze_ratio} in_channels, even out_channels and an "
                f"odd kernel; got {in_channels}->{out_channels}, k={kernel_size}"
            )
        squeezed = LIST.squeeze_width(in_channels, squeeze_ratio)
        half = out_channels // 2
        self.squeeze = nn.Conv2d(in_channels, squeezed, 1)
        self.pointwise_branch = nn.Conv2d(squeezed, half, 1)
        self.spatial_branch = nn.Sequential(
            nn.Conv2d(
                squeezed, squeezed, kernel_size, padding=kernel_size // 2,
                groups=squeezed, padding_mode=padding_mode,
            ),
            nn.Conv2d(squeezed, half, 1),
        )

    @staticmethod
    def squeeze_width(in_channels: int, squeeze_ratio: int) -> int:
        """How many channels the squeeze keeps: in_channels / squeeze_ratio, rounded up, so
        that channel counts the ratio does not divide (MoESR's 85) are lightened too."""
        return -(-in_channels // squeeze_ratio)

    @staticmethod
    def unsplittable(in_channels: int, out_channels: int, squeeze_ratio: int) -> str | None:
        """Why a LIST cannot take ``in_channels -> out_channels`` (None if it can): the rules
        that build LISTs refuse with this reason."""
        if in_channels < squeeze_ratio:
            return f"{in_channels} input channels are fewer than the squeeze ratio {squeeze_ratio}"
        if out_channels % 2:
            return f"{out_channels} output channels do not split into two equal branches"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return torch.cat([self.pointwise_branch(squeezed), self.spatial_branch(squeezed)],
                         dim=-3)


class GSAT(nn.Module):
    """Drop-in for a dense dilated 3x3 conv (C -> C): grouped, shuffled, residual.

    A grouped dilated 3x3 keeps the receptive field at 1/groups of the cost; the channel
    shuffle lets the grouped 1x1 that follows mix information across groups; the residual
    add and ReLU follow the authors' reference module.
    """

    def __init__(self, channels: int, dilation: int, groups: int = 8,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"GSAT needs channels divisible by groups; got {channels}/{groups}")
        self.grouped_dilated = nn.Conv2d(channels, channels, 3, padding=dilation,
                                         dilation=dilation, groups=groups,
                                         padding_mode=padding_mode)
        self.shuffle = nn.ChannelShuffle(groups)
        self.grouped_pointwise = nn.Conv2d(channels, channels, 1, groups=groups)
        self.norm = nn.BatchNorm2d(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _unbatched(x):  # BatchNorm2d and ChannelShuffle need the batch dimension
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = self.grouped_pointwise(self.shuffle(self.grouped_dilated(x)))
        return self.act(self.norm(y) + x)


class Resize(nn.Module):
    """Bilinear resize to the spatial size a given conv (or transposed conv) would produce.

    The size is computed from the input at run time with the conv's own arithmetic, so a
    resample+LIST replacement matches the original for every input size, odd ones included.
    """

    def __init__(self, kind: str, kernel_size: tuple[int, int] = (1, 1),
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1),
                 output_padding: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        if kind not in ("conv", "transposed", "scale"):
            raise ValueError(f"kind must be conv, transposed or scale, not {kind!r}")
        self.kind = kind
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.output_padding = dilation, output_padding

    def output_size(self, size: tuple[int, int]) -> list[int]:
        out = []
        for i, n in enumerate(size):
            k, s, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
            if self.kind == "conv":
                out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
            elif self.kind == "transposed":
                out.append((n - 1) * s - 2 * p + d * (k - 1) + self.output_padding[i] + 1)
            else:
                out.append(n * s)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _unbatched(x):  # interpolate reads dims 2.. as spatial
            return self.forward(x.unsqueeze(0)).squeeze(0)
        size = self.output_size((x.shape[-2], x.shape[-1]))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"{self.kind}, stride={self.stride}"


class PointwiseOverParts(nn.Module):
    """A 1x1 conv over ``cat(parts, dim=1)`` computed as a sum of 1x1 convs over each part.

    Exactly equal to the original, but the concatenated tensor is never materialised: in a
    U-Net decoder that tensor is often the largest activation alive.
    """

    def __init__(self, conv: nn.Conv2d, part_channels: list[int]) -> None:
        super().__init__()
        if sum(part_channels) != conv.in_channels or conv.groups != 1:
            raise ValueError("parts must add up to the conv's input channels (groups=1)")
        weights = torch.split(conv.weight.detach(), part_channels, dim=1)
        self.parts = nn.ModuleList()
        for i, (w, c) in enumerate(zip(weights, part_channels, strict=True)):
            part = nn.Conv2d(c, conv.out_channels, 1, bias=conv.bias is not None and i == 0)
            part.weight = nn.Parameter(w.clone())
            if part.bias is not None:
                part.bias = nn.Parameter(conv.bias.detach().clone())
            self.parts.append(part)

    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        out = self.parts[0](parts[0])
        for conv, x in zip(self.parts[1:], parts[1:], strict=True):
            out = out + conv(x)
        return out


def _unbatched(x: Any) -> bool:
    """An eager CxHxW tensor (never an fx Proxy: a traced graph is for its batched input)."""
    return isinstance(x, torch.Tensor) and not isinstance(x, fx.Proxy) and x.dim() == 3


class _AddBatch:
    """Forward pre-hook: a tensor argument one dimension short of what the module was made
    for gets a batch dimension of 1 (marked, so ``_DropBatch`` removes it afterwards)."""

    def __init__(self, ranks: tuple[int | None, ...]) -> None:
        self.ranks = ranks

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not any(isinstance(a, torch.Tensor) and r is not None and a.dim() == r - 1
                   for a, r in zip(args, self.ranks, strict=False)):
            return None
        batched = []
        for a, r in zip(args, self.ranks + (None,) * len(args), strict=False):
            if isinstance(a, torch.Tensor) and r is not None and a.dim() == r - 1:
                a = a.unsqueeze(0)
                a._lwcompile_added_batch = True
            batched.append(a)
        return tuple(batched)


def _drop_batch(module: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: remove the batch dimension ``_AddBatch`` added."""
    if not any(getattr(a, "_lwcompile_added_batch", False) for a in args):
        return None
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.squeeze(0), output)


def accept_unbatched(module: nn.Module, example_args: tuple) -> nn.Module:
    """Let ``module`` (a graph made for the batched ``example_args``) take unbatched tensors
    as ``nn.Conv2d`` does: a 4-D example's argument given as CxHxW runs as 1xCxHxW and the
    outputs lose that batch dimension again. Hooks, so the module keeps its type; they run
    as Python when the module is exported and leave no op in the graph."""
    ranks = tuple(a.dim() if isinstance(a, torch.Tensor) and a.dim() == 4 else None
                  for a in example_args)
    if any(r is not None for r in ranks):
        module.register_forward_pre_hook(_AddBatch(ranks))
        module.register_forward_hook(_drop_batch)
    return module


# Deployed forms: the same functions as the blocks above (or as a plain conv), in the shape
# that runs fastest. ``lwcompile.emit_fast`` puts them in place.


class FusedLIST(nn.Module):
    """LIST with one grouped 1x1 conv (groups=2) over ``cat([squeezed, depthwise])``.

    Group 0 is LIST's 1x1 branch and group 1 the 1x1 after its depthwise conv, so the
    parameters are LIST's, value for value and in number. The concat copies the C/2
    squeezed channels instead of LIST's C output channels, and one conv call replaces two.
    """

    def __init__(self, lst: LIST) -> None:
        super().__init__()
        pointwise, spatial = lst.pointwise_branch, lst.spatial_branch[1]
        self.squeeze = copy.deepcopy(lst.squeeze)
        self.depthwise = copy.deepcopy(lst.spatial_branch[0])
        self.pointwise = nn.Conv2d(2 * lst.squeeze.out_channels,
                                   pointwise.out_channels + spatial.out_channels, 1, groups=2)
        with torch.no_grad():
            self.pointwise.weight.copy_(torch.cat([pointwise.weight, spatial.weight]))
            self.pointwise.bias.copy_(torch.cat([pointwise.bias, spatial.bias]))
        self.train(lst.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = self.squeeze(x)
        return self.pointwise(torch.cat([squeezed, self.depthwise(squeezed)], dim=-3))


class DenseLIST(nn.Module):
    """LIST as its squeeze and one dense kxk conv on the squeezed channels.

    The 1x1 branch is the dense conv's centre tap and the depthwise kxk + 1x1 branch its
    other outputs (``identities.depthwise_then_pointwise``): the same function, with more
    MACs but two passes over memory instead of four. Which form runs faster depends on the
    runtime and precision; ``lwcompile.tune`` measures it.
    """

    def __init__(self, lst: LIST) -> None:
        super().__init__()
        depthwise, spatial_pointwise = lst.spatial_branch[0], lst.spatial_branch[1]
        k = depthwise.kernel_size[0]
        parts = [identities.pointwise_as_kernel(
                     (lst.pointwise_branch.weight, lst.pointwise_branch.bias), k),
                 identities.depthwise_then_pointwise(
                     (depthwise.weight, depthwise.bias),
                     (spatial_pointwise.weight, spatial_pointwise.bias))]
        self.squeeze = copy.deepcopy(lst.squeeze)
        self.conv = nn.Conv2d(lst.squeeze.out_channels, sum(w.shape[0] for w, _ in parts), k,
                              padding=k // 2, padding_mode=depthwise.padding_mode)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([w for w, _ in parts]))
            self.conv.bias.copy_(torch.cat([b for _, b in parts]))
        self.train(lst.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.squeeze(x))


class ThinConvPhases(nn.Module):
    """A "same" conv with few output channels computed on its ``r * r`` pixel phases.

    One stride-r conv (``weight``, ``padding``: ``lwcompile.deploy.identities.
    strided_phase_weight`` of the original kernel) computes all r * r phases of each r x r
    output cell, and ``pixel_shuffle`` puts them in place: the GEMM is r^2 times wider than
    the thin conv's. Inputs whose sizes are not multiples of r are padded with the zeros the
    original conv's own padding would read, and the output cropped.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int,
                 padding: int) -> None:
        super().__init__()
        self.r = r
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1], stride=r,
                              padding=padding, bias=bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if bias is not None:
                self.conv.bias.copy_(bias)
        self.conv.to(weight.device, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if _must_pad(h, w, self.r):
            x = F.pad(x, (0, (-w) % self.r, 0, (-h) % self.r))
        return F.pixel_shuffle(self.conv(x), self.r)[..., :h, :w]


def _must_pad(h: int, w: int, r: int) -> bool:
    """Pad unless eager sizes are multiples of ``r`` (a pad of zero still copies the input).
    A traced or exported graph always pads: it must hold at every size."""
    if torch.jit.is_tracing() or not (isinstance(h, int) and isinstance(w, int)):
        return True
    return bool(h % r or w % r)


class ChannelsLast(nn.Module):
    """Runs ``module`` in channels_last on channels_last copies of its 4-D tensor inputs.

    ``module`` itself is converted (``nn.Module.to`` works in place): pass a copy to keep
    the original in NCHW. Depthwise and thin 1x1 convs run far faster in NHWC on oneDNN.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.contiguous(memory_format=torch.channels_last)
                     if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        return self.module(*args, **kwargs)
