"""What tracing freezes: plain Python attributes a traced forward reads.

fx runs ``forward`` once with proxies for tensors; every other value it meets is used as
it is and its effect baked into the graph: ``for _ in range(self.steps)`` is unrolled,
``if self.use_skip:`` keeps one branch, ``x * self.scale`` holds the number. Changing such
an attribute on the traced module later does nothing. ``frozen_attributes`` finds them, by
reading the source of ``forward`` and of the methods it calls on ``self``, so that the
report can name them (and ``like_original`` can warn when one is set).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Any

from torch import nn

#: values tracing bakes in (a tuple of them too: kernel sizes, shapes)
PLAIN = (bool, int, float, str)


def _is_plain(value: Any) -> bool:
    return isinstance(value, PLAIN) or (
        isinstance(value, tuple) and all(isinstance(v, PLAIN) for v in value))


@functools.lru_cache(maxsize=1024)
def _self_reads(cls: type) -> frozenset[str]:
    """Attributes of ``self`` read by ``forward`` and the methods it calls on ``self``."""
    reads: set[str] = set()
    todo, seen = ["forward"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        function = getattr(cls, name, None)
        if not inspect.isfunction(function) or function.__module__.startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            continue
        args = tree.body[0].args.args if tree.body and hasattr(tree.body[0], "args") else []
        me = args[0].arg if args else "self"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Name) and node.value.id == me):
                reads.add(node.attr)
                if inspect.isfunction(getattr(cls, node.attr, None)):
                    todo.append(node.attr)
    return frozenset(reads)


def frozen_attributes(module: nn.Module, leaves: set[str] | frozenset[str],
                      is_leaf: Any) -> dict[str, Any]:
    """``"path.attr" -> value`` for each plain instance attribute (not ``training``) that
    the forward of ``module``, or of a submodule traced through with it, reads.
    ``leaves`` are submodules kept as leaves (not traced through); ``is_leaf(m)`` says
    whether fx treats ``m`` as a leaf (torch.nn's own modules)."""
    frozen: dict[str, Any] = {}
    for path, sub in module.named_modules():
        if path and (is_leaf(sub) or any(path == leaf or path.startswith(f"{leaf}.")
                                          for leaf in leaves)):
            continue
        reads = _self_reads(type(sub))
        for attr, value in sub.__dict__.items():
            if attr in reads and attr != "training" and not attr.startswith("_") \
                    and _is_plain(value):
                frozen[f"{path}.{attr}" if path else attr] = value
    return frozen


def describe_frozen(region: str, frozen: dict[str, Any]) -> str:
    """The report line naming what tracing froze in ``region``."""
    values = ", ".join(f"{k}={v!r}" for k, v in sorted(frozen.items()))
    return (f"{region or '<root>'}: tracing froze the plain attribute(s) {values} into the "
            "graph (loops unrolled, branches chosen, numbers baked in): changing them on the "
            "result has no effect")
