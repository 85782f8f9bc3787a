"""How a replacement is fitted to the layer it replaced: one fitting per module type.

``init_layerwise`` records, at every rewritten site, what the teacher's layer received and
returned, and hands that to the fitting registered for the replacement's type (the most
specific class in its MRO wins). A fitting answers three questions:

- ``part``: which module to fit, on which input, to which target (default: the whole
  replacement, if its output has the target's shape; None: nothing to fit here);
- ``fit``: how to fit it, in place (default: Adam on the mean squared error);
- ``channel_order``: whether the module would rather have the teacher's output channels in
  another order (default: no), an order ``init_layerwise`` undoes downstream.

The built-in building blocks are registered below through the same ``register_fit`` a user
calls for the replacements their own rules build:

    @lwcompile.register_fit(MyBlock)
    @torch.no_grad()
    def fit_my_block(block: MyBlock, task: lwcompile.FitTask) -> None:
        task.least_squares(block.out_conv, block.features(task.inputs))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LwCompileError
from ..nn import LIST, PointwiseOverParts, Resize

#: modules that act on each channel separately: a channel permutation passes through them
PER_CHANNEL = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU,
               nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout)


@dataclass(frozen=True, eq=False)
class FitTask:
    """What one replacement is fitted to, as handed to a registered fit.

    ``inputs`` and ``target`` are the replaced layer's (first) input and its output in the
    teacher, concatenated over the calibration batches (possibly transformed by a ``part``,
    e.g. resized, or with the channels reordered by a ``channel_order``); ``original`` is the
    teacher's layer itself (to start from its weights); ``steps`` and ``lr`` are the gradient
    budget ``init_layerwise`` was given.
    """

    inputs: Tensor
    target: Tensor
    original: nn.Module
    steps: int = 100
    lr: float = 1e-2
    amp: torch.dtype | None = None

    def adam(self, module: nn.Module) -> None:
        """Train ``module`` to map ``inputs`` to ``target``: ``steps`` of Adam on the mean
        squared error, the learning rate decaying from ``lr`` to 0 on a cosine (forward
        passes under autocast to ``amp`` when set, the loss in float32)."""
        adam_steps(module, module.parameters(), self.inputs, self.target, self.steps,
                   self.lr, self.amp)

    def least_squares(self, conv: nn.Conv2d, features: Tensor, target: Tensor | None = None,
                      ridge: float = 1e-4) -> None:
        """Set ``conv``'s weight and bias to the ridge least-squares fit of ``target``
        (default: the task's) from ``features``, the conv's input: its output is linear in
        its weights, so this is the exact optimum where gradient steps only approach it."""
        solve_conv(conv, features, self.target if target is None else target, ridge)


def adam_steps(module: nn.Module, parameters: Any, inputs: Tensor, target: Tensor,
               steps: int, lr: float, amp: torch.dtype | None = None) -> None:
    """``steps`` of Adam on ``parameters`` so that ``module(inputs)`` approaches ``target``
    (mean squared error), the learning rate decaying from ``lr`` to 0 on a cosine; forward
    passes autocast to ``amp`` if given, with a loss scaler for float16."""
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters or steps <= 0:
        return
    device = inputs.device
    opt = torch.optim.Adam(parameters, lr=lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            output = module(inputs)
        loss = F.mse_loss(output.float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


FitFunction = Callable[[Any, FitTask], None]
PartFunction = Callable[[Any, Tensor, Tensor], "tuple[nn.Module, Tensor, Tensor] | None"]
ChannelOrder = Callable[[Any, nn.Module], "Tensor | None"]
_Fit = TypeVar("_Fit", bound=Callable[..., None])


def whole(module: nn.Module, inputs: Tensor, target: Tensor
          ) -> tuple[nn.Module, Tensor, Tensor] | None:
    """The default ``part``: the whole module, where its output has the target's shape."""
    with torch.no_grad():
        fits = module(inputs[:1]).shape == target[:1].shape
    return (module, inputs, target) if fits else None


def any_order(module: nn.Module, original: nn.Module) -> Tensor | None:
    """The default ``channel_order``: the teacher's order is as good as any."""
    return None


@dataclass(frozen=True)
class Fitting:
    """How modules of one type are fitted (see the module docstring)."""

    fit: FitFunction
    part: PartFunction = whole
    channel_order: ChannelOrder = any_order


_FITTINGS: dict[type, Fitting] = {}


def register_fit(module_type: type[nn.Module], *, part: PartFunction | None = None,
                 channel_order: ChannelOrder | None = None) -> Callable[[_Fit], _Fit]:
    """Declare how ``init_layerwise`` fits a replacement of ``module_type`` (and its
    subclasses) to the layer it replaced; use as a decorator on ``fit(module, task)``, which
    changes ``module`` in place so that ``module(task.inputs)`` approaches ``task.target``
    (see ``FitTask``). Registering a type again replaces its fitting, built-ins included.

    ``part(module, inputs, target)`` returns the module to fit (the replacement or one of its
    submodules; a submodule is fitted by the fitting of its own type), its input and its
    target, or None to leave the replacement as built; by default the whole replacement,
    where its output has the target's shape. ``channel_order(module, original)`` may return
    a permutation of the output channels: with ``init_layerwise``'s ``centre_heavy`` on and
    the whole replacement fitted, it is fitted to the teacher's output in that order, and the
    order is undone exactly downstream where the output only flows through per-channel
    modules into one conv (elsewhere the teacher's order is kept).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise LwCompileError(f"register_fit needs an nn.Module subclass, got {module_type!r}")

    def register(fit: _Fit) -> _Fit:
        if not callable(fit):
            raise LwCompileError(f"register_fit({module_type.__name__}) decorates a function "
                                 f"fit(module, task), got {fit!r}")
        _FITTINGS[module_type] = Fitting(fit, part or whole, channel_order or any_order)
        return fit
    return register


def fitting_for(module: nn.Module) -> Fitting:
    """The fitting registered for the most specific class of ``module``."""
    return next(_FITTINGS[cls] for cls in type(module).__mro__ if cls in _FITTINGS)


@torch.no_grad()
def relative_error(module: nn.Module, inputs: Tensor, target: Tensor) -> float:
    """How far a fitted module is from its target: ||module(inputs) - target||^2 /
    ||target||^2 (what ``init_layerwise`` reports per site)."""
    return float((module(inputs).float() - target).pow(2).sum()
                 / target.pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def solve_conv(conv: nn.Conv2d, features: Tensor, target: Tensor, ridge: float = 1e-4) -> None:
    """Set ``conv``'s weight (and bias, if it has one) to the ridge least-squares fit of
    ``target`` from ``features``. The normal equations are accumulated over the unfolded
    input patches one sample at a time (a 9x9 conv has C*81 inputs per pixel); a conv
    without bias is solved without an intercept, since it cannot keep one."""
    if conv.groups != 1 or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise LwCompileError("least squares solves a dense conv with numeric zero padding, got "
                             f"groups={conv.groups}, padding={conv.padding!r} "
                             f"({conv.padding_mode})")
    # float64 normal equations, on the CPU where the device has no float64 (MPS)
    exact = torch.float64 if features.device.type != "mps" else torch.float32
    gram = rhs = 0
    for f, t in zip(features, target, strict=True):
        patches = F.unfold(f[None].float(), conv.kernel_size, dilation=conv.dilation,
                           padding=conv.padding, stride=conv.stride)[0].to(exact)
        if conv.bias is not None:
            patches = torch.cat([patches, patches.new_ones(1, patches.shape[1])])
        gram = gram + patches @ patches.T
        rhs = rhs + patches @ t.flatten(1).to(exact).T
    gram, rhs = gram.cpu().double(), rhs.cpu().double()
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.solve(gram, rhs).float().to(conv.weight.device)
    weights = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
    conv.weight.copy_(sol[:weights].T.reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(sol[-1])


# --- any module: gradient steps on the whole replacement --------------------------------

@register_fit(nn.Module)
def _fit_by_gradient(module: nn.Module, task: FitTask) -> None:
    task.adam(module)


# --- LIST: its two output 1x1 convs solved exactly around the gradient steps -----------

def centre_heavy_order(conv: nn.Conv2d) -> Tensor:
    """Output channels sorted by the share of their kernel's energy in the centre tap.

    The first half are the most nearly 1x1 filters: the ones LIST's pointwise branch can
    reproduce."""
    w = conv.weight.detach().pow(2)
    k_h, k_w = w.shape[-2:]
    share = w[..., k_h // 2, k_w // 2].sum(1) / w.sum((1, 2, 3)).clamp_min(1e-12)
    order = torch.argsort(share, descending=True, stable=True)
    half = len(order) // 2
    return torch.cat([order[:half].sort().values, order[half:].sort().values])


@torch.no_grad()
def least_squares_heads(rep: LIST, x: Tensor, y: Tensor) -> None:
    """Solve LIST's two output 1x1 convs exactly for the target, given squeeze and depthwise."""
    squeezed = rep.squeeze(x)
    half = rep.pointwise_branch.out_channels
    solve_conv(rep.pointwise_branch, squeezed, y[:, :half])
    solve_conv(rep.spatial_branch[1], rep.spatial_branch[0](squeezed), y[:, half:])


def _centre_heavy_first(rep: LIST, original: nn.Module) -> Tensor | None:
    """LIST's first half of output channels comes from its 1x1 branch: give it the teacher
    channels whose kernels are most nearly 1x1."""
    return centre_heavy_order(original) if isinstance(original, nn.Conv2d) else None


@register_fit(LIST, channel_order=_centre_heavy_first)
def _fit_list(rep: LIST, task: FitTask) -> None:
    least_squares_heads(rep, task.inputs, task.target)
    task.adam(rep)
    least_squares_heads(rep, task.inputs, task.target)


# --- Sequential: a resize + LIST replacement fits its LIST; else the last conv is solved -

#: what may follow a resampling replacement's LIST: pointwise, or the unshuffle that hands
#: a pixel shuffle out of reach its low-resolution layout
_AFTER_LIST = (*PER_CHANNEL, nn.PixelUnshuffle)


@torch.no_grad()
def _resized_list_or_whole(rep: nn.Sequential, x: Tensor, y: Tensor
                           ) -> tuple[nn.Module, Tensor, Tensor] | None:
    """A resize + LIST replacement (strided, transposed and sub-pixel rules) has its LIST
    fitted on the resized input, so LIST's least-squares solve applies. A sub-pixel rewrite
    stands in for conv -> [activation] -> pixel shuffle(r) and the teacher's site is the
    conv, so that LIST's target is the conv's output pixel-shuffled: the activation is
    per-channel, so it commutes with the shuffle, and it follows the LIST in the replacement
    too. Any other Sequential is fitted whole."""
    if not (len(rep) > 1 and isinstance(rep[0], Resize) and isinstance(rep[1], LIST)
            and all(isinstance(m, _AFTER_LIST) for m in rep[2:])):
        return whole(rep, x, y)
    resized = rep[0](x)
    phases, rest = divmod(y.shape[1], 2 * rep[1].pointwise_branch.out_channels)
    r = math.isqrt(phases)
    if rest or r == 0 or r * r != phases:
        return None
    target = y if r == 1 else F.pixel_shuffle(y, r)
    return (rep[1], resized, target) if target.shape[-2:] == resized.shape[-2:] else None


def _solvable_last_conv(rep: nn.Sequential) -> nn.Conv2d | None:
    """The dense conv ending a Sequential replacement, if least squares can solve it."""
    last = rep[-1] if len(rep) > 1 else None
    if type(last) is nn.Conv2d and last.groups == 1 and last.padding_mode == "zeros" \
            and isinstance(last.padding, tuple):
        return last
    return None


@torch.no_grad()
def least_squares_last_conv(rep: nn.Sequential, x: Tensor, y: Tensor,
                            ridge: float = 1e-4) -> None:
    """Solve the final conv of ``rep`` exactly for the target, given the layers before it."""
    solve_conv(rep[-1], rep[:-1](x), y, ridge)


@register_fit(nn.Sequential, part=_resized_list_or_whole)
def _fit_sequential(rep: nn.Sequential, task: FitTask) -> None:
    """Gradient steps on the whole, then a dense last conv (e.g. ``image_output_squeeze``'s)
    solved exactly given the layers before it."""
    task.adam(rep)
    if _solvable_last_conv(rep) is not None:
        least_squares_last_conv(rep, task.inputs, task.target)


# --- PointwiseOverParts: an exact rewrite, already the teacher's layer ------------------

def _nothing_to_fit(rep: PointwiseOverParts, x: Tensor, y: Tensor) -> None:
    """It carries the teacher conv's own weights, split by concat part, and takes the parts
    (not the one concatenated input the teacher's conv recorded)."""
    return None


@register_fit(PointwiseOverParts, part=_nothing_to_fit)
def _keep(rep: PointwiseOverParts, task: FitTask) -> None:
    """Never called: ``part`` selects nothing."""
