"""Learning-rate schedules and weight averaging for ``distill``.

Constant-rate Adam's last iterate is noisy: where a run happens to stop decides its quality.
A cosine decay to zero over the run ends annealed, and an exponential moving average (EMA)
of the student's weights smooths what noise is left. Both are functions of the step alone
(the EMA is part of the checkpoint), so a resumed run stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..errors import ArgumentError

Schedule = Callable[[int], float]


def cosine(total_steps: int, warmup: int = 0) -> Schedule:
    """Factor on the learning rate at each step: linear warm-up over ``warmup`` steps, then a
    half cosine from 1 at the end of warm-up to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(total_steps - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
    return factor


def schedule_for(where: str, schedule: str | Schedule | None, total_steps: int
                 ) -> Schedule | None:
    """``schedule`` as a function of the step: "cosine" (over ``total_steps``), a function
    given by the caller, or None (constant learning rate)."""
    if schedule is None or callable(schedule):
        return schedule
    if schedule == "cosine":
        return cosine(total_steps)
    raise ArgumentError(f"{where}: lr_schedule must be None, 'cosine' or a function of the "
                        f"step, got {schedule!r}")


def weight_average(where: str, model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An EMA of ``model``'s parameters with ``decay`` per step (e.g. 0.999), or None. Its
    buffers (BatchNorm statistics) are not averaged: they are re-estimated for the averaged
    weights before the EMA model is used."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
        raise ArgumentError(f"{where}: ema must be None or a decay in (0, 1), got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)))
