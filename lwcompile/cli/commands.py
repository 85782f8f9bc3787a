"""The ``lwcompile`` command: lighten, plan, profile and report from the shell.

Results go to stdout (a table, or JSON with ``--json``); progress and library chatter go to
stderr, so ``--json`` output can be piped. Exit codes: 0 ok, 1 lwcompile refused (an
``LwCompileError``: the message says why), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lwcompile

from ..deploy import persist
from ..errors import ExampleInputError, LwCompileError, NotAModuleError, RuleError, one_line
from ..html_report import to_png, write_html
from ..measure.inputs import infer_example_inputs
from ..report import Report
from ..rule import Rule
from .spandrel import torchvision_stub

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2

EPILOG = """\
MODEL is a factory `package.module:callable` returning an nn.Module (the current folder is
importable), a checkpoint file whose architecture spandrel identifies (.pth, .pt, .ckpt,
.safetensors), or a file written by `lwcompile lighten`.

examples:
  lwcompile lighten examples.dncnn:build -o dncnn_light.pt
  lwcompile lighten 4x_esrgan.pth -o esrgan_light.pt --input 1x3x64x64 --json
  lwcompile lighten examples.dncnn:build -o light.pt --distill 2000 --data photos/
  lwcompile plan examples.srresnet:build
  lwcompile lighten examples.srresnet:build -o sr_light.pt --without image-output-squeeze
  lwcompile lighten examples.unet:build -o unet_light.pt --exclude 'up*.up' \
      --rule mypackage.rules:MyRule
  lwcompile profile 4x_esrgan.pth --input 1x3x32x32
  lwcompile export sr_light.pt -o sr_light.pte --input 1x3x128x128     # phones: ExecuTorch
  lwcompile export sr_light.pt -o sr_light.onnx                        # onnxruntime
  lwcompile report dncnn_light.pt --html report.html --teacher examples.dncnn:build

exit codes: 0 ok, 1 lwcompile refused (the message says why), 2 usage error
"""


class ModelSpecError(LwCompileError):
    """MODEL names no loadable network (no such file or factory, unidentifiable checkpoint)."""


class RuleSpecError(LwCompileError):
    """A --rule names nothing that makes an lwcompile Rule."""


class ExportSpecError(LwCompileError):
    """export lacks what the chosen runtime needs (e.g. the onnx package)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.run is _lighten and args.data is not None and not args.distill:
            parser.error("--data is only used with --distill")
        if (args.run is _export and not (args.mobile or args.onnx)
                and args.output.suffix not in (".pte", ".onnx")):
            parser.error(f"cannot tell the runtime from {args.output.name!r}: name it .pte "
                         "or .onnx, or pass --mobile or --onnx")
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        result = args.run(args)
    except LwCompileError as exc:
        print(f"lwcompile: error: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}}))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("lwcompile: interrupted", file=sys.stderr)
        return 130
    text = result.pop("text")  # each command returns its data and the human-readable form
    print(json.dumps(result, indent=2, default=str) if args.json else text)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lwcompile", formatter_class=formatter, epilog=EPILOG,
        description="Turn a PyTorch image-restoration network into a lightweight variant.")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], dict], help: str,
                model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=formatter)
        if model:
            p.add_argument("model", metavar="MODEL", help="module:factory or checkpoint file")
            p.add_argument("--input", action="append", type=_shape, metavar="SHAPE",
                           help="example input shape, e.g. 1x3x64x64; repeat for several "
                                "inputs (default: a 1xCx64x64 image, C from the first conv)")
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
        p.set_defaults(run=run)
        return p

    def rule_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                       help="a rule to use besides the default ones (a Rule class or factory, "
                            "e.g. mypackage.rules:MyRule); repeatable")
        p.add_argument("--without", action="append", metavar="RULE",
                       help="leave out the default rule of this name (e.g. "
                            "image-output-squeeze, to keep every image-facing layer standard "
                            "as the paper does); repeatable")
        p.add_argument("--exclude", action="append", metavar="GLOB",
                       help="keep the sites whose names match (e.g. 'up*.up'); repeatable")

    p = command("lighten", _lighten, "lighten MODEL and save the result (architecture + weights)")
    rule_option(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.pt",
                   help="where to save the lightened model (lwcompile.load reads it)")
    p.add_argument("--distill", type=_positive, metavar="STEPS",
                   help="then train the result for STEPS steps to reproduce MODEL's outputs")
    p.add_argument("--data", metavar="DIR",
                   help="folder of training images for --distill (default: scikit-image's)")
    rule_option(command("plan", _plan, "show what lighten would do to MODEL, without building it"))
    p = command("export", _export, "write MODEL for a runtime: ExecuTorch/XNNPACK or ONNX")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write it; .pte means --mobile, .onnx means --onnx")
    runtime = p.add_mutually_exclusive_group()
    runtime.add_argument("--mobile", action="store_true",
                         help="an XNNPACK-delegated ExecuTorch program (.pte), as phones run "
                              "it; needs lwcompile[mobile]")
    runtime.add_argument("--onnx", action="store_true",
                         help="ONNX for onnxruntime (height and width stay dynamic); needs "
                              "lwcompile[export]")
    command("profile", _profile, "parameters and MACs of MODEL, layer by layer")
    p = command("report", _report, "describe a saved lightened model, optionally as HTML",
                model=False)
    p.add_argument("saved", metavar="OUT.pt", type=Path, help="a file written by lighten")
    p.add_argument("--html", type=Path, metavar="REPORT.html",
                   help="write a self-contained HTML report (default: print the table)")
    p.add_argument("--teacher", metavar="MODEL", help="the original model, to show its output "
                   "beside the lightened one")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--image", type=Path, help="image for the output crops")
    source.add_argument("--data", metavar="DIR", help="folder whose first image is used")
    source.add_argument("--no-crops", action="store_true", help="no output crops")
    p.add_argument("--crop", type=_positive, default=64, metavar="PX",
                   help="size of the centre crop fed to the models (default 64)")
    return parser


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1x3x64x64")
    return dims


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# ------------------------------------------------------------------------------- commands

