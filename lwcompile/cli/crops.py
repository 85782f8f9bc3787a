"""Output crops for ``lwcompile report --html``: what the models make of one image.

A centre crop of an image is fed to the lightened model (and to the original, if given) and
the input and outputs become PNGs for the page. Crops are an illustration, not a check: when
they cannot be made (no image reader, a model that does not take 1 or 3 channels, a forward
that fails) a note goes to stderr and the page is written without them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LwCompileError, one_line
from ..html_report import to_png


def output_crops(student: nn.Module, teacher: nn.Module | None, *, image: Path | None,
                 data: str | None, size: int) -> list[tuple[str, bytes]] | None:
    """(caption, PNG) for the input crop, the teacher's and the student's outputs on it.

    The image is ``image``, else the first image of the folder ``data``, else scikit-image's
    camera; None (with a note on stderr) if no crop can be made."""
    picture = _source_image(image, data)
    if picture is None:
        return None
    from ..train.data import to_channels

    conv = next((m for m in student.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv else picture.shape[0]
    if channels not in (1, 3):
        print(f"lwcompile: no output crops: the model takes {channels}-channel input, "
              "not an image", file=sys.stderr)
        return None
    x = to_channels(picture, channels)
    h, w = x.shape[-2:]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[None, :, top:top + size, left:left + size].contiguous()
    crops = [(f"input {size}x{size}", to_png(x))]
    pairs = [("teacher (original)", teacher)] if teacher is not None else []
    pairs.append(("student (lightened)", student))
    for label, model in pairs:
        try:
            with torch.no_grad():
                out = model.eval()(x)
        except Exception as exc:
            print(f"lwcompile: no output crops: {label} fails on a {size}x{size} crop: "
                  f"{one_line(exc)}", file=sys.stderr)
            return None
        while isinstance(out, tuple | list):
            out = out[0]
        crops.append((f"{label} {out.shape[-1]}x{out.shape[-2]}", to_png(out)))
    return crops


def _source_image(image: Path | None, data: str | None) -> torch.Tensor | None:
    """The image to crop (CxHxW in [0, 1]): ``image``, the first of ``data``, or skimage's
    camera; None if scikit-image, needed for the default, is missing."""
    if data is not None:
        from ..train.data import load_folder

        return load_folder(data, channels=3)[0]
    if image is not None:
        return _read_image(image)
    try:
        import skimage.data
    except ImportError:
        print("lwcompile: no output crops (scikit-image is not installed; pass --image)",
              file=sys.stderr)
        return None
    return torch.from_numpy(skimage.data.camera()).float().div(255)[None]


def _read_image(path: Path) -> torch.Tensor:
    """An image file as a float CxHxW tensor in [0, 1], via scikit-image or else PIL."""
    try:
        from skimage.io import imread
    except ImportError:
        try:
            from PIL import Image
        except ImportError as exc:
            raise LwCompileError("--image needs scikit-image or PIL to read images") from exc

        def imread(p: Path) -> Any:
            return Image.open(p).convert("RGB")
    try:
        array = torch.from_numpy(np.array(imread(path)))
    except Exception as exc:
        raise LwCompileError(f"--image {path}: cannot read it as an image: "
                             f"{one_line(exc)}") from exc
    if array.dim() == 2:
        array = array[..., None]
    array = array[..., :3].permute(2, 0, 1)
    return array.float() / 255 if array.dtype == torch.uint8 else array.float()
