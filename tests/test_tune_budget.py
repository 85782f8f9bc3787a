"""tune(..., budget_ms=): LIST squeeze widths chosen under a latency budget.

The choice (squeeze_choice), the re-squeezing (train.resqueeze: wider exactly, narrower
fitted) and the whole pass (deploy.budget) with a deterministic stand-in for timing, so that
the widths chosen are known; then tune itself on the torch target, and the model file.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lwcompile
from examples import dncnn
from lwcompile.deploy import budget
from lwcompile.deploy.squeeze_choice import Option, choose, predicted_ms
from lwcompile.deploy.tune import TuneError, tune
from lwcompile.nn import LIST
from lwcompile.train import resqueeze
from lwcompile.train.fitting import FitTask, fitting_for, relative_error
from tests.helpers import close, run

# --- the choice ---------------------------------------------------------------------

def _ladder(*rows: tuple[int, float, int]) -> list[Option]:
    return [Option(*row) for row in rows]


def test_choice_narrows_the_cheapest_loss_first_until_within_budget() -> None:
    options = {  # width, ms change, params
        "a": _ladder((16, 0.0, 1000), (8, -4.0, 600), (4, -5.0, 300)),  # 4 ms for 400 params
        "b": _ladder((16, 0.0, 1000), (8, -3.0, 900), (4, -3.5, 800)),  # 3 ms for 100 params
    }
    current = {"a": 16, "b": 16}
    assert choose(options, current, 20.0, 17.0) == {"a": 16, "b": 8}  # b's move is cheaper
    assert choose(options, current, 20.0, 14.0) == {"a": 8, "b": 8}
    assert predicted_ms(options, {"a": 8, "b": 8}, 20.0) == 13.0
    # 11.5 ms needs every move: b to 4 (0.5 ms for 100 params) before a (1 ms for 300)
    assert choose(options, current, 20.0, 11.5) == {"a": 4, "b": 4}
    assert choose(options, current, 20.0, 11.0) is None  # even the narrowest is 11.5 ms


def test_choice_widens_where_the_budget_allows_and_never_takes_a_move_that_saves_nothing(
        ) -> None:
    options = {
        "a": _ladder((32, 6.0, 2000), (16, 0.0, 1000), (8, 0.5, 600)),  # narrower is slower
        "b": _ladder((32, 2.0, 1200), (16, 0.0, 1000)),
    }
    current = {"a": 16, "b": 16}
    assert choose(options, current, 10.0, 10.0) == current
    assert choose(options, current, 10.0, 12.5) == {"a": 16, "b": 32}  # 100 params per ms
    assert choose(options, current, 10.0, 18.0) == {"a": 32, "b": 32}
    assert choose(options, current, 10.0, 9.0) is None  # narrowing a only adds time


# --- re-squeezing ---------------------------------------------------------------------

def _fitted_list(seed: int = 0) -> tuple[LIST, torch.Tensor]:
    torch.manual_seed(seed)
    old = LIST(32, 32).eval()
    x = torch.randn(8, 32, 16, 16)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    fitting_for(old).fit(old, FitTask(x, conv(x).detach(), original=conv, steps=20))
    return old, x


def test_widening_is_exact_and_adds_the_parameters_of_the_wider_squeeze() -> None:
    old, x = _fitted_list()
    wide = resqueeze.widened(old, 2)
    assert (old.squeeze.out_channels, wide.squeeze.out_channels) == (8, 16)
    close(wide(x), old(x))
    params = sum(p.numel() for p in wide.parameters())
    assert params == 32 * 16 + 16 + (16 * 16 + 16) * 2 + 16 * 9 + 16
    # the extra channels carry signal, so training reaches the zeroed weights
    assert wide.pointwise_branch.weight[:, 8:].abs().sum() == 0
    wide(x).pow(2).sum().backward()
    assert wide.pointwise_branch.weight.grad[:, 8:].abs().sum() > 0


def test_narrowing_recovers_a_list_whose_squeeze_has_the_narrower_rank() -> None:
    torch.manual_seed(0)
    old = LIST(32, 32).eval()  # squeeze 32 -> 8 of rank 4, one depthwise kernel for all
    with torch.no_grad():
        old.squeeze.weight.copy_((torch.randn(8, 4) @ torch.randn(4, 32))[..., None, None])
        old.squeeze.bias.zero_()
        old.spatial_branch[0].weight.copy_(torch.randn(1, 1, 3, 3).expand(8, 1, 3, 3))
    x = torch.randn(8, 32, 16, 16)
    narrow, error = resqueeze.narrowed(old, 8, x, steps=0)
    assert narrow.squeeze.out_channels == 4
    assert error < 1e-4  # the ridge of least squares
    assert error == relative_error(narrow, x, old(x))
    random_start = resqueeze.with_ratio(old, 8)
    fitting_for(random_start).fit(random_start, FitTask(x, old(x), original=old, steps=0))
    assert relative_error(random_start, x, old(x)) > 1e-2


# --- the whole pass, with the widths' latency made up -----------------------------------

def _light() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    original = dncnn.DnCNN(features=32, depth=5).eval()
    inputs = (torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(1)),)
    return original, lwcompile.lighten(original, inputs), inputs


def _made_up_latency(model: nn.Module) -> float:
    """1 ms per squeezed channel, plus 100 ms for the rest."""
    return 100.0 + sum(m.squeeze.out_channels for m in model.modules() if isinstance(m, LIST))


def _pass(light: nn.Module, inputs: tuple, budget_ms: float,
          variants_off_by: float = 0.0) -> budget.Budgeted:
    """fit_budget with made-up latencies; the group variants measured ``variants_off_by``
    ms slower than they are (their noise, in effect)."""
    groups = lwcompile.deploy.tune.list_groups(light, inputs)
    return budget.fit_budget(
        light, groups, budget_ms, (2, 4, 8),
        prepare=lambda m: (lambda: m),
        medians=lambda calls: {k: _made_up_latency(c()) + variants_off_by * k.startswith("group")
                               for k, c in calls.items()},
        fit_inputs=[inputs, (torch.rand(1, 1, 24, 24),)])


def test_the_pass_narrows_to_the_budget_fits_the_narrowed_and_saves_as_data(tmp_path) -> None:
    original, light, inputs = _light()
    sites = lwcompile.deploy.tune.list_groups(light, inputs)[0]
    assert len(sites) == 3 and _made_up_latency(light) == 100 + 3 * 8
    done = _pass(light, inputs, 118.0)  # 6 channels too many: two sites 8 -> 4
    assert sorted(after for _, after in done.widths.values()) == [4, 4, 8]
    assert (done.ms_before, done.ms_after) == (124.0, 116.0)
    narrowed = [s for s, (before, after) in done.widths.items() if after < before]
    assert set(done.fit_errors) == set(narrowed) and all(0 <= e < 1 for e in
                                                         done.fit_errors.values())
    assert {done.site_ms[s] for s in narrowed} == {-4.0}
    # untouched sites keep their weights
    kept = next(s for s in sites if s not in narrowed)
    close(done.model.get_submodule(kept).squeeze.weight, light.get_submodule(kept).squeeze.weight)
    # the model file records the per-site ratio and loads back the same model
    path = lwcompile.save(done.model, tmp_path / "budget.safetensors")
    back = lwcompile.load(path, original)
    assert [back.get_submodule(s).squeeze.out_channels for s in sites] == \
        [done.model.get_submodule(s).squeeze.out_channels for s in sites]
    close(run(back, inputs), run(done.model, inputs))
    assert done.model.lwcompile_plan["version"] == 2
    # the lighten report counts the narrower LISTs: parameters exactly, MACs by the LIST's
    # weights per pixel (24x24 input, as lighten counted)
    rows = {r.site: r for r in done.model.lwcompile_report.applied}
    given_rows = {r.site: r for r in light.lwcompile_report.applied}
    for site in narrowed:
        lst = done.model.get_submodule(site)
        assert rows[site].params_after == sum(p.numel() for p in lst.parameters())
        assert rows[site].macs_after == 24 * 24 * sum(
            m.weight.numel() for m in lst.modules() if isinstance(m, nn.Conv2d))
        assert rows[site].macs_after < given_rows[site].macs_after
    summary = done.model.lwcompile_report.summary
    assert summary.params_after == sum(p.numel() for p in done.model.parameters())
    assert summary.macs_after == lwcompile.profile(done.model, inputs).macs
    assert light.lwcompile_plan["version"] == 1  # the given model's plan is untouched


def test_the_pass_corrects_its_prediction_by_what_the_choice_measured() -> None:
    _, light, inputs = _light()
    # narrowing a site is measured to save 10/3 ms instead of 4: two sites are chosen for
    # 120 ms (predicted 117.3, measured 116), then, with the error corrected, one (120 ms)
    done = _pass(light, inputs, 120.0, variants_off_by=2.0)
    assert sorted(after for _, after in done.widths.values()) == [4, 8, 8]
    assert done.ms_after == 120.0
    assert [k for k in done.timings if k.startswith("budget")] == \
        ["budget attempt 1", "budget attempt 2"]


def test_the_pass_widens_exactly_where_the_budget_allows() -> None:
    _, light, inputs = _light()
    done = _pass(light, inputs, 1000.0)
    assert {after for _, after in done.widths.values()} == {16}  # ratio 2 of 32 channels
    assert done.fit_errors == {}
    close(run(done.model, inputs), run(light, inputs))


def test_a_budget_every_choice_misses_names_what_they_measured() -> None:
    _, light, inputs = _light()
    groups = lwcompile.deploy.tune.list_groups(light, inputs)
    with pytest.raises(budget.BudgetUnreachable,
                       match=r"118 ms was missed: the choices made measured 126\.0 ms"):
        budget.fit_budget(  # the chosen model measures 10 ms slower than predicted
            light, groups, 118.0, (2, 4, 8), prepare=lambda m: (lambda: m),
            medians=lambda calls: {k: _made_up_latency(c()) + 10 * (k == "budget")
                                   for k, c in calls.items()},
            fit_inputs=[inputs])


def test_the_pass_names_what_the_narrowest_would_take() -> None:
    _, light, inputs = _light()
    with pytest.raises(budget.BudgetUnreachable, match=r"124\.0 ms.*about 112\.0 ms"):
        _pass(light, inputs, 110.0)


# --- tune ---------------------------------------------------------------------------------

def test_tune_with_a_generous_budget_keeps_the_function() -> None:
    _, light, inputs = _light()
    tuned = tune(light, inputs, target="torch", runs=1, budget_ms=1e6)
    report = tuned.report
    assert report.exact and report.budget_ms == 1e6
    assert all(c.squeeze_after >= c.squeeze_before == 8 for c in report.sites)
    close(run(tuned.model, inputs), run(light, inputs))
    assert "budget 1e+06 ms" in str(report) and "NOT EXACT" not in str(report)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tune_with_a_budget_in_onnxruntime(precision: str) -> None:
    pytest.importorskip("onnxruntime")
    _, light, inputs = _light()
    tuned = tune(light, inputs, target="onnxruntime", precision=precision, runs=1,
                 budget_ms=1e6, min_psnr=200.0)  # min_psnr is left to the export
    assert tuned.precision == precision and tuned.report.exact
    assert {c.squeeze_after for c in tuned.report.sites} == {16}
    assert f"{precision}: group 0 squeeze 16" in tuned.report.timings
    close(run(tuned.model, inputs), run(light, inputs))


def test_tune_refuses_a_budget_out_of_reach() -> None:
    _, light, inputs = _light()
    with pytest.raises(TuneError, match="out of reach"):
        tune(light, inputs, target="torch", runs=1, budget_ms=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget_ms": -1.0}, "budget_ms"),
    ({"budget_ms": 10.0, "precision": "auto", "target": "onnxruntime"}, "not 'auto'"),
    ({"budget_ms": 10.0, "squeeze_ratios": []}, "squeeze_ratios is empty"),
    ({"budget_ms": 10.0, "squeeze_ratios": [4, "8"]}, "squeeze_ratios"),
    ({"budget_ms": 10.0, "squeeze_ratios": [0]}, "squeeze_ratios"),
    ({"squeeze_ratios": [8]}, "pass budget_ms too"),
])
def test_bad_budget_arguments_are_named(kwargs: dict, match: str) -> None:
    _, light, inputs = _light()
    with pytest.raises(lwcompile.ArgumentError, match=match):
        tune(light, inputs, target=kwargs.pop("target", "torch"), **kwargs)


def test_a_budget_for_a_model_without_lists_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1)).eval()
    with pytest.raises(TuneError, match="no LIST"):
        tune(model, (torch.rand(1, 1, 8, 8),), target="torch", budget_ms=5.0)
