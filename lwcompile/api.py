"""The public entry points: ``lighten``, ``plan``, and the default rule and guard sets.

Everything here validates what the user handed in (so misuse fails early with a
``RuleError`` naming the problem) and then hands over to the compiler (``compiler.driver``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from . import arguments as check
from .compiler.driver import compile_verified, plan_only
from .deploy.light_plan import record as record_plan
from .errors import CompileFailed, LwCompileError, LwCompileWarning, NotAModuleError, RuleError
from .measure.inputs import infer_example_inputs
from .report import Report
from .rule import Guard, Proposal, Rule, Veto

RuleParams = dict[str, dict[str, Any]]


def default_rules(without: Sequence[str] = ()) -> list[Rule]:
    """The built-in rules (from the ``rules`` folder), in priority order, except those named in
    ``without`` (e.g. ``"image-output-squeeze"``, to keep every image-facing layer standard
    as the paper does)."""
    from .rules.gsat_dilated import GsatRule
    from .rules.image_output_squeeze import ImageOutputSqueezeRule
    from .rules.list_conv import ListRule
    from .rules.list_unpadded import UnpaddedListRule
    from .rules.low_rank_linear import LowRankLinearRule
    from .rules.low_rank_pointwise import LowRankPointwiseRule
    from .rules.split_concat_pointwise import SplitConcatPointwiseRule
    from .rules.strided_conv import StridedConvRule
    from .rules.subpixel import SubpixelRule
    from .rules.transposed_conv import TransposedConvRule

    rules = [SplitConcatPointwiseRule(), SubpixelRule(), GsatRule(), StridedConvRule(),
             TransposedConvRule(), ListRule(), ImageOutputSqueezeRule(), UnpaddedListRule(),
             LowRankPointwiseRule(), LowRankLinearRule()]
    without = check.strings("default_rules", "without", without)
    unknown = set(without) - {r.name for r in rules}
    if unknown:
        raise RuleError(f"default_rules(without=...): no default rule named "
                        f"{', '.join(map(repr, sorted(unknown)))}; they are "
                        f"{', '.join(r.name for r in rules)}")
    return sorted((r for r in rules if r.name not in without), key=lambda r: r.priority)


def default_guards() -> list[Guard]:
    """The guards applied by default to every rule, built-in or not."""
    from .rules.depthwise_subpixel import DepthwiseSubpixelGuard
    from .rules.image_boundary import ImageBoundaryGuard

    return [ImageBoundaryGuard(), DepthwiseSubpixelGuard()]


@dataclasses.dataclass
class ExcludeGuard(Guard):
    """Keeps every site whose qualified name matches one of the glob ``patterns``."""

    name = "exclude"

    patterns: tuple[str, ...] = ()

    def check(self, proposal: Proposal) -> Veto | None:
        site = proposal.match.site.name
        for pattern in self.patterns:
            if fnmatch.fnmatchcase(site, pattern):
                return Veto(f"excluded by the user's pattern {pattern!r}")
        return None


def configure(rules: Sequence[Rule], params: RuleParams) -> list[Rule]:
    """Set rule parameters by rule name, e.g. ``{"list": {"squeeze_ratio": 8}}``."""
    by_name = {r.name: r for r in rules}
    for name, values in params.items():
        if name not in by_name:
            raise RuleError(f"rule_params names {name!r}, but the rules are "
                            f"{sorted(by_name)}")
        rule = by_name[name]
        fields = {f.name for f in dataclasses.fields(rule)} if dataclasses.is_dataclass(
            rule) else set()
        unknown = sorted(set(values) - fields)
        if unknown:
            raise RuleError(f"rule {name!r} has no parameter {unknown[0]!r}; its parameters "
                            f"are {sorted(fields) or 'none'}")
        by_name[name] = dataclasses.replace(rule, **values)
    return [by_name[r.name] for r in rules]


def _checked_rules(rules: Sequence[Rule] | None, params: RuleParams | None) -> list[Rule]:
    rules = default_rules() if rules is None else list(rules)
    for rule in rules:
        if not isinstance(rule, Rule):
            raise RuleError(f"{rule!r} is not an lwcompile.Rule instance")
        for method in ("match", "build"):
            if getattr(type(rule), method) is getattr(Rule, method):
                raise RuleError(f"rule {rule.name!r} ({type(rule).__name__}) has no "
                                f"{method}() method: a rule needs a matcher and a builder")
    seen: dict[str, Rule] = {}
    for rule in rules:
        if rule.name in seen:
            raise RuleError(f"two rules are named {rule.name!r} ({type(seen[rule.name]).__name__}"
                            f" and {type(rule).__name__}): give each a distinct `name`")
        seen[rule.name] = rule
    return sorted(configure(rules, params or {}), key=lambda r: r.priority)


def _checked_guards(guards: Sequence[Guard] | None, exclude: Sequence[str]) -> list[Guard]:
    guards = default_guards() if guards is None else list(guards)
    for guard in guards:
        if not isinstance(guard, Guard):
            raise RuleError(f"{guard!r} is not an lwcompile.Guard instance")
        if type(guard).check is Guard.check:
            raise RuleError(f"guard {guard.name!r} has no check() method")
    if isinstance(exclude, str):
        exclude = [exclude]
    return [ExcludeGuard(tuple(exclude)), *guards] if exclude else guards


def _warn_unused_excludes(model: nn.Module, exclude: Sequence[str]) -> None:
    names = [n for n, _ in model.named_modules()]
    for pattern in [exclude] if isinstance(exclude, str) else exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.warn(f"exclude pattern {pattern!r} matches no module of "
                          f"{type(model).__name__}", LwCompileWarning, stacklevel=3)


def _call(where: str, model: nn.Module, example_inputs: Sequence[Any] | None,
          example_kwargs: dict[str, Any] | None, rules: Sequence[Rule] | None,
          guards: Sequence[Guard] | None, exclude: Sequence[str],
          rule_params: RuleParams | None) -> tuple:
    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"lwcompile needs an nn.Module, got {type(model).__name__}")
    example_inputs = check.inputs(where, "example_inputs", example_inputs, optional=True)
    example_kwargs = check.mapping(where, "example_kwargs", example_kwargs)
    rules = check.sequence(where, "rules", rules)
    guards = check.sequence(where, "guards", guards)
    exclude = check.strings(where, "exclude", exclude)
    rule_params = check.mapping(where, "rule_params", rule_params, values_are_mappings=True)
    checked_rules = _checked_rules(rules, rule_params)
    checked_guards = _checked_guards(guards, exclude)
    _warn_unused_excludes(model, exclude)
    inferred = example_inputs is None
    args = infer_example_inputs(model) if inferred else example_inputs
    return model, args, dict(example_kwargs or {}), checked_rules, checked_guards, inferred


def lighten(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    rules: Sequence[Rule] | None = None,
    guards: Sequence[Guard] | None = None,
    exclude: Sequence[str] = (),
    rule_params: RuleParams | None = None,
) -> nn.Module:
    """Return a lightweight copy of ``model``; the report is at ``result.lwcompile_report``.

    ``example_inputs`` are the positional arguments of one forward (tensors and any other
    values, e.g. a noise level); without them a 1xCx64x64 image is inferred. ``rules`` and
    ``guards`` replace the defaults; ``exclude`` keeps sites whose qualified names match a
    glob (``"upsample.*"``); ``rule_params`` sets rule parameters by rule name
    (``{"list": {"squeeze_ratio": 8}}``). The input model is never modified.
    """
    call = _call("lighten", model, example_inputs, example_kwargs, rules, guards, exclude,
                 rule_params)
    with _no_raw_errors(model):
        result, report = compile_verified(*call)
    result.lwcompile_report = report
    # what save writes so that load can rebuild the result from data (deploy/light_plan.py)
    result.lwcompile_plan = record_plan(*call[:5], result, report)
    return result


def plan(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    rules: Sequence[Rule] | None = None,
    guards: Sequence[Guard] | None = None,
    exclude: Sequence[str] = (),
    rule_params: RuleParams | None = None,
) -> Report:
    """A dry run of ``lighten``: the report of what it would do, and no model.

    Matches, vetoes and per-site checks are exactly lighten's (same code, on a scratch copy);
    the summary's after-figures are estimated from the rows, and the whole-model check is
    not run (in the rare case it would roll a rewrite back, lighten's report says so).
    """
    call = _call("plan", model, example_inputs, example_kwargs, rules, guards, exclude,
                 rule_params)
    with _no_raw_errors(model):
        return plan_only(*call)


@contextlib.contextmanager
def _no_raw_errors(model: nn.Module) -> Iterator[None]:
    """Whatever goes wrong inside compilation reaches the user as an LwCompileError."""
    try:
        yield
    except LwCompileError:
        raise
    except Exception as exc:
        raise CompileFailed(
            f"lwcompile failed on {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
