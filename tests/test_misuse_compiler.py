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


# --- Class 1: an unbatched CxHxW input, which nn.Conv2d accepts -------------------------------


class EveryRule(nn.Module):
    """One site for each built-in rule: LIST, GSAT, strided, transposed, split-concat 1x1,
    sub-pixel; the forward itself is written for any rank (dim=-3, pixel_shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.dilated = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.mix = nn.Conv2d(64, 32, 1)
        self.sub = nn.Conv2d(32, 128, 3, padding=1)
        self.tail = nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dilated(torch.relu(self.conv(torch.relu(self.head(x))))))
        u = torch.relu(self.up(torch.relu(self.down(h))))
        h = torch.relu(self.mix(torch.cat([h, u], dim=-3)))
        return self.tail(torch.nn.functional.avg_pool2d(
            torch.nn.functional.pixel_shuffle(self.sub(h), 2), 2))


@pytest.fixture(scope="module")
def every_rule() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = EveryRule().eval()
    light = lwcompile.lighten(model, (torch.rand(1, 3, 16, 16),))
    assert {r.decided_by for r in light.lwcompile_report.applied} == {
        "list", "gsat", "strided-conv", "transposed-conv", "split-concat-1x1", "subpixel"}
    return model, light.eval()


@pytest.mark.parametrize("form", ["lightened", "emit_fast", "emit_fast channels_last"])
def test_unbatched_input_gives_the_batched_result(form, every_rule) -> None:
    model, light = every_rule
    if form != "lightened":
        light = lwcompile.emit_fast(light, (torch.rand(1, 3, 16, 16),),
                                    channels_last=form.endswith("channels_last"))
    image = torch.rand(3, 16, 16)
    assert run(model, (image,)).shape == (3, 16, 16)  # the original takes it
    got = run(light, (image,))
    assert got.shape == (3, 16, 16)
    close(got, run(light, (image[None],))[0])


@pytest.mark.parametrize("block", ["LIST", "GSAT", "Resize", "FusedLIST"])
def test_each_block_takes_an_unbatched_input(block) -> None:
    from lwcompile.nn import FusedLIST

    torch.manual_seed(0)
    module = {"LIST": lambda: lwcompile.LIST(16, 16), "GSAT": lambda: lwcompile.GSAT(16, 2),
              "Resize": lambda: lwcompile.Resize("conv", (3, 3), (2, 2), (1, 1)),
              "FusedLIST": lambda: FusedLIST(lwcompile.LIST(16, 16))}[block]().eval()
    image = torch.rand(16, 9, 9)
    got = run(module, (image,))
    assert got.shape == run(module, (image[None],))[0].shape
    close(got, run(module, (image[None],))[0])


def test_emit_fast_unbatched_after_a_pickle_round_trip(every_rule) -> None:
    _, light = every_rule
    fast = lwcompile.emit_fast(light, (torch.rand(1, 3, 16, 16),), channels_last=False)
    again = _pickled(fast)
    image = torch.rand(3, 16, 16)
    close(run(again, (image,)), run(fast, (image[None],))[0])


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


# --- Class 1: what tracing froze (a loop over range(self.steps)) -----------------------------


class Steps(Body):
    """Runs its middle conv ``steps`` times: tracing unrolls the loop."""

    def __init__(self, steps: int = 2) -> None:
        super().__init__()
        self.steps = steps
        self.gain = 1.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(x))
        for _ in range(self.steps):
            h = torch.relu(self.conv(h))
        return self.tail(h) * self.gain


def test_an_unrolled_loop_is_named_in_the_report() -> None:
    torch.manual_seed(0)
    light = lwcompile.lighten(Steps().eval(), (torch.rand(1, 1, 16, 16),))
    frozen = [line for line in light.lwcompile_report.log if "tracing froze" in line]
    assert frozen == ["<root>: tracing froze the plain attribute(s) gain=1.5, steps=2 into "
                      "the graph (loops unrolled, branches chosen, numbers baked in): changing "
                      "them on the result has no effect"]
    assert light.steps == 2  # still readable, as on the original


def test_setting_a_frozen_attribute_warns_that_it_does_nothing() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(Steps().eval(), (x,))
    before = run(light, (x,))
    with pytest.warns(lwcompile.LwCompileWarning, match="steps was read when the model was "
                                                        "traced .* no effect"):
        light.steps = 5
    close(run(light, (x,)), before)  # what the warning says


def test_a_frozen_attribute_of_a_nested_block_is_named() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Steps(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    light = lwcompile.lighten(Outer().eval(), (torch.rand(1, 1, 16, 16),))
    assert any("block.steps=3" in line for line in light.lwcompile_report.log)


def test_no_frozen_line_for_a_forward_reading_no_plain_attribute() -> None:
    light = lwcompile.lighten(Body().eval(), (torch.rand(1, 1, 16, 16),))
    assert not any("tracing froze" in line for line in light.lwcompile_report.log)


# --- Class 7: tied weights, hooks, the original's attributes and methods, input mutation ----


class CalledTwice(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.head(x))))
        return self.tail(torch.relu(self.conv(h)))


def test_a_conv_called_twice_keeps_one_shared_replacement() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(CalledTwice().eval(), (x,))
    report = light.lwcompile_report
    assert [r.site for r in report.applied] == ["conv"]
    assert "conv: called 2 times; its one replacement serves every call, so the calls still " \
           "share weights" in report.log
    calls = [n.target for n in light.graph.nodes if n.op == "call_module"]
    assert calls == ["head", "conv", "conv", "tail"]
    assert isinstance(light.conv, lwcompile.LIST)
    assert lwcompile.count_params(light) == 320 + 632 + 289


class SharedWeight(Body):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv2.weight = self.conv.weight
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.head(x))))
        return self.tail(torch.relu(self.conv3(torch.relu(self.conv2(h)))))


def test_convs_sharing_a_weight_are_kept_with_a_reason() -> None:
    torch.manual_seed(0)
    model, x = SharedWeight().eval(), torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(model, (x,))
    rows = {r.site: r for r in light.lwcompile_report.rows}
    for name, other in (("conv", "conv2"), ("conv2", "conv")):
        assert rows[name].decided_by == "tied-weights" and rows[name].replacement == "kept"
        assert f"shares its weight with {other!r} (weight): a replacement would untie them" \
            in rows[name].reason
    assert rows["conv3"].decided_by == "list"
    assert light.conv.weight is light.conv2.weight
    assert run(light, (x,)).shape == x.shape


class SameModuleTwoNames(Body):
    def __init__(self) -> None:
        super().__init__()
        self.again = self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.head(x))))
        return self.tail(torch.relu(self.again(h)))


def test_one_module_under_two_names_stays_one_module() -> None:
    """fx calls the module by its first name at both places: one replacement serves both."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(SameModuleTwoNames().eval(), (x,))
    assert [r.site for r in light.lwcompile_report.applied] == ["conv"]
    assert any(line.startswith("conv: called 2 times") for line in light.lwcompile_report.log)
    assert [n.target for n in light.graph.nodes if n.op == "call_module"] == [
        "head", "conv", "conv", "tail"]


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_hooked_conv_is_kept_with_a_reason_and_its_hook_still_runs(kind) -> None:
    torch.manual_seed(0)
    model, x = Body().eval(), torch.rand(1, 1, 16, 16)
    seen: list[tuple] = []
    if kind == "forward":
        model.conv.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    else:
        model.conv.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    with pytest.raises(lwcompile.NothingToLighten) as caught:
        lwcompile.lighten(model, (x,))
    row = next(r for r in caught.value.report.rows if r.site == "conv")
    assert row.decided_by == "hooks" and "would drop them" in row.reason
    assert (kind.replace("pre", "forward pre") + " hooks") in row.reason


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Body(), Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_hooks_on_a_block_and_on_the_model_still_run_on_the_result() -> None:
    torch.manual_seed(0)
    model, x = TwoBlocks().eval(), torch.rand(1, 1, 16, 16)
    seen: list[str] = []
    model.first.register_forward_hook(lambda m, a, out: seen.append("first"))
    model.register_forward_pre_hook(lambda m, a: seen.append("model"))
    light = lwcompile.lighten(model, (x,))
    assert {r.site for r in light.lwcompile_report.applied} == {"first.conv", "second.conv"}
    seen.clear()
    light(x)
    assert seen == ["model", "first"]
    seen.clear()
    light_copy = __import__("copy").deepcopy(light)
    light_copy(x)
    assert seen == ["model", "first"]


