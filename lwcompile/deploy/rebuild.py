"""Rebuild a lightened model's architecture from its original and the recorded plan.

Algorithm (``rebuild``), each step refusing with the first difference before any weight is
loaded:
1. The original handed in must be the architecture the plan was made from: its class name,
   then its tensor names and shapes (``WrongArchitectureError``).
2. Each rule the plan applied is found by name: a rule the caller passed (a user's own rule;
   never a class named by the file), else a built-in rule of ``lwcompile.rules`` (found by
   scanning that package, so new built-ins replay without being listed here), configured
   with the recorded parameters (``UnknownRuleError``).
3. ``lighten`` runs on the original with the recorded example input shapes, no guards and
   each rule restricted to the sites it rewrote: the same tracing, site order and rewrites
   as the first run, so the same modules and names; the per-site and whole-result checks
   run as in any lighten (one reference forward and one check, not the rule search).
4. The replay must have applied the same rules at the same sites, its replacements must have
   the recorded structure digests, and its tensors the file's names and shapes
   (``WeightMismatchError``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import pkgutil
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LwCompileError, NothingToLighten
from ..rule import Match, NoMatch, Refuse, Rule, Site
from .file_errors import ReplayError, UnknownRuleError, WeightMismatchError, WrongArchitectureError
from .light_plan import decode, names_and_shapes, structure_digest

#: the largest example input a file may ask the replay to make (a crafted file must not be
#: able to make load allocate without bound); larger ones are passed by the caller
MAX_INPUT_ELEMENTS = 2**27


@functools.cache
def builtin_rule_classes() -> dict[str, type[Rule]]:
    """Every concrete Rule class defined in the ``lwcompile.rules`` package, by rule name."""
    from .. import rules as package

    found: dict[str, type[Rule]] = {}
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Rule) and value is not Rule
                    and value.__module__ == module.__name__
                    and value.match is not Rule.match and value.build is not Rule.build):
                found.setdefault(value.name, value)
    return found


def check_original(original: nn.Module, plan: Mapping[str, Any]) -> None:
    """Refuse an original of another architecture than the plan's, naming the difference."""
    want = plan["original"]
    source = f" (made from {want['source']!r})" if want.get("source") else ""
    if type(original).__name__ != want["class_name"]:
        raise WrongArchitectureError(
            f"the file was made from a {want['class_name']}{source}, but the original given "
            f"is a {type(original).__name__}")
    difference = first_difference(want["tensors"], names_and_shapes(original))
    if difference:
        raise WrongArchitectureError(
            f"the original given is not the {want['class_name']} the file was made "
            f"from{source}: {difference}")


def first_difference(wanted: Mapping[str, Sequence[int]], got: Mapping[str, Sequence[int]],
                     theirs: str = "the file's", ours: str = "the given model") -> str:
    """The first tensor whose name or shape differs, in words ('' if none)."""
    for name, shape in wanted.items():
        if name not in got:
            return f"{theirs} tensor {name!r} {list(shape)} is missing from {ours}"
        if list(got[name]) != list(shape):
            return (f"tensor {name!r} is {list(shape)} in {theirs[:-2]}, {list(got[name])} in "
                    f"{ours}")
    extra = next((n for n in got if n not in wanted), None)
    return f"{ours} has tensor {extra!r}, which {theirs[:-2]} lacks" if extra else ""


def replay_rules(plan: Mapping[str, Any], passed: Sequence[Rule]) -> dict[str, Rule]:
    """The rule of each name the plan applied, configured with its recorded parameters."""
    passed_by_name = {r.name: r for r in passed}
    builtin = builtin_rule_classes()
    needed = {site["rule"] for site in plan["sites"]}
    chosen: dict[str, Rule] = {}
    for entry in plan["rules"]:
        name = entry["name"]
        if name not in needed:
            continue
        if name in passed_by_name:
            rule = passed_by_name[name]
        elif name in builtin and entry.get("builtin", True):
            rule = builtin[name]()
        elif entry.get("builtin", True):
            raise UnknownRuleError(
                f"the file's plan uses the rule {name!r}, which this lwcompile does not have "
                f"(it was written by lwcompile {plan['lwcompile_version']}): upgrade lwcompile")
        else:
            raise UnknownRuleError(
                f"the file's plan uses the rule {name!r} ({entry['class']}), a rule of your own "
                "that lwcompile never imports from a name in a file: pass it, "
                f"load(..., rules=[{entry['class'].rpartition(':')[2]}()])")
        chosen[name] = _configured(rule, entry.get("params") or {})
    missing = sorted(needed - set(chosen))
    if missing:
        raise UnknownRuleError(f"the file's plan applies the rule {missing[0]!r} but does not "
                               "describe it (corrupt plan)")
    return chosen


