"""What a module costs: parameters, multiply-accumulates and peak activation memory.

MACs come from ``torch.utils.flop_counter``'s formulas (half their FLOP count) rather than
hand formulas, so grouped, dilated and transposed convs and matmuls are all counted by the
same authority. They are applied by one light dispatch mode of ours (``CostMode``), which
also tracks memory: ``FlopCounterMode`` attributes FLOPs to modules through global module
hooks, which made counting cost 40% of a forward; lighten only needs the totals.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import conv_flop_count, flop_registry

from .state import preserved_state


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_CONVOLUTION = torch.ops.aten.convolution.default


class CostMode(TorchDispatchMode):
    """Count FLOPs, and the bytes of tensor storages created and alive at once.

    Weights, buffers and inputs existed before and are not counted: the peak is the
    activation memory the forward needs, which is what a concat-free rewrite lowers.
    """

    def __init__(self, preexisting: set[int] | None = None) -> None:
        super().__init__()
        #: storages that existed before (None: count FLOPs only, e.g. on fake tensors)
        self.preexisting = preexisting
        self.flops = 0
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.current -= self.live.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _CONVOLUTION:  # most ops of an image network: skip the generic wrapper
            self.flops += conv_flop_count(args[0].shape, args[1].shape, out.shape,
                                          transposed=args[6])
        elif (formula := flop_registry.get(func._overloadpacket)) is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        if self.preexisting is not None:
            for t in (out,) if isinstance(out, torch.Tensor) else tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0 or ptr in self.preexisting:
            return
        if ptr not in self.live:
            self.live[ptr], self.refs[ptr] = storage.nbytes(), 0
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[ptr] += 1
        weakref.finalize(t, self._release, ptr)

    @property
    def macs(self) -> int:
        return self.flops // 2


@dataclass
class Measured:
    output: Any
    macs: int
    peak_bytes: int


def measure(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Measured:
    """Run ``module`` once (no grad, state restored): output, MACs and peak activation bytes.

    MACs are half the flop counter's FLOPs; bilinear resizes and elementwise ops count as
    zero there. Measuring rides along forwards we need anyway (verification).
    """
    tensors = [*module.parameters(), *module.buffers(),
               *(a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))]
    cost = CostMode({t.untyped_storage().data_ptr() for t in tensors})
    with preserved_state(module), torch.no_grad(), cost:
        out = module(*args, **(kwargs or {}))
    return Measured(out, cost.macs, cost.peak)


def run_counting(module: nn.Module, args: tuple, kwargs: dict | None = None) -> tuple[Any, int]:
    """Run ``module`` once (no grad, state restored); return its output and its MACs."""
    run = measure(module, args, kwargs)
    return run.output, run.macs


def count_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of one forward of ``module`` on these inputs."""
    return run_counting(module, args, kwargs)[1]


def count_on_shapes(module: nn.Module, shapes: tuple[torch.Size, ...],
                    dtype: torch.dtype = torch.float32) -> tuple[Any, int]:
    """Output and MACs of one forward on inputs of these shapes, without the arithmetic.

    Runs on fake tensors (shapes and dtypes only), so checking a rewrite's shapes and
    counting its MACs costs microseconds per op instead of a real convolution. Raises what
    the forward raises, including for code that needs real values (``.item()``): callers
    fall back to ``run_counting`` on real inputs.
    """
    cost = CostMode()
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = tuple(torch.empty(s, dtype=dtype) for s in shapes)
        with preserved_state(module), torch.no_grad(), cost:
            out = module(*inputs)
    return out, cost.macs


def random_inputs(shapes: tuple[torch.Size, ...], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Reproducible random tensors of these shapes (the site's dtype: half models too)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator).to(dtype) for s in shapes)
