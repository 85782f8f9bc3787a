"""Low-rank factorisations of channel-mixing layers, shared by two built-in rules.

A ``nn.Linear`` (a token MLP or an attention projection) and a 1x1 ``nn.Conv2d`` (a
projection or the halves of a gated FFN) both mix channels at every position with one
matrix W (out x in). ``W ~ expand @ reduce`` with ``reduce`` of rank r costs r (in + out)
multiply-adds per position instead of in x out.

The factors start from the original weights, not at random: the truncated SVD of W (the best
rank-r approximation of the matrix itself). ``init_layerwise`` then refits them on what the
teacher's layer received and returned, by reduced-rank regression (the best rank-r *linear
map* for that data, which weighs the input directions the data actually uses): the
least-squares map B from inputs to outputs, projected onto the r principal directions of
its fitted outputs. Both are registered with ``register_fit`` like any user's fitting.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lwcompile import FitTask, Refuse, register_fit


def factor_rank(in_features: int, out_features: int, rank_ratio: int) -> int:
    """The rank the rules use: ``min(in, out) // rank_ratio``, at least 1."""
    return max(1, min(in_features, out_features) // rank_ratio)


def factored_weights(in_features: int, out_features: int, rank: int) -> int:
    """Multiply-adds per position of the two factors (also their weight count)."""
    return rank * (in_features + out_features)


#: the fewest inputs or outputs either low-rank rule factors (features or channels): below
#: it the rank would be a handful and the saving small
MIN_SIDE = 16


def rank_or_refusal(n_in: int, n_out: int, *, rank_ratio: int, min_size: int,
                    min_saving: float, unit: str, per: str) -> int | Refuse:
    """The rank both low-rank rules factor an ``n_in -> n_out`` map to, or why not: a side
    below ``min_size`` ``unit`` saves (almost) nothing, and the factors must cost at most
    1 / ``min_saving`` of the original's multiply-adds ``per`` position."""
    if min(n_in, n_out) < min_size:
        return Refuse(f"{n_in}->{n_out} {unit}: fewer than {min_size} on one side, a "
                      "low-rank factorisation saves (almost) nothing")
    rank = factor_rank(n_in, n_out, rank_ratio)
    factored = factored_weights(n_in, n_out, rank)
    if factored * min_saving > n_in * n_out:
        return Refuse(f"rank {rank} factors of {n_in}->{n_out} cost {factored:,} "
                      f"multiply-adds per {per} vs {n_in * n_out:,}: less than "
                      f"{min_saving}x saved")
    return rank


@torch.no_grad()
def svd_factors(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(reduce, expand)`` with ``expand @ reduce`` the best rank-``rank`` approximation of
    the matrix ``weight`` (out x in), the singular values split evenly between them."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


class LowRankLinear(nn.Sequential):
    """``nn.Linear(in, out)`` as ``reduce`` (in -> rank, no bias) then ``expand`` (rank ->
    out, the original's bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True
                 ) -> None:
        super().__init__()
        self.reduce = nn.Linear(in_features, rank, bias=False)
        self.expand = nn.Linear(rank, out_features, bias=bias)

    @property
    def weight(self) -> Tensor:
        """The out x in matrix the factors compute, so that code applying a Linear through
        its weight (``F.linear(x, self.qkv.weight, bias)``) still runs (at the dense cost)."""
        return self.expand.weight @ self.reduce.weight

    @property
    def bias(self) -> Tensor | None:
        return self.expand.bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Factored from ``linear``'s weight by truncated SVD (bias copied)."""
        module = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        reduce, expand = svd_factors(linear.weight, rank)
        with torch.no_grad():
            module.reduce.weight.copy_(reduce)
            module.expand.weight.copy_(expand)
            if linear.bias is not None:
                module.expand.bias.copy_(linear.bias)
        return module.to(linear.weight.device, linear.weight.dtype)


class LowRankPointwise(nn.Sequential):
    """A 1x1 ``nn.Conv2d(in, out)`` as ``reduce`` (1x1 in -> rank, no bias) then ``expand``
    (1x1 rank -> out, the original's bias)."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, bias: bool = True
                 ) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, rank, 1, bias=False)
        self.expand = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int) -> LowRankPointwise:
        """Factored from ``conv``'s weight by truncated SVD (bias copied)."""
        module = cls(conv.in_channels, conv.out_channels, rank, conv.bias is not None)
        reduce, expand = svd_factors(conv.weight.flatten(1), rank)
        with torch.no_grad():
            module.reduce.weight.copy_(reduce[..., None, None])
            module.expand.weight.copy_(expand[..., None, None])
            if conv.bias is not None:
                module.expand.bias.copy_(conv.bias)
        return module.to(conv.weight.device, conv.weight.dtype)


@torch.no_grad()
def reduced_rank_regression(x: Tensor, y: Tensor, rank: int, intercept: bool = True,
                            ridge: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """The rank-``rank`` affine map from rows of ``x`` (n x in) to rows of ``y`` (n x out)
    with the least squared error: ``(reduce, expand, bias)`` such that
    ``y ~ x @ reduce.T @ expand.T + bias`` (``bias`` zero without ``intercept``, for a
    replacement that cannot hold one). Ridge-regularised, accumulated in double."""
    x, y = x.double(), y.double()
    mean_x, mean_y = x.mean(0), y.mean(0)
    if not intercept:
        mean_x, mean_y = torch.zeros_like(mean_x), torch.zeros_like(mean_y)
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc
    regular = gram + ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(
        len(gram), dtype=gram.dtype)
    b = torch.linalg.solve(regular, xc.T @ yc)             # in x out, full-rank least squares
    fitted_cov = b.T @ gram @ b                            # covariance of the fitted outputs
    _, vectors = torch.linalg.eigh(fitted_cov)
    v = vectors[:, -rank:]                                 # its top principal directions
    reduce, expand = (b @ v).T, v
    bias = mean_y - expand @ (reduce @ mean_x)
    return reduce, expand, bias


def _rows(t: Tensor, channel_dim: int) -> Tensor:
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


@register_fit(LowRankLinear)
@torch.no_grad()
def fit_low_rank_linear(module: LowRankLinear, task: FitTask) -> None:
    """Reduced-rank regression on the teacher's tokens (each position a sample)."""
    rank = module.reduce.out_features
    reduce, expand, bias = reduced_rank_regression(
        _rows(task.inputs, -1), _rows(task.target, -1), rank, module.expand.bias is not None)
    _assign(module, reduce, expand, bias)


@register_fit(LowRankPointwise)
@torch.no_grad()
def fit_low_rank_pointwise(module: LowRankPointwise, task: FitTask) -> None:
    """Reduced-rank regression on the teacher's pixels (each position a sample)."""
    rank = module.reduce.out_channels
    reduce, expand, bias = reduced_rank_regression(
        _rows(task.inputs, 1), _rows(task.target, 1), rank, module.expand.bias is not None)
    _assign(module, reduce, expand, bias)


def _assign(module: nn.Sequential, reduce: Tensor, expand: Tensor, bias: Tensor) -> None:
    module.reduce.weight.copy_(reduce.reshape(module.reduce.weight.shape))
    module.expand.weight.copy_(expand.reshape(module.expand.weight.shape))
    if module.expand.bias is not None:
        module.expand.bias.copy_(bias)
