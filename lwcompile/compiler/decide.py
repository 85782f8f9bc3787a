"""Decide one site: match -> guard -> check -> rewrite, and the report row that says so.

Algorithm (``decide``), for each rule in priority order that applies to the site's module:
1. Match. ``Refuse`` (the rule recognises the site but cannot rewrite it) lets later rules
   try; the first refusal is remembered, or a guard's veto of it, which names the deeper
   reason. ``NoMatch`` is logged. A matcher that raises rolls the site back.
2. Build the replacement, placed on the original's device and dtype; a builder that raises
   or returns no module rolls the site back.
3. Guard: the first guard that vetoes the proposal keeps the site as it is.
4. Check the replacement against the nodes it replaces (check.py); a problem rolls it back.
5. Rewrite: swap the module, or for a multi-node match, call the replacement in place of
   the matched nodes of the installed graph. A rewrite that breaks the graph raises
   ``SiteBroke``: the workspace may be half-edited, so the driver compiles again without it.
If no rule rewrites the site, the row is the first refusal (None if there was none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import RuleError, one_line
from ..measure.cost import count_macs, count_params, measure_on_shapes, random_inputs
from ..report import APPLIED, KEPT, REFUSED, ROLLED_BACK, Row
from ..rule import Guard, Match, Proposal, Refuse, Rule, Site, Veto
from ..tracing.like_original import has_hooks
from ..tracing.trace import join
from .check import check_replacement
from .workspace import Workspace


class SiteBroke(Exception):
    """Applying a rewrite left the workspace inconsistent: compile again without that site."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(reason)
        self.site, self.reason = site, reason


