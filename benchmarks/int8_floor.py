"""The int8 cost no layer can avoid: rounding only the model's input and output to 8 bits.

    python -m benchmarks.int8_floor

An int8 deployment whose first and last layers run in int8 quantises the network's input and
output tensors (onnxruntime's QDQ and XNNPACK's pt2e both do), so rounding those two alone,
with everything between them in float, is a floor under its PSNR cost; only keeping those
layers float (at float speed) goes below it. For each committed trained teacher
(benchmarks/weights) the input and the output are rounded to 8 bits (asymmetric, ranges
the min/max over the calibration inputs the exports use, zero included), separately and
together, and the PSNR cost against the fp32 model is measured per held-out image and in the
mean, as ``benchmarks.deploy`` measures int8 costs. Where the floor alone takes most of a
cost goal, no fine-tuning of the layers between reaches it. JSON in benchmarks/results/.
"""

from __future__ import annotations

import torch
from torch import Tensor

from benchmarks.common import DENOISE, SR2, Task, held_out, load_teacher, score
from benchmarks.speed import THREADS, machine, table, write_json
from lwcompile.deploy import int8_inputs

CALIBRATION_INPUTS = 8


def rounded(x: Tensor, low: float, high: float) -> Tensor:
    """``x`` through an asymmetric 8-bit quantise/dequantise with range [low, high] (widened
    to include 0, as the runtimes' quantisers do)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255
    zero = round(-low / scale)
    return ((x / scale).round() + zero).clamp(0, 255).sub(zero).mul(scale)


def floor(task: Task) -> dict:
    teacher = load_teacher(task).eval()
    pairs = held_out(task)
    calibration = int8_inputs.calibration_inputs(None, (pairs[0][0],), CALIBRATION_INPUTS,
                                                 task.degrade)
    with torch.no_grad():
        inputs = torch.cat([c[0] for c in calibration])
        outputs = teacher(inputs)
    x_range = (inputs.min().item(), inputs.max().item())
    y_range = (outputs.min().item(), outputs.max().item())
    fp32 = [score(teacher, task, [p])["psnr"] for p in pairs]
    ways = {"input": lambda x: teacher(rounded(x, *x_range)),
            "output": lambda x: rounded(teacher(x), *y_range),
            "input and output": lambda x: rounded(teacher(rounded(x, *x_range)), *y_range)}
    costs = {}
    for name, run in ways.items():
        per_image = [f - score(run, task, [p])["psnr"] for f, p in zip(fp32, pairs, strict=True)]
        costs[name] = {"mean": round(sum(per_image) / len(per_image), 3),
                       "per_image": [round(c, 3) for c in per_image]}
    return {"fp32_psnr_per_image": [round(f, 2) for f in fp32],
            "input_range": [round(v, 4) for v in x_range],
            "output_range": [round(v, 4) for v in y_range], "cost_db": costs}


def main() -> None:
    torch.set_num_threads(THREADS)
    info = machine()
    results = {task.name: floor(task) for task in (DENOISE, SR2)}
    rows = [[name, way, f"{cost['mean']:.3f}", " / ".join(f"{c:.2f}" for c in cost["per_image"])]
            for name, result in results.items() for way, cost in result["cost_db"].items()]
    print(f"{info['cpu']}: PSNR cost (dB) of rounding only the input and output to 8 bits")
    print(table(rows, ["teacher", "rounded", "mean", "per held-out image"]))
    for name, result in results.items():
        print(f"{name}: fp32 PSNR per image {result['fp32_psnr_per_image']}")
    write_json("int8_floor", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
