"""lighten on third-party restoration networks (spandrel's architectures, examples/zoo.py).

Entries outside ``zoo.ZOO_FAST`` are marked ``zoo`` (``make zoo`` runs them all). Each network
must give the verdict recorded in ``tests/zoo_expected.json``: a network recorded as lightened
must still be lightened with the same rewrites (rule -> count), the same kept sites (guard or
check -> count) and the same parameters and MACs before and after, output shapes kept; a
network recorded as refused must still raise a ``LwCompileError`` naming its reason. The input
model is never changed, and, checked independently of the compiler's own guard by watching
every depthwise conv in a real forward, no depthwise conv feeds a pixel shuffle in the result.

The record is taken from ``benchmarks/results/zoo_coverage.json`` (written by ``make
coverage``, which also writes docs/coverage.md). After a change that is meant to alter a
verdict, run ``make coverage``, review the diff of docs/coverage.md, then accept it with
``python -m tests.test_zoo`` (rewrites tests/zoo_expected.json) and commit both.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import lwcompile
from examples import zoo
from lwcompile.report import APPLIED
from tests.helpers import depthwise_feeding_pixel_shuffle, zoo_cases

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILE = Path(__file__).with_name("zoo_expected.json")
COVERAGE_FILE = ROOT / "benchmarks" / "results" / "zoo_coverage.json"

pytest.importorskip("spandrel")


def expectation(row: dict) -> dict:
    """What the test holds a network to, from one row of zoo_coverage.json."""
    if row["status"] != "lightened":
        return {"lightens": False, "status": row["status"]}
    return {"lightens": True, "applied": row["rules"], "kept": row["kept_by"],
            "params": [row["params_before"], row["params_after"]],
            "macs": [row["macs_before"], row["macs_after"]]}


def write_expectations(rows: list[dict]) -> None:
    """One network per line, so that a changed verdict is a one-line diff."""
    lines = [f"  {json.dumps(row['network'])}: {json.dumps(expectation(row))}" for row in rows]
    EXPECTED_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")


@functools.cache
def expected_verdicts() -> dict[str, dict]:
    return json.loads(EXPECTED_FILE.read_text())


def shapes(out):  # noqa: ANN001, ANN201
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return tuple(shapes(o) for o in out)
    return type(out).__name__


def test_every_zoo_network_has_a_recorded_verdict() -> None:
    assert set(expected_verdicts()) == set(zoo.ZOO)


#: fast-subset networks that take over 5 s to lighten on 2 cores: left out of ``make quick``
@pytest.mark.parametrize("name", zoo_cases(slow=frozenset({"LaMa", "NAFNet"})))
def test_lighten_zoo_network(name: str) -> None:
    expected = expected_verdicts()[name]
    entry = zoo.ZOO[name]
    torch.manual_seed(0)
    model = entry.build()
    inputs = entry.example_inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        light = lwcompile.lighten(model, inputs)
    except lwcompile.LwCompileError as exc:
        assert not expected["lightens"], f"{name} was lightened before, now refused: {exc}"
        assert str(exc)  # a refusal names its reason
        return
    finally:
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert expected["lightens"], f"{name} was {expected['status']} before: record the change"
    report = light.lwcompile_report
    assert dict(Counter(r.decided_by for r in report.applied)) == expected["applied"]
    assert dict(Counter(r.decided_by for r in report.rows if r.outcome != APPLIED)) == \
        expected["kept"]
    summary = report.summary
    assert [summary.params_before, summary.params_after] == expected["params"]
    assert [summary.macs_before, summary.macs_after] == expected["macs"]
    with torch.no_grad():
        assert shapes(light(*inputs)) == shapes(model(*inputs))
    assert depthwise_feeding_pixel_shuffle(light, inputs) == set()


if __name__ == "__main__":
    write_expectations(json.loads(COVERAGE_FILE.read_text()))
    print(f"wrote {EXPECTED_FILE.relative_to(ROOT)} from {COVERAGE_FILE.relative_to(ROOT)}")
