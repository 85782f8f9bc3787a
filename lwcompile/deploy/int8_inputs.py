"""Calibration and held-out inputs for int8 export, from the data ``distill`` takes.

``data`` is None (scikit-image's bundled images: ``TRAIN`` to calibrate, ``HELD_OUT`` to
measure), a folder, an (N,C,H,W) tensor or a DataLoader, read through ``train.data``; the
clean crops go through distill's ``degrade`` (noise for a denoiser). Crops are taken at the
example input's size and fill the image argument (the first tensor); a model's other
inputs (a mask, a noise level) keep their example values. Data that cannot fill it (other
channels, rank, smaller images) raises ``CalibrationDataError``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import LwCompileError
from ..train.data import (
    HELD_OUT,
    TRAIN,
    Degrade,
    batches,
    load_images,
    random_crops,
    step_generator,
)
from .int8 import CalibrationDataError


def image_argument(example_inputs: Sequence[Any]) -> tuple[int, Tensor]:
    """The position and value of the image input: the first tensor argument, 4-D."""
    for i, a in enumerate(example_inputs):
        if isinstance(a, Tensor):
            if a.dim() != 4:
                raise CalibrationDataError(
                    f"int8 calibration needs a 4-D (N,C,H,W) image as the first tensor input, "
                    f"got shape {tuple(a.shape)}")
            return i, a
    raise CalibrationDataError("int8 calibration needs a tensor input; the example has none")


def _fit(batch: Tensor, example: Tensor, source: str) -> Tensor:
    """``batch`` as inputs shaped like ``example``: channels and rank must match, larger
    images are cropped at the top left, smaller ones refused."""
    if batch.dim() != 4:
        raise CalibrationDataError(
            f"{source} batches must be (N,C,H,W) like the example input "
            f"{tuple(example.shape)}, got shape {tuple(batch.shape)}")
    c, h, w = example.shape[1:]
    if batch.shape[1] != c:
        raise CalibrationDataError(
            f"{source} has {batch.shape[1]} channels but the model reads {c}")
    if batch.shape[2] < h or batch.shape[3] < w:
        raise CalibrationDataError(
            f"{source} images are {batch.shape[2]}x{batch.shape[3]}, smaller than the "
            f"example input's {h}x{w}")
    return batch[:, :, :h, :w].to(example.dtype)


def _as_inputs(images: Iterable[Tensor], example_inputs: Sequence[Any], position: int,
               count: int, degrade: Degrade | None = None, seed: int = 0) -> list[tuple]:
    """``count`` input tuples: each image batch passed through ``degrade`` (noise seeded by
    the batch's index), split to the example's batch size, put in the image's place among
    the example's other arguments."""
    n = example_inputs[position].shape[0]
    out: list[tuple] = []
    for step, batch in enumerate(images):
        if degrade is not None:
            batch = degrade(batch, step_generator(seed + 1, 0, step))
        for start in range(0, batch.shape[0] - n + 1, n):
            args = list(example_inputs)
            args[position] = batch[start:start + n].contiguous()
            out.append(tuple(args))
            if len(out) == count:
                return out
    return out


class _RankChecked:
    """A loader whose batches are checked to be 4-D before ``batches`` converts channels."""

    def __init__(self, loader: Iterable, example: Tensor, source: str) -> None:
        self.loader, self.example, self.source = loader, example, source

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(images, Tensor) and images.dim() != 4:
                _fit(images, self.example, self.source)  # raises, naming the shapes
            yield batch


def _bundled_crops(names: tuple[str, ...], example: Tensor, seed: int,
                   source: str) -> Iterator[Tensor]:
    """Crops of scikit-image's bundled images ``names``, those large enough for the example
    input's size (``batches`` would refuse a crop larger than any one of them)."""
    size, channels = max(example.shape[2:]), example.shape[1]
    if channels not in (1, 3):
        raise CalibrationDataError(
            f"the model reads {channels} channels and the bundled {source} images are grey "
            f"or RGB: pass calibration= data with {channels} channels, as the deployment "
            "will feed it (an image with its noise map, say)")
    images = [i for i in load_images(names, channels) if min(i.shape[-2:]) >= size]
    if not images:
        raise CalibrationDataError(
            f"no {source} image is {size}x{size} or larger: pass calibration data of the "
            "example input's size")
    for step in itertools.count():
        crops = random_crops(images, example.shape[0], size, step_generator(seed, 0, step))
        yield _fit(crops, example, source)


def _crops(data: Any, example: Tensor, seed: int, source: str) -> Iterable[Tensor]:
    channels, size = example.shape[1], max(example.shape[2:])
    if data is None:
        return _bundled_crops(TRAIN, example, seed, "default calibration")
    if not isinstance(data, (str, Path, Tensor)):  # a DataLoader
        return (_fit(b, example, source)
                for b in batches(_RankChecked(data, example, source), channels=channels))
    if isinstance(data, Tensor) and data.dim() == 4 and data.shape[1] not in (1, 3, channels):
        raise CalibrationDataError(
            f"{source} has {data.shape[1]} channels but the model reads {channels}")
    try:
        stream = batches(data, channels=channels, batch_size=example.shape[0], crop=size,
                         seed=seed)
        return (_fit(b, example, source) for b in stream)
    except CalibrationDataError:
        raise
    except LwCompileError as exc:
        raise CalibrationDataError(f"{source}: {exc}") from exc


def _before_degrade(example: Tensor, degrade: Degrade | None) -> Tensor:
    """A tensor of the size whose crops ``degrade`` turns into the example's size: the
    example itself, or twice its size for a bicubic x2 downscale (an SR model's input)."""
    if degrade is None:
        return example
    h, w = example.shape[-2:]
    probe_h, probe_w = degrade(example[:1].new_zeros(example[:1].shape),
                               step_generator(0, 0, 0)).shape[-2:]
    if (probe_h, probe_w) == (h, w):
        return example
    size = (h * h // max(probe_h, 1), w * w // max(probe_w, 1))
    source = example.new_zeros(*example.shape[:-2], *size)
    if tuple(degrade(source[:1], step_generator(0, 0, 0)).shape[-2:]) != (h, w):
        raise CalibrationDataError(
            f"degrade turns {h}x{w} crops into {probe_h}x{probe_w}: no crop size gives the "
            f"example input's {h}x{w}")
    return source


def calibration_inputs(data: Any, example_inputs: Sequence[Any], count: int,
                       degrade: Degrade | None = None) -> list[tuple]:
    """``count`` model inputs from ``data`` (as ``distill`` takes it, with its ``degrade``)
    at the example's size: crops taken at the size ``degrade`` turns into it."""
    position, example = image_argument(example_inputs)
    example = _before_degrade(example, degrade)
    try:
        inputs = _as_inputs(_crops(data, example, 0, "calibration data"), example_inputs,
                            position, count, degrade)
    except CalibrationDataError:
        raise
    except LwCompileError as exc:
        raise CalibrationDataError(f"calibration data: {exc}") from exc
    if not inputs:
        raise CalibrationDataError("the calibration data gave no batch")
    return inputs


def evaluation_inputs(data: Any, example_inputs: Sequence[Any], count: int,
                      skip: int, degrade: Degrade | None = None) -> list[tuple]:
    """``count`` held-out inputs: crops of ``HELD_OUT`` images when ``data`` is None, else
    crops of ``data`` drawn with another seed (a DataLoader: the batches after the first
    ``skip``, those the calibration used, when it has more)."""
    position, example = image_argument(example_inputs)
    example = _before_degrade(example, degrade)
    if data is None:
        stream = _bundled_crops(HELD_OUT, example, 1, "held-out")
        return _as_inputs(stream, example_inputs, position, count, degrade, seed=1)
    if not isinstance(data, (str, Path, Tensor)):
        stream = _crops(data, example, 0, "evaluation data")
        everything = _as_inputs(stream, example_inputs, position, skip + count, degrade,
                                seed=1)
        held = everything[skip:] or everything
        return held[:count]
    return _as_inputs(_crops(data, example, 1, "evaluation data"), example_inputs, position,
                      count, degrade, seed=1)
