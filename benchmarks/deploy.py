"""Original against light, each in the best form it can be deployed in: the deployment table.

    python -m benchmarks.deploy                              # all three networks, all forms
    python -m benchmarks.deploy --only DnCNN-17 --runs 9
    python -m benchmarks.deploy --skip xnnpack-int8 --quality-seconds 0 --out deploy_fp32

Part 1, latency. For each network (DnCNN-17 with the committed trained weights, SRResNet x4,
GLCIC; ``benchmarks.speed.CASES`` at benchmark size) the original and ``lighten`` of it are
each run in every form a deployment engineer would try: eager PyTorch, channels_last,
``emit_fast``, onnxruntime fp32 and int8 (``export_onnx``), ExecuTorch/XNNPACK fp32 and int8
(``export_mobile``). All forms of one network run interleaved round-robin in one process
(2 threads everywhere; onnxruntime with its default spin-waiting, as a deployed session runs,
and ``--pause-ms`` of idling before each timed call so that one variant's spinning threads do
not slow the next), medians of ``--runs``. The table
gives each model's best form and three ratios: fp32 best vs best, best vs best with int8
allowed on both sides, and XNNPACK alone (best of its fp32 and int8).

Part 2, what int8 costs in quality. The committed trained teachers (DnCNN-17 sigma 25,
SRResNet x2) and their light students (``lighten`` + ``init_layerwise`` + ``distill`` for
``--quality-seconds`` CPU seconds) are exported fp32 and int8 to both runtimes and scored
against the clean held-out images (``benchmarks.common.score``); the int8 cost is each
model's int8 PSNR below its own fp32 PSNR, in the mean and per image (an image restored
very well in fp32 shows int8's error most). ``--qat-steps`` / ``--teacher-qat-steps``
fine-tune the students' / teachers' int8 exports first.

Writes benchmarks/results/deploy.json (``--out``) with the machine (CPU model, ISA flags,
versions).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import lwcompile
from benchmarks.common import DENOISE, SR2, Task, held_out, load_teacher, score
from benchmarks.quality_denoise import timed_distill
from benchmarks.speed import CASES, THREADS, hardware_label, machine, medians_ms, table, write_json
from lwcompile.deploy.emit import emit_fast
from lwcompile.deploy.export import export_onnx
from lwcompile.deploy.int8_onnx import session as onnxruntime_session
from lwcompile.deploy.mobile import export_mobile, load_pte
from lwcompile.measure.profile import time_interleaved
from lwcompile.nn import ChannelsLast

FORMS = ("eager", "channels_last", "emitted", "ort-fp32", "ort-int8", "xnnpack-fp32",
         "xnnpack-int8")
NETWORKS = ("DnCNN-17", "SRResNet x4", "GLCIC")
#: what each network's int8 export calibrates on: DnCNN-17 sees noisy images
DEGRADE = {"DnCNN-17": DENOISE.degrade}

Runner = Callable[..., Any]


def _ort_runner(path: Path) -> Runner:
    session = onnxruntime_session(path, THREADS, spinning=True)
    names = [i.name for i in session.get_inputs()]

    def run(*args: Tensor) -> Tensor:
        feed = dict(zip(names, (a.numpy() for a in args), strict=True))
        return torch.from_numpy(session.run(None, feed)[0])
    return run


def _pte_runner(path: Path) -> Runner:
    method = load_pte(path)
    return lambda *args: method(*args)[0]


def build_form(form: str, model: nn.Module, inputs: tuple, folder: Path, name: str,
               degrade: Any = None, qat_steps: int = 0) -> Runner:
    """A callable running ``model`` on tensors as ``form`` deploys it (exports go to
    ``folder``); int8 forms fine-tune for ``qat_steps`` first."""
    if form == "eager":
        return lambda *args: model(*args)
    if form == "channels_last":
        wrapped = ChannelsLast(copy.deepcopy(model).eval())
        return lambda *args: wrapped(*args)
    if form == "emitted":
        fast = emit_fast(model, inputs)
        return lambda *args: fast(*args)
    runtime, precision = form.split("-")
    if runtime == "ort":
        path = export_onnx(model, inputs, folder / f"{name}-{precision}.onnx",
                           precision=precision, degrade=degrade,
                           qat_steps=qat_steps if precision == "int8" else 0)
        run = _ort_runner(path)
        run.int8_report = path.int8_report
        return run
    exported = export_mobile(model, inputs, folder / f"{name}-{precision}.pte",
                             precision=precision, degrade=degrade, verify=False,
                             qat_steps=qat_steps if precision == "int8" else 0)
    run = _pte_runner(exported.path)
    run.int8_report = exported.int8_report
    return run


def set_threads(threads: int) -> None:
    """The same thread count for torch and ExecuTorch's XNNPACK threadpool."""
    torch.set_num_threads(threads)
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return
    portable_lib._unsafe_reset_threadpool(threads)


