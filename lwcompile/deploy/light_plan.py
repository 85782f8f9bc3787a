"""The plan a lightened model was made by, as JSON-ready data: what a model file replays.

``lighten`` records it on its result (``result.lwcompile_plan``), ``save`` writes it into the
model file, and ``load`` replays it on the original architecture (``deploy.rebuild``), so
that a model file holds data only: tensors and this plan, never code. The schema (versions 1
and 2, documented for readers in docs/model_files.md)::

    {"version": 1 | 2, "lwcompile_version": str, "torch_version": str,
     "original": {"class_name": str, "params": int, "architecture": str,
                  "tensors": {name: [shape...]}, "source": str | null},
     "inputs": {"args": [INPUT...], "kwargs": {name: INPUT}},
     "rules": [{"name": str, "class": "module:QualName", "builtin": bool,
                "params": {field: value}}],
     "guards": [str], "exclude": [str],
     "sites": [{"site": str, "rule": str, "result_name": str, "structure": str,
                "params"?: {field: value}}],
     "vetoes": [{"site": str, "by": str, "outcome": str, "reason": str}],
     "result": {"architecture": str, "training": bool, "training_differs": [str]},
     "replayable": true | "why not"}

    INPUT = {"tensor": {"shape": [int...], "dtype": "float32"}} | {"value": JSON scalar}
            | {"unknown": "type name"}

``class`` is for the reader only: the loader never imports a name it reads from a file.
A site's ``params`` (written by ``tune(..., budget_ms=)``, which changes squeeze ratios per
site) override its rule's parameters there.
``structure`` is a digest of the replacement's ``structure_key`` (classes, configuration and
tensor shapes, not values); ``architecture`` a digest of tensor names and shapes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import nn

from ..report import APPLIED, Report
from ..rule import Guard, Rule
from ..tracing.flow import structure_key

#: the newest plan version this reads; 2 adds a site's own ``params``, and a plan is
#: written as 2 only where a site has them (so that older readers refuse it, and read the rest)
VERSION = 2
SITE_PARAMS_VERSION = 2
_SCALARS = (type(None), bool, int, float, str)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def lwcompile_version() -> str:
    try:
        return metadata.version("lwcompile")
    except metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


def names_and_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Every state_dict entry (parameters and persistent buffers) with its shape."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def shapes_digest(model: nn.Module) -> str:
    """A digest of the state_dict's names and shapes (not dtypes, not values)."""
    text = ";".join(f"{n}:{s}" for n, s in names_and_shapes(model).items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def structure_digest(module: nn.Module) -> str:
    """A digest of ``structure_key(module)`` without dtypes (a model saved in half precision
    is rebuilt in the original's) or training flags (the plan keeps those apart), stable
    across processes (addresses removed)."""
    key = [(name, cls, extra, tuple(kv for kv in plain if kv[0] != "training"),
            tuple((n, shape) for n, shape, _dtype in tensors), code)
           for name, cls, extra, plain, tensors, code in structure_key(module)]
    text = _ADDRESS.sub("", repr(key))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rule_entry(rule: Rule) -> dict[str, Any]:
    """How the plan names a rule: its name, class (for the reader) and parameters."""
    cls = type(rule)
    params = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.init} \
        if dataclasses.is_dataclass(rule) else {}
    return {"name": rule.name, "class": f"{cls.__module__}:{cls.__qualname__}",
            "builtin": cls.__module__.startswith("lwcompile.rules."),
            "params": {k: encode(v, f"rule {rule.name!r} parameter {k!r}")
                       for k, v in params.items()}}


def encode(value: Any, what: str) -> Any:
    """A rule parameter as JSON (tuples become lists); anything else cannot be replayed."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [encode(v, what) for v in value]
    raise NotReplayable(f"{what} is a {type(value).__name__}, which a data-only file "
                        "cannot hold")


def decode(value: Any, like: Any) -> Any:
    """A parameter read back: a list becomes a tuple where the rule's default is one."""
    if isinstance(value, list) and isinstance(like, tuple):
        return tuple(value)
    return value


class NotReplayable(Exception):
    """Something of the lighten call cannot be written as data (kept as the plan's reason)."""


def describe_input(value: Any) -> dict[str, Any]:
    """One example input as data: a tensor by shape and dtype, a scalar by value."""
    if isinstance(value, torch.Tensor):
        return {"tensor": {"shape": list(value.shape),
                           "dtype": str(value.dtype).removeprefix("torch.")}}
    if isinstance(value, _SCALARS) and not (isinstance(value, float) and value != value):
        return {"value": value}
    return {"unknown": type(value).__name__}


