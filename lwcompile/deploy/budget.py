"""``tune``'s latency budget: LIST squeeze widths chosen by measured latency, then fitted.

With ``tune(..., budget_ms=B)``:

1. For each group of alike LIST sites (``tune.list_groups``) and each other width the
   candidate squeeze ratios give, a variant of the model with that group at that width
   (freshly initialised: latency does not depend on the values) is prepared for the target
   and timed interleaved with the model as given.
2. Each site's options are its group's latency change divided among the group's sites, and
   its parameter count at that width; ``squeeze_choice.choose`` picks the widths with the
   most parameters that fit the budget (wider than given where the budget allows).
3. The changed sites are rebuilt from their LISTs (``train.resqueeze``: wider exactly,
   narrower fitted on crops of calibration inputs) and the result is timed against the model
   as given, in the same rounds; its latency is its ratio to the model as given times the
   median of the model as given over every round so far, so that a machine whose speed
   drifts between rounds does not decide. The prediction adds the sites' changes, an
   approximation, so its measured error is added to it and the choice made again (narrower
   where the result was over the budget, wider where budget was left), until a choice
   repeats or ``ATTEMPTS`` are made; the measured-within-budget result with the most
   parameters is kept.
4. The model's lighten plan records each changed site's squeeze ratio, so that the model
   still saves as data and loads back (``deploy.rebuild``), and its lighten report counts
   the new parameters and MACs.

A narrower LIST is another function: the result needs ``distill`` (the report says so).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import LIST
from ..train import resqueeze
from . import light_plan
from .squeeze_choice import Option, choose, predicted_ms

#: choices made and measured at most, each corrected by the last one's measured error
ATTEMPTS = 3
#: each fit's inputs: this many crops of this size per calibration input
CROPS_PER_INPUT, CROP = 2, 48

Prepare = Callable[[nn.Module], Callable[[], Any]]
Medians = Callable[[dict[str, Callable[[], Any]]], dict[str, float]]


class BudgetUnreachable(Exception):
    """No width choice measured within the budget; the message gives the closest."""


@dataclass
class Budgeted:
    """The model at its chosen widths and what was measured on the way."""

    model: nn.Module
    ms_before: float
    ms_after: float
    widths: dict[str, tuple[int, int]]  # site -> (width before, width after)
    fit_errors: dict[str, float]  # changed sites narrowed: relative error against the old
    site_ms: dict[str, float]  # each site's share of the latency change its width made
    timings: dict[str, float]


def ratio_widths(lst: LIST, ratios: Sequence[int]) -> dict[int, int]:
    """Squeeze width -> the smallest of ``ratios`` giving it (a LIST needs ratio <= C)."""
    channels = lst.squeeze.in_channels
    widths: dict[int, int] = {}
    for r in sorted(ratios, reverse=True):
        if r <= channels:
            widths[LIST.squeeze_width(channels, r)] = r
    return widths


def fit_budget(model: nn.Module, groups: list[list[str]], budget_ms: float,
               ratios: Sequence[int], prepare: Prepare, medians: Medians,
               fit_inputs: Sequence[tuple]) -> Budgeted:
    """The copy of ``model`` whose LIST sites take the widths chosen for ``budget_ms`` (see
    the module docstring); ``prepare`` makes a timed call of a model as deployed,
    ``fit_inputs`` are model inputs the narrowed sites are fitted on."""
    lists = {site: model.get_submodule(site) for group in groups for site in group}
    given = {site: lst.squeeze.out_channels for site, lst in lists.items()}
    by_width = {site: ratio_widths(lst, ratios) for site, lst in lists.items()}
    as_given = prepare(model)
    options, timings = _timed_options(model, groups, lists, by_width, as_given, prepare,
                                      medians)
    given_rounds = [timings["as given"]]  # the model as given, once per round of timing
    rebuilt: dict[tuple[str, int], tuple[LIST, float | None]] = {}  # fits kept across attempts
    tried: list[dict[str, int]] = []
    best: Budgeted | None = None
    shortfall = 0.0
    for attempt in range(ATTEMPTS):
        ms_given = statistics.median(given_rounds)
        widths = choose(options, given, ms_given + shortfall, budget_ms)
        if widths is None and not tried:
            fastest = {s: min(opts, key=lambda o: o.ms).width for s, opts in options.items()}
            raise BudgetUnreachable(
                f"{budget_ms:g} ms is out of reach: the model as given measured "
                f"{ms_given:.1f} ms, and at its fastest squeeze widths of the ratios "
                f"{tuple(sorted(ratios))} it would take about "
                f"{predicted_ms(options, fastest, ms_given + shortfall):.1f} ms "
                "(a narrower squeeze is not always faster; on a machine whose timings "
                "vary, more runs= measure steadier)")
        if widths is None or widths in tried:
            break
        tried.append(widths)
        changed = {s: w for s, w in widths.items() if w != given[s]}
        for site, width in changed.items():
            if (site, width) not in rebuilt:
                rebuilt[site, width] = _resqueezed(model, site, lists[site], width,
                                                   by_width[site][width], fit_inputs)
        built = with_lists(model, {s: copy.deepcopy(rebuilt[s, w][0])
                                   for s, w in changed.items()})
        final = medians({"as given": as_given, "budget": prepare(built)})
        given_rounds.append(final["as given"])
        ms_given = statistics.median(given_rounds)
        ms = ms_given * final["budget"] / final["as given"]
        timings[f"budget attempt {attempt + 1}"] = ms
        if ms <= budget_ms and (best is None or _params(built) > _params(best.model)):
            _replan(built, {s: by_width[s][w] for s, w in changed.items()})
            _recount(built, {s: (lists[s], built.get_submodule(s)) for s in changed})
            best = Budgeted(
                built, ms_given, ms,
                {s: (given[s], widths[s]) for s in lists},
                {s: e for s, w in changed.items() if (e := rebuilt[s, w][1]) is not None},
                {s: next(o.ms for o in options[s] if o.width == widths[s]) for s in lists},
                timings)
        # the prediction's error, measured: over the budget it narrows the next choice,
        # under it (budget left unused) it widens it
        shortfall = ms - predicted_ms(options, widths, ms_given)
    if best is None:
        measured = ", ".join(f"{v:.1f}" for k, v in timings.items() if k.startswith("budget"))
        raise BudgetUnreachable(f"{budget_ms:g} ms was missed: the choices made measured "
                                f"{measured} ms (the model as given {ms_given:.1f} ms; on a "
                                "machine whose timings vary, more runs= measure steadier)")
    return best


def _timed_options(model: nn.Module, groups: list[list[str]], lists: Mapping[str, LIST],
                   by_width: Mapping[str, Mapping[int, int]], as_given: Callable[[], Any],
                   prepare: Prepare, medians: Medians
                   ) -> tuple[dict[str, list[Option]], dict[str, float]]:
    """Each site's options, from one timed variant per group and other width (fresh weights:
    latency does not depend on them), and every median timed."""
    calls = {"as given": as_given}
    for i, group in enumerate(groups):
        for width, ratio in by_width[group[0]].items():
            if width != lists[group[0]].squeeze.out_channels:
                variant = with_lists(model, {s: resqueeze.with_ratio(lists[s], ratio)
                                             for s in group})
                calls[f"group {i} squeeze {width}"] = prepare(variant)
    ms = medians(calls)
    options: dict[str, list[Option]] = {}
    for i, group in enumerate(groups):
        for site in group:
            lst = lists[site]
            options[site] = [Option(lst.squeeze.out_channels, 0.0, _params(lst))] + [
                Option(w, (ms[f"group {i} squeeze {w}"] - ms["as given"]) / len(group),
                       _params(resqueeze.with_ratio(lst, r)))
                for w, r in by_width[site].items() if w != lst.squeeze.out_channels]
    return options, dict(ms)


def with_lists(model: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with the module at each name of ``replacements`` replaced."""
    out = copy.deepcopy(model)
    for name, module in replacements.items():
        out.set_submodule(name, module)
    return out