def latency(name: str, forms: list[str], runs: int, folder: Path, pause: float) -> dict:
    case = CASES[name]
    original = case.build()
    if name == "DnCNN-17":  # the trained weights: int8 calibrates on a real network
        original = load_teacher(DENOISE)
    light = case.lighten(original).eval()
    inputs = case.bench_inputs()
    fns, export_s = {}, {}
    for model_name, model in (("original", original), ("light", light)):
        for form in forms:
            start = time.perf_counter()
            run = build_form(form, model, inputs, folder, f"{name}-{model_name}",
                             DEGRADE.get(name))
            export_s[f"{model_name} {form}"] = round(time.perf_counter() - start, 1)
            fns[f"{model_name} {form}"] = lambda run=run: run(*inputs)
    set_threads(THREADS)
    with torch.no_grad():
        times = time_interleaved(fns, runs=runs, pause=pause)
        ms = {k: round(v, 1) for k, v in medians_ms(times).items()}
    return {"network": name, "input": [list(a.shape) for a in inputs], "median_ms": ms,
            "prepare_seconds": export_s, **ratios(ms, forms)}


def ratios(ms: dict[str, float], forms: list[str]) -> dict[str, Any]:
    """Each model's best form in three scopes and the original-over-light ratio of each."""
    scopes = {"fp32": [f for f in forms if "int8" not in f], "int8 allowed": forms,
              "xnnpack": [f for f in forms if f.startswith("xnnpack")]}
    out: dict[str, Any] = {"best": {}, "ratio": {}}
    for scope, allowed in scopes.items():
        if not allowed:
            continue
        best = {m: min(allowed, key=lambda f, m=m: ms[f"{m} {f}"]) for m in ("original", "light")}
        out["best"][scope] = best
        out["ratio"][scope] = round(ms[f"original {best['original']}"]
                                    / ms[f"light {best['light']}"], 2)
    return out


def trained(light: nn.Module, teacher: nn.Module, task: Task, seconds: float) -> nn.Module:
    """``light`` after ``init_layerwise`` + ``distill`` (in place) until ``seconds`` CPU
    seconds are spent, with the quality benchmark's recipe (cosine learning rate over the
    budget, seed 0)."""
    start = time.process_time()
    lwcompile.init_layerwise(light, teacher, channels=task.channels, degrade=task.degrade,
                             steps=50, crop=task.crop, batch_size=task.batch_size, seed=0)
    timed_distill(light, teacher, task, seconds - (time.process_time() - start), seed=0)
    return light.eval()


def _student(task: Task, teacher: nn.Module, seconds: float, example: tuple) -> nn.Module:
    """``lighten`` (seeded), then ``trained`` for ``seconds`` CPU seconds."""
    torch.manual_seed(0)
    light = lwcompile.lighten(teacher, example)
    return trained(light, teacher, task, seconds) if seconds > 0 else light.eval()


