"""Where the time goes inside onnxruntime: a per-op profile of the original and the light model.

    python -m benchmarks.op_profile                          # DnCNN-17, fp32 and int8
    python -m benchmarks.op_profile --only "SRResNet x4" --runs 20
    python -m benchmarks.op_profile --without-depthwise-sum --out op_profile_plain

MACs are not latency. This profiles each model as ``export_onnx`` deploys it (fp32, and int8
calibrated as ``precision="int8"`` does) with onnxruntime's own profiler, on the graph
onnxruntime runs after its optimisations (fused convs, NCHWc or NHWC layouts), and groups
the kernel time by op and shape: a conv group is named by its input -> output channels,
kernel and groups (``dw`` for depthwise). For every group it gives the median time per
inference, its share, its MACs (from the weights of the optimised graph) and the bytes its
kernels read and wrote (activations only, as onnxruntime reports them), and from those the
rate each group reached: GMAC/s says how close a conv came to the CPU's arithmetic, GB/s how
close to its memory bandwidth. A light model's thin convs run far below the dense model's
GMAC/s; which of the two limits binds differs by CPU, so run it where you deploy.

The models: DnCNN-17 with the committed trained weights (and ``lighten`` of it, seeded),
the other networks of ``benchmarks.speed.CASES`` with seeded random weights. Medians over
``--runs`` profiled inferences after two warm-up runs, 2 threads, spin-waiting on (as a
deployed session runs). Writes benchmarks/results/op_profile.json (``--out``) with the
machine (CPU model, ISA flags, versions).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import DENOISE, load_teacher
from benchmarks.deploy import DEGRADE
from benchmarks.depthwise_sum import form
from benchmarks.speed import CASES, THREADS, machine, table, write_json
from lwcompile.deploy.export import export_onnx

#: ops whose weight is the given input of the node (onnxruntime's fused and quantised convs)
_WEIGHT_INPUT = {"Conv": 1, "FusedConv": 1, "NhwcFusedConv": 1, "QLinearConv": 3,
                 "ConvInteger": 1, "ConvTranspose": 1}


@dataclass
class OpGroup:
    """Kernels of one op kind and shape, summed per inference."""

    op: str
    shape: str  # "64->16 1x1", "16 dw 3x3", or the output shape for other ops
    count: int  # kernels per inference
    ms: float  # median over the profiled inferences
    share: float  # of all kernel time
    macs: int
    bytes_moved: int  # activations read + written, as onnxruntime reports them

    @property
    def gmacs_per_s(self) -> float:
        return self.macs / self.ms / 1e6 if self.ms else 0.0

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes_moved / self.ms / 1e6 if self.ms else 0.0


def _weights(optimized: Path) -> dict[str, tuple[str, list[int], int]]:
    """Per conv node of onnxruntime's optimised graph: its weight's shape and its groups."""
    import onnx

    graph = onnx.load(str(optimized)).graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    found = {}
    for node in graph.node:
        index = _WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index or node.input[index] not in shapes:
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        found[node.name] = (node.op_type, shapes[node.input[index]], groups)
    return found


def _label(args: dict, weight: tuple[str, list[int], int] | None) -> tuple[str, int]:
    """A group's shape label and the MACs of one kernel call."""
    outputs = [list(v.values())[0] for v in args.get("output_type_shape", [])]
    if weight is None:
        return ("x".join(map(str, outputs[0])) if outputs else "", 0)
    op, (a, b, kh, kw), groups = weight
    if op == "ConvTranspose":  # weight: in x out/groups x kh x kw; each input feeds b*kh*kw
        inputs = math.prod(list(args["input_type_shape"][0].values())[0])
        return f"{a}->{b * groups} T{kh}x{kw}", inputs * b * kh * kw
    out_ch, in_per_group = a, b
    kind = f"{out_ch} dw" if groups == out_ch and in_per_group == 1 else \
        f"{in_per_group * groups}->{out_ch}" + (f" g{groups}" if groups > 1 else "")
    return f"{kind} {kh}x{kw}", math.prod(outputs[0]) * in_per_group * kh * kw


