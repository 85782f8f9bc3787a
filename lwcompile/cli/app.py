"""The ``lwcompile`` command line: its arguments, its output and its exit codes.

Results go to stdout (a table, or JSON with ``--json``); progress and library chatter go to
stderr, so ``--json`` output can be piped. Exit codes: 0 ok, 1 lwcompile refused (an
``LwCompileError``: the message says why), 2 usage error, 3 unexpected error (any other
exception: a bug, told apart from a refusal; one line, the traceback with ``--debug``).
What each subcommand does is in ``commands``; this module only parses, dispatches and
reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LwCompileError, one_line
from . import commands, training

EXIT_OK, EXIT_REFUSED, EXIT_CRASHED, EXIT_INTERRUPTED = 0, 1, 3, 130  # argparse: 2 on misuse

EPILOG = """\
MODEL is a factory `package.module:callable` returning an nn.Module (the current folder is
importable), a checkpoint file whose architecture spandrel identifies (.pth, .pt, .ckpt,
.safetensors), or a file written by `lwcompile lighten` (weights and plan, no code: it is
rebuilt from --original MODEL, the model it was lightened from).

examples:
  lwcompile lighten examples.dncnn:build -o dncnn_light.safetensors
  lwcompile lighten 4x_esrgan.pth -o esrgan_light.safetensors --input 1x3x64x64 --json
  lwcompile lighten examples.dncnn:build -o light.safetensors --distill 2000 --data photos/
  lwcompile lighten examples.dncnn:build -o fast.safetensors --input 1x1x256x256 \
      --budget-ms 40                          # squeezes chosen to run within 40 ms here
  lwcompile plan examples.srresnet:build
  lwcompile lighten examples.srresnet:build -o sr.safetensors --without image-output-squeeze
  lwcompile lighten examples.unet:build -o unet_light.safetensors --exclude 'up*.up' \
      --rule mypackage.rules:MyRule
  lwcompile profile 4x_esrgan.pth --input 1x3x32x32
  lwcompile export sr.safetensors --original examples.srresnet:build -o sr.pte \
      --input 1x3x128x128                                              # phones: ExecuTorch
  lwcompile export esrgan_light.safetensors --original 4x_esrgan.pth -o esrgan.onnx
  lwcompile export sr.safetensors --original examples.srresnet:build -o sr_int8.onnx \
      --precision int8 --calibration photos/
  lwcompile export sr.safetensors --original examples.srresnet:build -o sr.onnx \
      --input 1x3x128x128 --tune --precision auto      # forms and precision timed here
  lwcompile report dncnn_light.safetensors
  lwcompile report dncnn_light.safetensors --html report.html --teacher examples.dncnn:build
  lwcompile distill light.safetensors --teacher examples.dncnn:build --data photos/ \
      --noise 25 --val held_out/ --minutes 30 -o trained.safetensors
  lwcompile eval trained.safetensors --teacher examples.dncnn:build --data held_out/ --noise 25
  lwcompile convert old_light.pt --original examples.dncnn:build --trust-pickle \
      -o light.safetensors

exit codes: 0 ok, 1 lwcompile refused (the message says why), 2 usage error,
  3 unexpected error (a bug: rerun with --debug for the traceback)
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_combinations(parser, args)
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
        return EXIT_INTERRUPTED
    except Exception as exc:  # not a refusal: a bug, told apart by its exit code
        if args.debug:
            traceback.print_exc()
        print(f"lwcompile: unexpected error: {one_line(exc)} (a bug; rerun with --debug for "
              "the traceback)", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc),
                                        "unexpected": True}}))
        return EXIT_CRASHED
    text = result.pop("text")  # each command returns its data and the human-readable form
    print(json.dumps(result, indent=2, default=str) if args.json else text)
    return EXIT_OK


