"""What a module costs: parameters and multiply-accumulates.

MACs come from ``torch.utils.flop_counter`` (half its FLOP count) rather than hand formulas,
so grouped, dilated and transposed convs and matmuls are all counted by the same authority.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .state import preserved_state


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, *args: Any, **kwargs: Any) -> int:
    """MACs of one forward of ``module`` on inputs like these (bilinear resizes and elementwise
    ops count as zero, as in the flop counter).

    The forward runs on fake tensors: shapes propagate, nothing is computed, so counting a
    large model costs almost nothing. Models that fake tensors cannot run are run for real.
    """
    counter = FlopCounterMode(display=False)
    try:
        with preserved_state(module), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with counter, torch.no_grad():
                module(*fake, **kwargs)
    except Exception:
        counter = FlopCounterMode(display=False)
        with preserved_state(module), counter, torch.no_grad():
            module(*args, **kwargs)
    return counter.get_total_flops() // 2


def random_inputs(shapes: tuple[torch.Size, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=generator) for s in shapes)
