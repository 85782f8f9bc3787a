"""Snapshot and restore module attributes around anything that runs a user's forward.

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
