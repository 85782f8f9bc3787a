"""The driver: trace -> for each site, each rule, each guard -> apply -> verify -> report.

The engine knows no particular rule or guard; they are handed to it. All work happens on a
deep copy of the user's model, in eval mode (so BatchNorm statistics never move), and the
copy is handed back only after the whole result has been verified.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import (
    LwCompileError,
    NothingToLighten,
    UntraceableError,
    VerificationError,
    one_line,
)
from ..graph_check.lockstep import Lockstep
from ..graph_check.replay import Replay, recording
from ..measure.cost import (
    Measured,
    count_macs,
    count_params,
    measure,
    measure_on_shapes,
    random_inputs,
)
from ..measure.inputs import run_example
from ..measure.state import preserved_state
from ..report import APPLIED, KEPT, REFUSED, ROLLED_BACK, Report, Row, Summary
from ..rule import Guard, Match, Proposal, Refuse, Rule, Site
from ..tracing.flow import DataFlow, flow_recording, note_output, structure_key
from ..tracing.skips import concat_skips
from ..tracing.trace import (
    Call,
    Region,
    TracedModel,
    check_graph,
    is_leaf,
    join,
    trace_graph,
    trace_model,
)
from .composed import compose_result


class SiteBroke(Exception):
    """Applying a rewrite left the workspace inconsistent: compile again without that site."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(reason)
        self.site, self.reason = site, reason


@dataclass
class Workspace:
    """The copy being rewritten, and where each traced region's graph lives inside it."""

    root: nn.Module
    traced: TracedModel
    #: region name -> GraphModule installed in ``root`` (only these may be edited as graphs)
    installed: dict[str, fx.GraphModule]
    #: outcomes of shape checks, by what decides them (``structure_key``s, shapes, dtype)
    shape_checks: dict[tuple, Checked] = field(default_factory=dict)
    #: rewritten site -> what checking its replacement found
    rewritten: dict[str, Checked] = field(default_factory=dict)


@dataclass(frozen=True)
class Checked:
    """What checking one replacement against the original it stands in for found."""

    problem: str  # '' if it stands in
    macs_before: int
    macs_after: int
    #: the replacement's own peak activation bytes on the site's inputs, where that composes
    #: into the result's peak (composed.py); else why not
    peak_after: int | str = "it was checked on real values, not on shapes alone"


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


def prepare(model: nn.Module, args: tuple, kwargs: dict, output: Any,
            fresh_copy: nn.Module | None = None, replay: Replay | None = None,
            checked_root: tuple[Region, set[str]] | None = None) -> Workspace:
    """Copy (unless a ``fresh_copy`` of ``model`` is handed over), trace, and install each
    traced region's GraphModule in the copy. ``output`` and ``replay`` are from the eager
    run on ``args`` that traced graphs are checked against; ``checked_root`` is the fresh
    copy's root, already traced and checked alongside that run."""
    root = fresh_copy if fresh_copy is not None else _copy(model)
    root.eval()
    traced = trace_model(root, args, kwargs, output, replay, checked_root)
    installed: dict[str, fx.GraphModule] = {}
    for region in traced.regions:
        if not region.traced or region.specialised:
            continue
        gm = region.graph_module
        if region.name == "":
            root = gm
        else:
            _keep_plain_attributes(region.module, gm)
            root.set_submodule(region.name, gm)
        installed[region.name] = gm
    if not installed and not traced.opaque_leaves and not any(
        r.traced for r in traced.regions
    ):
        raise UntraceableError(
            "no part of the model could be traced or visited: "
            + "; ".join(traced.log or ["the model has no submodules to visit"])
        )
    return Workspace(root, traced, installed)


def _keep_plain_attributes(module: nn.Module, gm: fx.GraphModule) -> None:
    """Parent code may read plain attributes of a submodule (``self.net.dim_in``): keep them."""
    for key, value in module.__dict__.items():
        if not key.startswith("_") and key not in gm.__dict__ and not isinstance(
                value, (nn.Module, torch.Tensor)):
            gm.__dict__[key] = value


