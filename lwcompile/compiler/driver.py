"""The driver: reference run -> workspace -> sites -> decide each -> check the whole result,
with bisection and rollback until it passes; or a plan of the same decisions.

Algorithm (``compile_verified``):
0. Re-parameterised blocks are folded into the convs they compute (folding.py), on a copy.
1. Reference run: a copy of the model runs once on the example inputs, measured (MACs,
   peak memory), its data flow recorded, and the root's traced graph checked alongside it
   (``graph_check.GraphCheck``).
2. ``compile_once``: a workspace (the copy, traced, graphs installed), its sites in
   execution order, one decision per site (decide.py). Sites held back are reported as
   rolled back and left as they are; a rewrite that breaks the graph holds its site back
   and the pass starts over.
3. The whole result is checked: its cost is composed from runs already made where that is
   sound (result_cost.py), else it runs. Each site was checked alone, so a failure means
   rewrites interact: the smallest prefix of the applied rewrites (in order) that fails is
   found by bisection, its last rewrite is held back, and compilation repeats.
4. The result gets the model's training flags, module by module; nothing applied raises
   ``NothingToLighten`` with the report.
``plan_only`` stops after one ``compile_once`` and estimates the result's totals from the
rows. The compiler knows no particular rule or guard: they are handed to it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch
import torch.fx as fx
from torch import nn

from ..arguments import own_copy
from ..errors import NothingToLighten, UntraceableError, VerificationError
from ..graph_check import GraphCheck
from ..measure.cost import Measured, count_params
from ..measure.inputs import run_example
from ..report import ROLLED_BACK, Report, Summary
from ..rule import Guard, Rule
from ..tracing.flow import DataFlow, flow_recording, note_inputs, note_output
from ..tracing.fx_helpers import one_at_a_time
from ..tracing.skips import concat_skips
from ..tracing.trace import Call, Region, is_leaf, trace_graph
from .check import first_failure, output_shapes
from .decide import SiteBroke, decide, kept_row
from .folding import fold_reparameterised
from .result_cost import compose_result
from .sites import find_sites, site_types, watched
from .workspace import Workspace, copy_model, installed_graphs_run, prepare, uninstall_subregions

_T = TypeVar("_T")


def exclusive(compile_fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run ``compile_fn(model, args, kwargs, ...)`` alone in the process (fx patches
    ``nn.Module`` process-wide while it traces: ``fx_helpers.one_at_a_time``), outside inference
    mode: the compiler's checks read tensor version counters and build autograd-free copies
    that inference mode forbids. The example tensors are cloned (normal tensors, even from
    inference ones), so a forward that writes into its input never writes into the user's;
    the result holds no inference tensor."""

    @functools.wraps(compile_fn)
    @one_at_a_time
    def wrapper(model: nn.Module, args: tuple, kwargs: dict, *rest, **options) -> _T:
        _refuse_scripted(model)
        with torch.inference_mode(False):
            args, kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, own_copy, (args, kwargs))
            return compile_fn(model, args, kwargs, *rest, **options)

    return wrapper


