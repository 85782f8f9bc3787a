"""Image-folder datasets (random crops, flips, pairs checked by name and size), the
step-seeded DataLoader that keeps resume exact, and the composable degradations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lwcompile.errors import ArgumentError, LwCompileError
from lwcompile.train.data import add_noise, batches, downscale
from lwcompile.train.datasets import ImageFolder, PairedFolders, step_loader
from lwcompile.train.degradations import compose, gaussian_blur, jpeg

pytestmark = pytest.mark.usefixtures("one_thread")


def write(path, height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels == 3 else (height, width)
    Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path):
    for i, (h, w) in enumerate([(40, 52), (64, 48), (37, 90)]):
        write(tmp_path / f"img{i}.png", h, w, seed=i)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder_gives_seeded_crops_of_images_of_any_size(folder):
    data = ImageFolder(folder, crop=32, channels=1)
    assert len(data) == 3
    a, b = data[(1, 7)], data[(1, 7)]
    assert a.shape == (1, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, data[(1, 8)])
    noisy, clean = ImageFolder(folder, crop=32, degrade=add_noise(25))[(0, 3)]
    assert noisy.shape == clean.shape == (3, 32, 32)
    assert 0.05 < float((noisy - clean).std()) < 0.15  # sigma 25/255
    with pytest.raises(LwCompileError, match="larger than the image"):
        ImageFolder(folder, crop=60)[(0, 0)]


def test_empty_missing_and_unreadable_folders_are_refused(tmp_path):
    with pytest.raises(LwCompileError, match="no .*images"):
        ImageFolder(tmp_path)
    with pytest.raises(LwCompileError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(LwCompileError, match="cannot read the image .*broken.png"):
        ImageFolder(tmp_path, crop=8)[(0, 0)]


def test_paired_folders_check_names_and_sizes(tmp_path):
    low, high = tmp_path / "low", tmp_path / "high"
    low.mkdir()
    high.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        write(low / f"{name}.png", 20, 24, seed=seed)
        write(high / f"{name}.png", 40, 48, seed=seed)
    pairs = PairedFolders(low, high, scale=2, crop=16)
    x, y = pairs[(1, 5)]
    assert x.shape == (3, 8, 8) and y.shape == (3, 16, 16)
    # the low crop is the window of the high crop: compare with a whole-image downscale
    whole_low, whole_high = pairs.whole(1)
    assert whole_low.shape[-2:] == (20, 24) and whole_high.shape[-2:] == (40, 48)
    write(high / "c.png", 40, 48)
    with pytest.raises(LwCompileError, match="'c' is in .*high but not in .*low"):
        PairedFolders(low, high, scale=2)
    (high / "c.png").unlink()
    write(high / "b.png", 40, 50)
    with pytest.raises(LwCompileError, match="b.png is 40x50 .* must be 40x48"):
        PairedFolders(low, high, scale=2)
    with pytest.raises(ArgumentError, match="multiple of scale"):
        PairedFolders(low, low, scale=2, crop=15)


def test_paired_crops_are_aligned(tmp_path):
    low, high = tmp_path / "low", tmp_path / "high"
    low.mkdir()
    high.mkdir()
    big = torch.rand(3, 32, 40)
    small = big[:, ::2, ::2]  # low pixel (i, j) is high pixel (2i, 2j)
    for tensor, folder in ((big, high), (small, low)):
        array = (tensor * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / "x.png")
    pairs = PairedFolders(low, high, scale=2, crop=16, flips=False)
    for seed in range(5):
        x, y = pairs[(0, seed)]
        torch.testing.assert_close(x, y[:, ::2, ::2])


def test_the_loader_batch_of_a_step_is_the_same_with_workers_and_on_resume(folder):
    data = ImageFolder(folder, crop=24, channels=1)
    plain = [b for _, b in zip(range(3), step_loader(data, batch_size=4, seed=2), strict=False)]
    workers = [b for _, b in zip(range(3), step_loader(data, batch_size=4, seed=2, workers=2),
                                 strict=False)]
    resumed = next(iter(step_loader(data, batch_size=4, seed=2, start=2)))
    assert all(torch.equal(a, b) for a, b in zip(plain, workers, strict=True))
    assert torch.equal(resumed, plain[2]) and not torch.equal(plain[1], plain[2])
    # a folder path given as data= is read through the same dataset
    b = next(batches(folder, channels=1, batch_size=4, crop=24, seed=2, start=2))
    assert torch.equal(b, plain[2])


def test_degradations_compose_and_are_seeded():
    x = torch.rand(2, 3, 32, 32)
    flat = torch.full((1, 1, 16, 16), 0.4)
    torch.testing.assert_close(gaussian_blur(1.5)(flat, None), flat)  # a constant stays
    blurred = gaussian_blur(1.5)(x, None)
    assert blurred.shape == x.shape and float(blurred.std()) < 0.6 * float(x.std())
    compressed = jpeg(30)(x, None)
    assert compressed.shape == x.shape and 0 <= float(compressed.min())
    assert 0.01 < float((compressed - x).abs().mean()) < 0.3
    chain = compose(gaussian_blur(1.0), downscale(2), add_noise(10), jpeg(80))
    a = chain(x, torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16)
    assert torch.equal(a, chain(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, chain(x, torch.Generator().manual_seed(4)))
    with pytest.raises(ArgumentError):
        jpeg(0)
    with pytest.raises(ArgumentError):
        gaussian_blur(-1)
    with pytest.raises(ArgumentError):
        compose()


def test_paired_folders_are_not_degraded_again(tmp_path):
    from lwcompile.train.data import model_inputs

    for folder in ("low", "high"):
        (tmp_path / folder).mkdir()
        write(tmp_path / folder / "a.png", 32, 32)
    pairs = PairedFolders(tmp_path / "low", tmp_path / "high", crop=16, channels=1)
    with pytest.raises(LwCompileError, match="degrade=None"):
        next(model_inputs(pairs, None, 1, add_noise(25), 2, 16, 0))
    step, x = next(model_inputs(pairs, None, 1, None, 2, 16, 0))
    assert step == 0 and x.shape == (2, 1, 16, 16)
