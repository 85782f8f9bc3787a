"""Deploy every spandrel zoo network, lightened, through every path a user would take.

    python -m benchmarks.zoo_deploy                    # whole zoo, 2 networks at a time
    python -m benchmarks.zoo_deploy --only SAFMN RealCUGAN_4x --timeout 600
    python -m benchmarks.zoo_deploy --only IPT --keep   # the rest of the recorded JSON kept

Per network (``examples/zoo.py``, random weights, its example input): ``lighten``, then
``export_onnx`` fp32 (the file run in onnxruntime and compared with the eager light model;
"size fixed" where its height and width are the example's, not symbolic),
``export_mobile`` fp32 (ExecuTorch runs it and compares), then both in int8.
A step ends ``ok``, with the ``LwCompileError`` subclass and message that refused it (an
exporter's limit, named), or ``RAW`` with the exception type and where it came from: a raw
error is a bug of lwcompile. int8 uses 2 calibration crops and 1 held-out crop (the
measurement is of the path, not of quality: the weights are random); a network reading an
image and a noise-level map gets such inputs (``noise_map_calibration``), as its users
must. Each network runs in its own process with one thread and a time limit, so a hang or a
crash is one row.

Writes ``benchmarks/results/zoo_deploy.json`` (with the machine; each network with the time
limit it ran under, each step with the CPU it ran on, and ``cpus`` listing them: kept
records may come from another machine) and prints a markdown table. ``--keep`` keeps the
recorded networks not named in ``--only``, so a long run can be finished in parts;
``--steps`` runs only the named steps (``lighten`` always runs: the others need its
model) and keeps the others' records, so the slow int8 steps can be given a longer time
limit alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: in the order they run: the fp32 paths first, so a time limit costs the int8 ones
STEPS = ("lighten", "onnx fp32", "xnnpack fp32", "onnx int8", "xnnpack int8")
#: noise levels (of 255) of the noise maps that stand in for a 4-channel network's data
NOISE_LEVELS = (15, 25, 50)


def noise_map_calibration(example: Any) -> Any:
    """int8 data for a network reading an image and its noise-level map (FDnCNN, DRUNet),
    which the bundled images cannot stand in for: the example's image, shifted, beside a
    constant map at each of ``NOISE_LEVELS``. Enough to check the path, as the rest is."""
    import torch

    image = example[:, :3]
    return torch.cat([torch.cat([image.roll(7 * k, -1), torch.full_like(image[:, :1], level / 255)],
                                1) for k, level in enumerate(NOISE_LEVELS)])


def _child(name: str, out: Path, steps: tuple[str, ...]) -> None:
    """Run the steps for ``name`` in this process, writing the record after each step (a
    step killed by the time limit leaves the ones before it)."""
    import warnings

    import torch

    from examples.zoo import ZOO

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    entry = ZOO[name]
    model, x = entry.build(), entry.example_inputs()
    record: dict[str, Any] = {"name": name}
    with tempfile.TemporaryDirectory(prefix="zoo-deploy-") as tmp:
        _steps(model, x, Path(tmp), record, out, steps)


def _steps(model: Any, x: tuple, folder: Path, record: dict[str, Any], out: Path,
           steps: tuple[str, ...]) -> None:
    import torch

    import lwcompile
    from examples.zoo import first_image

    light: dict[str, Any] = {}

    def step(label: str, work: Any) -> None:
        start = time.perf_counter()
        try:
            detail = work()
            record[label] = {"status": "ok", "detail": detail}
        except lwcompile.LwCompileError as exc:
            record[label] = {"status": type(exc).__name__, "detail": str(exc)[:400]}
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            record[label] = {"status": "RAW", "detail": f"{type(exc).__name__}: "
                             f"{str(exc)[:300]} ({Path(where.filename).name}:{where.lineno})"}
        record[label]["seconds"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(record, indent=1))

    def lighten() -> str:
        light["model"] = lwcompile.lighten(model, x)
        before, after = lwcompile.count_macs(model, *x), lwcompile.count_macs(light["model"], *x)
        return f"MACs {before / after:.1f}x fewer"

    def onnx_fp32() -> str:
        import onnxruntime as ort

        path = lwcompile.export_onnx(light["model"], x, folder / "fp32.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        tensors = [a for a in x if isinstance(a, torch.Tensor)]
        got = session.run(None, {f"input_{i}": a.numpy() for i, a in enumerate(tensors)})[0]
        with torch.no_grad():
            want = first_image(light["model"](*x))
        fixed = not any(isinstance(d, str) for d in session.get_inputs()[0].shape)
        return (f"onnx vs eager {float((torch.from_numpy(got) - want).abs().max()):.1e}"
                + (", size fixed" if fixed else ""))

    data = {"calibration": noise_map_calibration(x[0])} if x[0].shape[1] == 4 else {}

    def onnx_int8() -> str:
        path = lwcompile.export_onnx(light["model"], x, folder / "int8.onnx", precision="int8",
                                     calibration_count=2, evaluation_count=1, **data)
        return f"int8 vs float {path.int8_report.psnr_db:.1f} dB"

    def mobile(precision: str) -> str:
        int8_data = data if precision == "int8" else {}
        export = lwcompile.export_mobile(light["model"], x, folder / f"{precision}.pte",
                                         precision=precision, calibration_count=2,
                                         evaluation_count=1, **int8_data)
        if precision == "int8":
            return f"int8 vs float {export.int8_report.psnr_db:.1f} dB"
        return f"pte vs eager {export.max_abs_error:.1e}"

    step("lighten", lighten)
    if "model" not in light:
        for label in STEPS[1:]:
            record[label] = {"status": "not run", "detail": "lighten failed"}
        out.write_text(json.dumps(record, indent=1))
        return
    work = {"onnx fp32": onnx_fp32, "xnnpack fp32": lambda: mobile("fp32"),
            "onnx int8": onnx_int8, "xnnpack int8": lambda: mobile("int8")}
    for label in STEPS[1:]:
        if label in steps:
            step(label, work[label])


def cpu_label(machine: dict[str, Any]) -> str:
    """The CPU a step ran on, as each step record names it: model and vector ISA flags."""
    return f"{machine['cpu']} ({', '.join(machine['isa'])})"


def _run(name: str, timeout: float, folder: Path, steps: tuple[str, ...]) -> dict[str, Any]:
    out = folder / f"{name}.json"
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "benchmarks.zoo_deploy", "--child", name,
                        "--record", str(out), "--steps", *steps], cwd=ROOT, timeout=timeout,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        ended = None
    except subprocess.TimeoutExpired:
        ended = f"time limit ({timeout:.0f} s)"
    record = json.loads(out.read_text()) if out.exists() else {"name": name}
    for label in (s for s in STEPS if s in steps):
        if label not in record:
            record[label] = {"status": "not run", "detail": ended or "the process died"}
            ended = ended and "after the time limit"
        record[label]["time_limit_s"] = timeout  # for the network, all its steps together
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["timeout_s"] = timeout
    print(f"{name}: " + ", ".join(f"{s} {record[s]['status']}" for s in STEPS if s in record),
          flush=True)
    return record


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["| network | " + " | ".join(STEPS) + " |", "|---" * (len(STEPS) + 1) + "|"]
    for record in records:
        cells = []
        for label in STEPS:
            result = record[label]
            cells.append(result["detail"] if result["status"] == "ok" else
                         f"**{result['status']}**: {result['detail'][:90]}")
        lines.append(f"| {record['name']} | " + " | ".join(c.replace("|", "/") for c in cells)
                     + " |")
    counts = {label: sum(r[label]["status"] == "ok" for r in records) for label in STEPS}
    raw = sum(r[label]["status"] == "RAW" for r in records for label in STEPS)
    lines.append("")
    lines.append(f"{len(records)} networks; ok: " + ", ".join(
        f"{label} {n}" for label, n in counts.items()) + f"; raw errors: {raw}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="network names (default: the whole zoo)")
    parser.add_argument("--timeout", type=float, default=480.0, help="seconds per network")
    parser.add_argument("--jobs", type=int, default=2, help="networks at a time")
    parser.add_argument("--out", default="zoo_deploy")
    parser.add_argument("--keep", action="store_true",
                        help="keep the recorded networks not named in --only")
    parser.add_argument("--steps", nargs="*", choices=STEPS, default=list(STEPS),
                        help="steps to run (default: all; lighten always runs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, Path(args.record), tuple(args.steps))
        return

    from benchmarks.speed import machine
    from examples.zoo import ZOO

    names = args.only or list(ZOO)
    steps = tuple(s for s in STEPS if s == "lighten" or s in args.steps)
    here = machine()
    with tempfile.TemporaryDirectory(prefix="zoo-deploy-") as tmp, \
            ThreadPoolExecutor(args.jobs) as pool:
        records = list(pool.map(lambda n: _run(n, args.timeout, Path(tmp), steps), names))
    cpu = cpu_label(here)
    for record in records:  # a kept record keeps the CPU it ran on
        for label in steps:
            record[label]["cpu"] = cpu
    out = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    kept = {r["name"]: r for r in json.loads(out.read_text())["networks"]} \
        if out.exists() and (args.keep or steps != STEPS) else {}
    for record in records:  # the steps not run this time, as recorded
        for label in STEPS:
            if label not in record:
                record[label] = kept.get(record["name"], {}).get(label) or \
                    {"status": "not run", "detail": "not asked for (--steps)"}
    if args.keep:
        ran = {r["name"]: r for r in records}
        records = [ran.get(n) or kept[n] for n in ZOO if n in ran or n in kept]
    table = markdown(records)
    print(table)
    cpus = sorted({r[label]["cpu"] for r in records for label in STEPS
                   if "cpu" in r.get(label, {})})
    out.write_text(json.dumps({"machine": here, "cpus": cpus, "networks": records,
                               "table": table}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
