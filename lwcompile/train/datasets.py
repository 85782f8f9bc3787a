"""Image folders as ``torch.utils.data`` datasets: random crops of images of any size.

A folder of DIV2K-style photographs does not fit in memory as tensors, so each image is read
when a crop of it is drawn. Every item is addressed by ``(index, seed)``: the crop position,
the flips and any degradation noise come from that seed alone, and ``step_loader`` draws the
keys of step ``s`` from a generator seeded by ``(seed, rank, s)``. So a DataLoader with any
number of workers gives the same batch for the same step, and a resumed run sees exactly the
batches an uninterrupted one would have.

    train = ImageFolder("DIV2K_train_HR", crop=96, channels=3,
                        degrade=compose(gaussian_blur(1.0), jpeg(40)))
    pairs = PairedFolders("LR_x2", "HR", scale=2, crop=96)   # names and sizes checked
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ArgumentError, LwCompileError
from .data import IMAGE_SUFFIXES, Degrade, step_generator, to_channels

Key = tuple[int, int]


def image_files(folder: str | Path) -> list[Path]:
    """The image files in ``folder``, sorted by name; a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LwCompileError(f"{folder} is not a folder: pass a folder of images "
                             f"({'/'.join(IMAGE_SUFFIXES)})")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise LwCompileError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    return paths