def record(original: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any],
           rules: Sequence[Rule], guards: Sequence[Guard], result: nn.Module,
           report: Report, source: str | None = None) -> dict[str, Any]:
    """The plan of one lighten call: what ``rebuild`` needs to make ``result`` again from
    ``original``. Never raises for what data cannot hold: ``replayable`` says why instead."""
    plan: dict[str, Any] = {
        "version": 1, "lwcompile_version": lwcompile_version(),
        "torch_version": torch.__version__,
        "original": {"class_name": type(original).__name__,
                     "params": sum(p.numel() for p in original.parameters()),
                     "architecture": shapes_digest(original),
                     "tensors": names_and_shapes(original), "source": source},
        "inputs": {"args": [describe_input(a) for a in args],
                   "kwargs": {k: describe_input(v) for k, v in kwargs.items()}},
        "guards": [g.name for g in guards],
        "exclude": [p for g in guards for p in getattr(g, "patterns", ()) if g.name == "exclude"],
        "sites": [], "vetoes": [], "replayable": True,
    }
    used = {row.decided_by for row in report.applied}
    try:
        plan["rules"] = [rule_entry(r) for r in rules if r.name in used]
    except NotReplayable as exc:
        plan["rules"], plan["replayable"] = [], str(exc)
    plan["rules"] += [{"name": r.name, "class": f"{type(r).__module__}:{type(r).__qualname__}",
                       "builtin": type(r).__module__.startswith("lwcompile.rules."),
                       "params": None} for r in rules if r.name not in used]
    for row in report.rows:
        if row.outcome == APPLIED:
            try:
                digest = structure_digest(result.get_submodule(row.result_name or row.site))
            except AttributeError as exc:  # never fail lighten over its record
                plan["replayable"], digest = f"the replacement at {row.site!r} is not a " \
                    f"submodule of the result ({exc})", ""
            plan["sites"].append({"site": row.site, "rule": row.decided_by,
                                  "result_name": row.result_name or row.site,
                                  "structure": digest})
        else:
            plan["vetoes"].append({"site": row.site, "by": row.decided_by,
                                   "outcome": row.outcome, "reason": row.reason})
    plan["result"] = result_entry(result)
    return plan


def result_entry(result: nn.Module) -> dict[str, Any]:
    """The lightened model's own fingerprint and training flags, as the plan keeps them."""
    return {"architecture": shapes_digest(result), "training": result.training,
            "training_differs": [n for n, m in result.named_modules()
                                 if m.training != result.training]}


def validate(header: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first field of a file's header or plan that does not have
    the schema's type, so that a crafted or damaged file is refused before it is used."""
    def need(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise ValueError(f"{where} is {type(value).__name__}, not "
                             f"{getattr(kind, '__name__', kind)}")
        return value

    def each(items: Any, kind: type, where: str) -> Any:
        for i, item in enumerate(need(items, (list, dict), where)):
            need(items[item] if isinstance(items, dict) else item, kind, f"{where}[{i}]")
        return items

    for key in ("class_name", "lwcompile_version", "torch_version"):
        need(header.get(key), str, key)
    need(header.get("params"), int, "params")
    need(header.get("report"), (dict, type(None)), "report")
    each(header.get("aliases"), str, "aliases")
    plan = need(header.get("plan"), dict, "plan")
    if need(plan.get("version"), int, "plan.version") > VERSION:
        raise ValueError(f"plan version {plan['version']} is newer than this lwcompile reads "
                         f"({VERSION}): it was written by lwcompile "
                         f"{plan.get('lwcompile_version')}; upgrade")
    for key in ("lwcompile_version", "torch_version"):
        need(plan.get(key), str, f"plan.{key}")
    original = need(plan.get("original"), dict, "plan.original")
    need(original.get("class_name"), str, "plan.original.class_name")
    need(original.get("source"), (str, type(None)), "plan.original.source")
    for name, shape in need(original.get("tensors"), dict, "plan.original.tensors").items():
        each(shape, int, f"plan.original.tensors[{name!r}]")
    inputs = need(plan.get("inputs"), dict, "plan.inputs")
    each(inputs.get("args"), dict, "plan.inputs.args")
    each(inputs.get("kwargs"), dict, "plan.inputs.kwargs")
    for i, rule in enumerate(each(plan.get("rules"), dict, "plan.rules")):
        need(rule.get("name"), str, f"plan.rules[{i}].name")
        need(rule.get("class"), str, f"plan.rules[{i}].class")
        need(rule.get("builtin"), bool, f"plan.rules[{i}].builtin")
        need(rule.get("params"), (dict, type(None)), f"plan.rules[{i}].params")
    for i, site in enumerate(each(plan.get("sites"), dict, "plan.sites")):
        for key in ("site", "rule", "result_name", "structure"):
            need(site.get(key), str, f"plan.sites[{i}].{key}")
        need(site.get("params"), (dict, type(None)), f"plan.sites[{i}].params")
    result = need(plan.get("result"), dict, "plan.result")
    need(result.get("architecture"), str, "plan.result.architecture")
    need(result.get("training"), bool, "plan.result.training")
    each(result.get("training_differs"), str, "plan.result.training_differs")
    need(plan.get("replayable"), (bool, str), "plan.replayable")
