"""Export a (lightened) model for deployment: ONNX for onnxruntime, or a torch.export program.

Height and width stay symbolic by default, so ``Resize`` (which computes its output size
from the input's at run time) stays size-generic instead of freezing the example's size.

ONNX goes through torch's TorchScript-based exporter first: for these CNNs it exports much
faster than the torch.export-based one, writes opset 17 natively and needs no onnxscript.
Where it has no translation for the model (FFTs, adaptive pooling to a computed size,
``col2im``), the torch.export-based exporter (torch's recommended path; the old one is
deprecated) writes the file instead, at its own opset 18 unless another is asked for. Its
files are checked with ONNX's own checker: its conversion down to an older opset can leave a
node that opset does not know (a ``Split`` with ``num_outputs``), which onnxruntime refuses to
load. ``dynamo=True`` or ``False`` picks one exporter.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .. import arguments as check
from ..errors import (
    ArgumentError,
    ExportError,
    LwCompileError,
    LwCompileWarning,
    VerificationError,
    one_line,
    raised_as,
)
from ..files import write_atomic
from ..measure.inputs import blamed_on_inputs, fresh
from ..nn import ChannelsLast
from ..tracing.fx_helpers import one_at_a_time
from ..train.data import Degrade
from . import int8
from .dense_mixtures import dense_mixtures
from .emit import emit_fast
from .keyword_calls import keyword_calls_exportable
from .module_rewrites import onnxruntime_forms
from .onnx_values import feeds
from .sort_as_topk import sorts_as_topk


def _for_export(model: nn.Module, args: tuple, fast: bool) -> nn.Module:
    """An eval copy, by default in ``emit_fast``'s form (BN folded, LIST merged, concats
    sunk: exact, and faster in onnxruntime too); a ChannelsLast wrapper is dropped (memory
    format means nothing there). If the fast form cannot be made, the plain copy is
    exported, with a warning. Either way, mixtures of experts picking in Python run every
    expert (``dense_mixtures``), which exporters can record."""
    if isinstance(model, ChannelsLast):
        model = copy.deepcopy(model.module).to(memory_format=torch.contiguous_format)
    prepared = None
    if fast:
        try:
            prepared = emit_fast(model, args, channels_last=False)
        except Exception as exc:
            warnings.warn(f"exporting the plain form: emit_fast failed ({one_line(exc)})",
                          LwCompileWarning, stacklevel=3)
    prepared = prepared if prepared is not None else copy.deepcopy(model).eval()
    dense_mixtures(prepared)
    return prepared


@contextlib.contextmanager
def _exporter_failures(where: str, model: Any, hint: str = "") -> Iterator[None]:
    """A raw error from inside an exporter (an op it has no translation for, a Python
    construct torch.export rejects) raised as ``ExportError`` naming the model and the first
    line of the complaint, or of both exporters' complaints where both were tried. Used
    outside ``blamed_on_inputs``, so an example input the model itself rejects is still
    named."""
    message = f"{where}: could not export {type(model).__name__}"
    with raised_as(ExportError, message, hint):
        try:
            yield
        except _Complaint as exc:
            raise ExportError(f"{message}: {exc}") from exc


def _tensor_names(args: tuple) -> list[str]:
    return [f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


@one_at_a_time  # torch.export patches process-wide state while it traces
def export_program(model: nn.Module, example_inputs: Sequence[Any],
                   dynamic_hw: bool = True, fast: bool = True) -> torch.export.ExportedProgram:
    """``torch.export`` of an eval copy of ``model`` (in ``emit_fast``'s form unless
    ``fast=False``); ``.module()`` runs it on other sizes.

    With ``dynamic_hw`` the height and width of every 4-D tensor argument are symbolic and
    export infers their relations (an image and its mask of one size; multiples of 8).
    """
    check.module("export_program", "model", model)
    args = check.inputs("export_program", "example_inputs", example_inputs)
    check.flag("export_program", "dynamic_hw", dynamic_hw)
    check.flag("export_program", "fast", fast)
    with _exporter_failures("export_program", model), \
            blamed_on_inputs("export_program", model, args):
        return _export(_for_export(model, args, fast), args, dynamic_hw)


def _export(model: nn.Module, args: tuple, dynamic_hw: bool) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model``, a copy of the user's (``keyword_calls_exportable``
    changes it)."""
    keyword_calls_exportable(model)
    dims = tuple({2: Dim.AUTO, 3: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() == 4
                 else None for a in args)
    return torch.export.export(model, args, strict=False,
                               dynamic_shapes=dims if dynamic_hw else None)


def _for_onnx(model: nn.Module, args: tuple, fast: bool) -> nn.Module:
    """``_for_export``'s copy, in the fast form also with ``onnxruntime_forms`` (a PReLU
    with one slope as a LeakyReLU, which onnxruntime fuses into the conv before it; checked
    equal on ``args`` when any applied, as emit_fast's steps are)."""
    prepared = _for_export(model, args, fast)
    if not fast:
        return prepared
    rewritten = copy.deepcopy(prepared)
    if not onnxruntime_forms(rewritten):
        return prepared
    with torch.no_grad():
        expected, got = prepared(*fresh(args)), rewritten(*fresh(args))
    try:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, check_stride=False)
    except AssertionError as exc:
        raise VerificationError(f"onnxruntime forms changed the outputs: {exc}") from exc
    return rewritten


