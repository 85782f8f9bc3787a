"""Convert a model file of the first (pickle) format into a data-only one.

Algorithm (``convert``): the old file is unpickled once, with the caller's explicit trust;
its report names the applied sites and the rule of each; those rules (built-in, or the
caller's own by name, with the caller's parameters) make a plan with the example inputs the
caller gives (default: inferred), exactly as ``lighten`` records one; the plan is replayed
on the original and must rebuild the old model's architecture exactly (same rewrites, same
replacement structures, same tensor names and shapes) before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import arguments as check
from ..errors import NotAModuleError
from ..measure.inputs import infer_example_inputs
from ..rule import Rule
from . import light_plan, rebuild
from .file_errors import NotSavableError, ReplayError, SaveFileError
from .persist import file_kind, info, load, report_from_dict, save


def convert(old: str | os.PathLike[str], new: str | os.PathLike[str], original: nn.Module, *,
            trust: bool = False, rules: Sequence[Rule] = (),
            example_inputs: Sequence[Any] | None = None, source: str | None = None) -> Path:
    """Turn a pickle model file into a data-only one (needs ``trust=True``: the old file is
    unpickled once). The plan is derived from the old file's report: its applied sites and
    rules (built-in, or yours in ``rules``, with their parameters), replayed on ``original``
    with ``example_inputs`` (as given to lighten; default: inferred) and checked to give the
    old model's architecture exactly before anything is written."""
    old = check.path("lwcompile.convert", "old", old)
    new = check.destination("lwcompile.convert", "new", new)
    if not isinstance(original, nn.Module):
        raise NotAModuleError(f"lwcompile.convert: original must be an nn.Module, got a "
                              f"{type(original).__name__}")
    if file_kind(old) != "pickle":
        info(old)  # a damaged or foreign file is refused as such
        raise SaveFileError(f"{old} is already a data-only model file: nothing to convert")
    header = info(old)
    model = load(old, trust=trust)
    if header["report"] is None:
        raise NotSavableError(f"{old} holds no report, so which rules made it is unknown: it "
                              "cannot be converted")
    report = report_from_dict(header["report"])
    args = check.inputs("lwcompile.convert", "example_inputs", example_inputs, optional=True)
    args = args if args is not None else infer_example_inputs(original)
    applied = {r.decided_by for r in report.applied}
    plan = {"rules": [{"name": n, "builtin": True, "class": "", "params": None}
                      for n in sorted(applied)], "sites": [{"rule": n} for n in applied],
            "lwcompile_version": header["lwcompile_version"]}
    chosen = rebuild.replay_rules(plan, list(rules))
    model.lwcompile_plan = light_plan.record(original, args, {}, list(chosen.values()), [],
                                             model, report, source)
    table = light_plan.names_and_shapes(model)
    try:
        rebuild.rebuild(original, model.lwcompile_plan, table, rules=list(chosen.values()),
                        inputs=(tuple(args), {}))
    except ReplayError as exc:
        raise type(exc)(f"{old} cannot be converted: {exc} (the old file does not record "
                        "rule parameters or example inputs: pass those lighten used, e.g. "
                        "rules=[ListRule(squeeze_ratio=8)], --input 1x3x64x64)") from exc
    return save(model, new, report=report)
