"""A thin large-kernel conv (SRResNet's 9x9 output conv) in its three exact forms, per runtime.

    python -m benchmarks.thin_conv

The conv writes 3 channels at 512x512 from 16 (the light SRResNet x4's squeezed tail) or 64
(the original's) input channels. Forms: the plain 9x9 conv; ``export_mobile``'s phase form
(pixel_unshuffle(4), 3x3 conv to 48 channels, pixel_shuffle(4)); ``nn.ThinConvPhases``
(one stride-4 conv, pixel shuffle). Runtimes: PyTorch NCHW, PyTorch channels_last,
onnxruntime, and ExecuTorch/XNNPACK (without lwcompile's own XNNPACK forms, so each form
is measured as written). All variants interleaved, medians, 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.speed import (
    THREADS,
    channels_last,
    eager,
    machine,
    onnxruntime_session,
    table,
    write_json,
)
from lwcompile.deploy.identities import PHASES, phase_bias, phase_weight
from lwcompile.deploy.module_rewrites import on_phases
from lwcompile.measure.profile import time_interleaved


class UnshufflePhases(nn.Module):
    """The phase form ``export_mobile`` writes at ATen level, as a module."""

    def __init__(self, conv: nn.Conv2d, r: int = PHASES) -> None:
        super().__init__()
        weight, reach = phase_weight(conv.weight.detach(), r)
        self.r = r
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[-1],
                              padding=reach)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            self.conv.bias.copy_(phase_bias(conv.bias, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(F.pixel_unshuffle(x, self.r)), self.r)


def _runtimes(model: nn.Module, inputs: tuple, folder: Path, mobile: bool) -> dict:
    runs = {"NCHW": eager(model, inputs), "channels_last": channels_last(model, inputs),
            "onnxruntime": onnxruntime_session(model, inputs, fast=False)}
    if mobile:
        from lwcompile.deploy.mobile import export_mobile, load_pte

        path = folder / f"{id(model)}.pte"
        export = export_mobile(model, inputs, path, optimize=False)
        program = load_pte(path)
        runs["XNNPACK"] = lambda: program(*inputs)
        runs["XNNPACK delegated"] = export.report.op_share
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--no-mobile", action="store_true", help="skip ExecuTorch")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    mobile = not args.no_mobile
    if mobile:
        from benchmarks.mobile import set_threads

        set_threads(THREADS)
    info = machine()
    torch.manual_seed(0)
    rows, fns, shares = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for c_in in (16, 64):
            conv = nn.Conv2d(c_in, 3, 9, padding=4).eval()
            inputs = (torch.rand(1, c_in, 512, 512),)
            forms = {"9x9 conv": conv, "unshuffle phases": UnshufflePhases(conv).eval(),
                     "ThinConvPhases": on_phases(conv).eval()}
            for form, model in forms.items():
                torch.testing.assert_close(model(*inputs), conv(*inputs), rtol=1e-4, atol=1e-4)
                for runtime, fn in _runtimes(model, inputs, Path(tmp), mobile).items():
                    if runtime == "XNNPACK delegated":
                        shares[(c_in, form)] = fn
                    else:
                        fns[(c_in, form, runtime)] = fn
        times = time_interleaved({"|".join(map(str, k)): f for k, f in fns.items()}, args.runs)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    runtimes = ["NCHW", "channels_last", "onnxruntime"] + (["XNNPACK"] if mobile else [])
    for c_in in (16, 64):
        for form in ("9x9 conv", "unshuffle phases", "ThinConvPhases"):
            row = {"in_channels": c_in, "form": form}
            row.update({r: round(medians[f"{c_in}|{form}|{r}"], 1) for r in runtimes})
            if mobile:
                row["XNNPACK delegated"] = shares[(c_in, form)]
            rows.append(row)
    header = ["in", "form", *[f"{r} ms" for r in runtimes]] + (["delegated"] if mobile else [])
    print(table([[r["in_channels"], r["form"], *[r[x] for x in runtimes]]
                 + ([f"{r['XNNPACK delegated']:.0%}"] if mobile else []) for r in rows], header))
    path = write_json("thin_conv", {"machine": info, "runs": args.runs, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
