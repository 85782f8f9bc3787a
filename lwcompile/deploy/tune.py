"""Choose each LIST's deployed form, and the precision, by timing them on this machine.

Which exact form of a LIST runs fastest depends on the runtime, the precision and the CPU:
the chain of thin convs (``FusedLIST``, what ``emit_fast`` makes) moves the least
arithmetic, ``DenseLIST`` (squeeze + one dense kxk conv) the least memory. MACs do not
decide it, so ``tune`` measures:

1. LIST sites are grouped by what decides their speed (channels, kernel, squeeze, padding
   mode and input shape): sites of one group take the same form.
2. For each precision asked for, the model as it is and one variant per (group, other form)
   are prepared for the target exactly as they would be deployed (``emit_fast``,
   ``export_onnx`` or ``export_mobile``; int8 calibrated and held to ``min_psnr``) and timed
   interleaved, so machine load hits them alike; medians decide.
3. Each group keeps its fastest form; the combination is timed once more against the model
   as it is and kept only if it is faster. With ``precision="auto"`` the faster precision
   wins.

Every form is exact (float rounding only), so the tuned model needs no retraining. The
report gives the whole model's latency before and after, and per site the form chosen and
the latency its group's change made in context, per site.

With ``budget_ms``, ``tune`` instead chooses each LIST's squeeze width so that the model
fits the budget with the most parameters (``deploy/budget.py``): not exact, so the result
needs ``distill``, and forms are left to a later ``tune`` of the distilled model.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import arguments as check
from ..errors import ArgumentError, LwCompileError, one_line
from ..measure.inputs import blamed_on_inputs
from ..measure.profile import time_interleaved
from ..nn import LIST, DenseLIST
from . import budget, int8, int8_inputs
from .int8_onnx import session as onnxruntime_session

TARGETS = {"torch": None, "onnxruntime": "onnxruntime", "xnnpack": "executorch"}
EXTRAS = {"onnxruntime": "lwcompile[export]", "xnnpack": "lwcompile[mobile]"}
PRECISIONS = ("fp32", "int8", "auto")
#: the squeeze ratios ``budget_ms`` chooses from by default (the paper's is 4)
SQUEEZE_RATIOS = (2, 4, 8, 16)
#: calibration inputs the narrowed LISTs of a budget are fitted on
FIT_INPUTS = 4
#: the deployed forms of a LIST: the name, and how a LIST becomes it (None: left a LIST,
#: which emit_fast and both exports turn into the chain of thin convs)
FORMS: dict[str, Callable[[LIST], nn.Module] | None] = {"chain": None, "dense": DenseLIST}


class TuneError(LwCompileError):
    """``tune`` cannot run as asked: a runtime that is not installed, or no form could be
    prepared for the target."""


@dataclass
class SiteChoice:
    """One LIST site: the form and squeeze width it had and takes, and what its group's
    change did to the whole model's latency, divided among the group's sites (negative:
    faster); where a budget narrowed it, its relative error against the LIST it had, on the
    calibration crops it was fitted on."""

    site: str
    group: int
    form_before: str
    form_after: str
    ms_change_per_site: float
    squeeze_before: int = 0
    squeeze_after: int = 0
    fit_error: float | None = None


@dataclass
class TuneReport:
    """What ``tune`` timed and chose; ``str()`` is a table."""

    target: str
    precision: str
    ms_before: float  # the model as given, in the chosen precision
    ms_after: float
    #: median ms of every variant timed, "precision: variant" -> ms
    timings: dict[str, float] = field(default_factory=dict)
    sites: list[SiteChoice] = field(default_factory=list)
    #: precisions that could not be prepared, and why
    skipped: dict[str, str] = field(default_factory=dict)
    budget_ms: float | None = None
    #: False where a budget narrowed a LIST: the model computes another function (distill it)
    exact: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        budget = f", budget {self.budget_ms:g} ms" if self.budget_ms is not None else ""
        lines = [f"tune for {self.target}, {self.precision}{budget}: {self.ms_before:.1f} -> "
                 f"{self.ms_after:.1f} ms (median)"]
        if not self.exact:
            narrowed = sum(c.squeeze_after < c.squeeze_before for c in self.sites)
            lines.append(f"  NOT EXACT: {narrowed} LIST sites narrowed (fitted to the LISTs "
                         "they replace); distill the model before use")
        groups: dict[int, list[SiteChoice]] = {}
        for choice in self.sites:
            groups.setdefault(choice.group, []).append(choice)
        for group, choices in groups.items():
            first = choices[0]
            names = ", ".join(c.site for c in choices[:3]) + (", ..." if len(choices) > 3 else "")
            if self.budget_ms is None:
                lines.append(f"  group {group} ({len(choices)} sites: {names}): "
                             f"{first.form_before} -> {first.form_after}, "
                             f"{first.ms_change_per_site:+.2f} ms per site")
                continue
            lines.append(f"  group {group} ({len(choices)} sites: {names}): squeeze width")
            moves: dict[tuple[int, int], list[SiteChoice]] = {}
            for c in choices:
                moves.setdefault((c.squeeze_before, c.squeeze_after), []).append(c)
            for (before, after), alike in moves.items():
                errors = [c.fit_error for c in alike if c.fit_error is not None]
                fit = f", fit error up to {max(errors):.3f}" if errors else ""
                lines.append(f"    {before} -> {after} at {len(alike)} sites "
                             f"({alike[0].ms_change_per_site:+.2f} ms each{fit})")
        lines += [f"  timed {name}: {ms:.1f} ms" for name, ms in self.timings.items()]
        lines += [f"  {p} skipped: {why}" for p, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class Tuned:
    """The model with each LIST in its chosen form (export it for ``target`` with
    ``precision``), and the report."""

    model: nn.Module
    target: str
    precision: str
    report: TuneReport


def tune(model: nn.Module, example_inputs: Sequence[Any], *, target: str = "onnxruntime",
         precision: str = "fp32", runs: int = 7, threads: int | None = None,
         calibration: Any = None, degrade: Callable | None = None,
         min_psnr: float | None = None, budget_ms: float | None = None,
         squeeze_ratios: Sequence[int] | None = None) -> Tuned:
    """Time the deployed forms of ``model``'s LIST sites in ``target`` ("torch",
    "onnxruntime", "xnnpack") at ``precision`` ("fp32", "int8", or "auto": both, the faster
    kept) on ``example_inputs`` (the size the model will run at), and return a copy in the
    fastest forms. ``model`` is untouched. int8 is calibrated on ``calibration`` (and
    ``degrade``) and refused below ``min_psnr`` as ``export_onnx`` does. ``threads``: the
    runtime's intra-op threads (default: torch's).

    With ``budget_ms``, each LIST site's squeeze ratio is chosen from ``squeeze_ratios``
    (default ``SQUEEZE_RATIOS``) instead, by measured latency at ``precision`` ("fp32" or
    "int8"), so that the model runs within the budget with the most parameters: wider LISTs
    are exact, narrower ones are fitted to the LISTs they replace on ``calibration`` crops;
    the result is then *not* exact (``report.exact``) and needs ``distill``. Forms are not
    changed; tune again after distilling. A budget the narrowest ratios cannot meet raises
    ``TuneError``. The budget's variants are timed without ``min_psnr`` (their weights are
    fresh); the export applies it.
    """
    check.module("tune", "model", model)
    args = check.inputs("tune", "example_inputs", example_inputs)
    if target not in TARGETS:
        raise ArgumentError(f"tune: unknown target {target!r}; valid targets: "
                            f"{', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise ArgumentError(f"tune: unknown precision {precision!r}; valid: "
                            f"{', '.join(PRECISIONS)}")
    if target == "torch" and precision == "int8":
        raise ArgumentError("tune: int8 is deployed through onnxruntime or xnnpack; "
                            "target='torch' runs fp32 only")
    runs = check.integer("tune", "runs", runs, minimum=1)
    threads = check.integer("tune", "threads", threads if threads is not None
                            else torch.get_num_threads(), minimum=1)
    if budget_ms is not None:
        budget_ms = check.number("tune", "budget_ms", budget_ms, positive=True)
        if precision == "auto":
            raise ArgumentError("tune: budget_ms times one precision; pass precision='fp32' "
                                "or 'int8', not 'auto'")
        squeeze_ratios = _ratios(SQUEEZE_RATIOS if squeeze_ratios is None else squeeze_ratios)
    elif squeeze_ratios is not None:
        raise ArgumentError("tune: squeeze_ratios is what budget_ms chooses from; pass "
                            "budget_ms too, or leave squeeze_ratios out")
    _require_runtime(target)
    precisions = (["fp32"] if target == "torch" else ["fp32", "int8"]) if precision == "auto" \
        else [precision]
    with tempfile.TemporaryDirectory(prefix="lwcompile-tune-") as folder, \
            blamed_on_inputs("tune", model, args):
        deploy = _Deploy(target, args, threads, Path(folder),
                         {"calibration": calibration, "degrade": degrade, "min_psnr": min_psnr})
        if budget_ms is not None:
            fit_inputs = int8_inputs.calibration_inputs(calibration, args, FIT_INPUTS, degrade)
            return _tune_budget(copy.deepcopy(model).eval(), args, precision, runs, deploy,
                                budget_ms, squeeze_ratios, fit_inputs)
        return _tune(copy.deepcopy(model).eval(), args, precisions, runs, deploy)


def _ratios(value: Any) -> tuple[int, ...]:
    ratios = check.sequence("tune", "squeeze_ratios", value, optional=False)
    if not ratios:
        raise ArgumentError("tune: squeeze_ratios is empty; give at least one ratio, e.g. "
                            f"{SQUEEZE_RATIOS}")
    return tuple(check.integer("tune", "squeeze_ratios", r, minimum=1) for r in ratios)


def _require_runtime(target: str) -> None:
    package = TARGETS[target]
    if package is None:
        return
    try:
        __import__(package)
    except ImportError as exc:
        raise TuneError(f"tune for {target} needs {package}, which is not installed "
                        f"({one_line(exc)}); install it with `pip install "
                        f"{EXTRAS[target]}`") from exc


def list_groups(model: nn.Module, args: tuple) -> list[list[str]]:
    """The model's LIST sites grouped by channels, kernel, squeeze, padding mode and the
    input shape each sees on ``args``; groups in order of first site."""
    shapes: dict[str, tuple] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_pre_hook(record(name))
             for name, m in model.named_modules() if isinstance(m, LIST)]
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[tuple, list[str]] = {}
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        m = modules[name]
        dw = m.spatial_branch[0]
        key = (m.squeeze.in_channels, m.squeeze.out_channels, m.pointwise_branch.out_channels,
               dw.kernel_size, dw.padding_mode, shape)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def with_forms(model: nn.Module, forms: dict[str, str]) -> nn.Module:
    """A copy of ``model`` with the LIST at each site name of ``forms`` in that form (each
    form makes a new module from the LIST, sharing no tensor with it)."""
    return budget.with_lists(model, {site: make(model.get_submodule(site))
                                     for site, form in forms.items()
                                     if (make := FORMS[form]) is not None})


class _Deploy:
    """Prepares a model for the target as it will be deployed and returns a timed call."""

    def __init__(self, target: str, args: tuple, threads: int, folder: Path,
                 int8_options: dict[str, Any]) -> None:
        self.target, self.args, self.threads, self.folder = target, args, threads, folder
        self.int8_options = int8_options
        self.count = 0

    def __call__(self, model: nn.Module, precision: str, *,
                 checked: bool = True) -> Callable[[], Any]:
        """The deployed model's call; ``checked=False`` skips ``min_psnr`` (a model with
        fresh weights, timed only)."""
        self.count += 1
        options = self.int8_options if precision == "int8" else {}
        if not checked:
            options = {k: v for k, v in options.items() if k != "min_psnr"}
        if self.target == "torch":
            from .emit import emit_fast

            fast = emit_fast(model, self.args)
            return lambda: fast(*self.args)
        if self.target == "onnxruntime":
            from .export import export_onnx

            path = export_onnx(model, self.args, self.folder / f"{self.count}.onnx",
                               precision=precision, **options)
            return _onnxruntime_call(path, self.args, self.threads)
        from .mobile import export_mobile, load_pte

        exported = export_mobile(model, self.args, self.folder / f"{self.count}.pte",
                                 precision=precision, verify=False, **options)
        method = load_pte(exported.path)
        tensors = [a for a in self.args if isinstance(a, Tensor)]
        return lambda: method(*tensors)


def _onnxruntime_call(path: Path, args: tuple, threads: int) -> Callable[[], Any]:
    session = onnxruntime_session(path, threads)
    names = [i.name for i in session.get_inputs()]
    feed = dict(zip(names, (a.numpy() for a in args if isinstance(a, Tensor)), strict=True))
    return lambda: session.run(None, feed)


def _medians(calls: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    with torch.no_grad():
        times = time_interleaved(calls, runs=runs, warmup=1)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _tune(model: nn.Module, args: tuple, precisions: list[str], runs: int,
          deploy: _Deploy) -> Tuned:
    groups = list_groups(model, args)
    default = {site: "chain" for group in groups for site in group}
    variants = {f"group {i} {form}": {**default, **dict.fromkeys(group, form)}
                for i, group in enumerate(groups) for form in FORMS if form != "chain"}
    results: dict[str, tuple[float, float, dict[str, str], dict[str, float]]] = {}
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for precision in precisions:
        try:
            given = deploy(model, precision)
            calls = {"as given": given} | {name: deploy(with_forms(model, forms), precision)
                                           for name, forms in variants.items()}
        except int8.Int8Error as exc:  # e.g. a missed min_psnr: not an option here
            skipped[precision] = one_line(exc)
            continue
        ms = _medians(calls, runs)
        chosen, per_site = dict(default), {}
        for i, group in enumerate(groups):
            form = min(FORMS, key=lambda f, i=i: ms["as given" if f == "chain"
                                                    else f"group {i} {f}"])
            chosen.update(dict.fromkeys(group, form))
            change = 0.0 if form == "chain" else ms[f"group {i} {form}"] - ms["as given"]
            per_site |= dict.fromkeys(group, change / len(group))
        before = after = ms["as given"]
        if chosen != default:  # the combination, timed once more against the model as given
            final = _medians({"as given": given,
                              "tuned": deploy(with_forms(model, chosen), precision)}, runs)
            ms |= {"tuned": final["tuned"]}
            if final["tuned"] < final["as given"]:
                before, after = final["as given"], final["tuned"]
            else:
                chosen, per_site = dict(default), dict.fromkeys(default, 0.0)
        timings |= {f"{precision}: {name}": round(v, 2) for name, v in ms.items()}
        results[precision] = (before, after, chosen, per_site)
    if not results:
        raise TuneError(f"tune: no precision could be prepared ({'; '.join(skipped.values())})")
    precision = min(results, key=lambda p: results[p][1])
    before, after, chosen, per_site = results[precision]
    width = _widths(model)
    sites = [SiteChoice(site, i, "chain", chosen[site], round(per_site.get(site, 0.0), 3),
                        width[site], width[site])
             for i, group in enumerate(groups) for site in group]
    report = TuneReport(deploy.target, precision, round(before, 2), round(after, 2), timings,
                        sites, skipped)
    tuned = with_forms(model, chosen)
    if hasattr(model, "lwcompile_report"):
        tuned.lwcompile_report = model.lwcompile_report
    return Tuned(tuned, deploy.target, precision, report)


def _widths(model: nn.Module) -> dict[str, int]:
    return {name: m.squeeze.out_channels for name, m in model.named_modules()
            if isinstance(m, LIST)}


def _tune_budget(model: nn.Module, args: tuple, precision: str, runs: int, deploy: _Deploy,
                 budget_ms: float, ratios: tuple[int, ...], fit_inputs: list[tuple]) -> Tuned:
    groups = list_groups(model, args)
    if not groups:
        raise TuneError("tune: budget_ms chooses LIST squeeze widths, and the model has no "
                        "LIST (lighten it first)")
    try:
        result = budget.fit_budget(
            model, groups, budget_ms, ratios,
            prepare=lambda m: deploy(m, precision, checked=False),
            medians=lambda calls: _medians(calls, runs), fit_inputs=fit_inputs)
    except budget.BudgetUnreachable as exc:
        raise TuneError(f"tune: {exc}") from None
    sites = [SiteChoice(site, i, "chain", "chain", round(result.site_ms[site], 3),
                        *result.widths[site], result.fit_errors.get(site))
             for i, group in enumerate(groups) for site in group]
    exact = all(c.squeeze_after >= c.squeeze_before for c in sites)  # widening is exact
    report = TuneReport(deploy.target, precision, round(result.ms_before, 2),
                        round(result.ms_after, 2),
                        {f"{precision}: {k}": round(v, 2) for k, v in result.timings.items()},
                        sites, budget_ms=budget_ms, exact=exact)
    return Tuned(result.model, deploy.target, precision, report)