def _lighten(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model)
    inputs = _inputs(model, args.input)
    with _stage(f"lightening {type(model).__name__}", args.quiet):
        light = lwcompile.lighten(model, inputs, **_rules(args))
    if args.distill:
        distill = _distill_function()
        with _stage(f"distilling {args.distill} steps", args.quiet):
            distill(light, model, args.data, steps=args.distill)
    report: Report = light.lwcompile_report
    persist.save(light, args.output, report=report)
    text = f"{report}\n\nsaved to {args.output}"
    return {"model": args.model, "output": str(args.output), "class_name": type(light).__name__,
            "distill_steps": args.distill or 0, "report": report.to_dict(), "text": text}


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model(args.model)
    inputs = _inputs(model, args.input)
    with _stage(f"planning {type(model).__name__}", args.quiet):
        report = lwcompile.plan(model, inputs, **_rules(args))
    return {"model": args.model, "report": report.to_dict(), "text": str(report)}


def _export(args: argparse.Namespace) -> dict[str, Any]:
    """export_mobile or export_onnx of MODEL (a saved lightened model, or any other)."""
    mobile = args.mobile or (not args.onnx and args.output.suffix == ".pte")
    model = load_model(args.model)
    inputs = _inputs(model, args.input) or infer_example_inputs(model)
    where = "ExecuTorch (XNNPACK)" if mobile else "ONNX"
    with _stage(f"exporting {type(model).__name__} to {where}", args.quiet):
        if mobile:
            written = lwcompile.export_mobile(model, inputs, args.output)
            return {"model": args.model, "runtime": "executorch-xnnpack",
                    "export": written.to_dict(), "text": str(written)}
        try:
            path = lwcompile.export_onnx(model, inputs, args.output)
        except ImportError as exc:
            raise ExportSpecError(f"ONNX export needs the onnx package ({one_line(exc)}); "
                                  "install it with `pip install 'lwcompile[export]'`") from exc
    shapes = ", ".join("x".join(map(str, a.shape)) for a in inputs
                       if isinstance(a, torch.Tensor))
    text = (f"{path} ({path.stat().st_size / 1024:.0f} KiB, example inputs {shapes}; height "
            "and width dynamic)")
    return {"model": args.model, "runtime": "onnx", "export": {"path": str(path)},
            "text": text}


def _profile(args: argparse.Namespace) -> dict[str, Any]:
    """``lwcompile.profile`` where it exists; without it, the per-site costs of ``plan``."""
    model = load_model(args.model)
    inputs = _inputs(model, args.input)
    profile = _optional_function("profile")
    if profile is not None:
        args_ = inputs if inputs is not None else infer_example_inputs(model)
        with _stage(f"profiling {type(model).__name__}", args.quiet):
            try:
                result = profile(model, args_)
            except LwCompileError:
                raise
            except Exception as exc:
                raise ExampleInputError(f"{type(model).__name__} cannot be profiled on "
                                        f"the example input: {one_line(exc)}") from exc
        data = result.to_dict() if hasattr(result, "to_dict") else result
        return {"model": args.model, "profile": data, "text": str(result)}
    with _stage(f"profiling {type(model).__name__}", args.quiet):
        report = lwcompile.plan(model, inputs)
    layers = [{"site": r.site, "layer": r.original, "params": r.params_before,
               "macs": r.macs_before, "params_after": r.params_after,
               "macs_after": r.macs_after, "outcome": r.outcome} for r in report.rows]
    s = report.summary
    total = {"params": s.params_before, "macs": s.macs_before} if s else None
    return {"model": args.model, "layers": layers, "total": total,
            "text": _profile_table(layers, total)}