def uninstall_subregions(ws: Workspace) -> None:
    """Put the original modules back where sub-region graphs were installed.

    Their parents' code may need more of the original than a GraphModule offers (methods,
    properties); then sub-regions are analysed as graphs but rewritten module by module.
    """
    for name in [n for n in ws.installed if n]:
        ws.root.set_submodule(name, ws.traced.region(name).module)
        del ws.installed[name]


def find_sites(ws: Workspace, types: tuple[type[nn.Module], ...], flow: DataFlow,
               log: list[str]) -> list[Site]:
    """Every leaf call of a module of ``types``, with its shapes, in execution order.

    ``flow`` is the data flow of the reference run, which watched every module of ``types``
    (``watched``). A module whose parameters the graph also reads directly (``get_attr``,
    e.g. a forward that does ``F.conv2d(x, self.conv.weight)``) is no site: swapping it
    would break those reads.
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
                          feeds_concat=name in flow.feeds_concat))
    return sites


def watched(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """The modules the reference run records the data flow of: every one a rule applies to."""
    return [name for name, m in model.named_modules() if isinstance(m, types)]


def _installed_graphs_run(ws: Workspace, args: tuple, kwargs: dict) -> str:
    """'' if the workspace runs with its sub-region graphs installed, else why not.

    Parent code may need more of a submodule than its GraphModule offers (methods,
    properties). Only sub-region installs can break that way; the root's graph was checked
    against eager when it was traced.
    """
    if all(name == "" for name in ws.installed):
        return ""
    try:
        with preserved_state(ws.root), torch.no_grad():
            ws.root(*args, **kwargs)
    except Exception as exc:
        return one_line(exc)
    return ""


def _subgraph(gm: fx.GraphModule, nodes: Sequence[fx.Node], inputs: Sequence[Any]) -> nn.Module:
    """The matched nodes as a standalone module taking ``inputs``: what a replacement must equal."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in_{i}") for i, n in enumerate(inputs)}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(env[nodes[-1]])
    return fx.GraphModule(gm, graph)


def _check_replacement(ws: Workspace, proposal: Proposal, original: nn.Module,
                       shapes: tuple[torch.Size, ...], dtype: torch.dtype) -> Checked:
    """Whether the replacement stands in for the original, and what both cost.

    A rule that is not exact only has to take the same inputs and give the same output
    shape: that is checked on fake tensors, with no arithmetic, once per distinct pair of
    structures (a network's hundreds of identical convs and LISTs share one check). An
    exact rule (or code that needs real values) runs both on the same random input.
    """
    rule, replacement = proposal.rule, proposal.replacement
    if not rule.exact:
        key = (structure_key(original), proposal.replacement_key, tuple(shapes), dtype)
        if key not in ws.shape_checks:
            try:
                before, after = (measure_on_shapes(m, shapes, dtype)
                                 for m in (original, replacement))
            except Exception:  # failing for real is reported below, with the real error
                return _run_both(rule, original, replacement, shapes, dtype)
            ws.shape_checks[key] = _on_shapes(_shape_problem(after.output, before.output),
                                              before, after)
        return ws.shape_checks[key]
    return _run_both(rule, original, replacement, shapes, dtype)


def _run_both(rule: Rule, original: nn.Module, replacement: nn.Module,
              shapes: tuple[torch.Size, ...], dtype: torch.dtype) -> Checked:
    """Run both on the same random input and compare."""
    inputs = random_inputs(shapes, dtype=dtype)
    before = measure(original, inputs)
    try:
        after = measure(replacement, inputs)
    except Exception as exc:
        problem = f"replacement fails to run: {type(exc).__name__}: {exc}"[:300]
        return Checked(problem, before.macs, 0)
    got, expected = after.output, before.output
    problem = _shape_problem(got, expected)
    if not problem and rule.exact and not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        err = (got - expected).abs().max().item()
        problem = f"rule claims to be exact but differs by up to {err:.3g}"
    return Checked(problem, before.macs, after.macs)


def _shape_problem(got: Any, expected: torch.Tensor) -> str:
    if isinstance(got, torch.Tensor) and got.shape == expected.shape:
        return ""
    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
    return f"replacement output {shape} != original {tuple(expected.shape)}"