#: the exporters, as ``OnnxFile.exporter`` names them
TORCHSCRIPT, TORCH_EXPORT = "torchscript", "torch.export"
#: the opset each writes unless told otherwise (the torch.export-based one's own)
OPSET = {TORCHSCRIPT: 17, TORCH_EXPORT: 18}


class OnnxFile(type(Path())):
    """The written file's path; ``exporter`` names the exporter that wrote it (``TORCHSCRIPT``
    or ``TORCH_EXPORT``); ``int8_report`` says how far an int8 export is from float (None for
    fp32)."""

    exporter: str | None = None
    int8_report: int8.Int8Report | None = None


@one_at_a_time  # the exporters register symbolics and trace with process-wide state
def export_onnx(model: nn.Module | torch.export.ExportedProgram,
                example_inputs: Sequence[Any], path: str | Path, dynamic_hw: bool = True,
                opset: int | None = None, dynamo: bool | None = None, fast: bool = True, *,
                precision: str = "fp32", calibration: Any = None,
                degrade: Degrade | None = None, min_psnr: float | None = None,
                target_psnr: float = int8.DEFAULT_TARGET_PSNR,
                max_float_layers: int = int8.DEFAULT_MAX_FLOAT_LAYERS,
                calibration_count: int = 8, evaluation_count: int = 4,
                qat_steps: int = 0) -> OnnxFile:
    """Write an eval copy of ``model`` to ``path`` as one self-contained ONNX file, in
    ``emit_fast``'s form plus ``onnxruntime_forms`` unless ``fast=False`` (what lwcompile emits is
    fast by default).

    Tensor arguments become the graph's inputs (``input_0``, ...) and its output
    ``output``; other arguments, and parameters left to their defaults, are baked in. With
    ``dynamic_hw`` every 4-D input's height and width are symbolic, unless a traced file
    fails or computes otherwise at another size the model takes (``_wrong_at_other_sizes``):
    then they are the example's, with an ``LwCompileWarning``. A model choosing its
    computation from tensor values in Python is refused (``ExportError``), since a traced
    file would keep the example's choice. An ``ExportedProgram``
    (from ``export_program``) is converted with the new exporter, keeping the shapes it was
    exported with.

    ``dynamo=None`` exports with the TorchScript-based exporter and, where that one cannot
    take the model, with the torch.export-based one; ``True`` or ``False`` uses only the
    torch.export-based or only the TorchScript-based exporter. The returned path's
    ``exporter`` says which wrote the file. ``opset=None`` is each exporter's own (``OPSET``:
    17 and 18).

    ``precision="int8"`` quantises with onnxruntime (QDQ, per-channel int8 weights; see
    ``deploy.int8_onnx``), calibrated on ``calibration_count`` crops of ``calibration``
    (None, a folder, a tensor or a DataLoader, and ``degrade``, as ``distill`` takes them)
    and measured against the float model on ``evaluation_count`` held-out crops (of
    ``HELD_OUT`` images by default, else of ``calibration`` drawn apart). Below
    ``target_psnr`` dB up to ``max_float_layers`` convs, the most sensitive measured, stay
    float; below ``min_psnr`` it raises ``Int8QualityError`` and writes nothing. The
    returned path's ``int8_report`` holds the measurement. ``qat_steps`` > 0 first
    fine-tunes the exported form's weights and activation ranges under simulated int8
    (uint8 activations, as onnxruntime's) for that many steps (``deploy.int8_finetune``; one
    input per step, cut to 128x128 where the example is larger), so that they lose less when
    quantised; the report still measures against ``model``. The
    file is written atomically.
    """
    if not isinstance(model, torch.export.ExportedProgram):
        check.module("export_onnx", "model", model)
    args = check.inputs("export_onnx", "example_inputs", example_inputs)
    path = OnnxFile(check.destination("export_onnx", "path", path))
    for name, value in (("dynamic_hw", dynamic_hw), ("fast", fast)):
        check.flag("export_onnx", name, value)
    check.flag("export_onnx", "dynamo", dynamo, optional=True)
    _check_opset(opset, bool(dynamo) or isinstance(model, torch.export.ExportedProgram))
    int8.check_precision(precision)
    qat_steps = int8.check_qat_steps("export_onnx", qat_steps, precision)
    if precision == "int8":
        if isinstance(model, torch.export.ExportedProgram):
            raise int8.Int8Error("int8 export needs the nn.Module (to measure it against "
                                 "float), not an ExportedProgram")
        with _exporter_failures("export_onnx", model, _onnx_hint(dynamo)), \
                blamed_on_inputs("export_onnx", model, args):
            return _export_int8(model, args, path, dynamic_hw, opset, dynamo, fast, min_psnr,
                                target_psnr, max_float_layers, calibration_count,
                                evaluation_count, calibration, degrade, qat_steps)
    with tempfile.TemporaryDirectory(prefix="lwcompile-onnx-") as tmp:
        written = Path(tmp) / "model.onnx"  # the destination is written whole or not at all
        with _exporter_failures("export_onnx", model, _onnx_hint(dynamo)):
            if isinstance(model, torch.export.ExportedProgram):
                path.exporter = _write_onnx(model, args, written, dynamic_hw, opset, dynamo,
                                            fast)
            else:
                with blamed_on_inputs("export_onnx", model, args):
                    path.exporter = _write_onnx(model, args, written, dynamic_hw, opset,
                                                dynamo, fast)
        with written.open("rb") as source:
            write_atomic(path, lambda f: shutil.copyfileobj(source, f))
    return path


