"""The memory layout training runs in: channels-last where the models' convs take it.

oneDNN's CPU convolutions (and cuDNN's tensor-core ones) compute in NHWC order; handed NCHW
tensors, they reorder to and from it around every conv, forward and backward. A light network
is many thin convs over full-size activations, so those reorders are a large share of each
training step. ``distill`` therefore trains with the 4-D weights of both models and the
batches in channels-last order, and gives every weight back the layout it had afterwards: the
user's models are left as they were.

``channels_last=None`` (the default) uses it where the student has 2-D convs and both models
run a batch in it (a forward that calls ``.view`` on a conv's output may not); ``True``
always, ``False`` never.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import LwCompileWarning, one_line
from ..measure.snapshot import eval_mode


def _four_d(models: tuple[nn.Module, ...]) -> list[Tensor]:
    """The 4-D parameters and buffers of ``models`` (conv weights), each once."""
    seen: dict[int, Tensor] = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            if t.dim() == 4:
                seen.setdefault(id(t), t)
    return list(seen.values())


class Layout:
    """The layout one training run uses; ``batch`` puts each batch in it, ``restore`` gives
    the weights back their own."""

    def __init__(self, where: str, option: bool | None, student: nn.Module,
                 *others: nn.Module) -> None:
        self.where = where
        self.models = (student, *others)
        self.auto = option is None
        wanted = option if option is not None else any(
            isinstance(m, nn.Conv2d) for m in student.modules())
        self._restore: list[tuple[Tensor, tuple[int, ...]]] = []
        self.on = False
        if wanted:
            self._switch()

    def _switch(self) -> None:
        # restrided even where is_contiguous(channels_last) already holds (a 1x1 or a
        # depthwise weight has a size-1 dim, so both layouts "hold" but the strides differ
        # and oneDNN goes by the strides), as ``Module.to(memory_format=...)`` does
        with torch.no_grad():
            for t in _four_d(self.models):
                switched = t.data.to(memory_format=torch.channels_last)
                if switched.stride() != t.stride():
                    self._restore.append((t, t.stride()))
                    t.data = switched
        self.on = True

    def restore(self) -> None:
        """Every switched weight back in its own strides."""
        with torch.no_grad():
            for t, stride in self._restore:
                own = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
                t.data = own.copy_(t.data)
        self._restore.clear()
        self.on = False

    def batch(self, x: Tensor) -> Tensor:
        """``x`` in the run's layout (the first batch of an automatic choice is tried on
        both models first)."""
        if not self.on or x.dim() != 4:
            return x
        x = x.contiguous(memory_format=torch.channels_last)
        if self.auto:
            self.auto = False
            try:
                with torch.no_grad(), eval_mode(*self.models):
                    for model in self.models:
                        model(x)
            except Exception as exc:  # the user's forward may raise anything
                self.restore()
                warnings.warn(f"{self.where}: training in the standard memory layout: a model "
                              f"does not run in channels-last ({one_line(exc)})",
                              LwCompileWarning, stacklevel=3)
                return x.contiguous()
        return x