def _profile_table(layers: list[dict[str, Any]], total: dict[str, int] | None) -> str:
    macs = max(total["macs"] if total else sum(x["macs"] for x in layers), 1)
    rows = [("site", "layer", "params", "MACs", "% MACs", "after lighten (params / MACs)")]
    rows += [(x["site"] or "<root>", x["layer"], f"{x['params']:,}", f"{x['macs']:,}",
              f"{100 * x['macs'] / macs:.1f}",
              f"{x['params_after']:,} / {x['macs_after']:,}" if x["outcome"] == "applied"
              else "kept") for x in layers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if total:
        lines += ["", f"whole model: {total['params']:,} parameters, {total['macs']:,} MACs "
                      "(layers no rule looks at are counted here only)"]
    return "\n".join(lines)


def _report(args: argparse.Namespace) -> dict[str, Any]:
    header = persist.info(args.saved)
    report = header["report"] or {"rows": [], "summary": None, "log": [], "notes": {}}
    if args.html is None:
        text = str(persist.report_from_dict(report))
        return {"saved": str(args.saved), "report": report, "text": text}
    student = persist.load(args.saved)
    teacher = load_model(args.teacher) if args.teacher else None
    crops = None if args.no_crops else _crops(student, teacher, args)
    meta = {"file": args.saved.name, "parameters": f"{header['params']:,}",
            "lwcompile": header["lwcompile_version"], "torch": header["torch_version"]}
    meta = {k: v for k, v in meta.items() if v != "unknown"}  # version of a source tree
    write_html(report, args.html, crops, title=header["class_name"], meta=meta)
    return {"saved": str(args.saved), "html": str(args.html), "crops": len(crops or []),
            "text": f"wrote {args.html}" + (f" with {len(crops)} output crops" if crops else "")}


# ------------------------------------------------------------------------------- helpers

def load_model(spec: str) -> nn.Module:
    """The network MODEL names: an lwcompile save, a spandrel checkpoint or module:factory."""
    path = Path(spec)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(len(persist.MAGIC)) == persist.MAGIC:
                return persist.load(path)
        return _load_checkpoint(path)
    obj = _find(spec, ModelSpecError, "no file, nor a factory like 'package.module:build'")
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModelSpecError(f"{spec!r} is a {type(obj).__name__}, not a factory")
        try:
            obj = obj()
        except Exception as exc:
            raise ModelSpecError(f"calling {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise NotAModuleError(f"{spec!r} returned a {type(obj).__name__}, not an nn.Module")
    return obj


def _find(spec: str, error: type[LwCompileError], what: str) -> Any:
    """The object ``package.module:name`` names (the current folder importable too)."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise error(f"{spec!r} is {what}")
    if os.getcwd() not in sys.path:  # console scripts do not put the current folder there
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise error(f"cannot find {spec!r}: {one_line(exc)}") from exc
    return obj


def _rules(args: argparse.Namespace) -> dict[str, Any]:
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
    return {**chosen, "rules": [*kept, *(_user_rule(spec) for spec in args.rule or ())]}


def _user_rule(spec: str) -> Rule:
    obj = _find(spec, RuleSpecError, "not like 'package.module:RuleClass'")
    try:
        rule = obj() if callable(obj) and not isinstance(obj, Rule) else obj
    except Exception as exc:
        raise RuleSpecError(f"calling {spec!r} failed: {one_line(exc)}") from exc
    if not isinstance(rule, Rule):
        raise RuleSpecError(f"{spec!r} gives a {type(rule).__name__}, not an lwcompile Rule")
    return rule


def _load_checkpoint(path: Path) -> nn.Module:
    try:
        with torchvision_stub():
            from spandrel import ModelLoader
    except ImportError as exc:
        raise ModelSpecError(f"reading checkpoint {path} needs spandrel (pip install "
                             f"spandrel): {one_line(exc)}") from exc
    try:
        with torchvision_stub():
            model = ModelLoader().load_from_file(path).model
    except Exception as exc:  # spandrel raises ValueError, UnsupportedModelError, pickle errors
        why = one_line(exc).rstrip(": ")
        if why == "UnsupportedModelError":
            why = "no architecture spandrel knows matches its keys"
        raise ModelSpecError(f"{path} is not a model checkpoint spandrel can identify: "
                             f"{why}") from exc
    return model.eval()


def _inputs(model: nn.Module, shapes: list[tuple[int, ...]] | None) -> tuple | None:
    """Seeded random tensors of the given shapes, in the model's dtype; None: let lighten infer."""
    if not shapes:
        return None
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.rand(s, generator=generator).to(dtype) for s in shapes)


def _optional_function(name: str) -> Callable[..., Any] | None:
    """``lwcompile.<name>`` if exported, else ``lwcompile.<name>.<name>``, else None.

    distill and profile are younger than the command line: it uses them where present."""
    function = getattr(lwcompile, name, None)
    if callable(function):
        return function
    try:
        module = importlib.import_module(f"lwcompile.{name}")
    except ImportError:
        return None
    function = getattr(module, name, None)
    return function if callable(function) else None


def _distill_function() -> Callable[..., nn.Module]:
    distill = _optional_function("distill")
    if distill is None:
        raise LwCompileError("--distill needs lwcompile.distill, which this installation "
                             "does not have")
    return distill


def _crops(student: nn.Module, teacher: nn.Module | None,
           args: argparse.Namespace) -> list[tuple[str, bytes]] | None:
    """Input, teacher and student outputs on a centre crop; None (with a note) if impossible."""
    image = _crop_source(args)
    if image is None:
        return None
    from ..train.data import to_channels

    conv = next((m for m in student.modules() if isinstance(m, nn.Conv2d)), None)
    channels = conv.in_channels if conv else image.shape[0]
    if channels not in (1, 3):
        print(f"lwcompile: no output crops: the model takes {channels}-channel input, "
              "not an image", file=sys.stderr)
        return None
    x = to_channels(image, channels)
    h, w = x.shape[-2:]
    size = min(args.crop, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    x = x[None, :, top:top + size, left:left + size].contiguous()
    crops = [(f"input {size}x{size}", to_png(x))]
    pairs = [("teacher (original)", teacher)] if teacher is not None else []
    pairs.append(("student (lightened)", student))
    for label, model in pairs:
        try:
            with torch.no_grad():
                out = model.eval()(x)
        except Exception as exc:
            print(f"lwcompile: no output crops: {label} fails on a {size}x{size} crop: "
                  f"{one_line(exc)}", file=sys.stderr)
            return None
        while isinstance(out, tuple | list):
            out = out[0]
        crops.append((f"{label} {out.shape[-1]}x{out.shape[-2]}", to_png(out)))
    return crops


def _crop_source(args: argparse.Namespace) -> torch.Tensor | None:
    """The image to crop (CxHxW in [0, 1]): --image, the first of --data, or skimage's camera."""
    if args.data is not None:
        from ..train.data import load_folder

        return load_folder(args.data, channels=3)[0]
    if args.image is not None:
        return _read_image(args.image)
    try:
        import skimage.data
    except ImportError:
        print("lwcompile: no output crops (scikit-image is not installed; pass --image)",
              file=sys.stderr)
        return None
    return torch.from_numpy(skimage.data.camera()).float().div(255)[None]


def _read_image(path: Path) -> torch.Tensor:
    """An image file as a float CxHxW tensor in [0, 1], via scikit-image or else PIL."""
    try:
        from skimage.io import imread
    except ImportError:
        try:
            from PIL import Image
        except ImportError as exc:
            raise LwCompileError("--image needs scikit-image or PIL to read images") from exc

        def imread(p: Path) -> Any:
            return Image.open(p).convert("RGB")
    try:
        array = torch.from_numpy(np.array(imread(path)))
    except Exception as exc:
        raise LwCompileError(f"--image {path}: cannot read it as an image: "
                             f"{one_line(exc)}") from exc
    if array.dim() == 2:
        array = array[..., None]
    array = array[..., :3].permute(2, 0, 1)
    return array.float() / 255 if array.dtype == torch.uint8 else array.float()


@contextlib.contextmanager
def _stage(message: str, quiet: bool) -> Iterator[None]:
    """Say on stderr what is running (ticking seconds on a terminal) and how long it took.

    Whatever the library prints meanwhile (e.g. distill's progress) goes to stderr too, so
    stdout carries only the result."""
    err = sys.stderr
    if quiet:
        with contextlib.redirect_stdout(err):
            yield
        return
    start, stop = time.monotonic(), threading.Event()
    ticker = None
    if err.isatty():
        def tick() -> None:
            while not stop.wait(1.0):
                err.write(f"\rlwcompile: {message} ... {time.monotonic() - start:.0f} s")
                err.flush()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    else:
        print(f"lwcompile: {message} ...", file=err, flush=True)
    outcome = "failed"
    try:
        with contextlib.redirect_stdout(err):
            yield
        outcome = "done"
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        print(f"{chr(13) if ticker else ''}lwcompile: {message}: {outcome} in "
              f"{time.monotonic() - start:.1f} s", file=err, flush=True)


if __name__ == "__main__":
    sys.exit(main())
