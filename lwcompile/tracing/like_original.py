"""A GraphModule that keeps what applications use of the module it was traced from.

fx's GraphModule keeps only the graph and the submodules, parameters and buffers it reads;
applications also call the original's plain attributes (``model.scale``), its methods and
class constants (``model.tile_forward(x)``), and rely on its hooks. ``like_original`` gives
a GraphModule all four, and keeps them through ``copy.deepcopy`` and pickling (which fx's
own ``__deepcopy__`` and ``__reduce__`` drop: they rebuild the module from its graph).

Methods come from the original's class and run with the GraphModule as ``self``: those
that call ``forward``/``self(...)`` run the traced graph. What cannot carry over: a
method using zero-argument ``super()`` (the GraphModule is no instance of that class), and
``isinstance(result, OriginalClass)``, which stays False.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import LwCompileWarning

#: nn.Module's hook dictionaries, copied as they are
HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
         "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
         "_backward_pre_hooks")
_EXTRAS = "_lwcompile_extras"


def has_hooks(module: nn.Module) -> bool:
    """Does ``module`` have forward (pre-)hooks or backward hooks of its own?"""
    return any(getattr(module, name, None) for name in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                "_backward_pre_hooks"))


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """The public instance attributes that are neither modules nor tensors."""
    return {k: v for k, v in module.__dict__.items()
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor))}


def class_members(cls: type) -> dict[str, Any]:
    """The methods, properties and constants ``cls`` adds to ``nn.Module`` (not ``forward``,
    dunders, or names nn.Module/GraphModule define: overriding those would change how the
    GraphModule itself works)."""
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass in nn.Module.__mro__ or klass in fx.GraphModule.__mro__:
            continue
        for name, value in vars(klass).items():
            if (name.startswith("__") or name == "forward" or name == "training"
                    or hasattr(fx.GraphModule, name)):
                continue
            members[name] = value
    return members


def like_original(gm: fx.GraphModule, original: nn.Module | None,
                  frozen: dict[str, Any] | None = None) -> fx.GraphModule:
    """Give ``gm`` the plain attributes, class members and hooks of ``original`` (None: keep
    only what ``gm`` already has, e.g. hooks added to it), kept through deepcopy and pickle.
    ``frozen`` names attributes tracing froze into the graph: setting one on ``gm`` warns
    that it has no effect."""
    extras = gm.__dict__.get(_EXTRAS) or {"cls": None, "frozen": {}}
    if original is not None:
        for key, value in plain_attributes(original).items():
            if key not in gm.__dict__:
                gm.__dict__[key] = value
        for name in HOOKS:
            hooks = getattr(original, name, None)
            if hooks:
                getattr(gm, name).update(hooks)
        extras["cls"] = type(original)
    extras["frozen"] = dict(extras["frozen"], **(frozen or {}))
    gm.__dict__[_EXTRAS] = extras
    _apply_class(gm, extras)
    return gm


def _apply_class(gm: fx.GraphModule, extras: dict[str, Any]) -> None:
    """``gm`` becomes an instance of fx's per-instance class (``GraphModuleImpl``, which
    ``recompile`` puts ``forward`` on) over a class holding the original's members; fx's
    ``__new__`` skips ``GraphModuleImpl`` classes, so copies get the same layering."""
    members = class_members(extras["cls"]) if extras["cls"] is not None else {}
    members.update(_lwcompile_kept=True, __deepcopy__=_deepcopy, __reduce__=_reduce,
                   __setattr__=_setattr, __module__=fx.GraphModule.__module__)
    name = type(gm).__name__
    kept = type(name, (fx.GraphModule,), members)
    impl = type("GraphModuleImpl", (kept,), {"__qualname__": "GraphModuleImpl"})
    impl.__name__ = name
    gm.__class__ = impl
    gm.recompile()


def _setattr(self: fx.GraphModule, name: str, value: Any) -> None:
    frozen = self.__dict__.get(_EXTRAS, {}).get("frozen", {})
    if name in frozen:
        warnings.warn(f"{name} was read when the model was traced ({frozen[name]!r}) and is "
                      "frozen into its graph: setting it has no effect (lighten a model built "
                      "with the value you need)", LwCompileWarning, stacklevel=2)
    nn.Module.__setattr__(self, name, value)


def _carried(gm: fx.GraphModule) -> dict[str, Any]:
    """What fx's copy and pickle drop: hooks and plain attributes (the rest it keeps)."""
    carried = {name: getattr(gm, name) for name in HOOKS if getattr(gm, name, None)}
    carried.update({k: v for k, v in gm.__dict__.items()
                    if k == _EXTRAS or (not k.startswith("_") and not isinstance(
                        v, (nn.Module, torch.Tensor)) and k not in ("training", "meta"))})
    return carried


def _restore(gm: fx.GraphModule, carried: dict[str, Any]) -> fx.GraphModule:
    for name, value in carried.items():
        if name in HOOKS:
            getattr(gm, name).update(value)
        else:
            gm.__dict__[name] = value
    _apply_class(gm, gm.__dict__.get(_EXTRAS) or {"cls": None, "frozen": {}})
    return gm


def _deepcopy(self: fx.GraphModule, memo: dict[int, Any]) -> fx.GraphModule:
    plain = fx.GraphModule.__deepcopy__(self, memo)
    return _restore(plain, copy.deepcopy(_carried(self), memo))


def _reduce(self: fx.GraphModule) -> tuple:
    rebuild, (body, *rest) = fx.GraphModule.__reduce__(self)[:2]
    body = {k: v for k, v in body.items() if k not in HOOKS and k != _EXTRAS}
    carried = _carried(self)
    extras = carried.get(_EXTRAS)
    if extras is not None and not _picklable(extras["cls"]):
        _unsaved(self, f"the methods of {extras['cls'].__qualname__} (a class defined where "
                 "pickle cannot import it)")
        carried[_EXTRAS] = dict(extras, cls=None)
    for name in [n for n in carried if n in HOOKS]:
        kept = type(carried[name])(
            (k, hook) for k, hook in carried[name].items() if _picklable(hook))
        if len(kept) < len(carried[name]):
            _unsaved(self, f"{len(carried[name]) - len(kept)} hook(s) that cannot be pickled")
        carried[name] = kept
    return rebuild_like_original, (rebuild, (body, *rest), carried)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _unsaved(gm: fx.GraphModule, what: str) -> None:
    warnings.warn(f"saving {type(gm).__name__}: {what} cannot be pickled and will be missing "
                  "when it is loaded", LwCompileWarning, stacklevel=4)


def rebuild_like_original(rebuild: Any, args: tuple, carried: dict[str, Any]) -> Any:
    """Unpickle: fx's own rebuild, then what ``like_original`` carried."""
    return _restore(rebuild(*args), carried)