def _onnx_hint(dynamo: bool | None) -> str:
    return (" (with the TorchScript-based exporter alone, as dynamo=False asks; dynamo=None "
            "also tries the torch.export-based one)") if dynamo is False else ""


def _check_opset(opset: Any, new_exporter: bool) -> None:
    from torch.onnx import _constants

    if opset is None:
        return
    check.integer("export_onnx", "opset", opset)
    low = _constants.ONNX_MIN_OPSET  # the new exporter converts down from its own 18
    high = _constants.ONNX_MAX_OPSET if new_exporter else \
        _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not low <= opset <= high:
        exporter = "torch.export-based" if new_exporter else "TorchScript-based"
        raise ArgumentError(f"export_onnx: opset must be from {low} to {high} with the "
                            f"{exporter} exporter, got {opset}")


def _export_int8(model: nn.Module, args: tuple, path: OnnxFile, dynamic_hw: bool,
                 opset: int | None, dynamo: bool | None, fast: bool,
                 min_psnr: float | None, target_psnr: float, max_float_layers: int,
                 calibration_count: int, evaluation_count: int, calibration: Any,
                 degrade: Degrade | None, qat_steps: int) -> OnnxFile:
    """Float export to a temporary file (fine-tuned for int8 first with ``qat_steps``),
    quantised and measured; written only if accepted."""
    from .int8_onnx import prepare, quantization_aware, quantize_onnx

    int8.validate_options(min_psnr, target_psnr, max_float_layers, calibration_count,
                          evaluation_count)
    with tempfile.TemporaryDirectory(prefix="lwcompile-onnx-") as tmp:
        float_path, tuned_path, tuned = Path(tmp) / "float.onnx", None, None
        deployed = _for_onnx(model, args, fast)  # made once: the tuned file is this form too
        path.exporter = _write_onnx(deployed, args, float_path, dynamic_hw, opset, dynamo,
                                    fast=False)
        prepare(float_path)
        reference = copy.deepcopy(model).eval()
        if qat_steps:  # ``deployed`` is export's own copy, its float file already written
            tuned = quantization_aware(deployed, reference, args, calibration, degrade,
                                       qat_steps, calibration_count, float_path,
                                       _tensor_names(args))
            tuned_path = Path(tmp) / "tuned.onnx"
            _write_onnx(deployed, args, tuned_path, dynamic_hw, opset,
                        path.exporter == TORCH_EXPORT, fast=False)
            prepare(tuned_path)
        data, report = quantize_onnx(
            float_path, reference, args, _tensor_names(args), calibration, degrade=degrade,
            min_psnr=min_psnr,
            target_psnr=max(target_psnr, min_psnr or target_psnr),
            max_float_layers=max_float_layers, calibration_count=calibration_count,
            evaluation_count=evaluation_count, tuned_path=tuned_path, tuned=tuned)
    write_atomic(path, lambda f: f.write(data))
    path.int8_report = report
    return path


