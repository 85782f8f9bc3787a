"""Which exact forms make a lightened model faster on CPU: the evidence behind emit_fast.

    python -m benchmarks.emit_forms                 # four networks + the LIST-form study
    python -m benchmarks.emit_forms --only DnCNN-17 --runs 9

Part 1, per network (lightened, at benchmark size): the light model as lighten returns it
against emit_fast's steps switched on one at a time (BN folding, LIST merging, both, then
concat sinking), each in NCHW and in channels_last, and the last two exported to
onnxruntime ("ORT"), all interleaved in one process.

Part 2, 15 stacked 64->64 LISTs at 256x256 (DnCNN's body) in four exact forms:
  list       cat([1x1(s), 1x1(dw(s))])                 (lwcompile.LIST)
  grouped    grouped 1x1 (groups=2) over cat([s, dw(s)]) (FusedLIST)
  blockdiag  dense 1x1 with a block-diagonal weight over cat([s, dw(s)])
  dwx2       no concat: depthwise with channel multiplier 2 (an identity kernel and dw's),
             then a dense 1x1 with zeros where the branches do not meet
Writes benchmarks/results/emit_forms.json.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import lwcompile
from benchmarks.speed import (
    CASES,
    THREADS,
    machine,
    medians_ms,
    onnxruntime_session,
    table,
    write_json,
)
from lwcompile.deploy.emit import emit_fast
from lwcompile.measure.profile import time_interleaved
from lwcompile.nn import LIST, ChannelsLast, FusedLIST


def network_forms(name: str, runs: int) -> dict:
    case = CASES[name]
    light = lwcompile.lighten(case.build(), case.example_inputs())
    inputs = case.bench_inputs()
    forms = {
        "light": light,
        "fold-bn": emit_fast(light, inputs, merge=False, channels_last=False),
        "merge": emit_fast(light, inputs, fold_bn=False, channels_last=False),
        "merge+fold": emit_fast(light, inputs, channels_last=False, sink=False),
        "merge+fold+sink": emit_fast(light, inputs, channels_last=False),
    }
    forms |= {f"{k} CL": ChannelsLast(copy.deepcopy(m)) for k, m in list(forms.items())}
    fns = {k: (lambda m=m: m(*inputs)) for k, m in forms.items()}
    for k in ("merge+fold", "merge+fold+sink"):
        fns[f"{k} ORT"] = onnxruntime_session(forms[k], inputs, fast=False)
    with torch.no_grad():
        ms = medians_ms(time_interleaved(fns, runs=runs))
    return {"network": name, "input": [list(a.shape) for a in inputs], "median_ms": ms}


class _Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.relu(block(x))
        return x


class _BlockDiagonal(nn.Module):
    def __init__(self, fused: FusedLIST) -> None:
        super().__init__()
        self.squeeze, self.depthwise = fused.squeeze, fused.depthwise
        g = fused.pointwise
        out, sq = g.out_channels, g.in_channels // 2
        self.pointwise = nn.Conv2d(2 * sq, out, 1)
        with torch.no_grad():
            self.pointwise.weight.zero_()
            self.pointwise.weight[: out // 2, :sq] = g.weight[: out // 2]
            self.pointwise.weight[out // 2:, sq:] = g.weight[out // 2:]
            self.pointwise.bias.copy_(g.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return self.pointwise(torch.cat([s, self.depthwise(s)], dim=1))


class _DepthwiseX2(nn.Module):
    def __init__(self, fused: FusedLIST) -> None:
        super().__init__()
        self.squeeze = fused.squeeze
        dw, g = fused.depthwise, fused.pointwise
        sq, out, k = dw.in_channels, g.out_channels, dw.kernel_size[0]
        self.depthwise = nn.Conv2d(sq, 2 * sq, k, padding=k // 2, groups=sq)
        self.pointwise = nn.Conv2d(2 * sq, out, 1)
        with torch.no_grad():
            self.depthwise.weight.zero_()
            self.depthwise.weight[0::2, 0, k // 2, k // 2] = 1.0
            self.depthwise.weight[1::2] = dw.weight
            self.depthwise.bias.zero_()
            self.depthwise.bias[1::2] = dw.bias
            self.pointwise.weight.zero_()
            self.pointwise.weight[: out // 2, 0::2] = g.weight[: out // 2]
            self.pointwise.weight[out // 2:, 1::2] = g.weight[out // 2:]
            self.pointwise.bias.copy_(g.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(self.squeeze(x)))


def list_forms(runs: int) -> dict:
    torch.manual_seed(0)
    lists = [LIST(64, 64).eval() for _ in range(15)]
    fused = [FusedLIST(m) for m in lists]
    stacks = {"list": _Stack(lists), "grouped": _Stack(fused),
              "blockdiag": _Stack([_BlockDiagonal(f) for f in fused]),
              "dwx2": _Stack([_DepthwiseX2(f) for f in fused])}
    x = torch.rand(1, 64, 256, 256)
    with torch.no_grad():
        reference = stacks["list"](x)
        for stack in stacks.values():
            torch.testing.assert_close(stack(x), reference, rtol=1e-4, atol=1e-4)
    fns = {}
    for k, stack in stacks.items():
        nhwc = ChannelsLast(copy.deepcopy(stack))
        fns[k] = lambda s=stack: s(x)
        fns[f"{k} CL"] = lambda s=nhwc: s(x)
    with torch.no_grad():
        ms = medians_ms(time_interleaved(fns, runs=runs))
    return {"input": [1, 64, 256, 256], "blocks": 15, "median_ms": ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=[*CASES, "LIST"], default=None)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    info = machine()
    chosen = args.only or [*CASES, "LIST"]
    results = {"machine": info, "runs": args.runs, "networks": [], "list_forms": None}
    for name in chosen:
        if name == "LIST":
            results["list_forms"] = res = list_forms(args.runs)
            title = "15 x LIST(64, 64) at 1x64x256x256"
        else:
            res = network_forms(name, args.runs)
            results["networks"].append(res)
            title = f"{name} light at {res['input']}"
        ms = res["median_ms"]
        base = next(iter(ms.values()))
        rows = [(k, f"{v:.1f}", f"{base / v:.2f}x") for k, v in ms.items()]
        print(f"\n{title} (median of {args.runs}, {THREADS} threads)")
        print(table(rows, ["form", "ms", "speed-up vs first"]))
        write_json("emit_forms", results)
    print(f"\nwrote {write_json('emit_forms', results)}")


if __name__ == "__main__":
    main()