def _check_combinations(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot express: options that only make sense together."""
    if args.run is commands.lighten and args.data is not None and not args.distill:
        parser.error("--data is only used with --distill")
    if args.run is commands.lighten and args.budget_ms is None \
            and (args.target is not None or args.precision is not None):
        parser.error("--target and --precision are only used with --budget-ms")
    if (args.run is commands.export and args.precision == "fp32"
            and (args.calibration is not None or args.min_psnr is not None
                 or args.qat_steps)):
        parser.error("--calibration, --min-psnr and --qat-steps are only used with "
                     "--precision int8 or auto")
    if args.run is commands.export and args.precision == "auto" and not args.tune:
        parser.error("--precision auto needs --tune (it times fp32 against int8)")
    if (args.run is commands.export and not (args.mobile or args.onnx)
            and args.output.suffix not in (".pte", ".onnx")):
        parser.error(f"cannot tell the runtime from {args.output.name!r}: name it .pte "
                     "or .onnx, or pass --mobile or --onnx")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per function in ``commands`` (``args.run``)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="lwcompile", formatter_class=formatter, epilog=EPILOG,
        description="Turn a PyTorch image-restoration network into a lightweight variant.")
    parser.add_argument("--debug", action="store_true",
                        help="on an unexpected error, print the full traceback")
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
        if model:
            file_options(p)
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
        p.set_defaults(run=run)
        return p

    def file_options(p: argparse.ArgumentParser, rule: bool = False) -> None:
        p.add_argument("--original", metavar="MODEL",
                       help="for a model file written by lighten: the model it was lightened "
                            "from (factory or checkpoint), which the file's plan is replayed on")
        p.add_argument("--trust-pickle", action="store_true",
                       help="load a model file of lwcompile's first format, a pickle: this "
                            "runs code chosen by whoever wrote the file")
        if rule:
            p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                           help="a rule of your own that the model file's plan names "
                                "(never imported from the file itself); repeatable")

    def rule_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                       help="a rule to use besides the default ones (a Rule class or factory, "
                            "e.g. mypackage.rules:MyRule); repeatable")
        p.add_argument("--without", action="append", metavar="RULE",
                       help="leave out the default rule of this name (e.g. "
                            "image-output-squeeze, to keep every image-facing layer standard "
                            "as the paper does); repeatable")
        p.add_argument("--exclude", action="append", metavar="GLOB",
                       help="keep the sites whose names match (e.g. 'up*.up'); repeatable")

    p = command("lighten", commands.lighten,
                "lighten MODEL and save the result (architecture + weights)")
    rule_options(p)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.safetensors",
                   help="where to save the lightened model: its weights and the plan that "
                        "made it, data only (lwcompile.load reads it with the original)")
    p.add_argument("--distill", type=_positive, metavar="STEPS",
                   help="then train the result for STEPS steps to reproduce MODEL's outputs")
    p.add_argument("--data", metavar="DIR",
                   help="folder of training images for --distill (default: scikit-image's)")
    p.add_argument("--budget-ms", type=_positive_float, metavar="MS",
                   help="choose each LIST's squeeze ratio so that the model runs within MS "
                        "milliseconds at the --input size on --target, timed here "
                        "(lwcompile.tune budget_ms); narrowed LISTs need --distill or "
                        "`lwcompile distill` afterwards")
    p.add_argument("--target", choices=("onnxruntime", "xnnpack", "torch"),
                   help="the runtime --budget-ms is timed in (default onnxruntime)")
    p.add_argument("--precision", choices=("fp32", "int8"),
                   help="the precision --budget-ms is timed in (default fp32)")
    rule_options(command("plan", commands.plan,
                         "show what lighten would do to MODEL, without building it"))
    p = command("export", commands.export,
                "write MODEL for a runtime: ExecuTorch/XNNPACK or ONNX")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                   help="where to write it; .pte means --mobile, .onnx means --onnx")
    runtime = p.add_mutually_exclusive_group()
    runtime.add_argument("--mobile", action="store_true",
                         help="an XNNPACK-delegated ExecuTorch program (.pte), as phones run "
                              "it; needs lwcompile[mobile]")
    runtime.add_argument("--onnx", action="store_true",
                         help="ONNX for onnxruntime (height and width stay dynamic); needs "
                              "lwcompile[export]")
    p.add_argument("--precision", choices=("fp32", "int8", "auto"), default="fp32",
                   help="int8: quantise (onnxruntime QDQ or XNNPACK pt2e, per-channel "
                        "weights), measured against float on held-out crops; auto (with "
                        "--tune): the faster of the two, timed here (default fp32)")
    p.add_argument("--tune", action="store_true",
                   help="time each LIST's exact deployed forms in the target runtime at the "
                        "--input size and export the fastest (lwcompile.tune)")
    p.add_argument("--calibration", metavar="DIR",
                   help="folder of images to calibrate int8 on (default: scikit-image's)")
    p.add_argument("--min-psnr", type=float, metavar="DB",
                   help="refuse (write nothing) if int8's PSNR against float is below DB")
    p.add_argument("--qat-steps", type=int, default=0, metavar="N",
                   help="fine-tune the weights and activation ranges under simulated int8 for "
                        "N steps first; kept only if the int8 output measures closer to float "
                        "(default 0)")
    p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                   help="a rule of your own that MODEL's plan names (never imported from "
                        "the file itself); repeatable")
    p = command("profile", commands.profile, "parameters and MACs of MODEL, layer by layer")
    p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                   help="a rule of your own that MODEL's plan names; repeatable")
    p = command("report", commands.report,
                "describe a saved lightened model, optionally as HTML", model=False)
    p.add_argument("saved", metavar="OUT.safetensors", type=Path,
                   help="a file written by lighten")
    file_options(p, rule=True)
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
    p = command("convert", commands.convert, "rewrite a model file of lwcompile's first "
                "format (a pickle) as a data-only one, checked by replaying it", model=False)
    p.add_argument("old", metavar="OLD.pt", type=Path, help="a pickle file written by lighten")
    p.add_argument("--original", required=True, metavar="MODEL",
                   help="the model OLD was lightened from (factory or checkpoint)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="required: OLD is unpickled once, which runs code chosen by whoever "
                        "wrote it")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="NEW.safetensors")
    p.add_argument("--input", action="append", type=_shape, metavar="SHAPE",
                   help="the example input shape lighten ran on, if it was given then")
    p.add_argument("--rule", action="append", metavar="MODULE:CLASS",
                   help="a rule of your own that made OLD; repeatable")
    training.register(command)  # distill, eval
    return parser


def _shape(text: str) -> tuple[int, ...]:
    """An --input shape such as ``1x3x64x64``."""
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value