def read_image(path: Path, channels: int) -> Tensor:
    """One image file as a CxHxW float tensor in [0, 1], through Pillow."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise LwCompileError("reading image files needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            image.load()
            array = np.array(image.convert("RGB") if image.mode not in ("L", "RGB")
                             else image)
    except Exception as exc:
        raise LwCompileError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") \
            from exc
    if array.ndim == 2:
        array = array[..., None]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255
    return to_channels(tensor, channels)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:
        raise LwCompileError(f"cannot read the image {path}: {type(exc).__name__}: {exc}") \
            from exc
    return height, width


def _crop_and_flip(images: list[Tensor], scales: list[int], crop: int | None,
                   generator: torch.Generator, flips: bool, path: Path) -> list[Tensor]:
    """The same random window (``crop`` at the largest size) and flips of aligned images,
    ``images[i]`` being ``max(scales) // scales[i]`` times smaller than the largest."""
    top_scale = max(scales)
    if crop is not None:
        h, w = images[scales.index(top_scale)].shape[-2:]
        if h < crop or w < crop:
            raise LwCompileError(f"crop {crop} is larger than the image {path} ({h}x{w})")
        top = int(torch.randint((h - crop) // top_scale + 1, (1,), generator=generator))
        left = int(torch.randint((w - crop) // top_scale + 1, (1,), generator=generator))
        windows = []
        for img, s in zip(images, scales, strict=True):
            side = crop * s // top_scale
            windows.append(img[..., top * s:top * s + side, left * s:left * s + side])
        images = windows
    if flips:
        horizontal, vertical = (torch.rand(2, generator=generator) < 0.5).tolist()
        dims = [d for d, flip in ((-1, horizontal), (-2, vertical)) if flip]
        if dims:
            images = [img.flip(dims) for img in images]
    return [img.contiguous() for img in images]


class ImageFolder(Dataset):
    """Random ``crop`` x ``crop`` windows (with random flips) of the images in a folder.

    An item is ``dataset[(index, seed)]`` (a plain index means seed 0): the clean crop, or,
    with ``degrade``, the pair (degraded crop, clean crop), the degradation's noise seeded by
    the key as well. Images are read when drawn, so the folder may hold any number of images
    of any size (each at least ``crop`` on both sides)."""

    def __init__(self, folder: str | Path, *, crop: int = 48, channels: int = 3,
                 flips: bool = True, degrade: Degrade | None = None) -> None:
        if not isinstance(crop, int) or crop < 1:
            raise ArgumentError(f"ImageFolder: crop must be a positive int, got {crop!r}")
        self.paths = image_files(folder)
        self.crop, self.channels, self.flips, self.degrade = crop, channels, flips, degrade

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | Key) -> Tensor | tuple[Tensor, Tensor]:
        index, seed = (key, 0) if isinstance(key, int) else key
        generator = step_generator(seed, index, 0)
        path = self.paths[index]
        (clean,) = _crop_and_flip([read_image(path, self.channels)], [1], self.crop,
                                  generator, self.flips, path)
        if self.degrade is None:
            return clean
        return self.degrade(clean[None], generator)[0], clean


class PairedFolders(Dataset):
    """Aligned (low, high) crops from two folders of the same image names, ``high`` images
    being ``scale`` times the size of ``low`` ones (1 for denoising or deblurring pairs).

    Names (without suffix) and sizes are checked when the dataset is made: a missing
    partner or a size that is not ``scale`` times its partner's is an ``LwCompileError``
    naming the file. ``crop`` is the window on the high image (a multiple of ``scale``);
    None gives whole images (a batch needs images of one size then)."""

    def __init__(self, low: str | Path, high: str | Path, *, scale: int = 1,
                 crop: int | None = 48, channels: int = 3, flips: bool = True) -> None:
        if not isinstance(scale, int) or scale < 1:
            raise ArgumentError(f"PairedFolders: scale must be a positive int, got {scale!r}")
        if crop is not None and (not isinstance(crop, int) or crop < scale or crop % scale):
            raise ArgumentError(f"PairedFolders: crop must be a multiple of scale={scale}, "
                                f"got {crop!r}")
        lows = {p.stem: p for p in image_files(low)}
        highs = {p.stem: p for p in image_files(high)}
        unpaired = sorted(set(lows) ^ set(highs))
        if unpaired:
            name = unpaired[0]
            lonely, other = (low, high) if name in lows else (high, low)
            raise LwCompileError(f"paired folders: {name!r} is in {lonely} but not in {other} "
                                 f"({len(unpaired)} unpaired name(s)): each image needs its "
                                 "partner of the same name")
        self.pairs = [(lows[n], highs[n]) for n in sorted(lows)]
        for low_path, high_path in self.pairs:
            (lh, lw), (hh, hw) = image_size(low_path), image_size(high_path)
            if (lh * scale, lw * scale) != (hh, hw):
                raise LwCompileError(f"paired folders: {high_path} is {hh}x{hw} but its "
                                     f"partner {low_path} is {lh}x{lw}; with scale={scale} "
                                     f"it must be {lh * scale}x{lw * scale}")
        self.scale, self.crop, self.channels, self.flips = scale, crop, channels, flips

    def __len__(self) -> int:
        return len(self.pairs)

    def whole(self, index: int) -> tuple[Tensor, Tensor]:
        """The whole (low, high) images of pair ``index``."""
        low_path, high_path = self.pairs[index]
        return read_image(low_path, self.channels), read_image(high_path, self.channels)

    def __getitem__(self, key: int | Key) -> tuple[Tensor, Tensor]:
        index, seed = (key, 0) if isinstance(key, int) else key
        low, high = _crop_and_flip(list(self.whole(index)), [1, self.scale], self.crop,
                                   step_generator(seed, index, 0), self.flips,
                                   self.pairs[index][1])
        return low, high


class StepBatches(Sampler):
    """Endless batches of ``(index, seed)`` keys, step ``s``'s drawn from a generator seeded
    by ``(seed, rank, s)`` alone, the first being step ``start``."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0,
                 start: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.start = rank, start

    def __iter__(self) -> Iterator[list[Key]]:
        for step in itertools.count(self.start):
            generator = step_generator(self.seed, self.rank, step)
            picks = torch.randint(self.size, (self.batch_size,), generator=generator).tolist()
            keys = torch.randint(2**31 - 1, (self.batch_size,), generator=generator).tolist()
            yield list(zip(picks, keys, strict=True))


def step_loader(dataset: ImageFolder | PairedFolders, *, batch_size: int, seed: int = 0,
                rank: int = 0, start: int = 0, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader over ``dataset`` whose batch at step ``s`` depends only on
    ``(seed, rank, s)``, whatever the number of ``workers``."""
    return DataLoader(dataset, batch_sampler=StepBatches(len(dataset), batch_size, seed, rank,
                                                         start),
                      num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)
