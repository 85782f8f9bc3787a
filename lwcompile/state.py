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
    """Restore every submodule's attributes (and its parameter/buffer/child tables) afterwards."""
    saved = []
    for m in module.modules():
        snapshot = dict(m.__dict__)
        for key in _TABLES:
            snapshot[key] = dict(m.__dict__[key])
        saved.append((m, snapshot))
    try:
        yield
    finally:
        for m, snapshot in saved:
            for key in _TABLES:
                m.__dict__[key].clear()
                m.__dict__[key].update(snapshot[key])
            for key in [k for k in m.__dict__ if k not in snapshot]:
                del m.__dict__[key]
            m.__dict__.update({k: v for k, v in snapshot.items() if k not in _TABLES})