def quality(task: Task, forms: list[str], seconds: float, folder: Path,
            qat_steps: int = 0, teacher_qat_steps: int = 0) -> dict:
    """PSNR of fp32 and int8 deployments of the trained teacher and its light student on
    the held-out images, and each int8 form's cost against its own fp32, in the mean and per
    image. The student's int8 exports fine-tune for ``qat_steps`` first, the teacher's for
    ``teacher_qat_steps``."""
    teacher = load_teacher(task)
    side = task.crop // 2 if task.channels == 3 else task.crop
    student = _student(task, teacher, seconds, (torch.rand(1, task.channels, side, side),))
    pairs = held_out(task)
    inputs = (pairs[0][0],)
    assert all(x.shape == inputs[0].shape for x, _ in pairs), "held-out crops differ in size"
    rows: dict[str, dict[str, float]] = {}
    images: dict[str, dict[str, list[float]]] = {}
    reports: dict[str, dict] = {}
    steps = {"teacher": teacher_qat_steps, "light": qat_steps}
    for model_name, model in (("teacher", teacher), ("light", student)):
        per_image = {}
        for form in [f for f in forms if f[:3] in ("ort", "xnn")]:
            run = build_form(form, model, inputs, folder, f"{task.name}-{model_name}",
                             task.degrade, steps[model_name])
            per_image[form] = [score(run, task, [pair])["psnr"] for pair in pairs]
            if getattr(run, "int8_report", None) is not None:
                reports[f"{model_name} {form}"] = run.int8_report.to_dict()
        per_image["eager"] = [score(model, task, [pair])["psnr"] for pair in pairs]
        for form in [f for f in per_image if f.endswith("int8")]:
            fp32 = per_image.get(form.replace("int8", "fp32"), per_image["eager"])  # skipped
            per_image[f"{form} cost dB"] = [a - b for a, b in zip(fp32, per_image[form],
                                                                   strict=True)]
        rows[model_name] = {f: round(statistics.fmean(v), 3) for f, v in per_image.items()}
        images[model_name] = {f: [round(x, 3) for x in v] for f, v in per_image.items()}
    return {"task": task.name, "student_cpu_seconds": seconds, "student_qat_steps": qat_steps,
            "teacher_qat_steps": teacher_qat_steps, "psnr": rows, "psnr_per_image": images,
            "int8_reports": reports}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=NETWORKS, action="append")
    parser.add_argument("--skip", choices=FORMS, action="append", default=[])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--pause-ms", type=float, default=50.0,
                        help="idle time before each timed call (not timed)")
    parser.add_argument("--out", default="deploy",
                        help="results file name under benchmarks/results (default deploy)")
    parser.add_argument("--quality-seconds", type=float, default=120.0,
                        help="CPU seconds of init + distillation per light student; 0 skips "
                             "the quality part")
    parser.add_argument("--quality-task", choices=("denoise", "sr"), action="append",
                        help="the quality part's tasks (default: both)")
    parser.add_argument("--qat-steps", type=int, default=0,
                        help="quantisation-aware fine-tuning steps before each int8 export of "
                             "the light students (export's qat_steps; default 0)")
    parser.add_argument("--teacher-qat-steps", type=int, default=0,
                        help="the same for the trained teachers' int8 exports (default 0: "
                             "post-training int8)")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency part (only the quality part runs)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    set_threads(THREADS)
    info = machine()
    forms = [f for f in FORMS if f not in args.skip]
    results: dict[str, Any] = {"machine": info, "runs": args.runs, "forms": forms,
                               "pause_ms": args.pause_ms, "onnxruntime_spinning": True,
                               "networks": [], "quality": []}
    label = (f"{hardware_label(info)}, onnxruntime "
             f"{info.get('onnxruntime')} (spin-waiting on), executorch "
             f"{info.get('executorch')}; medians of {args.runs} interleaved rounds, "
             f"{args.pause_ms:g} ms idle before each call")
    with tempfile.TemporaryDirectory() as tmp:
        for name in [] if args.no_latency else args.only or NETWORKS:
            row = latency(name, forms, args.runs, Path(tmp), args.pause_ms / 1000)
            results["networks"].append(row)
            print(f"\n{name} {row['input']} -- {label}")
            print(table([[f, row["median_ms"][f"original {f}"], row["median_ms"][f"light {f}"]]
                         for f in forms], ["form", "original ms", "light ms"]))
            for scope, ratio in row["ratio"].items():
                best = row["best"][scope]
                print(f"best vs best, {scope}: {ratio}x (original {best['original']}, "
                      f"light {best['light']})")
        if args.quality_seconds > 0:
            tasks = {"denoise": DENOISE, "sr": SR2}
            for task in [tasks[t] for t in args.quality_task or tasks]:
                q = quality(task, forms, args.quality_seconds, Path(tmp), args.qat_steps,
                            args.teacher_qat_steps)
                results["quality"].append(q)
                print(f"\n{task.name}: PSNR on held-out images (dB)")
                keys = sorted({k for r in q["psnr"].values() for k in r})
                print(table([[k, *(q["psnr"][m].get(k, "-") for m in ("teacher", "light"))]
                             for k in keys], ["form", "teacher", "light"]))
                for model, per_image in q["psnr_per_image"].items():
                    for key in [k for k in per_image if k.endswith("cost dB")]:
                        print(f"{model} {key} per image: {per_image[key]}")
    print(f"\nwrote {write_json(args.out, results)}")


if __name__ == "__main__":
    main()
