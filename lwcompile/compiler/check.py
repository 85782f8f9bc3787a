"""Checks: does a replacement stand in for what it replaces, and does the result run?

Algorithm, per replacement (``check_replacement``):
1. A rule that is not exact only has to take the same inputs and give the same output
   shape. Both modules run on fake tensors (no arithmetic), once per distinct pair of
   structures, dtype and shapes: a network's hundreds of identical convs and LISTs share one
   check, cached in the workspace's ``shape_checks``. If the replacement's fake run shows
   its output takes the original's place byte for byte, its own peak composes into the
   result's (result_cost.py).
2. An exact rule (or code that needs real values to run) runs both on the same random
   input; an exact rule must agree within float tolerance.
Whole model (``first_failure``): the result runs on the example inputs and gives the
original's output shapes; the driver bisects when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..measure.cost import Measured, measure, measure_on_shapes, random_inputs
from ..rule import Proposal, Rule
from ..tracing.flow import structure_key


@dataclass(frozen=True)
class Checked:
    """What checking one replacement against the original it stands in for found."""

    problem: str  # '' if it stands in
    macs_before: int
    macs_after: int
    #: the replacement's own peak activation bytes on the site's inputs, where that composes
    #: into the result's peak (result_cost.py); else why not
    peak_after: int | str = "it was checked on real values, not on shapes alone"


def check_replacement(shape_checks: dict[tuple, Checked], proposal: Proposal,
                      original: nn.Module, shapes: tuple[torch.Size, ...],
                      dtype: torch.dtype) -> Checked:
    """Whether the replacement stands in for the original, and what both cost.
    ``shape_checks`` caches checks on fake tensors by what decides them."""
    rule, replacement = proposal.rule, proposal.replacement
    if not rule.exact:
        key = (structure_key(original), proposal.replacement_key, tuple(shapes), dtype)
        if key not in shape_checks:
            try:
                before, after = (measure_on_shapes(m, shapes, dtype)
                                 for m in (original, replacement))
            except Exception:  # failing for real is reported below, with the real error
                return run_both(rule, original, replacement, shapes, dtype)
            shape_checks[key] = _on_shapes(_shape_problem(after.output, before.output),
                                           before, after)
        return shape_checks[key]
    return run_both(rule, original, replacement, shapes, dtype)


def run_both(rule: Rule, original: nn.Module, replacement: nn.Module,
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


def output_shapes(out: Any) -> Any:
    """The shapes of a forward's output, in its nesting: what the result must reproduce."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(output_shapes(o) for o in out)
    if isinstance(out, dict):
        return {k: output_shapes(v) for k, v in out.items()}
    return type(out).__name__


def first_failure(result: nn.Module, args: tuple, kwargs: dict,
                  expected: Any) -> tuple[str, Measured | None]:
    """'' if the result runs and gives the original's output shapes (``expected``, from
    ``output_shapes``), else the problem; and what was measured on that run."""
    try:
        run = measure(result, args, kwargs)
    except Exception as exc:
        return f"result fails to run: {type(exc).__name__}: {exc}"[:300], None
    got = output_shapes(run.output)
    return ("" if got == expected else f"result output shapes {got} != original {expected}",
            run)
