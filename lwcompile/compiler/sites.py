"""Sites: the places a rule may rewrite, found in a workspace.

Algorithm:
1. The modules any rule applies to (``site_types``) are ``watched`` by the reference run,
   which records their shapes, call order and data flow (``tracing.flow``).
2. Every call of such a module in a traced graph is a candidate, editable as a graph where
   its region's graph is installed; a leaf called from opaque (untraced) code is a
   module-only candidate.
3. A module whose parameters the graph also reads directly (``get_attr``, e.g. a forward
   that does ``F.conv2d(x, self.conv.weight)``) is no site: swapping it would break those
   reads.
4. Sites come in execution order (the reference run's first calls), each with its shapes
   and what its output feeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from ..rule import Rule, Site
from ..tracing.flow import DataFlow
from ..tracing.trace import join
from .workspace import Workspace


def site_types(rules: Sequence[Rule]) -> tuple[type[nn.Module], ...]:
    """Every module type some rule applies to."""
    return tuple({t for rule in rules for t in rule.applies_to})


def watched(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """The modules the reference run records the data flow of: every one a rule applies to."""
    return [name for name, m in model.named_modules() if isinstance(m, types)]


def find_sites(ws: Workspace, types: tuple[type[nn.Module], ...], flow: DataFlow,
               log: list[str]) -> list[Site]:
    """Every leaf call of a module of ``types``, with its shapes, in execution order.

    ``flow`` is the data flow of the reference run, which watched every module of ``types``.
    Modules left alone because the graph reads their parameters are noted in ``log``.
    """
    candidates: dict[str, tuple[str, fx.Node | None, bool]] = {}
    read_directly: set[str] = set()
    for region in ws.traced.regions:
        if not region.traced:
            continue
        editable = region.name in ws.installed
        for node in region.graph_module.graph.nodes:
            if node.op == "get_attr":
                read_directly.add(join(region.name, node.target).rpartition(".")[0])
            if node.op != "call_module":
                continue
            name = join(region.name, node.target)
            if isinstance(ws.root.get_submodule(name), types) and name not in candidates:
                candidates[name] = (region.name, node, editable)
    for name in sorted(read_directly & set(candidates)):
        log.append(f"{name}: left alone, its parameters are also read directly by the model")
        del candidates[name]
    for name in ws.traced.opaque_leaves:
        if isinstance(ws.root.get_submodule(name), types):
            candidates.setdefault(name, (name.rpartition(".")[0], None, False))
    sites = []
    for name, (shapes, out) in flow.shapes.items():  # first-call order = execution order
        if name not in candidates:
            continue
        region, node, editable = candidates[name]
        sites.append(Site(name, ws.root.get_submodule(name), shapes, out, node, region,
                          editable, feeds_pixel_shuffle=name in flow.feeds_pixel_shuffle,
                          pixel_shuffle_factor=flow.pixel_shuffle_factor.get(name),
                          feeds_concat=name in flow.feeds_concat,
                          reads_input=name in flow.reads_input,
                          writes_output=name in flow.writes_output))
    return sites
