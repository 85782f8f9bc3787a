"""One function per subcommand: lighten, plan, export, profile, report, convert.

Each takes the parsed arguments and returns its result as a dict for ``--json`` plus the
human-readable form under ``"text"``; ``app.main`` prints one or the other. The commands go
through the public API (``lwcompile.lighten``, ``lwcompile.distill``, ...), as a user's
script would.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import lwcompile

from ..deploy import persist
from ..errors import ExampleInputError, LwCompileError, RuleError, one_line
from ..html_report import write_html
from ..measure.inputs import infer_example_inputs
from ..report import Report
from ..rule import Rule
from .crops import output_crops
from .loading import RuleSpecError, load_model, load_rule
from .progress import stage


class ExportSpecError(LwCompileError):
    """export lacks what the chosen runtime needs (e.g. the onnx package)."""


def lighten(args: argparse.Namespace) -> dict[str, Any]:
    """Lighten MODEL, distil it if asked, and save it with its report."""
    model = _model(args)
    inputs = _example_inputs(model, args.input)
    with stage(f"lightening {type(model).__name__}", args.quiet):
        light = lwcompile.lighten(model, inputs, **_rule_choice(args))
    tuned = None
    if args.budget_ms is not None:
        target = args.target or "onnxruntime"
        with stage(f"choosing squeeze widths for {args.budget_ms:g} ms in {target}",
                   args.quiet):
            tuned = lwcompile.tune(light, inputs or infer_example_inputs(model),
                                   target=target, precision=args.precision or "fp32",
                                   budget_ms=args.budget_ms)
        light = tuned.model
    if args.distill:
        with stage(f"distilling {args.distill} steps", args.quiet):
            lwcompile.distill(light, model, args.data, steps=args.distill)
    report: Report = light.lwcompile_report
    persist.save(light, args.output, report=report, source=args.model)
    text = (f"{report}\n\nsaved to {args.output} (weights and plan; load it with "
            f"--original {args.model})")
    if tuned is not None and not tuned.report.exact and not args.distill:
        text += (f"\nnot exact: train it before use, e.g. lwcompile distill {args.output} "
                 f"--teacher {args.model} -o DISTILLED.safetensors")
    return {"model": args.model, "output": str(args.output), "class_name": type(light).__name__,
            "distill_steps": args.distill or 0, "report": report.to_dict(),
            **_tune_result(tuned), "text": _with_tune_report(text, tuned)}


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """What lighten would do to MODEL, without building the result."""
    model = _model(args)
    inputs = _example_inputs(model, args.input)
    with stage(f"planning {type(model).__name__}", args.quiet):
        report = lwcompile.plan(model, inputs, **_rule_choice(args))
    return {"model": args.model, "report": report.to_dict(), "text": str(report)}


def export(args: argparse.Namespace) -> dict[str, Any]:
    """export_mobile or export_onnx of MODEL (a saved lightened model, or any other)."""
    mobile = args.mobile or (not args.onnx and args.output.suffix == ".pte")
    model = _model(args)
    inputs = _example_inputs(model, args.input) or infer_example_inputs(model)
    where = "ExecuTorch (XNNPACK)" if mobile else "ONNX"
    tuned = None
    if args.tune:
        with stage(f"timing {type(model).__name__}'s forms in {where}", args.quiet):
            tuned = lwcompile.tune(model, inputs, target="xnnpack" if mobile else "onnxruntime",
                                   precision=args.precision, calibration=args.calibration,
                                   min_psnr=args.min_psnr)
        model, args.precision = tuned.model, tuned.precision
    with stage(f"exporting {type(model).__name__} to {where}", args.quiet):
        int8 = {"precision": args.precision, "calibration": args.calibration,
                "min_psnr": args.min_psnr,
                "qat_steps": args.qat_steps if args.precision == "int8" else 0}
        if mobile:
            written = lwcompile.export_mobile(model, inputs, args.output, **int8)
            return {"model": args.model, "runtime": "executorch-xnnpack",
                    "export": written.to_dict(), **_tune_result(tuned),
                    "text": _with_tune_report(str(written), tuned)}
        try:
            path = lwcompile.export_onnx(model, inputs, args.output, **int8)
        except ImportError as exc:
            raise ExportSpecError(f"ONNX export needs the onnx package ({one_line(exc)}); "
                                  "install it with `pip install 'lwcompile[export]'`") from exc
    shapes = ", ".join("x".join(map(str, a.shape)) for a in inputs
                       if isinstance(a, torch.Tensor))
    text = (f"{path} ({path.stat().st_size / 1024:.0f} KiB, example inputs {shapes}; height "
            f"and width dynamic; {path.exporter} exporter)")
    written = {"path": str(path), "precision": args.precision, "exporter": path.exporter}
    if path.int8_report is not None:
        text += f"\n{path.int8_report}"
        written["int8"] = path.int8_report.to_dict()
    return {"model": args.model, "runtime": "onnx", "export": written, **_tune_result(tuned),
            "text": _with_tune_report(text, tuned)}


def _tune_result(tuned: lwcompile.Tuned | None) -> dict[str, Any]:
    return {} if tuned is None else {"tune": tuned.report.to_dict()}


def _with_tune_report(text: str, tuned: lwcompile.Tuned | None) -> str:
    return text if tuned is None else f"{tuned.report}\n{text}"


def profile(args: argparse.Namespace) -> dict[str, Any]:
    """``lwcompile.profile`` of MODEL: parameters, MACs and time per leaf layer."""
    model = _model(args)
    inputs = _example_inputs(model, args.input) or infer_example_inputs(model)
    with stage(f"profiling {type(model).__name__}", args.quiet):
        try:
            result = lwcompile.profile(model, inputs)
        except LwCompileError:
            raise
        except Exception as exc:  # the model's own forward failed on these inputs
            raise ExampleInputError(f"{type(model).__name__} cannot be profiled on "
                                    f"the example input: {one_line(exc)}") from exc
    return {"model": args.model, "profile": result.to_dict(), "text": str(result)}


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The report saved with a lightened model, as a table or a self-contained HTML page."""
    header = persist.info(args.saved)
    saved_report = header["report"] or {"rows": [], "summary": None, "log": [], "notes": {}}
    if args.html is None:
        text = str(persist.report_from_dict(saved_report))
        return {"saved": str(args.saved), "report": saved_report, "text": text}
    crops = None
    if not args.no_crops:
        student = load_model(str(args.saved), original=args.original or args.teacher,
                             trust_pickle=args.trust_pickle, rules=_replay_rules(args))
        teacher = load_model(args.teacher) if args.teacher else None
        crops = output_crops(student, teacher, image=args.image, data=args.data,
                             size=args.crop)
    meta = {"file": args.saved.name, "parameters": f"{header['params']:,}",
            "lwcompile": header["lwcompile_version"], "torch": header["torch_version"]}
    meta = {k: v for k, v in meta.items() if v != "unknown"}  # version of a source tree
    write_html(saved_report, args.html, crops, title=header["class_name"], meta=meta)
    return {"saved": str(args.saved), "html": str(args.html), "crops": len(crops or []),
            "text": f"wrote {args.html}" + (f" with {len(crops)} output crops" if crops else "")}


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """A pickle model file (lwcompile's first format) rewritten as a data-only one."""
    original = load_model(args.original)
    inputs = _example_inputs(original, args.input)
    with stage(f"converting {args.old.name}", args.quiet):
        path = lwcompile.convert(args.old, args.output, original, trust=args.trust_pickle,
                                 rules=_replay_rules(args), example_inputs=inputs,
                                 source=args.original)
    header = persist.info(path)
    return {"old": str(args.old), "output": str(path), "class_name": header["class_name"],
            "sites": len(header["plan"]["sites"]),
            "text": f"wrote {path}: {header['class_name']}, {len(header['plan']['sites'])} "
                    f"rewritten sites replayed and checked (load it with --original "
                    f"{args.original})"}


