"""Shared pieces of the speed benchmarks: the four networks at benchmark size, the runtimes
a model can run in, and table / JSON output.

Wall-clock numbers are only comparable within one run: every benchmark times its
variants interleaved (``lwcompile.profile.time_interleaved``) and quotes medians and ratios.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lwcompile
from examples import dncnn, glcic, srresnet, unet
from lwcompile import Rule
from lwcompile.deploy.emit import ChannelsLast
from lwcompile.rules.image_output_squeeze import ImageOutputSqueezeRule

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]  # small: what lighten traces and verifies on
    bench_inputs: Callable[[], tuple]  # the size the latency is measured at
    #: rules for lighten (None: the defaults); set for the variants
    rules: Callable[[], list[Rule]] | None = None

    def lighten(self, model: nn.Module) -> nn.Module:
        kwargs = {"rules": self.rules()} if self.rules is not None else {}
        return lwcompile.lighten(model, self.example_inputs(), **kwargs)


def _images(*shapes: tuple[int, ...]) -> Callable[[], tuple]:
    def make() -> tuple:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.rand(s, generator=g) for s in shapes)
    return make


def _image_and_mask(size: int) -> Callable[[], tuple]:
    def make() -> tuple:
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        mask = torch.zeros(1, 1, size, size)
        mask[..., size * 5 // 16: size * 11 // 16, size // 4: size * 3 // 4] = 1.0
        return image, mask
    return make


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()
    return make


CASES = {
    "DnCNN-17": Case("DnCNN-17", _seeded(dncnn.build), dncnn.example_inputs,
                     _images((1, 1, 256, 256))),
    "SRResNet x4": Case("SRResNet x4", _seeded(srresnet.build), srresnet.example_inputs,
                        _images((1, 3, 128, 128))),
    "GLCIC": Case("GLCIC", _seeded(glcic.build), glcic.example_inputs, _image_and_mask(256)),
    "U-Net": Case("U-Net", _seeded(unet.build), unet.example_inputs, _images((1, 3, 256, 256))),
}

def _srresnet_variant(name: str, rules: Callable[[], list[Rule]]) -> Case:
    return Case(name, _seeded(srresnet.build), srresnet.example_inputs,
                _images((1, 3, 128, 128)), rules=rules)


SQUEEZE = "image-output-squeeze"

#: SRResNet with other rule choices for its 9x9 output conv, measured by ``latency`` next to
#: the defaults: kept standard (the paper's choice, ``--without image-output-squeeze``) and
#: squeezed by 8 instead of 4 (quality of both: ``benchmarks.image_output_study``)
VARIANTS = {
    "SRResNet x4, tail kept": _srresnet_variant(
        "SRResNet x4, tail kept", lambda: lwcompile.default_rules(without=[SQUEEZE])),
    "SRResNet x4, squeeze/8": _srresnet_variant(
        "SRResNet x4, squeeze/8", lambda: [*lwcompile.default_rules(without=[SQUEEZE]),
                                           ImageOutputSqueezeRule(squeeze_ratio=8)]),
}


def eager(model: nn.Module, inputs: tuple) -> Callable[[], Any]:
    return lambda: model(*inputs)


def channels_last(model: nn.Module, inputs: tuple) -> Callable[[], Any]:
    """A channels_last copy (``Module.to`` converts in place: the model itself stays NCHW)."""
    wrapped = model if isinstance(model, ChannelsLast) else ChannelsLast(copy.deepcopy(model))
    return lambda: wrapped(*inputs)


def onnxruntime_session(model: nn.Module, inputs: tuple, threads: int = THREADS,
                        fast: bool = True) -> Callable[[], Any]:
    """Export to ONNX (opset 17; ``fast``: emit_fast's form) and run with
    CPUExecutionProvider on ``threads`` threads."""
    from lwcompile.deploy.export import export_onnx
    from lwcompile.deploy.int8_onnx import session as ort_session

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, inputs, Path(tmp) / "model.onnx", fast=fast)
        # spin-waiting off: called back to back with other variants, a session's spinning
        # threads can take the CPU from the next one (benchmarks.deploy keeps onnxruntime's
        # default instead, with an idle pause before each call)
        session = ort_session(path, threads)
    feed = {f"input_{i}": a.numpy() for i, a in enumerate(inputs)}
    return lambda: session.run(None, feed)


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def merge_rows(fresh: list[dict], path: Path, list_key: str,
               order: Sequence[str]) -> list[dict]:
    """``fresh`` rows plus, for networks not rerun (``--only``), their rows from the last
    results file (``path``, under ``list_key``), sorted by network name in ``order``."""
    old = json.loads(path.read_text())[list_key] if path.exists() else []
    done = {r["network"] for r in fresh}
    rows = [r for r in old if r["network"] not in done] + fresh
    return sorted(rows, key=lambda r: order.index(r["network"]) if r["network"] in order
                  else len(order))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_and_write(rows: Sequence[Sequence[Any]], header: Sequence[str], name: str,
                     data: dict) -> Path:
    """Print the table of ``rows`` and write ``data`` to benchmarks/results/<name>.json."""
    print(table(rows, header))
    path = write_json(name, data)
    print(f"\nwrote {path}")
    return path


def write_json(name: str, data: dict) -> Path:
    """Write benchmarks/results/<name>.json atomically."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16",
             "neon", "asimd", "sve")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and the vector ISA flags that decide which kernels run (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model name") and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, sorted(flag for flag in ISA_FLAGS if flag in flags)


def hardware_label(info: dict[str, Any]) -> str:
    """The CPU, its ISA flags and the thread count, as every benchmark table is headed."""
    return f"{info['cpu']} ({', '.join(info['isa'])}), {THREADS} threads"


def machine() -> dict[str, Any]:
    """CPU model, ISA flags, versions, threads and the load average (call at the start: a loaded
    machine skews timings)."""
    cpu, isa = cpu_model_and_flags()
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpu": cpu, "isa": isa,
                            "cores": os.cpu_count()}
    for runtime in ("onnxruntime", "executorch"):
        try:
            info[runtime] = importlib.metadata.version(runtime)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    return info
