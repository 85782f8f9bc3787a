"""Validation during distillation (skimage PSNR/SSIM, best checkpoint), cosine schedule,
weight averaging and BatchNorm re-estimation, all resumable bit-exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lwcompile.errors import ArgumentError
from lwcompile.train.checkpoint import read_checkpoint
from lwcompile.train.data import add_noise
from lwcompile.train.distill import distill
from lwcompile.train.schedule import cosine, schedule_for
from lwcompile.train.validation import validate, validation_pairs
from tests.helpers import small_dncnn_and_light

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    return small_dncnn_and_light()


def val_pairs(n=2):
    g = torch.Generator().manual_seed(9)
    clean = torch.rand(n, 1, 1, 32, 32, generator=g)
    return [(add_noise(25)(c, torch.Generator().manual_seed(i)), c) for i, c in enumerate(clean)]


def test_validate_scores_with_skimage():
    clean = torch.full((1, 1, 16, 16), 0.5)
    scores = validate(lambda x: x + 0.1, [(clean, clean)])
    assert scores.psnr == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01), float32 x
    image = torch.rand(1, 3, 16, 16)
    near = validate(lambda x: x + 1e-4, [(image, image)])  # RGB: SSIM over the channel axis
    assert near.ssim == pytest.approx(1.0, abs=1e-3) and len(near.per_image) == 1


def test_validation_pairs_from_a_folder_are_fixed(tmp_path):
    from PIL import Image

    Image.fromarray((torch.rand(40, 50) * 255).byte().numpy()).save(tmp_path / "a.png")
    a = validation_pairs(tmp_path, channels=1, degrade=add_noise(25), size=32)
    b = validation_pairs(tmp_path, channels=1, degrade=add_noise(25), size=32)
    assert a[0][0].shape == (1, 1, 32, 32) and torch.equal(a[0][0], b[0][0])
    with pytest.raises(ArgumentError, match="degrade"):
        validation_pairs(tmp_path, channels=1)


def test_cosine_schedule():
    f = cosine(10)
    assert f(0) == 1 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0)
    assert cosine(10, warmup=2)(0) == 0.5
    halfway = 0.5 * (1 + math.cos(math.pi / 2))
    assert schedule_for("distill", "cosine", 8)(4) == pytest.approx(halfway)
    with pytest.raises(ArgumentError, match="lr_schedule"):
        schedule_for("distill", "linear", 8)


def test_distill_validates_keeps_the_best_and_resumes_exactly(pair, tmp_path):
    teacher, light = pair
    data = torch.rand(8, 1, 40, 40)
    seen = []
    kw = dict(data=data, degrade=add_noise(25), batch_size=4, crop=24, progress=False,
              lr_schedule="cosine", ema=0.9, val_data=val_pairs(), val_every=2,
              checkpoint_every=3, bn_batches=2, seed=1)
    straight = distill(copy.deepcopy(light), teacher, steps=6, checkpoint=tmp_path / "a.pt",
                       best_checkpoint=tmp_path / "best_a.pt",
                       on_validation=lambda step, s: seen.append((step, s.psnr)), **kw)
    assert [step for step, _ in seen] == [2, 4, 6]
    best = torch.load(tmp_path / "best_a.pt", weights_only=True)
    assert best["psnr"] == max(p for _, p in seen) and best["step"] in (2, 4, 6)
    assert [h["step"] for h in read_checkpoint(tmp_path / "a.pt")["history"]] == [2, 4, 6]

    distill(copy.deepcopy(light), teacher, steps=6, checkpoint=tmp_path / "b.pt",
            stop_when=lambda: read_checkpoint(tmp_path / "b.pt")["step"] >= 3
            if (tmp_path / "b.pt").exists() else False, **kw)
    assert read_checkpoint(tmp_path / "b.pt")["step"] == 3
    resumed = distill(copy.deepcopy(light), teacher, steps=6, checkpoint=tmp_path / "b.pt",
                      **kw)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["step"] for h in read_checkpoint(tmp_path / "b.pt")["history"]] == [2, 4, 6]


def test_batch_norm_statistics_are_reestimated_at_the_end(pair):
    teacher, light = pair
    kw = dict(data=torch.rand(8, 1, 40, 40), degrade=add_noise(25), batch_size=4, crop=24,
              progress=False, steps=3, seed=2)
    kept = distill(copy.deepcopy(light), teacher, bn_batches=0, **kw)
    fresh = distill(copy.deepcopy(light), teacher, bn_batches=3, **kw)
    weights = [k for k in kept.state_dict() if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(kept.state_dict()[k], fresh.state_dict()[k]) for k in weights)
    means = [k for k in kept.state_dict() if k.endswith("running_mean")]
    assert means and not torch.equal(kept.state_dict()[means[0]], fresh.state_dict()[means[0]])
