"""lwcompile: compile PyTorch image-restoration networks into lightweight variants.

    light = lwcompile.lighten(model)          # an ordinary nn.Module
    print(light.lwcompile_report)             # what changed, what was refused, and why
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .cost import count_macs, count_params, random_inputs
from .errors import (
    ExampleInputError,
    LwCompileError,
    NotAModuleError,
    RuleError,
    UntraceableError,
    VerificationError,
)
from .flow import DataFlow, is_depthwise, record_flow
from .modules import GSAT, LIST, PointwiseOverParts, Resize
from .report import Report, Row, Summary
from .rule import Guard, Match, NoMatch, Proposal, Refuse, Rule, Site, Veto

__all__ = [
    "GSAT", "LIST", "DataFlow", "PointwiseOverParts", "Resize", "count_macs", "count_params",
    "is_depthwise", "random_inputs", "record_flow", "ExampleInputError", "Guard",
    "LwCompileError", "Match", "NoMatch",
    "NotAModuleError", "Proposal", "Refuse", "Report", "Row", "Rule", "RuleError", "Site",
    "Summary",
    "UntraceableError", "Veto", "VerificationError", "default_guards", "default_rules",
    "lighten",
]


def default_rules() -> list[Rule]:
    """The built-in rules (from the ``rules`` folder), in priority order."""
    from .rules.gsat_dilated import GsatRule
    from .rules.list_conv import ListRule
    from .rules.split_concat_pointwise import SplitConcatPointwiseRule
    from .rules.strided_conv import StridedConvRule
    from .rules.subpixel import SubpixelRule
    from .rules.transposed_conv import TransposedConvRule

    rules = [SplitConcatPointwiseRule(), SubpixelRule(), GsatRule(), StridedConvRule(),
             TransposedConvRule(), ListRule()]
    return sorted(rules, key=lambda r: r.priority)


def default_guards() -> list[Guard]:
    """The guards applied by default to every rule, built-in or not."""
    from .rules.depthwise_subpixel import DepthwiseSubpixelGuard
    from .rules.image_boundary import ImageBoundaryGuard

    return [ImageBoundaryGuard(), DepthwiseSubpixelGuard()]


def lighten(
    model: nn.Module,
    example_inputs: Sequence[Any] | None = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    rules: Sequence[Rule] | None = None,
    guards: Sequence[Guard] | None = None,
) -> nn.Module:
    """Return a lightweight copy of ``model``; the report is at ``result.lwcompile_report``.

    ``example_inputs`` are the positional arguments of one forward (tensors and any other
    values, e.g. a noise level); without them a 1xCx64x64 image is inferred. The input model
    is never modified.
    """
    from .engine import compile_verified
    from .inputs import infer_example_inputs

    if not isinstance(model, nn.Module):
        raise NotAModuleError(f"lighten needs an nn.Module, got {type(model).__name__}")
    inferred = example_inputs is None
    args = infer_example_inputs(model) if inferred else tuple(example_inputs)
    rules = sorted(default_rules() if rules is None else list(rules), key=lambda r: r.priority)
    guards = default_guards() if guards is None else list(guards)
    result, report = compile_verified(model, args, dict(example_kwargs or {}), rules, guards,
                                      inferred)
    result.lwcompile_report = report
    return result