def _on_shapes(problem: str, before: Measured, after: Measured) -> Checked:
    """A check on fake tensors: the replacement's code ran without reading a value. Its
    peak composes if its output takes the original's place byte for byte."""
    got, expected = after.output, before.output
    in_place = (after.fresh_output and before.fresh_output
                and (got.dtype, got.stride(), got.storage_offset()) ==
                (expected.dtype, expected.stride(), expected.storage_offset())
                and got.untyped_storage().nbytes() == expected.untyped_storage().nbytes())
    peak = after.peak_bytes if in_place else "its output is laid out unlike the original's"
    return Checked(problem, before.macs, after.macs, peak)


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


def _original_of(ws: Workspace, match: Match) -> nn.Module:
    if not match.nodes:
        return match.site.module
    return _subgraph(ws.installed[match.site.region], match.nodes, match.inputs)


def _normalise(match: Match) -> Match:
    """Fill defaults so the engine can treat every match the same way."""
    if not match.nodes:
        return match
    inputs = match.inputs if match.inputs is not None else tuple(match.nodes[0].all_input_nodes)
    shapes = match.input_shapes or tuple(n.meta["tensor_meta"].shape for n in inputs)
    return Match(match.site, tuple(match.nodes), tuple(inputs), shapes, match.info)


def decide(ws: Workspace, site: Site, rules: Sequence[Rule], guards: Sequence[Guard],
           erased: set[fx.Node], log: list[str]) -> Row | None:
    """Ask each rule, then every guard; apply the first rewrite that survives. One row.

    A rule that refuses the site lets later rules try; if none rewrites it, the first
    refusal (or a guard's veto of it, which names the deeper reason) becomes the row.
    """
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
                refusal = _kept(site, rule.name, REFUSED, outcome.reason)
                veto = _first_veto(guards, Proposal(rule, Match(site), None))
                if veto is not None:
                    refusal = _kept(site, *veto)
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
            return _kept(site, *veto, params=count_params(original))
        checked = _check_replacement(ws, proposal, original, match.shapes, site.dtype)
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
        return row
    if refusal is None and misses:
        log.append(f"{site.name}: no rule matched ({'; '.join(misses)})")
    return refusal


def _first_veto(guards: Sequence[Guard], proposal: Proposal) -> tuple[str, str, str] | None:
    for guard in guards:
        veto = guard.check(proposal)
        if veto is not None:
            return guard.name, KEPT, veto.reason
    return None


def _kept(site: Site, decided_by: str, outcome: str, reason: str,
          params: int | None = None) -> Row:
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
    return _kept(site, rule.name, ROLLED_BACK, reason)


def _match_placement(replacement: nn.Module, like: nn.Module) -> None:
    ref = next(like.parameters(), None)
    if ref is not None and any(t.device != ref.device or t.dtype != ref.dtype
                               for t in replacement.parameters()):
        replacement.to(device=ref.device, dtype=ref.dtype)


def _output_shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(_output_shapes(o) for o in out)
    if isinstance(out, dict):
        return {k: _output_shapes(v) for k, v in out.items()}
    return type(out).__name__


def compile_once(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
                 guards: Sequence[Guard], held_back: dict[str, str],
                 reference: Reference, seconds: Counter[str]) -> tuple[Workspace, Report]:
    """One pass over the model; sites in ``held_back`` are reported but left as they are.

    ``reference`` is the model's eager run on ``args``: traced graphs are checked against
    its output, and sites get their shapes and data flow from it. Time spent is added to
    ``seconds`` by phase."""
    with timed(seconds, "tracing + graph check"):
        ws = prepare(model, args, kwargs, reference.run.output, *reference.take_spares())
    report = Report(log=list(ws.traced.log))
    report.notes["concat_skips"] = [
        asdict(skip) for name, gm in ws.installed.items()
        for skip in concat_skips(gm.graph, name)]
    types = site_types(rules)
    erased: set[fx.Node] = set()
    with timed(seconds, "tracing + graph check"):
        problem = _installed_graphs_run(ws, args, kwargs)
    if problem:
        uninstall_subregions(ws)
        report.log.append(f"sub-region graphs not installed ({problem}): rewriting "
                          "inside them module by module")
    sites = find_sites(ws, types, reference.flow, report.log) if types else []
    with timed(seconds, "rule decisions"):
        for site in sites:
            if site.node is not None and site.node in erased:
                continue
            if site.name in held_back:
                report.rows.append(_kept(site, "verify", ROLLED_BACK, held_back[site.name]))
                continue
            row = decide(ws, site, rules, guards, erased, report.log)
            if row is not None:
                report.rows.append(row)
    return ws, report