def profile_onnx(path: Path, inputs: tuple, runs: int) -> list[OpGroup]:
    """Per-op kernel time of ``path`` in onnxruntime, grouped by op and shape."""
    import onnxruntime as ort

    folder = Path(tempfile.mkdtemp())
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
    warmup = 2
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    weights = _weights(folder / "optimized.onnx")
    # a kernel belongs to the first run that ends after it starts (the profile lists each
    # run's kernels before the run's own event)
    ends = sorted(e["ts"] + e["dur"] for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * len(ends))
    macs: dict[tuple[str, str], int] = defaultdict(int)
    moved: dict[tuple[str, str], int] = defaultdict(int)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        args = event["args"]
        node = event["name"].removesuffix("_kernel_time")
        shape, node_macs = _label(args, weights.get(node))
        key = (args["op_name"], shape)
        index = bisect.bisect_left(ends, event["ts"])
        per_run[key][index] += event["dur"] / 1000
        if index == warmup:  # count one inference's kernels
            counts[key] += 1
            macs[key] += node_macs
            moved[key] += int(args.get("activation_size", 0)) + int(args.get("output_size", 0))
    medians = {key: statistics.median(times[warmup:]) for key, times in per_run.items()}
    total = sum(medians.values()) or 1.0
    groups = [OpGroup(op, shape, counts[(op, shape)], ms, ms / total, macs[(op, shape)],
                      moved[(op, shape)]) for (op, shape), ms in medians.items()]
    return sorted(groups, key=lambda g: -g.ms)


def _models(name: str) -> dict[str, nn.Module]:
    case = CASES[name]
    original = load_teacher(DENOISE) if name == "DnCNN-17" else case.build()
    torch.manual_seed(0)
    return {"original": original.eval(), "light": case.lighten(original).eval()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=list(CASES), default=None)
    parser.add_argument("--precision", action="append", choices=["fp32", "int8"], default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="op_profile")
    parser.add_argument("--without-depthwise-sum", action="store_true",
                        help="export without the depthwise + sum form (the profile it came "
                             "from)")
    options = parser.parse_args()
    torch.set_num_threads(THREADS)
    info = machine()
    folder = Path(tempfile.mkdtemp())
    results: list[dict[str, Any]] = []
    for name in options.only or ["DnCNN-17"]:
        inputs = CASES[name].bench_inputs()
        for model_name, model in _models(name).items():
            for precision in options.precision or ["fp32", "int8"]:
                with form(not options.without_depthwise_sum):
                    path = export_onnx(model, inputs,
                                       folder / f"{model_name}-{precision}.onnx",
                                       precision=precision, degrade=DEGRADE.get(name))
                groups = profile_onnx(path, inputs, options.runs)
                total = sum(g.ms for g in groups)
                print(f"\n{name} {model_name} {precision}: {total:.1f} ms of kernels "
                      f"({info['cpu']}, {', '.join(info['isa'])}, {THREADS} threads)")
                rows = [[g.op, g.shape, g.count, f"{g.ms:.2f}", f"{100 * g.share:.0f}%",
                         f"{g.macs / 1e6:.0f}", f"{g.gmacs_per_s:.0f}" if g.macs else "",
                         f"{g.gbytes_per_s:.1f}"] for g in groups if g.share >= 0.005]
                print(table(rows, ["op", "shape", "n", "ms", "share", "MMACs", "GMAC/s",
                                   "GB/s"]))
                results.append({"network": name, "model": model_name, "precision": precision,
                                "kernel_ms": round(total, 3),
                                "groups": [asdict(g) | {"gmacs_per_s": g.gmacs_per_s,
                                                        "gbytes_per_s": g.gbytes_per_s}
                                           for g in groups]})
    written = write_json(options.out, {"machine": info, "runs": options.runs,
                                       "depthwise_sum": not options.without_depthwise_sum,
                                       "profiles": results})
    print(f"\nwrote {written}")


if __name__ == "__main__":
    main()
