"""Export a model to an ExecuTorch ``.pte`` run by XNNPACK, and say which ops XNNPACK took.

    export = export_mobile(light, example_inputs, "dncnn.pte")
    print(export.report)      # ops and MACs delegated to XNNPACK vs left to portable kernels

A light network only pays off on a phone if its cheap ops (depthwise and thin 1x1 convs,
concats, bilinear resizes, channel shuffles) run inside the XNNPACK delegate: an op left to
ExecuTorch's portable kernels runs as a plain single-threaded reference kernel and splits the
delegate in two, with layout conversions at each boundary. The report is read from the
lowered program itself, so it is what the ``.pte`` does.

Needs ExecuTorch (``pip install lwcompile[mobile]``); tested with executorch 1.5.1 and
torch 2.13. Shapes are static: the ``.pte`` accepts inputs of the example inputs' shapes.
A non-tensor argument (a noise level) is fixed to its example value by ``torch.export`` but
keeps its place: call the program with every argument, as the model. A model that writes
into its input (RCAN's ``x *= rgb_range``) gets a program that returns the written input
first (ExecuTorch's convention); ``MobileExport.leading_outputs`` counts them.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .. import arguments as check
from ..errors import ExportError, LwCompileError, one_line, raised_as
from ..files import write_atomic
from ..measure.inputs import fresh
from ..tracing.fx_helpers import one_at_a_time
from ..train.data import Degrade
from . import int8
from .aten_rewrites import float_op_forms, strided_views_made_contiguous, xnnpack_forms
from .delegation import DelegationReport, delegation_report
from .dense_mixtures import dense_mixtures
from .keyword_calls import keyword_calls_exportable

INSTALL_HINT = "pip install lwcompile[mobile]"


class MobileUnavailableError(LwCompileError, ImportError):
    """ExecuTorch (the mobile runtime and its XNNPACK backend) is not installed."""


class MobileExportError(ExportError):
    """torch.export or ExecuTorch lowering failed on this model, or the ExecuTorch runtime
    could not run the program it made; the cause is chained and nothing is written."""


def _executorch() -> tuple[Any, Any]:
    """Import ExecuTorch lazily: it is an optional, heavy dependency of this module only."""
    try:
        import executorch.exir as exir
        import executorch.kernels.quantized  # noqa: F401  (de)quantising outside XNNPACK
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )
    except ImportError as exc:
        raise MobileUnavailableError(
            f"mobile export needs ExecuTorch, which is not installed ({one_line(exc)}); "
            f"install it with `{INSTALL_HINT}`"
        ) from exc
    return exir, XnnpackPartitioner


@dataclass
class MobileExport:
    """A written ``.pte`` and what XNNPACK took of it."""

    path: Path
    size_bytes: int
    input_shapes: list[tuple[int, ...]]  # of the tensor arguments
    report: DelegationReport
    #: equivalent forms emitted for XNNPACK (``deploy.aten_rewrites``): kind -> count
    forms: dict[str, int]
    #: max |pte - eager| on the example inputs, or None when not checked
    max_abs_error: float | None = None
    #: how far the int8 program is from float on held-out crops (None for fp32)
    int8_report: int8.Int8Report | None = None
    #: outputs the program returns before the model's own: the inputs the model writes
    #: into (RCAN's ``x *= rgb_range``), which ExecuTorch hands back
    leading_outputs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size_bytes": self.size_bytes,
                "input_shapes": [list(s) for s in self.input_shapes], "forms": dict(self.forms),
                "max_abs_error": self.max_abs_error, "report": self.report.to_dict(),
                "int8": None if self.int8_report is None else self.int8_report.to_dict(),
                "leading_outputs": self.leading_outputs}

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        checked = ("" if self.max_abs_error is None
                   else f", max |pte - eager| = {self.max_abs_error:.2e}")
        forms = ", ".join(f"{k} x{n}" for k, n in self.forms.items()) or "none"
        return (f"{self.path} ({self.size_bytes / 1024:.0f} KiB, inputs {shapes}{checked})\n"
                f"XNNPACK forms: {forms}\n{self.report}"
                + ("" if self.int8_report is None else f"\n{self.int8_report}"))


@one_at_a_time  # torch.export and ExecuTorch lowering hold process-wide state
def export_mobile(model: nn.Module, example_inputs: tuple, path: str | Path, *,
                  optimize: bool = True, verify: bool = True, precision: str = "fp32",
                  calibration: Any = None, degrade: Degrade | None = None,
                  min_psnr: float | None = None,
                  target_psnr: float = int8.DEFAULT_TARGET_PSNR,
                  max_float_layers: int = int8.DEFAULT_MAX_FLOAT_LAYERS,
                  calibration_count: int = 8, evaluation_count: int = 4,
                  qat_steps: int = 0) -> MobileExport:
    """Write ``model`` as an XNNPACK-delegated ExecuTorch program to ``path``.

    An eval copy of the model is exported (BatchNorm with running statistics, as deployed);
    the model itself is never switched or run, so other threads may keep using it. With
    ``optimize``, BatchNorms and ReLUs after a concat and concats feeding squeezing convs
    are rewritten into equivalent forms XNNPACK fuses (``deploy.aten_rewrites``; outputs
    change by float rounding only); in int8 the forms of ops that stay float (Mish, channel
    means, splits) are applied to the quantised graph (``float_op_forms``), so that the
    quantiser sees them as they were. Constant subexpressions are folded before partitioning:
    ``1 - mask`` otherwise leaves a copy of the scalar 1 outside XNNPACK. In int8, a zero pad
    of a dequantised tensor pads the int8 tensor instead (``_pads_on_int8_pass``), which
    XNNPACK would otherwise refuse to build.
    With ``verify``, the program is run once on copies of ``example_inputs`` by the
    ExecuTorch runtime before it is written, and compared with the eager model
    (``max_abs_error``, over every tensor of nested outputs); a program the runtime cannot
    run is a ``MobileExportError`` and no file; so is an int8 program whose output is further
    from float than the quantised model it was lowered from (by ``INT8_PROGRAM_SLACK_DB``).
    An int8 program that does not run there is lowered once more with its strided image
    views copied contiguous (``strided-view-made-contiguous``; KBNet's program ran only
    so), and refused if it still does not run. A mixture of experts picking its experts in Python
    runs every expert, the unpicked weighted by zero (``dense_mixtures``; ``dense-mixture``
    in ``forms``): exact, and what torch.export can record.

    ``precision="int8"`` quantises with pt2e and ``XNNPACKQuantizer`` (per-channel
    symmetric; ``deploy.int8_xnnpack``), calibrated on ``calibration`` (and ``degrade``) as
    ``export_onnx`` is, and measured against the float model on held-out crops
    (``int8_report``); the same
    ``target_psnr``, ``max_float_layers`` and ``min_psnr`` (below it: ``Int8QualityError``,
    nothing written). ``qat_steps`` > 0 first fine-tunes the deployed graph's weights and
    activation ranges under simulated int8 for that many steps (``deploy.int8_finetune``;
    one input per step, drawn as the calibration is, cut to 128x128 where the example is
    larger), so that they lose less
    when quantised; the report still measures against ``model``. The file is written
    atomically.
    """
    check.module("export_mobile", "model", model)
    example_inputs = check.inputs("export_mobile", "example_inputs", example_inputs)
    path = check.destination("export_mobile", "path", path)
    check.flag("export_mobile", "optimize", optimize)
    check.flag("export_mobile", "verify", verify)
    int8.check_precision(precision)
    int8.validate_options(min_psnr, target_psnr, max_float_layers, calibration_count,
                          evaluation_count)
    qat_steps = int8.check_qat_steps("export_mobile", qat_steps, precision)
    exir, XnnpackPartitioner = _executorch()
    if precision == "int8":
        from .int8_xnnpack import quantize_pt2e
    path = Path(path)
    int8_report = None
    model = copy.deepcopy(model).eval()
    keyword_calls_exportable(model)
    mixtures = dense_mixtures(model)
    example_inputs = fresh(example_inputs)
    with raised_as(MobileExportError, "could not export for XNNPACK"), torch.no_grad():
        for_int8 = precision == "int8"
        exported, forms = _deployed(model, example_inputs, optimize, for_int8)
        forms["dense-mixture"] += mixtures
        if for_int8:
            quantized, int8_report = quantize_pt2e(
                exported.module(), model, example_inputs, calibration, degrade=degrade,
                min_psnr=min_psnr, target_psnr=max(target_psnr, min_psnr or target_psnr),
                max_float_layers=max_float_layers, calibration_count=calibration_count,
                evaluation_count=evaluation_count, qat_steps=qat_steps,
                export_at=lambda args: _deployed(model, args, optimize,
                                                 for_int8)[0].module())
            if optimize:
                forms += float_op_forms(quantized)
            exported = torch.export.export(quantized, example_inputs)
        with raised_as(MobileExportError, "could not export for XNNPACK",
                       _int8_limits(quantized) if for_int8 else ""):
            program, report, leading = _lowered(exir, XnnpackPartitioner, exported)
        expected = model(*fresh(example_inputs)) if verify else None
        simulated = quantized(*fresh(example_inputs)) if verify and for_int8 else None
    error = None
    if expected is not None:
        try:
            got = _run_program(program.buffer, fresh(example_inputs), leading)
        except MobileExportError as failure:
            relaid = strided_views_made_contiguous(quantized) if for_int8 else None
            if not relaid:
                if for_int8 and (limits := _int8_limits(quantized)):
                    raise MobileExportError(f"{failure}{limits}") from failure
                raise
            forms += relaid
            with raised_as(MobileExportError, "could not export for XNNPACK"), \
                    torch.no_grad():
                program, report, leading = _lowered(
                    exir, XnnpackPartitioner, torch.export.export(quantized, example_inputs))
            got = _run_program(program.buffer, fresh(example_inputs), leading)
        error = _compared(got, expected, simulated)
    write_atomic(path, lambda f: f.write(program.buffer))
    shapes = [tuple(a.shape) for a in example_inputs if isinstance(a, Tensor)]
    return MobileExport(path, path.stat().st_size, shapes, report, dict(+forms), error,
                        int8_report, leading)


def _int8_limits(quantized: torch.fx.GraphModule) -> str:
    """What in a quantised graph XNNPACK's int8 cannot take, worded for its refusal ("" if
    nothing known): convs whose weights are computed."""
    from .int8_xnnpack import computed_weight_convs

    names = computed_weight_convs(quantized)
    if not names:
        return ""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"; the model computes conv weights from its input ({shown}: modulated convs), "
            f"which XNNPACK cannot run in int8: export it in fp32, or in int8 with "
            f"export_onnx")


def _leading_outputs(program: torch.export.ExportedProgram) -> int:
    """How many outputs come before the user's: ExecuTorch returns each input the graph
    writes into first."""
    from torch.export.graph_signature import OutputKind

    kinds = [spec.kind for spec in program.graph_signature.output_specs]
    return kinds.index(OutputKind.USER_OUTPUT) if OutputKind.USER_OUTPUT in kinds else 0


#: how far (dB) the int8 program's output may be further from float than the quantised torch
#: model's (which the int8 report measured): XNNPACK rounds a little differently
INT8_PROGRAM_SLACK_DB = 3.0
#: the quantised model's PSNR above which the program is held to this one instead
INT8_PROGRAM_CHECKED_DB = 45.0


def _lowered(exir: Any, partitioner: Any,
             exported: torch.export.ExportedProgram) -> tuple[Any, DelegationReport, int]:
    """``exported`` lowered to XNNPACK: the ExecuTorch program, what was delegated, and how
    many written inputs lead its outputs."""
    lowered = exir.to_edge_transform_and_lower(
        exported, transform_passes=[_fold_constants_pass(), _pads_on_int8_pass()],
        partitioner=[partitioner()],
    )
    edge = lowered.exported_program()
    report, leading = delegation_report(edge), _leading_outputs(edge)  # before to_executorch
    return lowered.to_executorch(), report, leading  # rewrites ``edge`` into out-variants


def _run_program(buffer: bytes, example_inputs: tuple, leading: int) -> list[Tensor]:
    """The tensors ``buffer``'s program returns (after the ``leading`` written inputs),
    run from a temporary file before it is written."""
    with tempfile.TemporaryDirectory(prefix="lwcompile-pte-") as tmp:
        staged = Path(tmp) / "model.pte"
        staged.write_bytes(buffer)
        with raised_as(MobileExportError,
                       "the ExecuTorch runtime could not run the exported program",
                       " (its log on stderr names the failing operator; nothing was written)"):
            return [g for g in load_pte(staged)(*example_inputs)[leading:]
                    if isinstance(g, Tensor)]


def _compared(got: list[Tensor], expected: Any, simulated: Any = None) -> float:
    """Max |program - eager| over the tensors of the outputs (nested ones flattened, as the
    program returns them). ``simulated``: the quantised torch model's output for an int8
    program; a program further from float than it by more than ``INT8_PROGRAM_SLACK_DB``
    computes something else, and is refused."""
    want = [w for w in pytree.tree_leaves(expected) if isinstance(w, Tensor)]
    if len(got) != len(want):
        raise MobileExportError(f"the exported program returns {len(got)} tensors, the model "
                                f"{len(want)}")
    if simulated is not None and want:
        simulated_db = int8.compare([want[0]], [int8.first_output(simulated)])[0]
        program_db = int8.compare([want[0]], [got[0]])[0]
        # capped: a near-exact simulation must not make XNNPACK's own rounding a refusal
        if program_db < min(simulated_db, INT8_PROGRAM_CHECKED_DB) - INT8_PROGRAM_SLACK_DB:
            raise MobileExportError(
                f"the int8 program's output is {program_db:.1f} dB PSNR from float on the "
                f"example input, where the quantised model it was lowered from is "
                f"{simulated_db:.1f} dB: XNNPACK computes something else; nothing was written")
    return max((float((g - w).abs().max()) for g, w in zip(got, want, strict=True)),
               default=0.0)


def _deployed(model: nn.Module, args: tuple, optimize: bool,
              quantized: bool = False) -> tuple[torch.export.ExportedProgram, Counter[str]]:
    """``model`` exported at the size of ``args`` in the form XNNPACK gets (with
    ``optimize``, rewritten by ``xnnpack_forms`` and exported again; ``quantized``: in the
    form for int8), and the forms used."""
    exported = torch.export.export(model, args)
    forms: Counter[str] = Counter()
    if optimize:
        module = exported.module()
        forms = xnnpack_forms(module, quantized)
        if forms:
            exported = torch.export.export(module, args)
    return exported, forms


def load_pte(path: str | Path) -> Callable[..., list[Tensor]]:
    """Load a ``.pte`` in the ExecuTorch Python runtime; call the result with the inputs."""
    _executorch()
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    return lambda *inputs: list(method.execute(list(inputs)))


def _pads_on_int8_pass() -> Any:
    """An ExecuTorch pass moving every zero pad of a dequantised tensor before the
    dequantisation: ``pad(dequantize(q), 0)`` is ``dequantize(pad(q, zero_point))``, exactly.

    XNNPACK takes a pad in float only, and built one whose input came from a dequantisation
    with an int8 input and a float output, which it refused (``StaticConstantPad``: invalid
    parameter): the int8 program did not load. A zero pad after a quantised op is common
    (windowed attention padding to a multiple of the window, and ExecuTorch's decomposition
    of an unfold: HAT, IPT). On the int8 tensor the pad runs in ExecuTorch's own kernels.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult

    pad = exir_ops.edge.aten.constant_pad_nd.default
    dequantize = exir_ops.edge.quantized_decomposed.dequantize_per_tensor.default

    class PadsOnInt8(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> ExportedProgramPassResult:
            graph = exported_program.graph_module.graph
            moved = 0
            for node in list(graph.nodes):
                source = node.args[0] if node.target is pad else None
                if getattr(source, "target", None) is not dequantize or (
                        node.args[2] if len(node.args) > 2 else 0.0) != 0:
                    continue
                quantized, _, zero_point = source.args[:3]
                if not isinstance(zero_point, int):
                    continue
                with graph.inserting_before(node):
                    padded = graph.call_function(pad, (quantized, node.args[1], zero_point))
                    out = graph.call_function(dequantize, (padded, *source.args[1:]),
                                              dict(source.kwargs))
                padded.meta["val"] = torch.ops.aten.constant_pad_nd.default(
                    quantized.meta["val"], node.args[1], zero_point)
                out.meta = dict(node.meta)
                node.replace_all_uses_with(out)
                graph.erase_node(node)
                moved += 1
            if moved:
                graph.eliminate_dead_code()
                exported_program.graph_module.recompile()
            return ExportedProgramPassResult(exported_program, moved > 0)

    return PadsOnInt8()


def _fold_constants_pass() -> Any:
    """An ExecuTorch pass folding ops whose inputs are all constants into new constants.

    ``_skip_dim_order=False`` matters: the edge dialect turns a Python scalar into a
    ``_to_dim_order_copy`` of a lifted 0-d tensor, which XNNPACK does not take. Quantising a
    constant is folded too (ExecuTorch's default leaves every quantisation op): the numbers
    XNNPACK's quantiser writes as 0-d tensors beside int8 operands (HVICIDNet's) were
    otherwise quantised in the program, and XNNPACK's channels-last pass failed reading the
    layout of such a constant (an ``IndexError``). Dequantisations stay, so that XNNPACK
    still sees int8 weights. A number read from a constant tensor (``.item()`` of a
    parameter: HVICIDNet's learned exponent, a ``_local_scalar_dense``) is first written
    into the ops that use it: the folding would make it a Python number, of which it cannot
    make a constant, and failed.
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes import constant_prop_pass as folding

    quantisations = {exir_ops.edge.quantized_decomposed.quantize_per_tensor.default,
                     exir_ops.edge.quantized_decomposed.quantize_per_tensor.tensor,
                     exir_ops.edge.quantized_decomposed.quantize_per_channel.default}
    skipped = set(folding._DEFAULT_SKIP_TARGETS) - quantisations

    # the edge dialect keeps it as the ATen op
    read_scalar = {torch.ops.aten._local_scalar_dense.default,
                   exir_ops.edge.aten._local_scalar_dense.default}

    def inline_constant_scalars(exported_program: Any) -> None:
        constants = folding.get_constant_placeholder_dict(exported_program)
        graph = exported_program.graph_module.graph
        for node in list(graph.nodes):
            if node.target not in read_scalar or node.args[0] not in constants:
                continue
            for user in list(node.users):
                user.args, user.kwargs = _with_value(
                    (user.args, user.kwargs), node, constants[node.args[0]].item())
            graph.erase_node(node)

    class FoldConstants(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> ExportedProgramPassResult:
            inline_constant_scalars(exported_program)
            folded = folding.constant_prop_pass(exported_program, custom_skip_targets=skipped,
                                                _skip_dim_order=False)
            return ExportedProgramPassResult(folded, True)

    return FoldConstants()


def _with_value(arguments: Any, node: Any, value: Any) -> Any:
    """``arguments`` (nested) with ``node`` replaced by ``value``."""
    return pytree.tree_map(lambda a: value if a is node else a, arguments)
