"""Calibration and training data: whatever the user has, as an endless stream of batches.

Layer-wise initialisation and distillation only need images the teacher has seen the like
of, not labels. Without user data we use the natural images bundled with scikit-image (no
download), split into a fixed ``TRAIN`` list and a disjoint ``HELD_OUT`` list for evaluation.
Random crops are drawn with a generator reseeded from ``(seed, rank, step)``, so the batch of
any step can be recomputed: that is what makes resumed training bit-exact.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arguments as check
from ..errors import ArgumentError, LwCompileError

#: scikit-image images used for calibration and training (bundled with the package).
TRAIN = ("astronaut", "brick", "camera", "coffee", "coins", "gravel", "immunohistochemistry",
         "moon", "page", "rocket", "text")
#: Disjoint images kept for evaluation only.
HELD_OUT = ("chelsea", "clock", "grass", "motorcycle")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_INSTALL = "pip install 'lwcompile[data]'"
# ITU-R BT.709 luma, as skimage.color.rgb2gray
_LUMA = torch.tensor([0.2125, 0.7154, 0.0721]).view(1, 3, 1, 1)

#: a degradation maps a clean batch (and a generator, for noise) to the model's input
Degrade = Callable[[Tensor, torch.Generator], Tensor]


def _skimage_data():
    try:
        import skimage.data
    except ImportError as e:
        raise LwCompileError(
            f"no data given and scikit-image (the default images) is not installed: {_INSTALL}, "
            "or pass a folder of images, a tensor (N,C,H,W) or a DataLoader") from e
    return skimage.data


def _to_tensor(array: np.ndarray) -> Tensor:
    """HxW or HxWxC array (uint8, bool or float) -> float CxHxW in [0, 1]."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[..., None]
    a = a[..., :3]  # drop alpha
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


def to_channels(x: Tensor, channels: int) -> Tensor:
    """Convert a (N,)C,H,W batch to ``channels`` (1 = grey, 3 = RGB); floats in [0, 1]."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    x = x.float()
    c = x.shape[-3]
    if c == channels:
        return x
    if c == 3 and channels == 1:
        return (x.unsqueeze(0) if x.dim() == 3 else x).mul(_LUMA).sum(1, keepdim=True).view(
            *x.shape[:-3], 1, *x.shape[-2:])
    if c == 1 and channels == 3:
        return x.expand(*x.shape[:-3], 3, *x.shape[-2:]).contiguous()
    raise LwCompileError(f"cannot convert {c}-channel images to {channels} channels")


@functools.lru_cache(maxsize=8)
def load_images(names: tuple[str, ...] = TRAIN, channels: int = 1) -> tuple[Tensor, ...]:
    """scikit-image's bundled images by name, as CxHxW float tensors in [0, 1]."""
    names = check.strings("load_images", "names", names)
    channels = check.integer("load_images", "channels", channels, minimum=1)
    data = _skimage_data()
    out = []
    for name in names:
        if name != "motorcycle" and not callable(getattr(data, name, None)):
            raise ArgumentError(f"load_images: {name!r} is not one of scikit-image's "
                                      f"bundled images (e.g. {', '.join(TRAIN)})")
        array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
        out.append(to_channels(_to_tensor(array), channels))
    return tuple(out)


def load_folder(folder: str | Path, channels: int = 1) -> tuple[Tensor, ...]:
    """Every image file in ``folder`` (sorted by name), via scikit-image or else PIL."""
    folder = check.path("load_folder", "folder", folder)
    channels = check.integer("load_folder", "channels", channels, minimum=1)
    if not Path(folder).is_dir():
        raise LwCompileError(f"{folder} is not a folder: pass a folder of images "
                             f"({'/'.join(IMAGE_SUFFIXES)})")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise LwCompileError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    try:
        from skimage.io import imread
    except ImportError:
        try:
            from PIL import Image
        except ImportError as e:
            raise LwCompileError(
                f"reading image files needs scikit-image or PIL: {_INSTALL}") from e

        def imread(p):
            return np.asarray(Image.open(p))

    return tuple(to_channels(_to_tensor(imread(p)), channels) for p in paths)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A generator determined by ``(seed, rank, step)`` alone: batches are recomputable."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def random_crops(images: Iterable[Tensor], n: int, size: int | None,
                 generator: torch.Generator) -> Tensor:
    """``n`` random ``size``x``size`` crops from randomly chosen images (whole if None)."""
    images = list(images)
    picks = torch.randint(len(images), (n,), generator=generator).tolist()
    crops = []
    for i in picks:
        img = images[i]
        h, w = img.shape[-2:]
        if size is None:
            crops.append(img)
            continue
        if h < size or w < size:
            raise LwCompileError(f"crop {size} is larger than an image of {h}x{w}")
        top = int(torch.randint(h - size + 1, (1,), generator=generator))
        left = int(torch.randint(w - size + 1, (1,), generator=generator))
        crops.append(img[..., top:top + size, left:left + size])
    return torch.stack(crops)


