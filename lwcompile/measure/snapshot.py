"""Snapshot and restore module attributes around anything that runs a user's forward, and
modes around a run in eval mode (``eval_mode``).

Some forwards assign attributes (``self.mean = self.mean.type_as(x)``, fused weights):
tracing would capture Proxies there and fake-tensor counting would leave fake tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_TABLES = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's attributes (and its parameter/buffer/child tables) afterwards.

    Whole-dict copies and updates only, no per-attribute Python loop: a lightened network
    has thousands of modules, and this wraps every forward lighten measures.
    """
    saved = [(m.__dict__, m.__dict__.copy(), tuple(m.__dict__[key].copy() for key in _TABLES))
             for m in module.modules()]
    try:
        yield
    finally:
        for attributes, snapshot, tables in saved:
            attributes.clear()
            attributes.update(snapshot)  # the table dicts themselves are back: refill them
            for key, table in zip(_TABLES, tables, strict=True):
                attributes[key].clear()
                attributes[key].update(table)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode for the block, then give every submodule back the mode
    it had (not its root's: a model may hold frozen, eval-mode parts)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training

