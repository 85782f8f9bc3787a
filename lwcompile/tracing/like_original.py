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

A graph traced with some arguments fixed to None (``none_only``) holds only while they are
None. It is installed behind a guard: a call passing any of them runs the original class's
``forward`` instead, with the GraphModule as ``self``. For that, the GraphModule also keeps
every child, parameter and buffer of the original (fx keeps only those its graph reads), and
submodules swapped in later must be drop-in replacements of the originals.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import LwCompileError, LwCompileWarning

#: nn.Module's hook dictionaries, copied as they are
HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
         "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
         "_backward_pre_hooks")
_EXTRAS = "_lwcompile_extras"
_MEMBERS = "_lwcompile_members"


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
                  frozen: dict[str, Any] | None = None,
                  none_only: tuple[str, ...] = ()) -> fx.GraphModule:
    """Give ``gm`` the plain attributes, class members and hooks of ``original`` (None: keep
    only what ``gm`` already has, e.g. hooks added to it), kept through deepcopy and pickle.
    ``frozen`` names attributes tracing froze into the graph: setting one on ``gm`` warns
    that it has no effect. ``none_only``: the parameters of ``forward`` the graph was traced
    with fixed to None; ``gm`` then runs the original's ``forward`` when one is not None."""
    extras = gm.__dict__.get(_EXTRAS) or {"cls": None, "frozen": {}}
    if none_only and original is not None:
        _give_members(gm, _members(original))
        extras["none_only"] = _positions(type(original).forward, none_only)
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
    if extras.get("none_only"):
        members.update(recompile=_recompile_guarded)
    name = type(gm).__name__
    kept = type(name, (fx.GraphModule,), members)
    impl = type("GraphModuleImpl", (kept,), {"__qualname__": "GraphModuleImpl"})
    impl.__name__ = name
    gm.__class__ = impl
    gm.recompile()


def _members(module: nn.Module) -> dict[str, Any]:
    """``module``'s own children, parameters and buffers, by name."""
    return {**module._modules, **module._parameters, **module._buffers}


def _give_members(gm: fx.GraphModule, members: dict[str, Any]) -> None:
    """``members`` (children, parameters and buffers of the original) as ``gm``'s own, the
    same objects: where fx made a stand-in module for a path the graph reads, the original
    replaces it, and the graph still reaches the same leaves."""
    for name, value in members.items():
        if value is None:
            continue
        for table in (gm._modules, gm._parameters, gm._buffers):
            table.pop(name, None)
        if isinstance(value, nn.Module):
            gm._modules[name] = value
        elif isinstance(value, nn.Parameter):
            gm._parameters[name] = value
        else:
            gm._buffers[name] = value


def _positions(forward: Any, names: tuple[str, ...]) -> dict[str, int]:
    """Each parameter's position among ``forward``'s arguments (after ``self``)."""
    params = list(inspect.signature(forward).parameters)[1:]
    return {name: params.index(name) for name in names}


def _recompile_guarded(self: fx.GraphModule) -> Any:
    """fx's recompile, then the None guard around the graph's ``forward`` it generated."""
    code = fx.GraphModule.recompile(self)
    cls = type(self)
    cls._graph_forward = cls.forward
    cls.forward = _guarded_forward
    return code


def _guarded_forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """The traced graph while the arguments it was traced with as None are None; otherwise
    the original class's ``forward``."""
    extras = self.__dict__[_EXTRAS]
    for name, position in extras["none_only"].items():
        value = kwargs[name] if name in kwargs else (
            args[position] if position < len(args) else None)
        if value is None:
            continue
        if extras["cls"] is None:
            raise LwCompileError(
                f"{type(self).__name__} was traced with {name}=None and its class could not "
                f"be saved with it, so a call passing {name} cannot run")
        return extras["cls"].forward(self, *args, **kwargs)
    return self._graph_forward(*args, **kwargs)


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
    if gm.__dict__.get(_EXTRAS, {}).get("none_only"):
        carried[_MEMBERS] = _members(gm)  # fx keeps only what the graph reads
    return carried


def _restore(gm: fx.GraphModule, carried: dict[str, Any]) -> fx.GraphModule:
    for name, value in carried.items():
        if name in HOOKS:
            getattr(gm, name).update(value)
        elif name == _MEMBERS:
            _give_members(gm, value)
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
