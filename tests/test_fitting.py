"""How replacements are fitted to the layers they replaced: the per-type registry behind
``init_layerwise``, a user's own fitted replacement, and the least-squares solve."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lwcompile
from examples import custom_rules, unet
from examples.dncnn import DnCNN
from lwcompile import FitTask, LwCompileError, Match, NoMatch, PointwiseOverParts, Rule, Site
from lwcompile.train import fitting
from lwcompile.train.data import model_inputs
from lwcompile.train.fitting import fitting_for, register_fit, solve_conv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(fitting, "_FITTINGS", dict(fitting._FITTINGS))


def recorded(teacher: nn.Module, site: str, data: torch.Tensor, batch_size: int,
             crop: int, batches: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The site's input and output in the teacher on init_layerwise's calibration batches."""
    stream = model_inputs(data, teacher, None, None, batch_size, crop, 0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = teacher.get_submodule(site).register_forward_hook(
        lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        for _, (_, x) in zip(range(batches), stream, strict=False):
            teacher(x)
    hook.remove()
    return torch.cat([a for a, _ in seen]), torch.cat([b for _, b in seen])


def low_rank_pair():
    torch.manual_seed(0)
    teacher = DnCNN(features=32, depth=4).eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 24, 24),),
                              rules=[custom_rules.LowRank(rank=8)])
    sites = [r.site for r in light.lwcompile_report.applied]
    assert sites == ["body.2", "body.5"]
    return teacher, light


def test_a_user_replacement_is_fitted_by_the_fit_registered_for_it(registry):
    teacher, light = low_rank_pair()
    data = torch.rand(6, 1, 40, 40)
    default = copy.deepcopy(light)
    errors = lwcompile.init_layerwise(light, teacher, data, batch_size=4, crop=32, steps=100,
                                      output_steps=0, refit_kept=False)  # layer fits alone

    x, y = recorded(teacher, "body.2", data, batch_size=4, crop=32)
    fitted: custom_rules.LowRankConv = light.get_submodule("body.2")
    # the reduction is the teacher's kernel truncated to rank 8 by SVD ...
    u, s, vh = torch.linalg.svd(teacher.get_submodule("body.2").weight.detach().flatten(1),
                                full_matrices=False)
    truncated = (u[:, :8] * s[:8]) @ vh[:8]
    product = fitted.expand.weight.flatten(1) @ fitted.reduce.weight.flatten(1)
    torch.testing.assert_close(fitted.reduce.weight.flatten(1),
                               s[:8, None].sqrt() * vh[:8])
    # ... and the expansion the least-squares optimum given it, not the SVD's factor
    features = fitted.reduce(x).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    optimum = torch.linalg.lstsq(features.double(),
                                 y.permute(0, 2, 3, 1).reshape(-1, 32).double()).solution
    torch.testing.assert_close(fitted.expand.weight.flatten(1).T.double(), optimum,
                               rtol=1e-3, atol=1e-4)
    assert not torch.allclose(product, truncated, atol=1e-3)

    # without its registration the same replacement gets the default (Adam) fit: worse
    del fitting._FITTINGS[custom_rules.LowRankConv]
    default_errors = lwcompile.init_layerwise(default, teacher, data, batch_size=4, crop=32,
                                              steps=100, output_steps=0, refit_kept=False)
    # sites are fitted in order on the student's own inputs: the first site's input is the
    # teacher's in both runs, the second's follows from how the first was fitted
    assert default_errors.before["body.2"] == errors.before["body.2"]
    assert default_errors.before["body.5"] != errors.before["body.5"]
    for site in ("body.2", "body.5"):
        assert errors[site] < 0.5 * errors.before[site]
        assert errors[site] < default_errors[site]


def test_fittings_are_looked_up_along_the_class_hierarchy(registry):
    class MySequential(nn.Sequential):
        pass

    assert fitting_for(MySequential()) is fitting_for(nn.Sequential())
    assert fitting_for(nn.Conv2d(1, 1, 1)) is fitting_for(nn.Module())
    assert fitting_for(lwcompile.LIST(4, 4)) is not fitting_for(nn.Module())

    @register_fit(MySequential)
    def fit_mine(module: MySequential, task: FitTask) -> None:
        pass

    assert fitting_for(MySequential()).fit is fit_mine
    assert fitting_for(nn.Sequential()).fit is not fit_mine