class WithApplicationApi(Body):
    scale = 1
    tile = 8

    def __init__(self) -> None:
        super().__init__()
        self.name = "body"

    def tile_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run ``forward`` tile by tile, as applications do for large images."""
        rows = [torch.cat([self(t) for t in row.split(self.tile, dim=-1)], dim=-1)
                for row in x.split(self.tile, dim=-2)]
        return torch.cat(rows, dim=-2)

    @property
    def channels(self) -> int:
        return self.head.in_channels


def _pickled(module: nn.Module) -> nn.Module:
    import io

    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_the_result_keeps_plain_attributes_methods_and_class_constants() -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    light = lwcompile.lighten(WithApplicationApi().eval(), (x,))
    assert (light.scale, light.tile, light.name, light.channels) == (1, 8, "body", 1)
    assert light.tile_forward(x).shape == x.shape
    close(light.tile_forward(x)[..., :8, :8], light(x[..., :8, :8]))
    for again in (__import__("copy").deepcopy(light), _pickled(light)):
        assert (again.scale, again.name, again.channels) == (1, "body", 1)
        close(again.tile_forward(x), light.tile_forward(x))


class WritesIntoItsInput(Body):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return super().forward(x)


@pytest.mark.parametrize("entry", ["lighten", "plan"])
def test_a_forward_writing_into_its_input_leaves_the_users_tensor_alone(entry) -> None:
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16)
    before = x.clone()
    getattr(lwcompile, entry)(WritesIntoItsInput().eval(), (x,))
    assert torch.equal(x, before)
