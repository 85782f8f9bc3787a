"""Which cheap x2 upsampler is safe? Standard sub-pixel vs depthwise-separable vs bilinear+LIST.

The paper (see /work/shared/paper/NOTES.md) says a depthwise-separable kernel inside a
sub-pixel upsampler produces periodic (grid) artifacts, while resize-then-LIST does not.
Three small x2 SR nets share one body and differ only in the upsampler; each is trained for
the same CPU budget, then scored on held-out images by PSNR and by the share of the
residual's spectral energy (output minus bilinear upsampling of the input) that sits at the
2-periodic frequencies: FFT bins at multiples of N/2 in either axis, DC excluded.

    nice -n 10 .venv/bin/python -m benchmarks.subpixel_study --budget-seconds 100
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import RESULTS, SR2, held_out, score, train_supervised
from lwcompile.nn import LIST

SCALE = 2


def upsampler(kind: str, c: int) -> nn.Module:
    if kind == "subpixel":
        return nn.Sequential(nn.Conv2d(c, 4 * c, 3, padding=1), nn.PixelShuffle(SCALE))
    if kind == "dw-subpixel":
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, 4 * c, 1),
                             nn.PixelShuffle(SCALE))
    if kind == "bilinear+LIST":
        return nn.Sequential(nn.Upsample(scale_factor=SCALE, mode="bilinear",
                                         align_corners=False), LIST(c, c))
    raise ValueError(kind)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.PReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SmallSR(nn.Module):
    """Head, residual blocks, the upsampler under study, PReLU, tail."""

    def __init__(self, kind: str, c: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.PReLU())
        self.body = nn.Sequential(*(Block(c) for _ in range(blocks)))
        self.up = nn.Sequential(upsampler(kind, c), nn.PReLU())
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(x)
        return self.tail(self.up(h + self.body(h)))


def periodic_energy(y: Tensor, x: Tensor) -> float:
    """Share of the residual's energy (y minus bilinear-upsampled x) at the 2-periodic bins."""
    r = (y - F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False))[0]
    power = torch.fft.fft2(r.double()).abs().pow(2).sum(0)
    h, w = power.shape
    mask = torch.zeros_like(power, dtype=torch.bool)
    mask[::h // SCALE, ::w // SCALE] = True
    mask[0, 0] = False
    total = power.sum() - power[0, 0]
    return float(power[mask].sum() / total)


def side_by_side(panels: dict[str, Tensor], path, zoom: int = 4) -> None:
    """Nearest-neighbour zoomed crops in a row, labelled when PIL is available."""
    tiles = [np.kron(t[0].permute(1, 2, 0).clamp(0, 1).numpy(), np.ones((zoom, zoom, 1)))
             for t in panels.values()]
    gap = np.ones((tiles[0].shape[0], 4, 3))
    row = np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)
    image = (row * 255).round().astype(np.uint8)
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        from skimage.io import imsave
        imsave(path, image)
        return
    canvas = Image.new("RGB", (image.shape[1], image.shape[0] + 16), "white")
    canvas.paste(Image.fromarray(image), (0, 16))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(panels):
        draw.text((i * (tiles[0].shape[1] + 4) + 2, 2), name, fill="black")
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=100.0,
                        help="CPU seconds of training per network")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    pairs = held_out(SR2)
    kinds = ("subpixel", "dw-subpixel", "bilinear+LIST")
    rows: dict[str, dict] = {}
    outputs: dict[str, Tensor] = {}
    crop = (slice(None), slice(None), slice(96, 160), slice(96, 160))
    x0, clean0 = pairs[0]
    outputs["bicubic"] = F.interpolate(x0, scale_factor=SCALE, mode="bicubic",
                                       align_corners=False)[crop]
    with torch.no_grad():
        rows["ground truth"] = {"periodic_energy": float(np.mean(
            [periodic_energy(c, x) for x, c in pairs]))}
    for kind in kinds:
        torch.manual_seed(args.seed)
        model = SmallSR(kind)
        c0, t0 = time.process_time(), time.time()
        steps = train_supervised(model, SR2, args.budget_seconds, seed=args.seed,
                                 log=lambda s, k=kind: print(k, s, flush=True))
        quality = score(model, SR2, pairs)
        with torch.no_grad():
            energy = float(np.mean([periodic_energy(model(x).clamp(0, 1), x) for x, _ in pairs]))
            outputs[kind] = model(x0).clamp(0, 1)[crop]
        rows[kind] = {"params": sum(p.numel() for p in model.parameters()), "steps": steps,
                      **quality, "periodic_energy": energy,
                      "cpu_seconds": round(time.process_time() - c0, 1),
                      "wall_seconds": round(time.time() - t0, 1)}
        print(kind, rows[kind], flush=True)
    outputs["ground truth"] = clean0[crop]
    side_by_side(outputs, RESULTS / "subpixel_study.png")
    print(f"\n{'upsampler':<14} {'params':>7} {'steps':>6} {'PSNR':>7} {'SSIM':>6} "
          f"{'periodic energy':>16}")
    for name, r in rows.items():
        print(f"{name:<14} {r.get('params', ''):>7} {r.get('steps', ''):>6} "
              f"{r.get('psnr', float('nan')):>7.2f} {r.get('ssim', float('nan')):>6.3f} "
              f"{r['periodic_energy']:>16.2e}")
    (RESULTS / "subpixel_study.json").write_text(json.dumps(
        {"budget_cpu_seconds_each": args.budget_seconds, "seed": args.seed,
         "held_out": "centre 256x256 crops of lwcompile.data.HELD_OUT, x2 bicubic (antialiased)",
         "periodic_energy": "share of FFT energy of (output - bilinear(input)) at bins that "
                            "are multiples of N/2, DC excluded; mean over images",
         "crop_png": f"HELD_OUT[0] rows/cols 96:160, x4 nearest; panels {list(outputs)}",
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