@contextlib.contextmanager
def timed(seconds: Counter[str], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[phase]``: the report says where
    compilation spent its time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start


def _first_failure(result: nn.Module, args: tuple, kwargs: dict,
                   expected: Any) -> tuple[str, Measured | None]:
    """'' if the result runs and gives the original's output shapes, else the problem; and
    what was measured on that run."""
    try:
        run = measure(result, args, kwargs)
    except Exception as exc:
        return f"result fails to run: {type(exc).__name__}: {exc}"[:300], None
    got = _output_shapes(run.output)
    return ("" if got == expected else f"result output shapes {got} != original {expected}",
            run)


def _nothing_done(model: nn.Module, report: Report) -> str:
    """Why nothing was rewritten, in one paragraph: the decisions, then the log's first lines."""
    kept = Counter(f"{r.outcome} by {r.decided_by}" for r in report.rows)
    parts = [f"{n} site(s) {why}" for why, n in kept.most_common()]
    parts += [line for line in report.log if "no rule matched" not in line][:3]
    detail = "; ".join(parts) or "no conv the rules apply to was found"
    return f"nothing to lighten in {type(model).__name__}: {detail} (see the error's .report)"


def site_types(rules: Sequence[Rule]) -> tuple[type[nn.Module], ...]:
    return tuple({t for rule in rules for t in rule.applies_to})


@dataclass
class Reference:
    """The original model's one eager run: output, MACs, peak memory, data flow, and what
    checking traced graphs against it needs."""

    run: Measured
    flow: DataFlow
    #: the copy the run used, untouched since, the root's region (traced and checked
    #: alongside the run, lockstep.py) and the recorded conv outputs that regions below the
    #: root are checked with: the first workspace starts from them. Later ones (bisection,
    #: rare) trace and check afresh, so the recorded outputs (up to replay.BUDGET_BYTES)
    #: are not held through compilation.
    spare_copy: nn.Module | None = None
    root: tuple[Region, set[str]] | None = None
    replay: Replay | None = None

    def take_spares(self) -> tuple[nn.Module | None, Replay | None,
                                   tuple[Region, set[str]] | None]:
        spares = self.spare_copy, self.replay, self.root
        self.spare_copy = self.replay = self.root = None
        return spares


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        raise LwCompileError(f"cannot copy the model to work on it: {exc}") from exc


def _reference_run(model: nn.Module, args: tuple, kwargs: dict, inferred: bool,
                   types: tuple[type[nn.Module], ...], seconds: Counter[str]) -> Reference:
    """Copy the model and run it once, measured, with its data flow recorded. The root is
    traced first, so that its graph is checked alongside that run (lockstep.py); conv
    outputs are recorded only if regions below the root may need checking (replay.py)."""
    with timed(seconds, "reference run"):
        reference = _copy(model).eval()
    with timed(seconds, "tracing + graph check"):
        attempt = None if is_leaf(reference) else trace_graph("", reference,
                                                               Call(args, kwargs, None))
    # a root with opaque leaves would run them (and the hooked convs inside) during eager's
    # forward: its graph is checked afterwards, with recorded conv outputs, like those below
    pairing = Lockstep(attempt) if attempt is not None and attempt.whole else None
    with timed(seconds, "reference run"), \
            flow_recording(reference, watched(reference, types)) as flow, \
            (contextlib.nullcontext() if pairing else recording(reference)) as replay, \
            (pairing.alongside(reference, flow) if pairing else contextlib.nullcontext()):
        run = run_example(reference, args, kwargs, inferred)
        note_output(flow, run.output)
    root = None
    if pairing is not None:
        # the graph's share of the run is the graph check's
        seconds["reference run"] -= pairing.seconds
        seconds["tracing + graph check"] += pairing.seconds
        with timed(seconds, "tracing + graph check"):
            root = pairing.region(run.output, eager_read_values=run.reads_values)
    elif attempt is not None:
        with timed(seconds, "tracing + graph check"):
            root = check_graph(attempt, run.output, replay)
    return Reference(run, flow, spare_copy=reference, root=root, replay=replay)


def _rounded(seconds: Counter[str]) -> dict[str, float]:
    return {phase: round(s, 3) for phase, s in seconds.items()}


def _copy_training_flags(model: nn.Module, result: nn.Module) -> None:
    """Give the result the model's mode, module by module (a frozen BatchNorm in a model
    in training mode stays in eval); new modules take the mode of the model."""
    result.train(model.training)
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in result.named_modules():
        if flags.get(name, model.training) != m.training:
            m.training = flags[name]


def plan_only(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
              guards: Sequence[Guard], inferred: bool = False) -> Report:
    """The decisions ``compile_verified`` would make, on a scratch copy that is thrown away.

    The summary's "after" figures are estimates: totals minus each applied row's saving.
    """
    seconds: Counter[str] = Counter()
    reference = _reference_run(model, args, kwargs, inferred, site_types(rules), seconds)
    before = reference.run
    _, report = compile_once(model, args, kwargs, rules, guards, {}, reference, seconds)
    report.notes["seconds"] = _rounded(seconds)
    params = count_params(model)
    applied = report.applied
    report.summary = Summary(
        params, params - sum(r.params_before - r.params_after for r in applied),
        before.macs, before.macs - sum(r.macs_before - r.macs_after for r in applied),
        before.peak_bytes, None)
    return report


def compile_verified(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
                     guards: Sequence[Guard], inferred: bool = False) -> tuple[nn.Module, Report]:
    """Compile, check the whole result, and roll back the culprit rewrite until it passes.

    Each site was already checked alone; a whole-model failure means rewrites interact, so
    the first applied rewrite whose inclusion breaks the model is found by bisection over
    the applied ones in order and held back, and compilation is repeated.
    """
    seconds: Counter[str] = Counter()
    reference = _reference_run(model, args, kwargs, inferred, site_types(rules), seconds)
    before = reference.run
    expected = _output_shapes(before.output)
    held_back: dict[str, str] = {}
    while True:
        try:
            ws, report = compile_once(model, args, kwargs, rules, guards, held_back,
                                      reference, seconds)
        except SiteBroke as broke:
            held_back[broke.site] = broke.reason
            continue
        result = ws.root
        with timed(seconds, "result check"):
            after = compose_result(ws, report, reference.flow, before.macs)
            problem = ""
            if after is None:
                problem, after = _first_failure(result, args, kwargs, expected)
        if not problem:
            break
        applied = [r.site for r in report.applied]
        if not applied:
            raise VerificationError(f"the traced model itself fails verification: {problem}")
        lo, hi = 1, len(applied)  # smallest prefix of applied rewrites that fails
        while lo < hi:
            mid = (lo + hi) // 2
            keep = set(applied[:mid])
            trial, _ = compile_once(model, args, kwargs, rules, guards,
                                    held_back | {s: "" for s in applied if s not in keep},
                                    reference, seconds)
            with timed(seconds, "result check"):
                failed = _first_failure(trial.root, args, kwargs, expected)[0]
            if failed:
                hi = mid
            else:
                lo = mid + 1
        held_back[applied[lo - 1]] = f"whole-model check failed with it: {problem}"
    report.summary = Summary(count_params(model), count_params(result), before.macs, after.macs,
                             before.peak_bytes, after.peak_bytes)
    report.notes["seconds"] = _rounded(seconds)
    if not report.applied:
        raise NothingToLighten(_nothing_done(model, report), report)
    _copy_training_flags(model, result)
    return result, report
