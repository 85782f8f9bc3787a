"""What ``lwcompile.tune`` chooses for the trained light DnCNN-17 in each runtime.

    python -m benchmarks.tune_forms

The committed trained DnCNN-17 (sigma 25) is lightened and tuned at 1x1x256x256 for
onnxruntime and for XNNPACK with ``precision="auto"`` (2 threads, 7 interleaved rounds,
int8 calibrated on noisy crops); each report is printed with the CPU it ran on.
"""

from __future__ import annotations

import time
import warnings

import torch

import lwcompile
from benchmarks.common import DENOISE, load_teacher
from benchmarks.speed import THREADS, hardware_label, machine
from examples import dncnn


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    info = machine()
    print(hardware_label(info))
    light = lwcompile.lighten(load_teacher(DENOISE), dncnn.example_inputs())
    x = (torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(0)),)
    for target in ("onnxruntime", "xnnpack"):
        start = time.time()
        tuned = lwcompile.tune(light, x, target=target, precision="auto", runs=7,
                               threads=THREADS, degrade=DENOISE.degrade)
        print(f"{tuned.report}\n({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