class Spy(nn.Module):
    """A replacement that computes what the teacher's conv did: its fit is the test's."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass
class SpyOn(Rule):
    name = "spy"
    site_name: str = "2"

    def match(self, site: Site) -> Match | NoMatch:
        return Match(site) if site.name == self.site_name else NoMatch("another site")

    def build(self, match: Match) -> nn.Module:
        return Spy(match.site.module)


def spied_pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 16, 3, padding=1), nn.PReLU(16),
                            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.Conv2d(16, 1, 3, padding=1)).eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 16, 16),), rules=[SpyOn()])
    assert [r.site for r in light.lwcompile_report.applied] == ["2"]
    return teacher, light


def test_a_declared_channel_order_is_fitted_and_undone_downstream(registry):
    teacher, light = spied_pair()
    reverse = torch.arange(15, -1, -1)
    seen: list[FitTask] = []
    register_fit(Spy, channel_order=lambda module, original: reverse)(
        lambda module, task: seen.append(task))
    consumer, prelu = light.get_submodule("4").weight.clone(), light.get_submodule("3").weight
    prelu = prelu.clone()
    data = torch.rand(4, 1, 20, 20)
    errors = lwcompile.init_layerwise(light, teacher, data, batch_size=2, crop=16,
                                      output_steps=0, refit_kept=False)  # layer fits alone

    (task,) = seen
    x, y = recorded(teacher, "2", data, batch_size=2, crop=16)
    assert torch.equal(task.inputs, x) and torch.equal(task.target, y[:, reverse])
    assert task.original is teacher.get_submodule("2") and (task.steps, task.lr) == (100, 1e-2)
    assert torch.equal(light.get_submodule("4").weight, consumer[:, reverse])
    assert torch.equal(light.get_submodule("3").weight, prelu[reverse])
    assert set(errors) == {"2"}
    # the spy fitted nothing: its output is the teacher's, in the teacher's order (before is
    # measured against that), and misses the reordered target it was handed
    assert errors.before["2"] == 0 < errors["2"]

    seen.clear()
    _, light = spied_pair()
    errors = lwcompile.init_layerwise(light, teacher, data, batch_size=2, crop=16,
                                      centre_heavy=False, output_steps=0, refit_kept=False)
    assert torch.equal(seen[0].target, y) and errors["2"] == 0


def test_a_part_that_selects_nothing_leaves_the_replacement_as_built(registry):
    teacher, light = spied_pair()
    calls = []
    register_fit(Spy, part=lambda module, x, y: None)(lambda module, task: calls.append(1))
    before = copy.deepcopy(light.state_dict())
    errors = lwcompile.init_layerwise(light, teacher, torch.rand(4, 1, 20, 20), batch_size=2,
                                      crop=16)
    assert not calls and not errors and not errors.before
    assert all(torch.equal(before[k], v) for k, v in light.state_dict().items())


def test_a_part_is_fitted_by_its_own_types_fitting(registry):
    teacher, light = spied_pair()
    seen = []
    register_fit(Spy, part=lambda module, x, y: (module.conv, x, 2 * y))(
        lambda module, task: pytest.fail("the part's fitting should run, not Spy's"))
    register_fit(nn.Conv2d)(lambda module, task: seen.append((module, task.target)))
    data = torch.rand(4, 1, 20, 20)
    errors = lwcompile.init_layerwise(light, teacher, data, batch_size=2, crop=16)
    (module, target), = seen
    _, y = recorded(teacher, "2", data, batch_size=2, crop=16)
    assert module is light.get_submodule("2.conv") and torch.equal(target, 2 * y)
    assert errors.before["2"] == pytest.approx(0.25)  # |y - 2y|^2 / |2y|^2


def test_register_fit_refuses_what_is_not_a_module_type_or_function(registry):
    with pytest.raises(LwCompileError, match="nn.Module subclass"):
        register_fit(int)
    with pytest.raises(LwCompileError, match="fit\\(module, task\\)"):
        register_fit(Spy)(42)
    assert Spy not in fitting._FITTINGS


def test_an_exact_concat_rewrite_is_left_as_built():
    """PointwiseOverParts carries the teacher's weights and takes the concat's parts, not the
    concatenated tensor the teacher's conv recorded: init_layerwise leaves it, fits the rest."""
    torch.manual_seed(0)
    teacher = unet.build().eval()
    light = lwcompile.lighten(teacher, unet.example_inputs())
    exact = [r.result_name for r in light.lwcompile_report.applied
             if isinstance(light.get_submodule(r.result_name), PointwiseOverParts)]
    assert exact
    kept = {n: copy.deepcopy(light.get_submodule(n).state_dict()) for n in exact}
    errors = lwcompile.init_layerwise(light, teacher, torch.rand(2, 3, 40, 40), steps=2,
                                      calib_batches=1, batch_size=2, crop=32)
    assert not set(exact) & set(errors)
    assert len(errors) == len(light.lwcompile_report.applied) - len(exact)
    for name, state in kept.items():
        now = light.get_submodule(name).state_dict()
        assert all(torch.equal(state[k], now[k]) for k in state)


@pytest.mark.parametrize("bias", [True, False])
def test_least_squares_is_the_optimum_of_the_conv_as_it_is(bias):
    """Zero gradient at the solution; a conv without bias gets no intercept it cannot keep."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=1, bias=bias)
    x = torch.randn(2, 4, 10, 10)
    y = torch.randn(2, 3, 10, 10) + 0.5  # not reachable: an offset and noise
    solve_conv(conv, x, y, ridge=1e-10)
    loss = (conv(x) - y).pow(2).sum()
    loss.backward()
    scale = 1e-3 * loss.item()
    assert float(conv.weight.grad.abs().max()) < scale
    if bias:
        assert float(conv.bias.grad.abs().max()) < scale


def test_least_squares_refuses_a_grouped_conv():
    with pytest.raises(LwCompileError, match="groups=2"):
        solve_conv(nn.Conv2d(4, 4, 1, groups=2), torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3))