def _configured(rule: Rule, params: Mapping[str, Any]) -> Rule:
    if not params:
        return rule
    if not dataclasses.is_dataclass(rule):
        raise UnknownRuleError(f"the file's plan sets parameters of the rule {rule.name!r}, "
                               f"but {type(rule).__name__} has none")
    fields = {f.name for f in dataclasses.fields(rule) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise UnknownRuleError(f"the file's plan sets the parameter {unknown[0]!r} of the rule "
                               f"{rule.name!r}, which this version of it lacks")
    return dataclasses.replace(rule, **{k: decode(v, getattr(rule, k)) for k, v in
                                        params.items()})


class _OnlyAt(Rule):
    """A rule that matches only the sites the plan says it rewrote (else ``NoMatch``), at
    each as configured there: a site's own parameters (a squeeze ratio ``tune`` changed)
    over the rule's."""

    def __init__(self, by_site: dict[str, Rule]) -> None:
        self.by_site = by_site
        rule = next(iter(by_site.values()))
        self.name, self.applies_to = rule.name, rule.applies_to
        self.priority, self.exact = rule.priority, rule.exact
        self.for_image_layers = rule.for_image_layers

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        if site.name not in self.by_site:
            return NoMatch("not in the recorded plan")
        return self.by_site[site.name].match(site)

    def build(self, match: Match) -> nn.Module:
        return self.by_site[match.site.name].build(match)

    def describe(self, replacement: nn.Module) -> str:
        return next(iter(self.by_site.values())).describe(replacement)


def example_inputs(plan: Mapping[str, Any], like: nn.Module) -> tuple[tuple, dict]:
    """The recorded example inputs, remade: seeded random tensors of the recorded shapes and
    dtypes on ``like``'s device, and the recorded scalars."""
    ref = next(iter(like.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)

    def make(entry: Mapping[str, Any]) -> Any:
        if "tensor" in entry:
            dtype = getattr(torch, str(entry["tensor"]["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ReplayError(f"the file's example input has an unknown dtype "
                                  f"{entry['tensor']['dtype']!r}")
            shape = [int(d) for d in entry["tensor"]["shape"]]
            if min(shape, default=1) < 0 or math.prod(shape) > MAX_INPUT_ELEMENTS:
                raise ReplayError(f"the file's example input shape {shape} is not one to make "
                                  "(negative or too large): pass load(..., example_inputs=...)")
            value = torch.rand(shape, generator=generator) if dtype.is_floating_point \
                else torch.zeros(shape)
            return value.to(device=device, dtype=dtype)
        if "value" in entry:
            return entry["value"]
        raise ReplayError(f"the example input lighten ran on included a "
                          f"{entry.get('unknown', '?')}, which the file cannot hold: pass "
                          "load(..., example_inputs=(...)) as given to lighten")

    inputs = plan["inputs"]
    return (tuple(make(e) for e in inputs["args"]),
            {k: make(e) for k, e in inputs["kwargs"].items()})


def rebuild(original: nn.Module, plan: Mapping[str, Any], weights: Mapping[str, Sequence[int]],
            *, rules: Sequence[Rule] = (), inputs: tuple[tuple, dict] | None = None
            ) -> nn.Module:
    """The lightened architecture, made again from ``original`` by the recorded plan and
    checked against ``weights`` (the file's tensor names and shapes). Weights not loaded."""
    from ..api import lighten

    if plan.get("replayable", True) is not True:
        raise ReplayError(f"the plan cannot be replayed: {plan['replayable']}")
    check_original(original, plan)
    chosen = replay_rules(plan, rules)
    args, kwargs = inputs if inputs is not None else example_inputs(plan, original)
    by_site: dict[str, dict[str, Rule]] = {}
    for site in plan["sites"]:
        by_site.setdefault(site["rule"], {})[site["site"]] = \
            _configured(chosen[site["rule"]], site.get("params") or {})
    restricted = [_OnlyAt(rules) for rules in by_site.values()]
    try:
        light = lighten(original, args, example_kwargs=kwargs, rules=restricted, guards=[])
    except NothingToLighten as exc:
        raise ReplayError(f"replaying the plan on {type(original).__name__} rewrote nothing: "
                          f"{exc}") from exc
    except LwCompileError as exc:
        raise ReplayError(f"replaying the plan on {type(original).__name__} failed: {exc}") \
            from exc
    _check_replay(light, plan, weights)
    light.train(plan["result"]["training"])
    modules = dict(light.named_modules())
    for name in plan["result"]["training_differs"]:
        if name in modules:
            modules[name].training = not plan["result"]["training"]
    return light


def _check_replay(light: nn.Module, plan: Mapping[str, Any],
                  weights: Mapping[str, Sequence[int]]) -> None:
    done = [(r.site, r.decided_by, r.result_name or r.site)
            for r in light.lwcompile_report.applied]
    wanted = [(s["site"], s["rule"], s["result_name"]) for s in plan["sites"]]
    for got, want in zip(done + [None] * len(wanted), wanted, strict=False):
        if got != want:
            what = f"rewrote {got[0]!r} with {got[1]!r}" if got else "stopped"
            raise WeightMismatchError(
                f"the replay differs from the plan at site {want[0]!r}: the plan rewrote it "
                f"with {want[1]!r} (as {want[2]!r}), the replay {what}")
    if len(done) > len(wanted):
        raise WeightMismatchError(f"the replay rewrote {done[len(wanted)][0]!r}, which the "
                                  "plan does not")
    for site in plan["sites"]:
        digest = structure_digest(light.get_submodule(site["result_name"]))
        if digest != site["structure"]:
            raise WeightMismatchError(
                f"the replacement at {site['site']!r} ({site['rule']}) is built differently "
                f"from the file's (structure {digest} here, {site['structure']} in the file; "
                f"the file was written by lwcompile {plan['lwcompile_version']} with torch "
                f"{plan['torch_version']}, this is torch {torch.__version__})")
    difference = first_difference(weights, names_and_shapes(light), ours="the rebuilt model")
    if difference:
        raise WeightMismatchError(f"the file's weights do not fit the rebuilt model: "
                                  f"{difference}")