def batches(
    data: str | Path | Tensor | Iterable | None = None,
    *,
    channels: int = 1,
    batch_size: int = 16,
    crop: int | None = 40,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
    with_targets: bool = False,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor | None]]:
    """Endless batches (N,channels,crop,crop) in [0, 1], the first one being step ``start``.

    ``data`` is None (scikit-image's ``TRAIN`` images), a folder of images (read when drawn,
    any size: ``datasets.ImageFolder``), an ``ImageFolder`` or ``PairedFolders`` dataset
    (the low image of each pair is the model input), a tensor (N,C,H,W) or any iterable of
    batches such as a DataLoader (a tuple/list batch gives its first element). Folders,
    datasets, images and tensors give random crops, different for each ``rank``, loaded by
    ``workers`` DataLoader processes for folders and datasets; a DataLoader is replayed as
    is, cycled over epochs, and skips ``start`` batches on resume (exact only if the
    loader's order is reproducible).

    ``with_targets`` gives ``(batch, target)`` pairs instead: the second element of a pair
    batch (the high image of ``PairedFolders``, the clean image of an ``ImageFolder`` with a
    degradation, a DataLoader's second tensor), None where the data has none.
    """
    from .datasets import ImageFolder, PairedFolders, step_loader  # they import this module

    if isinstance(data, (str, Path)) and crop is not None:
        data = ImageFolder(data, crop=crop, channels=channels)
    if isinstance(data, (ImageFolder, PairedFolders)):
        loader = step_loader(data, batch_size=batch_size, seed=seed, rank=rank, start=start,
                             workers=workers, pin_memory=pin_memory)
        return _replay(loader, channels, 0, with_targets)
    if isinstance(data, Tensor) and data.dim() == 4:
        images = to_channels(data, channels)
    elif isinstance(data, Tensor):
        raise LwCompileError(f"a data tensor must be (N,C,H,W), got shape {tuple(data.shape)}")
    elif data is None:
        images = load_images(TRAIN, channels)
    elif isinstance(data, (str, Path)):
        images = load_folder(data, channels)
    elif isinstance(data, Iterable):
        return _replay(data, channels, start, with_targets)
    else:
        raise LwCompileError(f"unsupported data {type(data).__name__}: give None, a folder, "
                             "a (N,C,H,W) tensor or a DataLoader")
    if crop is not None and isinstance(images, Tensor) and min(images.shape[-2:]) <= crop:
        crop = None  # tensor of patches already: sample whole ones
    crops = (random_crops(images, batch_size, crop, step_generator(seed, rank, step))
             for step in itertools.count(start))
    return ((batch, None) for batch in crops) if with_targets else crops


def _replay(loader: Iterable, channels: int, start: int,
            with_targets: bool = False) -> Iterator[Any]:
    i = 0
    while True:
        seen = False
        for batch in loader:
            seen = True
            if i >= start:
                pair = isinstance(batch, (tuple, list))
                first = to_channels(batch[0] if pair else batch, channels)
                if not with_targets:
                    yield first
                    continue
                second = batch[1] if pair and len(batch) > 1 else None
                yield first, (to_channels(second, channels) if isinstance(second, Tensor)
                              else None)  # labels or names are no image target
            i += 1
        if not seen or iter(loader) is loader:  # empty, or a one-shot iterator: stop
            return


def image_channels(teacher: nn.Module) -> int:
    """The channels of the images ``teacher`` reads: its first conv's input channels."""
    conv = next((m for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise LwCompileError("cannot infer the image channels: pass channels=")
    return conv.in_channels


def model_inputs(data: str | Path | Tensor | Iterable | None, teacher: nn.Module,
                 channels: int | None, degrade: Degrade | None, batch_size: int,
                 crop: int | None, seed: int, start: int = 0, rank: int = 0,
                 workers: int = 0, pin_memory: bool = False
                 ) -> Iterator[tuple[int, Tensor]]:
    """(step, model input) pairs: ``batches`` of ``data`` passed through ``degrade``, whose
    noise is also seeded by the step; ``channels`` defaults to ``image_channels(teacher)``."""
    for step, x, _ in model_examples(data, teacher, channels, degrade, batch_size, crop, seed,
                                     start, rank, workers, pin_memory):
        yield step, x


def model_examples(data: str | Path | Tensor | Iterable | None, teacher: nn.Module,
                   channels: int | None, degrade: Degrade | None, batch_size: int,
                   crop: int | None, seed: int, start: int = 0, rank: int = 0,
                   workers: int = 0, pin_memory: bool = False
                   ) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """(step, model input, target) triples, as ``model_inputs`` with the clean image each
    input was made from (the crop before ``degrade``, or the data's own target: ``batches``
    with ``with_targets``); the target is None where the data has none."""
    from .datasets import PairedFolders

    if isinstance(data, PairedFolders) and degrade is not None:
        raise LwCompileError("paired folders already hold the degraded inputs: pass "
                             "degrade=None with PairedFolders")
    stream = batches(data, channels=channels or image_channels(teacher),
                     batch_size=batch_size, crop=crop, seed=seed, start=start, rank=rank,
                     workers=workers, pin_memory=pin_memory, with_targets=True)
    for step, (first, target) in enumerate(stream, start):
        if degrade is None:
            yield step, first, target
        else:
            yield step, degrade(first, step_generator(seed + 1, rank, step)), first


def add_noise(sigma: float) -> Degrade:
    """Gaussian denoising task: ``sigma`` on the 0..255 scale (25 as in DnCNN)."""
    def degrade(x: Tensor, generator: torch.Generator) -> Tensor:
        return x + sigma / 255 * torch.randn(x.shape, generator=generator)
    return degrade


def downscale(factor: int) -> Degrade:
    """Super-resolution task: anti-aliased bicubic downscaling by ``factor``."""
    def degrade(x: Tensor, generator: torch.Generator) -> Tensor:
        return F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True,
                             align_corners=False).clamp(0, 1)
    return degrade
