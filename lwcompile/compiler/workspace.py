"""The workspace: the copy of the user's model that lighten rewrites, traced.

Algorithm:
1. Deep-copy the model (never the user's own) and put the copy in eval mode, so BatchNorm
   statistics never move.
2. Trace the copy hierarchically (``tracing.trace_model``), each traced graph judged by the
   graph check handed in.
3. Install each traced region's GraphModule in the copy in place of its module (the root's
   graph becomes the root), with the module's plain attributes, methods, class constants
   and hooks (``tracing.like_original``); only installed graphs may be edited as graphs.
   A region traced with some arguments fixed (``specialised``) is for analysis only and
   is not installed. One traced with arguments fixed only to None is installed behind a
   guard that runs its module's own forward when they are not None (``like_original``);
   it is rewritten module by module, not edited as a graph, so both paths see each swap.
4. If the parent code of an installed sub-region needs more than its GraphModule offers
   (methods, properties), the original modules go back (``uninstall_subregions``) and
   rewriting inside them happens module by module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import LwCompileError, UntraceableError, one_line
from ..measure.snapshot import preserved_state
from ..tracing.like_original import like_original
from ..tracing.trace import Check, Region, TracedModel, trace_model
from .check import Checked


@dataclass
class Workspace:
    """The copy being rewritten, and where each traced region's graph lives inside it."""

    root: nn.Module
    traced: TracedModel
    #: region name -> GraphModule installed in ``root`` (only these may be edited as graphs)
    installed: dict[str, fx.GraphModule]
    #: region name -> GraphModule installed behind a None guard (rewritten module by module)
    guarded: dict[str, fx.GraphModule] = field(default_factory=dict)
    #: outcomes of shape checks, by what decides them (``structure_key``s, shapes, dtype)
    shape_checks: dict[tuple, Checked] = field(default_factory=dict)
    #: rewritten site -> what checking its replacement found
    rewritten: dict[str, Checked] = field(default_factory=dict)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` to work on; the user's model is never touched."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise LwCompileError(f"cannot copy the model to work on it: {exc}") from exc


def prepare(model: nn.Module, args: tuple, kwargs: dict, output: Any, check: Check,
            fresh_copy: nn.Module | None = None,
            checked_root: tuple[Region, set[str]] | None = None) -> Workspace:
    """Copy (unless a ``fresh_copy`` of ``model`` is handed over), trace, and install each
    traced region's GraphModule in the copy. ``output`` is the eager output on ``args``
    that ``check`` judges traced graphs against; ``checked_root`` is the fresh copy's root,
    already traced and checked alongside that run."""
    root = fresh_copy if fresh_copy is not None else copy_model(model)
    root.eval()
    traced = trace_model(root, args, kwargs, output, check, checked_root,
                         both_modes=model.training)
    installed: dict[str, fx.GraphModule] = {}
    guarded: dict[str, fx.GraphModule] = {}
    for region in traced.regions:
        if not region.traced or region.specialised:
            continue
        gm = like_original(region.graph_module, region.module,
                           {k: v for k, v in region.frozen.items() if "." not in k},
                           none_only=region.none_only)
        if region.name == "":
            root = gm
        else:
            root.set_submodule(region.name, gm)
        (guarded if region.none_only else installed)[region.name] = gm
    if not installed and not traced.opaque_leaves and not any(
        r.traced for r in traced.regions
    ):
        raise UntraceableError(
            "no part of the model could be traced or visited: "
            + "; ".join(traced.log or ["the model has no submodules to visit"])
        )
    return Workspace(root, traced, installed, guarded=guarded)


def installed_graphs_run(ws: Workspace, args: tuple, kwargs: dict) -> str:
    """'' if the workspace runs with its sub-region graphs installed, else why not.

    Parent code may need more of a submodule than its GraphModule offers (methods,
    properties). Only sub-region installs can break that way; the root's graph was checked
    against eager when it was traced.
    """
    if all(name == "" for name in [*ws.installed, *ws.guarded]):
        return ""
    try:
        with preserved_state(ws.root), torch.no_grad():
            ws.root(*args, **kwargs)
    except Exception as exc:
        return one_line(exc)
    return ""


def uninstall_subregions(ws: Workspace) -> None:
    """Put the original modules back where sub-region graphs were installed.

    Their parents' code may need more of the original than a GraphModule offers (methods,
    properties); then sub-regions are analysed as graphs but rewritten module by module.
    """
    for name in [n for n in ws.installed if n]:
        ws.root.set_submodule(name, ws.traced.region(name).module)
        del ws.installed[name]
    for name in [n for n in ws.guarded if n]:
        ws.root.set_submodule(name, ws.traced.region(name).module)
    ws.guarded.clear()