def _model(args: argparse.Namespace) -> nn.Module:
    """MODEL, where it is an lwcompile model file rebuilt from --original (with --rule's
    rules) or, for a pickle file, loaded only with --trust-pickle."""
    return load_model(args.model, original=getattr(args, "original", None),
                      trust_pickle=getattr(args, "trust_pickle", False),
                      rules=_replay_rules(args))


def _replay_rules(args: argparse.Namespace) -> list[Rule]:
    return [load_rule(spec) for spec in getattr(args, "rule", None) or ()]


def _example_inputs(model: nn.Module, shapes: list[tuple[int, ...]] | None) -> tuple | None:
    """Seeded random tensors of the --input shapes, in the model's dtype; None when no shape
    was given, so that the library infers its own."""
    if not shapes:
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.rand(s, generator=generator).to(dtype) for s in shapes)


def _rule_choice(args: argparse.Namespace) -> dict[str, Any]:
    """lighten/plan's ``rules=`` and ``exclude=`` from --rule, --without and --exclude."""
    chosen: dict[str, Any] = {}
    if args.exclude:
        chosen["exclude"] = list(args.exclude)
    if not args.rule and not args.without:
        return chosen
    try:
        kept = lwcompile.default_rules(without=args.without or ())
    except RuleError as exc:
        raise RuleSpecError(f"--without: {exc}") from exc
    return {**chosen, "rules": [*kept, *(load_rule(spec) for spec in args.rule or ())]}
