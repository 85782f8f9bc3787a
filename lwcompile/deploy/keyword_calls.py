"""Submodules called with a keyword named ``mod`` made exportable.

While torch.export traces (non-strict), torch.fx replaces ``nn.Module.__call__`` with a
wrapper whose first parameter is named ``mod``; a submodule called as ``block(x, mod=style)``
(the modulated convs of StyleGAN-like generators, AuraSR's) then fails with "got multiple
values for argument 'mod'" before its forward runs. Each module whose forward takes a
parameter of that name gets, on the copy being exported, a subclass whose own ``__call__``
runs the module as ``nn.Module`` does: Python finds it before the patched one, so the keyword
is never bound twice. The tracer then inlines such a module's forward as it does every
module's; only the exported graph's record of which module a node came from loses it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

#: the name torch.fx's patched ``nn.Module.__call__`` gives the module it is called on
TRACER_NAME = "mod"

_SUBCLASSES: dict[type, type] = {}


def _called_directly(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return nn.Module._call_impl(self, *args, **kwargs)


def _takes_tracer_name(cls: type) -> bool:
    try:
        return TRACER_NAME in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature
        return False


def keyword_calls_exportable(model: nn.Module) -> int:
    """Give every module of ``model`` whose forward takes ``mod`` a class that torch.fx's
    patched call does not intercept (in place: call it on a copy); return how many."""
    changed = 0
    for module in model.modules():
        cls = type(module)
        if cls in _SUBCLASSES.values() or not _takes_tracer_name(cls):
            continue
        if cls not in _SUBCLASSES:
            _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
                "__call__": _called_directly, "__module__": cls.__module__,
                "__qualname__": cls.__qualname__})
        module.__class__ = _SUBCLASSES[cls]
        changed += 1
    return changed
