"""What a module costs: parameters and multiply-accumulates.

MACs come from ``torch.utils.flop_counter`` (half its FLOP count) rather than hand formulas,
so grouped, dilated and transposed convs and matmuls are all counted by the same authority.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from .state import preserved_state


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class PeakMemory(TorchDispatchMode):
    """Track the bytes of tensor storages created during a forward and alive at once.

    Weights, buffers and inputs existed before and are not counted: the peak is the
    activation memory the forward needs, which is what a concat-free rewrite lowers.
    """

    def __init__(self, preexisting: set[int]) -> None:
        super().__init__()
        self.preexisting = preexisting
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.current -= self.live.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in self.preexisting:
                continue
            if ptr not in self.live:
                self.live[ptr], self.refs[ptr] = storage.nbytes(), 0
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.refs[ptr] += 1
            weakref.finalize(t, self._release, ptr)
        return out


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
    memory = PeakMemory({t.untyped_storage().data_ptr() for t in tensors})
    counter = FlopCounterMode(display=False)
    with preserved_state(module), counter, torch.no_grad(), memory:
        out = module(*args, **(kwargs or {}))
    return Measured(out, counter.get_total_flops() // 2, memory.peak)


def run_counting(module: nn.Module, args: tuple, kwargs: dict | None = None) -> tuple[Any, int]:
    """Run ``module`` once (no grad, state restored); return its output and its MACs."""
    counter = FlopCounterMode(display=False)
    with preserved_state(module), counter, torch.no_grad():
        out = module(*args, **(kwargs or {}))
    return out, counter.get_total_flops() // 2


def count_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of one forward of ``module`` on these inputs."""
    return run_counting(module, args, kwargs)[1]


def random_inputs(shapes: tuple[torch.Size, ...], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Reproducible random tensors of these shapes (the site's dtype: half models too)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator).to(dtype) for s in shapes)