class _Complaint(Exception):
    """An exporter's failure already worded for the user (the root cause, and which exporter
    said it)."""


def _write_onnx(model: nn.Module | torch.export.ExportedProgram, args: tuple, path: Path,
                dynamic_hw: bool, opset: int | None, dynamo: bool | None, fast: bool) -> str:
    """Write ``model`` to ``path`` with the exporter ``dynamo`` asks for (None: the
    TorchScript-based one, else the torch.export-based one) and return which wrote it. A
    module is put in its exported form once, for whichever exporter writes it. A trace that
    read tensor values in Python is checked: refused where the values were data
    (``_refuse_data_dependent_trace``), fixed to the example's size where the file does not
    hold at others (``_wrong_at_other_sizes``)."""
    if isinstance(model, torch.export.ExportedProgram):
        _write_with_torch_export(model, args, path, dynamic_hw, opset)
        return TORCH_EXPORT
    model = _for_onnx(model, args, fast)
    if dynamo:
        _write_with_torch_export(model, args, path, dynamic_hw, opset)
        return TORCH_EXPORT
    try:
        doubts = _write_with_torchscript(model, args, path, dynamic_hw, opset)
    except LwCompileError:
        raise
    except Exception as first:
        if dynamo is False:
            raise
        try:
            _write_with_torch_export(model, args, path, dynamic_hw, opset)
        except _Complaint as second:
            raise _Complaint(f"{one_line(first)} (TorchScript-based exporter); {second}"
                             ) from first
        return TORCH_EXPORT
    if doubts:
        _refuse_data_dependent_trace(model, args, doubts)
        if dynamic_hw and (wrong := _wrong_at_other_sizes(model, args, path)):
            _write_with_torchscript(model, args, path, False, opset)
            warnings.warn(f"the ONNX file's height and width are fixed to the example's "
                          f"({_image_size(args)}): its trace read sizes in Python, and with "
                          f"them left symbolic the file {wrong}", LwCompileWarning,
                          stacklevel=4)
    return TORCHSCRIPT


#: where a traced file with symbolic height and width is checked, as offsets from the
#: example's size: one that no window or stride divides, one that 8 does
SIZE_PROBES = (1, 8)


def _image_size(args: tuple) -> str:
    """``HxW`` of the first 4-D tensor in ``args``."""
    h, w = next(a.shape[-2:] for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)
    return f"{h}x{w}"


