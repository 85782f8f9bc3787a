"""compiler/check.py: does a replacement stand in for the original, and does the result run?"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lwcompile import LIST, Match, Proposal, Rule, Site
from lwcompile.compiler.check import check_replacement, first_failure, output_shapes

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = torch.Size([1, 16, 8, 8])


class ByShape(Rule):
    name = "by-shape"


class Exact(Rule):
    name = "exact"
    exact = True


def _check(rule: Rule, original: nn.Module, replacement: nn.Module, cache=None):
    site = Site("conv", original, (SHAPE,), SHAPE)
    proposal = Proposal(rule, Match(site), replacement)
    return check_replacement({} if cache is None else cache, proposal, original, (SHAPE,),
                             torch.float32)


def test_a_shape_check_runs_once_per_structure_and_its_peak_composes():
    cache: dict = {}
    first = _check(ByShape(), nn.Conv2d(16, 16, 3, padding=1), LIST(16, 16), cache)
    twin = _check(ByShape(), nn.Conv2d(16, 16, 3, padding=1), LIST(16, 16), cache)
    assert twin is first and len(cache) == 1
    assert first.problem == "" and first.macs_before == 8 * 8 * 9 * 16 * 16
    assert 0 < first.macs_after < first.macs_before
    assert isinstance(first.peak_after, int) and first.peak_after > 0
    other = _check(ByShape(), nn.Conv2d(16, 16, 5, padding=2), LIST(16, 16), cache)
    assert len(cache) == 2 and other.macs_before == 8 * 8 * 25 * 16 * 16


def test_a_replacement_of_another_shape_does_not_stand_in():
    checked = _check(ByShape(), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 8, 1))
    assert checked.problem == "replacement output (1, 8, 8, 8) != original (1, 16, 8, 8)"


def test_a_replacement_that_fails_to_run_is_reported_with_its_error():
    checked = _check(ByShape(), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(3, 16, 1))
    assert checked.problem.startswith("replacement fails to run: RuntimeError")
    assert checked.macs_after == 0


def test_an_exact_rule_must_agree_value_for_value():
    conv = nn.Conv2d(16, 16, 3, padding=1)
    same = _check(Exact(), conv, copy.deepcopy(conv))
    assert same.problem == "" and same.macs_after == same.macs_before
    assert same.peak_after == "it was checked on real values, not on shapes alone"
    spoiled = copy.deepcopy(conv)
    with torch.no_grad():
        spoiled.bias += 1.0
    differs = _check(Exact(), conv, spoiled)
    assert differs.problem.startswith("rule claims to be exact but differs by up to 1")


def test_output_shapes_keep_the_outputs_nesting():
    t = torch.zeros(1, 2)
    assert output_shapes((t, [torch.zeros(3)], {"k": t}, 3)) == (
        (1, 2), ((3,),), {"k": (1, 2)}, "int")


class Halves(nn.Module):
    def forward(self, x):
        return x[..., ::2]


class Fails(nn.Module):
    def forward(self, x):
        raise ValueError("broken result")


def test_the_whole_result_must_run_and_give_the_originals_shapes():
    x = torch.rand(1, 3, 8, 8)
    expected = output_shapes(x)
    problem, run = first_failure(nn.Identity(), (x,), {}, expected)
    assert problem == "" and run is not None and run.macs == 0
    problem, _ = first_failure(Halves(), (x,), {}, expected)
    assert problem == "result output shapes (1, 3, 8, 4) != original (1, 3, 8, 8)"
    problem, run = first_failure(Fails(), (x,), {}, expected)
    assert problem == "result fails to run: ValueError: broken result" and run is None