def describe(module: nn.Module) -> str:
    """A short human name for a module, e.g. ``Conv2d 64->64 3x3``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = "x".join(map(str, module.kernel_size))
        extras = [f"s{module.stride[0]}"] if max(module.stride) > 1 else []
        extras += [f"d{module.dilation[0]}"] if max(module.dilation) > 1 else []
        extras += [f"g{module.groups}"] if module.groups > 1 else []
        tail = f" ({', '.join(extras)})" if extras else ""
        return f"{type(module).__name__} {module.in_channels}->{module.out_channels} {k}{tail}"
    return type(module).__name__


def decide(ws: Workspace, site: Site, rules: Sequence[Rule], guards: Sequence[Guard],
           erased: set[fx.Node], log: list[str]) -> Row | None:
    """Ask each rule, then every guard; apply the first rewrite that survives. One row.

    ``erased`` holds the graph nodes earlier rewrites removed (a match touching one is
    skipped); why no rule matched goes to ``log``.
    """
    held = _held_by_the_compiler(ws, site)
    if held:
        return kept_row(site, *held)
    misses: list[str] = []
    refusal: Row | None = None
    for rule in rules:
        if not isinstance(site.module, rule.applies_to):
            continue
        try:
            outcome = rule.match(site)
        except Exception as exc:
            return _failed(site, rule, f"matcher raised {type(exc).__name__}: {exc}")
        if isinstance(outcome, Refuse):
            if refusal is None:
                refusal = kept_row(site, rule.name, REFUSED, outcome.reason)
                veto = _first_veto(guards, Proposal(rule, Match(site), None))
                if veto is not None:
                    refusal = kept_row(site, *veto)
            continue
        if not isinstance(outcome, Match):
            misses.append(f"{rule.name}: {getattr(outcome, 'reason', 'no match')}")
            continue
        match = _normalise(outcome)
        if match.nodes and not site.graph_editable:
            return _failed(site, rule, "needs graph context, but this site's region was not "
                           "traced as an editable graph")
        if any(n in erased for n in match.nodes):
            misses.append(f"{rule.name}: part of the match was already rewritten")
            continue
        calls = _calls(ws, site.name)
        if match.nodes and calls > 1:
            misses.append(f"{rule.name}: the module is called {calls} times and this rewrite "
                          "of one call would untie it from the others")
            continue
        original = _original_of(ws, match)
        try:
            replacement = rule.build(match)
        except Exception as exc:
            return _failed(site, rule, f"builder raised {type(exc).__name__}: {exc}")
        if not isinstance(replacement, nn.Module):
            return _failed(site, rule, f"builder returned {type(replacement).__name__}, "
                           "not an nn.Module")
        _match_placement(replacement, site.module)
        proposal = Proposal(rule, match, replacement)
        veto = _first_veto(guards, proposal)
        if veto is not None:
            return kept_row(site, *veto, params=count_params(original))
        checked = check_replacement(ws.shape_checks, proposal, original, match.shapes,
                                    site.dtype)
        row = Row(site.name, describe(site.module), rule.describe(replacement), APPLIED,
                  rule.name, "", count_params(original), count_params(replacement),
                  checked.macs_before, checked.macs_after)
        if checked.problem:
            row.outcome, row.reason, row.replacement = ROLLED_BACK, checked.problem, "kept"
            row.params_after, row.macs_after = row.params_before, row.macs_before
            return row
        try:
            row.result_name = _apply(ws, match, replacement, erased)
        except Exception as exc:  # the workspace may be half-edited: start over without it
            raise SiteBroke(site.name, f"applying it broke the graph: {one_line(exc)}") from exc
        ws.rewritten[site.name] = checked
        if calls > 1:
            log.append(f"{site.name}: called {calls} times; its one replacement serves every "
                       "call, so the calls still share weights")
        return row
    if refusal is None and misses:
        log.append(f"{site.name}: no rule matched ({'; '.join(misses)})")
    return refusal


def _held_by_the_compiler(ws: Workspace, site: Site) -> tuple[str, str, str] | None:
    """Sites no rule may rewrite, whatever the guards: a replacement would untie weights
    the model shares, or drop hooks the application put on the module."""
    shared = _sharing(ws.root, site.name)
    if shared:
        return ("tied-weights", KEPT, f"shares {shared}: a replacement would untie them "
                "(the model would stop sharing these weights)")
    if has_hooks(site.module):
        kinds = [k for k in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                             "_backward_pre_hooks") if getattr(site.module, k, None)]
        return ("hooks", KEPT, f"has {', '.join(k.strip('_').replace('_', ' ') for k in kinds)}"
                ": a replacement is another module and would drop them (remove the hooks to "
                "lighten it)")
    return None


def _calls(ws: Workspace, name: str) -> int:
    """How many calls of the module ``name`` the installed graphs make."""
    return sum(1 for region, gm in ws.installed.items() for node in gm.graph.nodes
               if node.op == "call_module" and join(region, node.target) == name)


def _sharing(root: nn.Module, name: str) -> str:
    """What the module ``name`` shares with other places of ``root`` ('' if nothing): the
    module itself registered under another name, or a parameter another module holds."""
    module = root.get_submodule(name)
    others = [n for n, m in root.named_modules(remove_duplicate=False) if m is module
              and n != name]
    if others:
        return f"the module itself with {others[0]!r}"
    mine = {id(p): p_name for p_name, p in module.named_parameters(remove_duplicate=False)}
    for other_name, other in root.named_modules(remove_duplicate=False):
        if other is module or other_name.startswith(f"{name}.") or \
                name.startswith(f"{other_name}.") or other_name == "":
            continue
        for p_name, p in other.named_parameters(recurse=False):
            if id(p) in mine:
                return f"its {mine[id(p)]} with {other_name!r} ({p_name})"
    return ""


def kept_row(site: Site, decided_by: str, outcome: str, reason: str,
             params: int | None = None) -> Row:
    """The row of a site left as it is: its own params and MACs on both sides."""
    params = count_params(site.module) if params is None else params
    try:
        macs = measure_on_shapes(site.module, site.input_shapes, site.dtype).macs
    except Exception:
        try:
            macs = count_macs(site.module, *random_inputs(site.input_shapes, dtype=site.dtype))
        except Exception:  # a site we only report on must not stop compilation
            macs = 0
    return Row(site.name, describe(site.module), "kept", outcome, decided_by, reason[:300],
               params, params, macs, macs)


def _failed(site: Site, rule: Rule, reason: str) -> Row:
    return kept_row(site, rule.name, ROLLED_BACK, reason)


def _first_veto(guards: Sequence[Guard], proposal: Proposal) -> tuple[str, str, str] | None:
    """The first guard's veto as (guard, outcome, reason); a guard that raises rolls the site
    back with a row naming it and its error, like a rule that raises."""
    for guard in guards:
        try:
            veto = guard.check(proposal)
        except Exception as exc:
            return guard.name, ROLLED_BACK, f"guard {guard.name} raised {one_line(exc)}"
        if veto is not None and not isinstance(veto, Veto):  # a misuse of the API: an error
            raise RuleError(f"guard {guard.name!r} ({type(guard).__name__}) returned "
                            f"{type(veto).__name__} {veto!r}; check() must return Veto or None")
        if veto is not None:
            return guard.name, KEPT, veto.reason
    return None


def _normalise(match: Match) -> Match:
    """Fill defaults so every match is treated the same way."""
    if not match.nodes:
        return match
    inputs = match.inputs if match.inputs is not None else tuple(match.nodes[0].all_input_nodes)
    shapes = match.input_shapes or tuple(n.meta["tensor_meta"].shape for n in inputs)
    return Match(match.site, tuple(match.nodes), tuple(inputs), shapes, match.info)


def _original_of(ws: Workspace, match: Match) -> nn.Module:
    """What the replacement must equal: the module, or the matched nodes as a module."""
    if not match.nodes:
        return match.site.module
    return _subgraph(ws.installed[match.site.region], match.nodes, match.inputs)


def _subgraph(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[Any]) -> nn.Module:
    """The matched nodes as a standalone module taking ``inputs``."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph)


def _match_placement(replacement: nn.Module, like: nn.Module) -> None:
    ref = next(like.parameters(), None)
    if ref is not None and any(t.device != ref.device or t.dtype != ref.dtype
                               for t in replacement.parameters()):
        replacement.to(device=ref.device, dtype=ref.dtype)


def _apply(ws: Workspace, match: Match, replacement: nn.Module, erased: set[fx.Node]) -> str:
    """Put the replacement in place; return its qualified name in the result."""
    site = match.site
    if not match.nodes:
        ws.root.set_submodule(site.name, replacement)
        return site.name
    gm = ws.installed[site.region]
    target = f"{site.node.target.replace('.', '_')}_lw"
    gm.add_submodule(target, replacement)
    last = match.nodes[-1]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(target, args=tuple(match.inputs))
    new.meta = dict(last.meta)
    last.replace_all_uses_with(new)
    for node in reversed(match.nodes):
        if not node.users:
            gm.graph.erase_node(node)
            erased.add(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return join(site.region, target)
