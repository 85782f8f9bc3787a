"""train/features.py: intermediate-feature distillation at the end of every rewritten block."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.errors import ArgumentError
from lwcompile.train.data import add_noise
from lwcompile.train.distill import distill
from lwcompile.train.features import CHANNEL_ORDERS, Features, boundaries
from lwcompile.train.layerwise import applied_sites, init_layerwise
from tests.helpers import small_dncnn_and_light

pytestmark = pytest.mark.usefixtures("one_thread")


def _boundary_errors(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                     mapped: bool = True) -> list[float]:
    """Each boundary's relative squared error on ``x`` (teacher read in the recorded channel
    order unless ``mapped`` is False)."""
    found = boundaries(student, teacher, applied_sites(student, teacher))
    if not mapped:
        found = [type(b)(b.name, b.student, b.teacher, None) for b in found]
    features = Features(found)
    try:
        with torch.no_grad():
            teacher(x)
            student.eval()(x)
        errors = []
        for i, b in enumerate(found):
            s, t = features.student[i][0], features.teacher[i][0]
            if b.order is not None:
                t = t[:, b.order]
            errors.append(((s - t).pow(2).mean() / t.pow(2).mean()).item())
        return errors
    finally:
        features.close()


def test_an_exact_rewrite_has_no_feature_error_at_its_boundaries():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(32, 48, 1), nn.BatchNorm2d(48), nn.ReLU(),
                            nn.Conv2d(48, 32, 1), nn.ReLU()).eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 32, 8, 8),),
                              rule_params={"low-rank-1x1": {"rank_ratio": 1,
                                                            "min_saving": 0.1}})
    found = boundaries(light, teacher, applied_sites(light, teacher))
    # each block ends at the per-channel modules after the replacement, in both models
    assert [(b.name, b.student is light.get_submodule(end), b.teacher is teacher[int(end)])
            for b, end in zip(found, ["2", "4"], strict=True)] == [
        ("0", True, True), ("3", True, True)]
    features = Features(found)
    x = torch.rand(2, 32, 8, 8)
    with torch.no_grad():
        teacher(x)
        light(x)
    torch.testing.assert_close(features.loss(), torch.tensor(0.0), atol=1e-8, rtol=0)
    features.close()
    assert not any(m._forward_hooks for m in [*light.modules(), *teacher.modules()])


def test_init_layerwise_records_the_channel_orders_and_boundaries_read_the_teacher_in_them():
    teacher, light = small_dncnn_and_light()
    init_layerwise(light, teacher, torch.rand(8, 1, 32, 32), steps=20, batch_size=8,
                   crop=24, degrade=add_noise(25))
    orders = getattr(light, CHANNEL_ORDERS)
    assert orders and all(sorted(o) == list(range(16)) for o in orders.values())
    x = add_noise(25)(torch.rand(4, 1, 24, 24), torch.Generator().manual_seed(3))
    mapped = _boundary_errors(light, teacher, x)
    unmapped = _boundary_errors(light, teacher, x, mapped=False)
    assert max(mapped) < 0.5
    assert sum(mapped) < 0.5 * sum(unmapped)  # the permuted channels are read back in order


def test_distilling_with_features_keeps_the_blocks_closer_to_the_teachers():
    teacher, _ = small_dncnn_and_light()
    generator = torch.Generator().manual_seed(2)
    batch_norms = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in batch_norms:  # the statistics of real activations, as a trained teacher has
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    teacher.train()
    with torch.no_grad():
        for _ in range(10):
            teacher(add_noise(25)(torch.rand(8, 1, 24, 24), generator))
    teacher.eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 24, 24),))
    init_layerwise(light, teacher, torch.rand(8, 1, 32, 32), steps=10, batch_size=8,
                   crop=24, degrade=add_noise(25))
    options = dict(steps=100, batch_size=8, crop=24, degrade=add_noise(25), progress=False,
                   lr=3e-3)
    plain, with_features = copy.deepcopy(light), copy.deepcopy(light)
    data = torch.rand(8, 1, 32, 32)
    distill(plain, teacher, data, **options)
    distill(with_features, teacher, data, features=1.0, **options)
    x = add_noise(25)(torch.rand(4, 1, 24, 24), torch.Generator().manual_seed(5))
    assert sum(_boundary_errors(with_features, teacher, x)) < \
        0.8 * sum(_boundary_errors(plain, teacher, x))
    assert not any(m._forward_hooks for m in [*with_features.modules(), *teacher.modules()])


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "1"])
def test_a_feature_weight_that_is_no_finite_number_at_least_zero_is_refused(weight):
    teacher, light = small_dncnn_and_light()
    with pytest.raises(ArgumentError, match="features"):
        distill(light, teacher, torch.rand(2, 1, 32, 32), steps=1, features=weight,
                progress=False)


def test_the_channel_orders_survive_saving_and_a_resumed_distillation(tmp_path):
    teacher, light = small_dncnn_and_light()
    init_layerwise(light, teacher, torch.rand(8, 1, 32, 32), steps=5, batch_size=8,
                   crop=24, degrade=add_noise(25))
    orders = getattr(light, CHANNEL_ORDERS)
    assert orders
    lwcompile.save(light, tmp_path / "light.safetensors")
    loaded = lwcompile.load(tmp_path / "light.safetensors", original=teacher)
    assert getattr(loaded, CHANNEL_ORDERS) == orders
    checkpoint = tmp_path / "run.pt"
    distill(light, teacher, torch.rand(4, 1, 32, 32), steps=2, batch_size=4, crop=24,
            checkpoint=checkpoint, progress=False, features=0.1)
    fresh = lwcompile.load(tmp_path / "light.safetensors", original=teacher)
    delattr(fresh, CHANNEL_ORDERS)  # as a student rebuilt without them
    distill(fresh, teacher, torch.rand(4, 1, 32, 32), steps=3, batch_size=4, crop=24,
            checkpoint=checkpoint, progress=False, features=0.1)
    assert getattr(fresh, CHANNEL_ORDERS) == orders
