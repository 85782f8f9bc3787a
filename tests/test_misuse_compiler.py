"""Misuse of lighten/plan that the compiler itself must survive (issue 20), by class:
1. silent wrong behaviour (train-mode branches), 2. concurrency, 5. models lighten refused
or blamed the wrong thing for. Each case failed before its fix."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile import Guard, LwCompileError, Proposal, Veto
from lwcompile.report import APPLIED, ROLLED_BACK
from tests.helpers import close, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(report: lwcompile.Report) -> list[tuple]:
    return [(r.site, r.outcome, r.decided_by, r.params_after, r.macs_after) for r in report.rows]


class Body(nn.Module):
    """Three 3x3 convs, the middle one lightenable; ``forward`` is overridden by variants."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.tail = nn.Conv2d(32, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.conv(torch.relu(self.head(x)))))


# ---------------------------------------------------------------------------------------------
# Class 1: silent wrong behaviour — a forward that branches on self.training
# ---------------------------------------------------------------------------------------------

class AuxInTraining(Body):
    """Adds an auxiliary term only in training (as a deep-supervision head would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.head(x))))
        out = self.tail(h)
        if self.training:
            out = out + 10.0 + h.mean()
        return out


def test_train_mode_branch_is_kept() -> None:
    torch.manual_seed(0)
    model = AuxInTraining().train()
    x = torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(model, (x,))
    assert any("branches on self.training" in line for line in light.lwcompile_report.log)
    assert [r.site for r in light.lwcompile_report.applied] == ["conv"]
    assert light.training
    for mode in (True, False):
        model.train(mode)
        light.train(mode)
        expected, got = run(model, (x,)), run(light, (x,))
        assert got.shape == expected.shape
        # the +10 of the training branch must be there in train mode and gone in eval
        assert abs(got.mean() - expected.mean()) < 1.0, f"training={mode}"


def test_eval_mode_model_is_traced_as_before() -> None:
    """Only a model in training mode pays for the second trace: in eval mode the root is
    traced as one graph, as it always was (the result's eval behaviour is the original's)."""
    torch.manual_seed(0)
    model, x = AuxInTraining().eval(), torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(model, (x,))
    assert isinstance(light, torch.fx.GraphModule)
    assert not any("self.training" in line for line in light.lwcompile_report.log)
    assert run(light, (x,)).shape == run(model, (x,)).shape


# ---------------------------------------------------------------------------------------------
# Class 2: concurrency — torch.fx patches nn.Module.__call__ process-wide while tracing
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _threads_switching_often() -> Iterator[None]:
    """Switch threads every microsecond inside, so that concurrent traces really overlap."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _start_and_join(threads: list[threading.Thread]) -> None:
    with _threads_switching_often():
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _small_models() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [(dncnn.DnCNN(features=32, depth=d), torch.rand(1, 1, 12, 12)) for d in (3, 4, 5, 6)]


@pytest.mark.parametrize("entry", ["lighten", "plan"])
def test_threads_compile_at_once_like_serial_runs(entry: str) -> None:
    original_call = nn.Module.__call__
    cases = _small_models()

    def one(model: nn.Module, x: torch.Tensor) -> list[tuple]:
        if entry == "plan":
            return _rows(lwcompile.plan(model, (x,)))
        return _rows(lwcompile.lighten(model, (x,)).lwcompile_report)

    serial = [one(m, x) for m, x in cases]
    results: dict[int, object] = {}

    def worker(i: int) -> None:
        try:
            results[i] = one(*cases[i])
        except Exception as exc:  # recorded and asserted below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    _start_and_join(threads)
    assert [results[i] for i in range(len(cases))] == serial
    assert nn.Module.__call__ is original_call


def test_emit_fast_and_lighten_at_once() -> None:
    """emit_fast traces with fx too: it waits for a compilation, not interleaves with it."""
    original_call = nn.Module.__call__
    cases = _small_models()
    light = lwcompile.lighten(*cases[-1]).eval()  # emit_fast's result is in eval mode
    x = cases[-1][1]
    expected = run(light, (x,))
    results: dict[str, object] = {}

    def emit(i: int) -> None:
        try:
            results[f"emit{i}"] = run(lwcompile.emit_fast(light, (x,), channels_last=False),
                                      (x,))
        except Exception as exc:  # recorded and asserted below
            results[f"emit{i}"] = exc

    def compile_(i: int) -> None:
        try:
            results[f"lighten{i}"] = _rows(lwcompile.lighten(*cases[i]).lwcompile_report)
        except Exception as exc:  # recorded and asserted below
            results[f"lighten{i}"] = exc

    threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (emit, compile_)]
    _start_and_join(threads)
    for i in range(3):
        assert isinstance(results[f"lighten{i}"], list), results[f"lighten{i}"]
        assert isinstance(results[f"emit{i}"], torch.Tensor), results[f"emit{i}"]
        close(results[f"emit{i}"], expected)
    assert nn.Module.__call__ is original_call


