"""Row-stripe (tiled) execution: one image run as overlapping horizontal stripes, measured.

    python -m benchmarks.row_stripes
    python -m benchmarks.row_stripes --precision fp32 --stripes 1 2 3 --runs 31

The light model's chain of thin ops makes one pass over a full-size activation per op. Run on
a stripe of rows at a time instead, each op's output is smaller and may still be in cache
when the next op reads it. ``RowStripes`` cuts the input into ``n`` stripes, each widened by
a halo of the network's receptive radius (the sum of its convs' reaches, every conv stride
1), runs the network on each and keeps each stripe's own rows; the halo makes the result the
whole image's. Exported as one program (torch.export unrolls the loop), the runtime runs the
stripes' ops in program order, one stripe after the other. The cost is the halo rows, computed
twice.

For the light DnCNN-17 (the trained teacher, ``lighten`` of it, seeded) the benchmark exports
the whole-image model and its striped forms to onnxruntime and ExecuTorch/XNNPACK, fp32 and
int8, checks each striped export against the same runtime's whole-image export, times all of
them interleaved in one process (2 threads, onnxruntime spin-waiting as deployed, 50 ms idle
before each call, medians of ``--runs``) and prints each form's speed against the whole
image. Writes benchmarks/results/row_stripes.json (``--out``) with the machine.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

import lwcompile
from benchmarks.common import DENOISE, load_teacher
from benchmarks.deploy import build_form, set_threads
from benchmarks.speed import THREADS, hardware_label, machine, report_and_write
from lwcompile.measure.profile import time_interleaved


def receptive_radius(model: nn.Module) -> int:
    """How many rows away an output row can see: the sum of the convs' reaches, an upper
    bound for a network of stride-1 convs and pointwise ops (a DnCNN)."""
    radius = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.stride[0] != 1:
                raise ValueError(f"{name} has stride {module.stride}: rows are not kept")
            radius += module.dilation[0] * (module.kernel_size[0] - 1) // 2
    return radius


class RowStripes(nn.Module):
    """``model`` run on ``stripes`` horizontal stripes of an image of ``height`` rows, each
    read with ``halo`` extra rows above and below, and its own rows concatenated."""

    def __init__(self, model: nn.Module, height: int, stripes: int, halo: int) -> None:
        super().__init__()
        self.model = model
        cuts = [round(i * height / stripes) for i in range(stripes + 1)]
        #: (first row read, first row kept, end of rows kept, end of rows read) per stripe
        self.windows = [(max(0, top - halo), top, bottom, min(height, bottom + halo))
                        for top, bottom in itertools.pairwise(cuts)]

    def rows_computed(self) -> int:
        return sum(stop - start for start, _, _, stop in self.windows)

    def forward(self, x: Tensor) -> Tensor:
        rows = []
        for start, top, bottom, stop in self.windows:
            y = self.model(x[..., start:stop, :])
            rows.append(y[..., top - start:bottom - start, :])
        return torch.cat(rows, dim=-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--stripes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "int8"],
                        default=["fp32", "int8"])
    parser.add_argument("--runtime", nargs="+", choices=["ort", "xnnpack"],
                        default=["ort", "xnnpack"])
    parser.add_argument("--out", default="row_stripes")
    options = parser.parse_args()
    set_threads(THREADS)
    info = machine()
    image = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    light = lwcompile.lighten(load_teacher(DENOISE), (image,)).eval()
    halo = receptive_radius(light)
    folder = Path(tempfile.mkdtemp())
    counts = [1, *(n for n in options.stripes if n != 1)]  # 1: the whole image, the reference
    striped = {n: RowStripes(light, image.shape[-2], n, halo).eval() for n in counts}
    runners, outputs = {}, {}
    for form in (f"{r}-{p}" for r in options.runtime for p in options.precision):
        for n in counts:
            model = light if n == 1 else striped[n]
            run = build_form(form, model, (image,), folder, f"light-{n}", DENOISE.degrade)
            with torch.no_grad():
                outputs[form, n] = run(image)
            runners[form, n] = run
    set_threads(THREADS)
    with torch.no_grad():
        times = time_interleaved({f"{f}|{n}": (lambda run=run: run(image))
                                  for (f, n), run in runners.items()},
                                 runs=options.runs, warmup=2, pause=0.05)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows, results = [], []
    for form, n in runners:
        whole_ms, ms = medians[f"{form}|1"], medians[f"{form}|{n}"]
        diff = (outputs[form, n] - outputs[form, 1]).abs().max().item()
        rows_computed = striped[n].rows_computed()
        results.append({"form": form, "stripes": n, "halo": halo, "rows_computed": rows_computed,
                        "ms": round(ms, 2), "speed_vs_whole": round(whole_ms / ms, 3),
                        "max_abs_diff_vs_whole": diff})
        rows.append([form, n, rows_computed, f"{ms:.1f}", f"{whole_ms / ms:.2f}x",
                     f"{diff:.1e}"])
    print(f"light DnCNN-17, 1x1x256x256, halo {halo} rows -- {hardware_label(info)};"
          f" medians of {options.runs} interleaved rounds")
    report_and_write(rows, ["form", "stripes", "rows computed", "ms", "speed vs whole",
                            "max |diff| vs whole"],
                     options.out, {"machine": info, "runs": options.runs, "rows": results})


if __name__ == "__main__":
    main()