def _wrong_at_other_sizes(model: nn.Module, args: tuple, path: Path) -> str | None:
    """How the file at ``path`` failed or differed from ``model`` at another size than the
    example's (``SIZE_PROBES``; inputs resized nearest, so masks stay masks), or None.

    A trace keeps the branch the example's size took: padding to a multiple of a window,
    skipped at the example's size, was skipped at every size, and a windowed transformer's
    reshapes held the example's window count (SwinIR's file failed at any other size).
    Sizes the model itself refuses say nothing; nothing is checked without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for offset in SIZE_PROBES:
        probe = tuple(F.interpolate(a.float(), size=(a.shape[-2] + offset,
                                                     a.shape[-1] + offset)).to(a.dtype)
                      if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)
        size = _image_size(probe)
        try:
            with torch.no_grad():
                want = int8.first_output(model(*fresh(probe)))
        except Exception:  # the model does not take this size
            continue
        try:  # onnxruntime does not write into its inputs: ``probe`` itself
            got = torch.from_numpy(session.run(None, feeds([probe], _tensor_names(args))[0])[0])
        except Exception as exc:
            return f"failed at {size} in onnxruntime ({one_line(exc)[:200]})"
        if got.shape != want.shape:
            return (f"returned shape {tuple(got.shape)} at {size}, where the model returns "
                    f"{tuple(want.shape)}")
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            return (f"computed something else at {size} (max |error| "
                    f"{float((got - want).abs().max()):.2g})")
    return None


def _refuse_data_dependent_trace(model: nn.Module, args: tuple, doubts: list[str]) -> None:
    """Raise a ``_Complaint`` if the trace just written holds a choice made from the
    example's data.

    The tracer warns wherever Python read a tensor's value. Reading a size is common and
    harmless (padding to a multiple of a window); reading data is not: SeemoRe's mixture of
    experts picks its expert in Python from the router's output, so a traced file always
    ran the example's expert, and was wrong wherever the router chose another. torch.export
    tells the two apart: it follows sizes symbolically and stops on a value computed from
    the data. Where it stops so, the file is refused (neither exporter can write the
    choice); where it fails for another reason, nothing says the trace is wrong."""
    try:
        _export(model, args, dynamic_hw=False)
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, GuardOnDataDependentSymNode | DataDependentOutputException):
            raise _Complaint(
                f"the model chooses its computation in Python from tensor values (the "
                f"TorchScript-based exporter's trace warned: {doubts[0].split('. ')[0]}; "
                f"torch.export: {one_line(cause)}): a traced file would always compute the "
                f"example's choice, so none is written") from exc


def _write_with_torch_export(model: nn.Module | torch.export.ExportedProgram, args: tuple,
                             path: Path, dynamic_hw: bool, opset: int | None) -> None:
    """The torch.export-based exporter (of a module in its exported form, changed by
    ``_export``, or of a program), its file checked: converted down from opset 18 it
    can keep attributes the older opset lacks, which onnxruntime then refuses to load. Its
    failures are raised as a ``_Complaint`` naming their root cause (its own first line is
    a generic "Failed to convert")."""
    import onnx

    opset = opset or OPSET[TORCH_EXPORT]
    try:
        if not isinstance(model, torch.export.ExportedProgram):
            model = _program_for_onnx(model, args, dynamic_hw)
        with _without_torchvision_notices():
            program = torch.onnx.export(model, args, dynamo=True, opset_version=opset,
                                        input_names=_tensor_names(args),
                                        output_names=["output"], verbose=False)
        program.save(str(path), external_data=False)
        onnx.checker.check_model(str(path), full_check=True)
    except LwCompileError:
        raise
    except onnx.checker.ValidationError as exc:
        own = OPSET[TORCH_EXPORT]
        advice = f"; opset={own} is written without converting" if opset < own else ""
        raise _Complaint(f"the torch.export-based exporter wrote a file that is not valid "
                         f"ONNX at opset {opset} ({one_line(exc)}){advice}") from exc
    except Exception as exc:
        raise _Complaint(f"{one_line(_root_cause(exc))} (torch.export-based exporter)"
                         ) from exc


def _program_for_onnx(model: nn.Module, args: tuple,
                      dynamic_hw: bool) -> torch.export.ExportedProgram:
    """``model`` exported, its integer sorts written as ``topk`` (``sort_as_topk``): the
    exporter has no translation for ``aten.sort``."""
    program = _export(model, args, dynamic_hw)
    module = program.module()
    return _export(module, args, dynamic_hw) if sorts_as_topk(module) else program


@contextlib.contextmanager
def _without_torchvision_notices() -> Iterator[None]:
    """The torch.export-based exporter's notices that it skips torchvision's ops (detection
    ops no image-to-image network here uses; lwcompile never installs torchvision) left out
    of the log; its other messages kept."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")

    def not_torchvision(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")

    registry_log.addFilter(not_torchvision)
    try:
        yield
    finally:
        registry_log.removeFilter(not_torchvision)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _write_with_torchscript(model: nn.Module, args: tuple, path: Path, dynamic_hw: bool,
                            opset: int | None) -> list[str]:
    """The TorchScript-based exporter, of a module in its exported form; returns the
    tracer's warnings that the trace may be incorrect (Python read a tensor's value), which
    are not shown: ``_refuse_data_dependent_trace`` decides on them."""
    opset = opset or OPSET[TORCHSCRIPT]
    names = _tensor_names(args)
    tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
    axes = {name: {2: "height", 3: "width"} for name, a in zip(names, tensors, strict=True)
            if a.dim() == 4}
    with _torchscript_exporter(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(_tensors_only(model, args), tensors, str(path),
                          dynamo=False, opset_version=opset, input_names=names,
                          output_names=["output"], dynamic_axes=axes if dynamic_hw else None)
    doubts = []
    for caught_warning in caught:
        if issubclass(caught_warning.category, torch.jit.TracerWarning):
            doubts.append(str(caught_warning.message))
        else:  # recorded only to find the tracer's: shown as they would have been
            warnings.warn_explicit(caught_warning.message, caught_warning.category,
                                   caught_warning.filename, caught_warning.lineno)
    return doubts


class _FixedArguments(nn.Module):
    """``model`` called with the example's non-tensor arguments fixed (and its own defaults
    for the rest); only the tensors are arguments."""

    def __init__(self, model: nn.Module, args: tuple) -> None:
        super().__init__()
        self.model = model
        self.template = args

    def forward(self, *tensors: torch.Tensor) -> Any:
        given = iter(tensors)
        return self.model(*(next(given) if isinstance(a, torch.Tensor) else a
                            for a in self.template))


def _tensors_only(model: nn.Module, args: tuple) -> nn.Module:
    """What the TorchScript-based exporter gets, so that only tensors become graph inputs:
    it turns a Python number in ``args`` into an input, and also each parameter of
    ``forward`` left to its default (RealCUGAN's ``alpha``), which the file's users then had
    to feed. Such a model is wrapped in ``_FixedArguments``; others are exported as they are,
    keeping their node names."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature: nothing to fill in
        parameters = []
    takes_more = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                     for p in parameters) > len(args)
    if takes_more or not all(isinstance(a, torch.Tensor) for a in args):
        return _FixedArguments(model, args)
    return model


def _channel_shuffle(g: Any, x: Any, groups: Any) -> Any:
    """aten::channel_shuffle (GSAT) as a Gather of channels: the old exporter lacks it."""
    from torch.onnx import symbolic_helper

    channels = symbolic_helper._get_tensor_sizes(x)[1]
    groups = symbolic_helper._get_const(groups, "i", "groups")
    order = torch.arange(channels).view(groups, -1).t().reshape(-1)
    return g.op("Gather", x, g.op("Constant", value_t=order), axis_i=1)


@contextlib.contextmanager
def _torchscript_exporter() -> Iterator[None]:
    """channel_shuffle registered for the duration; the exporter's deprecation notice and its
    log off.

    The log: torch's ``setup_onnx_logging`` tests ``torch._C._jit_is_onnx_log_enabled``
    without calling it, so it always finds it true and turns the ONNX log on; where the
    export then fails, the exporter logs the whole TorchScript graph to stdout (hundreds of
    kilobytes for a transformer) before ``export_onnx`` tries the other exporter or says
    why. For the duration the name holds what the function returns."""
    torch.onnx.register_custom_op_symbolic("aten::channel_shuffle", _channel_shuffle, 9)
    log_enabled = torch._C._jit_is_onnx_log_enabled
    torch._C._jit_is_onnx_log_enabled = log_enabled()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        torch._C._jit_is_onnx_log_enabled = log_enabled
        torch.onnx.unregister_custom_op_symbolic("aten::channel_shuffle", 9)