def _refuse_scripted(model: nn.Module) -> None:
    """TorchScript modules can be neither traced by fx nor hooked nor snapshotted: say so,
    naming the first one, rather than let the reference run blame the example input."""
    scripted = next((name for name, m in model.named_modules()
                     if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        where = f"submodule {scripted!r}" if scripted else "the model itself"
        raise UntraceableError(
            f"{type(model).__name__}: {where} is a torch.jit.script/trace module, which "
            "lwcompile cannot trace, hook or check; lighten the unscripted Python module and "
            "script the result")


@contextlib.contextmanager
def timed(seconds: Counter[str], phase: str) -> Iterator[None]:
    """Add the wall time of the block to ``seconds[phase]``: the report says where
    compilation spent its time."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] += time.perf_counter() - start


@dataclass
class Reference:
    """The original model's one eager run: output, MACs, peak memory, data flow, and the
    graph check made alongside it."""

    run: Measured
    flow: DataFlow
    graph_check: GraphCheck
    #: the copy the run used, untouched since, and the root's region (traced and checked
    #: alongside the run): the first workspace starts from them. Later ones (bisection,
    #: rare) trace and check afresh, and the graph check's recorded conv outputs (up to
    #: replay.BUDGET_BYTES) are released after the first, not held through compilation.
    spare_copy: nn.Module | None = None
    root: tuple[Region, set[str]] | None = None

    def take_spares(self) -> tuple[nn.Module | None, tuple[Region, set[str]] | None]:
        spares = self.spare_copy, self.root
        self.spare_copy = self.root = None
        return spares


def reference_run(model: nn.Module, args: tuple, kwargs: dict, inferred: bool,
                  types: tuple[type[nn.Module], ...], seconds: Counter[str]) -> Reference:
    """Copy the model and run it once, measured, with its data flow recorded. The root is
    traced first, so that its graph is checked alongside that run; conv outputs are
    recorded only if regions below the root may need checking (graph_check)."""
    with timed(seconds, "reference run"):
        reference = copy_model(model).eval()
    with timed(seconds, "tracing + graph check"):
        attempt = None if is_leaf(reference) else trace_graph(
            "", reference, Call(args, kwargs, None), both_modes=model.training)
    # a root with opaque leaves would run them (and the hooked convs inside) during eager's
    # forward: its graph is checked afterwards, with recorded conv outputs, like those below
    graph_check = GraphCheck(attempt)
    with timed(seconds, "reference run"), \
            flow_recording(reference, watched(reference, types)) as flow, \
            graph_check.during(reference, flow):
        note_inputs(args, kwargs)
        run = run_example(reference, args, kwargs, inferred)
        note_output(flow, run.output)
    if graph_check.paired:  # the graph's share of the run is the graph check's
        seconds["reference run"] -= graph_check.paired_seconds
        seconds["tracing + graph check"] += graph_check.paired_seconds
    with timed(seconds, "tracing + graph check"):
        root = graph_check.root(run.output, eager_read_values=run.reads_values)
    return Reference(run, flow, graph_check, spare_copy=reference, root=root)


def compile_once(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
                 guards: Sequence[Guard], held_back: dict[str, str],
                 reference: Reference, seconds: Counter[str]) -> tuple[Workspace, Report]:
    """One pass over the model; sites in ``held_back`` are reported but left as they are.

    ``reference`` is the model's eager run on ``args``: traced graphs are checked against
    its output, and sites get their shapes and data flow from it. Time spent is added to
    ``seconds`` by phase."""
    with timed(seconds, "tracing + graph check"):
        ws = prepare(model, args, kwargs, reference.run.output, reference.graph_check.region,
                     *reference.take_spares())
        reference.graph_check.release()
    report = Report(log=list(ws.traced.log))
    report.notes["concat_skips"] = [
        asdict(skip) for name, gm in ws.installed.items()
        for skip in concat_skips(gm.graph, name)]
    types = site_types(rules)
    erased: set[fx.Node] = set()
    with timed(seconds, "tracing + graph check"):
        problem = installed_graphs_run(ws, args, kwargs)
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
                report.rows.append(kept_row(site, "verify", ROLLED_BACK, held_back[site.name]))
                continue
            row = decide(ws, site, rules, guards, erased, report.log)
            if row is not None:
                report.rows.append(row)
    return ws, report


@exclusive
def plan_only(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
              guards: Sequence[Guard], inferred: bool = False) -> Report:
    """The decisions ``compile_verified`` would make, on a scratch copy that is thrown away.

    The summary's "after" figures are estimates: totals minus each applied row's saving.
    """
    seconds: Counter[str] = Counter()
    model, folds = fold_reparameterised(model, args, kwargs)
    reference = reference_run(model, args, kwargs, inferred, site_types(rules), seconds)
    before = reference.run
    _, report = compile_once(model, args, kwargs, rules, guards, {}, reference, seconds)
    report.log[:0] = folds
    report.notes["seconds"] = _rounded(seconds)
    params = count_params(model)
    applied = report.applied
    report.summary = Summary(
        params, params - sum(r.params_before - r.params_after for r in applied),
        before.macs, before.macs - sum(r.macs_before - r.macs_after for r in applied),
        before.peak_bytes, None)
    return report


@exclusive
def compile_verified(model: nn.Module, args: tuple, kwargs: dict, rules: Sequence[Rule],
                     guards: Sequence[Guard], inferred: bool = False) -> tuple[nn.Module, Report]:
    """Compile, check the whole result, and roll back the culprit rewrite until it passes."""
    seconds: Counter[str] = Counter()
    model, folds = fold_reparameterised(model, args, kwargs)
    reference = reference_run(model, args, kwargs, inferred, site_types(rules), seconds)
    before = reference.run
    expected = output_shapes(before.output)
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
                problem, after = first_failure(result, args, kwargs, expected)
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
                failed = first_failure(trial.root, args, kwargs, expected)[0]
            if failed:
                hi = mid
            else:
                lo = mid + 1
        held_back[applied[lo - 1]] = f"whole-model check failed with it: {problem}"
    report.log[:0] = folds
    report.summary = Summary(count_params(model), count_params(result), before.macs, after.macs,
                             before.peak_bytes, after.peak_bytes)
    report.notes["seconds"] = _rounded(seconds)
    if not report.applied:
        raise NothingToLighten(_nothing_done(model, report), report)
    _copy_training_flags(model, result)
    return result, report


def _nothing_done(model: nn.Module, report: Report) -> str:
    """Why nothing was rewritten, in one paragraph: the decisions, then the log's first lines."""
    kept = Counter(f"{r.outcome} by {r.decided_by}" for r in report.rows)
    parts = [f"{n} site(s) {why}" for why, n in kept.most_common()]
    parts += [line for line in report.log if "no rule matched" not in line][:3]
    detail = "; ".join(parts) or "no conv the rules apply to was found"
    return f"nothing to lighten in {type(model).__name__}: {detail} (see the error's .report)"


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