def _resqueezed(model: nn.Module, site: str, old: LIST, width: int, ratio: int,
                fit_inputs: Sequence[tuple]) -> tuple[LIST, float | None]:
    """``old`` at ``ratio`` (``width`` squeezed channels): widened exactly (no error to
    report), or narrowed and fitted on what ``site`` receives in ``model``, with its
    relative error against ``old`` there."""
    if width > old.squeeze.out_channels:
        return resqueeze.widened(old, ratio), None
    new, error = resqueeze.narrowed(old, ratio, _site_inputs(model, site, fit_inputs))
    return new, round(error, 4)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _site_inputs(model: nn.Module, site: str, fit_inputs: Sequence[tuple]) -> Tensor:
    """What ``site`` receives when ``model`` runs on ``fit_inputs``: ``CROPS_PER_INPUT``
    seeded crops of at most ``CROP`` pixels a side from each, concatenated."""
    seen: list[Tensor] = []
    handle = model.get_submodule(site).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach()))
    try:
        for inputs in fit_inputs:
            model(*inputs)
    finally:
        handle.remove()
    generator = torch.Generator().manual_seed(0)
    crops = []
    for x in seen:
        h, w = x.shape[-2:]
        ch, cw = min(CROP, h), min(CROP, w)
        for _ in range(CROPS_PER_INPUT):
            top = int(torch.randint(h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(w - cw + 1, (1,), generator=generator))
            crops.append(x[..., top:top + ch, left:left + cw])
    return torch.cat(crops)


def _holds(replacement: str, name: str) -> bool:
    """Whether the module ``name`` is the replacement at ``replacement`` or inside it."""
    return name == replacement or name.startswith(replacement + ".")


def _weights(lst: LIST) -> int:
    return sum(m.weight.numel() for m in lst.modules() if isinstance(m, nn.Conv2d))


def _recount(model: nn.Module, replaced: Mapping[str, tuple[LIST, LIST]]) -> None:
    """Bring the lighten report on ``model`` (if any) up to date for LISTs now at another
    width: each row's parameters and MACs after, and the summary. A LIST's convs all run at
    one resolution, so its MACs are its conv weights per output pixel and scale by their
    ratio at whatever input size the report counted; the replacements that hold a LIST
    (resize + LIST, LIST + unshuffle) do no other multiply-adds."""
    report = getattr(model, "lwcompile_report", None)
    if report is None or report.summary is None or not replaced:
        return
    macs_change = 0
    for name, (old, new) in replaced.items():
        row = next((r for r in report.applied if _holds(r.result_name or r.site, name)),
                   None)
        if row is None:
            continue
        row.params_after += _params(new) - _params(old)
        macs = round(row.macs_after * _weights(new) / _weights(old))
        macs_change += macs - row.macs_after
        row.macs_after = macs
    report.summary.params_after = _params(model)
    report.summary.macs_after += macs_change


def _replan(model: nn.Module, ratios: Mapping[str, int]) -> None:
    """Record each re-squeezed site's ratio in ``model``'s lighten plan (where it has one),
    so that ``save`` writes it and ``load`` rebuilds it; where the site's rule has no
    ``squeeze_ratio`` the plan says it cannot be replayed (``save`` then names the reason)."""
    plan = getattr(model, "lwcompile_plan", None)
    if not isinstance(plan, dict) or not ratios:
        return
    rules = {entry["name"]: entry.get("params") or {} for entry in plan["rules"]}
    for name, ratio in ratios.items():
        entry = next((s for s in plan["sites"] if _holds(s["result_name"], name)), None)
        if entry is None or "squeeze_ratio" not in rules.get(entry["rule"], {}):
            plan["replayable"] = (f"tune changed the squeeze of the LIST {name!r}, which "
                                  "no rule of the plan with a squeeze_ratio built")
            continue
        entry["params"] = {"squeeze_ratio": ratio}
        plan["version"] = max(plan["version"], light_plan.SITE_PARAMS_VERSION)
        entry["structure"] = light_plan.structure_digest(
            model.get_submodule(entry["result_name"]))
    plan["result"]["architecture"] = light_plan.shapes_digest(model)