def test_a_model_run_in_another_thread_during_lighten_is_plain_eager() -> None:
    """fx's patches of nn.Module act in the tracing thread only: the application's own
    forward passes elsewhere neither fail nor change while lighten traces."""
    cases = _small_models()
    other, x = cases[0][0].eval(), cases[0][1]
    expected = run(other, (x,))
    done = threading.Event()
    outcomes: list[object] = []

    def application() -> None:
        while not done.is_set():
            try:
                outcomes.append(torch.equal(run(other, (x,)), expected))
            except Exception as exc:  # recorded and asserted below
                outcomes.append(exc)

    thread = threading.Thread(target=application)
    with _threads_switching_often():
        thread.start()
        try:
            for model, inputs in cases[1:]:
                lwcompile.lighten(model, (inputs,))
        finally:
            done.set()
            thread.join()
    assert outcomes and all(o is True for o in outcomes), {repr(o) for o in outcomes}


def test_a_failing_trace_leaves_module_call_unpatched() -> None:
    class Untraceable(Body):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(torch.relu(self.head(x)))
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return self.tail(h)

    original_call, original_getattr = nn.Module.__call__, nn.Module.__getattr__
    try:
        lwcompile.lighten(Untraceable(), (torch.rand(1, 1, 8, 8),))
    except LwCompileError:
        pass
    assert nn.Module.__call__ is original_call
    assert nn.Module.__getattr__ is original_getattr


# ---------------------------------------------------------------------------------------------
# Class 5: models lighten refused or blamed the wrong thing for
# ---------------------------------------------------------------------------------------------

class KeywordCall(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(torch.relu(self.conv(input=torch.relu(self.head(x)))))


def test_conv_called_with_keyword_is_rewritten_or_reported() -> None:
    torch.manual_seed(0)
    model, x = KeywordCall().eval(), torch.rand(1, 1, 16, 16)
    report = lwcompile.plan(model, (x,))
    assert "conv" in {r.site for r in report.rows}
    light = lwcompile.lighten(model, (x,))
    assert run(light, (x,)).shape == run(model, (x,)).shape


class Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.post = torch.jit.script(nn.Conv2d(1, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.body(x))


@pytest.mark.parametrize("entry", ["lighten", "plan"])
def test_scripted_submodule_is_opaque_or_named(entry: str) -> None:
    torch.manual_seed(0)
    model, x = Scripted().eval(), torch.rand(1, 1, 16, 16)
    try:
        light = getattr(lwcompile, entry)(model, (x,))
    except LwCompileError as exc:
        message = str(exc)
        assert "post" in message and "script" in message.lower(), message
        assert "example input" not in message, message
        return
    if entry == "lighten":
        close(run(light, (x,)), run(model, (x,)))


def test_lighten_under_inference_mode() -> None:
    torch.manual_seed(0)
    model, x = dncnn.DnCNN(features=32, depth=4).eval(), torch.rand(1, 1, 12, 12)
    expected = _rows(lwcompile.lighten(model, (x,)).lwcompile_report)
    with torch.inference_mode():
        light = lwcompile.lighten(model, (x,))
        report = lwcompile.plan(model, (x,))
    assert _rows(light.lwcompile_report) == expected
    assert any(r.outcome == APPLIED for r in report.rows)
    y = run(light, (x,))
    assert y.shape == x.shape and not y.is_inference()
    assert all(not p.is_inference() for p in light.parameters())


class RaisingGuard(Guard):
    name = "raising-guard"

    def check(self, proposal: Proposal) -> Veto | None:
        raise ValueError("guard bug")


def test_a_raising_guard_becomes_a_row() -> None:
    torch.manual_seed(0)
    model, x = dncnn.DnCNN(features=32, depth=4), torch.rand(1, 1, 12, 12)
    guards = [*lwcompile.default_guards(), RaisingGuard()]
    report = lwcompile.plan(model, (x,), guards=guards)
    rows = [r for r in report.rows if r.decided_by == "raising-guard"]
    assert rows, report.rows
    for row in rows:
        assert row.outcome == ROLLED_BACK
        assert "raising-guard" in row.reason or "guard" in row.reason
        assert "ValueError: guard bug" in row.reason and "\n" not in row.reason
