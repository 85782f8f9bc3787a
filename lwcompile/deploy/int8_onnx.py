"""int8 ONNX through onnxruntime's static quantiser: QDQ format, per-channel int8 weights,
uint8 activations (the pairing onnxruntime recommends for x86), activation ranges from
calibration inputs.

How the ranges are set is measured, not assumed (``CALIBRATIONS``): min/max lets one rare
large activation stretch a tensor's scale and coarsen every other value, a high percentile
clips such outliers instead; which costs less depends on the model and the data. Each is
calibrated, the whole model quantised and scored against float on the held-out inputs, and
the best kept. Its ranges are cached (``calibration_cache_path``), so the greedy search of
``int8.choose_float_layers`` requantises with convs excluded (``nodes_to_exclude``) without
calibrating again. Each such call still rewrites the whole graph (seconds on a
transformer's), so a model with many convs is first screened on the quantised graph itself
(``qdq_float_layer``: one conv made float by rewiring, a session per conv) and only the
best few are quantised again.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) onnxruntime multiplies uint8 by int8
with ``VPMADDUBSW``, whose 16-bit pair sums saturate on large activations and weights; there
the weights are quantised to 7 bits (onnxruntime's ``reduce_range``), which keeps every pair
sum in range (``saturating_cpu``; the report's ``weight_bits``). The file is still measured on
this machine, so the report is what this CPU gives.

Before any of this the float file goes through onnxruntime's own preparation for its
quantiser (``prepare``): the exporter's constants, identities and shape arithmetic on fixed
sizes are folded away. The quantiser's passes cost time with the square of the node count
(it rewires every node's inputs for each tensor it quantises), and a transformer's exported
graph is mostly such bookkeeping.

Quantisation-aware fine-tuning (``quantization_aware``) simulates this scheme (uint8
per-tensor activations with learnable ranges, int8 per-channel symmetric weights, 7-bit
where the export writes 7-bit; the specs of torchao's x86 QAT configuration) on exactly the
tensors onnxruntime quantises in the float file (``onnxruntime_simulation``). The ranges it
learns are keyed by torch graph node; the ONNX file names its tensors otherwise, so
``learned_overrides`` finds each node's tensor by value (``onnx_values``) and hands the
learned scale and zero point to onnxruntime's quantiser as ``TensorQuantOverrides``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import one_line
from ..train.data import Degrade
from . import int8, int8_inputs, onnx_values
from .int8_finetune import Tuned
from .qdq_float_layer import FloatLayers

INSTALL_HINT = "pip install lwcompile[export]"
#: the largest weight magnitude, in grid steps, of onnxruntime's 7-bit (``reduce_range``)
#: symmetric int8 weights
SEVEN_BIT_WEIGHT_MAX = 64
#: activation-range calibrations tried: name -> (onnxruntime CalibrationMethod name, options)
CALIBRATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    f"percentile-{int8.CALIBRATION_PERCENTILE:g}": (
        "Percentile", {"CalibPercentile": int8.CALIBRATION_PERCENTILE}),
}


def saturating_cpu() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels on this CPU can saturate: x86 with AVX2 but
    no AVX512-VNNI (torch's own capability probe; VNNI's ``VPDPBUSD`` sums in 32 bits)."""
    avx2 = getattr(torch.cpu, "_is_avx2_supported", lambda: False)
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: True)
    return bool(avx2()) and not bool(vnni())


def _onnxruntime() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise int8.Int8Error(
            f"int8 ONNX export needs onnx and onnxruntime, which are not installed "
            f"({one_line(exc)}); install them with `{INSTALL_HINT}`") from exc
    return onnx, onnxruntime


@contextlib.contextmanager
def _logging_off(level: int) -> Iterator[None]:
    """Log records up to ``level`` dropped in the block, whatever logger they go to
    (onnxruntime's quantiser and torchao log on the root logger), and the previous
    setting restored after it."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def prepare(path: Path) -> None:
    """Rewrite the float ONNX file at ``path`` as onnxruntime's ``quant_pre_process`` leaves
    it for its quantiser: graph optimisations of the basic level (constant folding, identity
    and redundant node removal, conv + batch-norm folding; each exact up to float rounding)
    and ONNX shape inference. Symbolic shape inference is skipped: it fails on a file whose
    height and width are free. Where onnxruntime cannot optimise the graph its preparation
    goes on with shape inference alone, and where that fails too the file is left as
    exported: the quantiser takes either, only more slowly."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_name(path.stem + ".prepared.onnx")
    try:
        with _logging_off(logging.ERROR):  # a failure is handled here, not logged
            quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    except Exception:  # onnxruntime's optimiser or shape inference, on this graph
        prepared.unlink(missing_ok=True)
        return
    prepared.replace(path)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _quantize_static(source: Path, out: Path, feeds: list[dict[str, np.ndarray]],
                     calibration_name: str, *, overrides: dict[str, Any] | None = None,
                     excluded: frozenset[str] = frozenset(), cache: Path | None = None) -> None:
    """onnxruntime's ``quantize_static`` of ``source`` into ``out`` with this module's scheme
    (QDQ, per-channel int8 weights, 7-bit where ``saturating_cpu``, uint8 activations),
    calibrated on ``feeds`` by ``CALIBRATIONS[calibration_name]``, the tensors in
    ``overrides`` given their range, the convs in ``excluded`` left float."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method, options = CALIBRATIONS[calibration_name]
    if overrides:
        options = {**options, "TensorQuantOverrides": overrides}
    # its advice to pre-process goes to the root logger, the histogram's progress to stdout
    with _logging_off(logging.WARNING), contextlib.redirect_stdout(io.StringIO()):
        quantize_static(str(source), str(out), _Reader(list(feeds)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=saturating_cpu(), nodes_to_exclude=sorted(excluded),
                        calibrate_method=getattr(CalibrationMethod, method),
                        extra_options=options,
                        calibration_cache_path=None if cache is None else str(cache))


def _runner(sess: Any, names: Sequence[str]) -> int8.Runner:
    """Runs ``sess`` on one tuple of inputs, returning its first output."""
    def run(args: tuple) -> Tensor:
        return torch.from_numpy(sess.run(None, onnx_values.feeds([args], names)[0])[0])
    return run


def session(path: str | Path | bytes, threads: int = 2, spinning: bool = False) -> Any:
    """An onnxruntime CPU session on ``path`` (or a model's bytes) with ``threads`` intra-op
    threads. Without
    ``spinning`` its threads do not spin-wait after a run: spinning would take the CPU from
    whatever runs next (the next variant ``tune`` times). ``spinning=True`` is onnxruntime's
    default, what a deployed session gets: it shortens the hand-over between many small ops."""
    _, ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def quantize_onnx(float_path: Path, model: nn.Module, example_inputs: tuple,
                  names: Sequence[str], calibration: Any, *, min_psnr: float | None,
                  degrade: Degrade | None,
                  target_psnr: float, max_float_layers: int, calibration_count: int,
                  evaluation_count: int, tuned_path: Path | None = None,
                  tuned: Tuned | None = None) -> tuple[bytes, int8.Int8Report]:
    """The int8 form of the float ONNX file ``float_path`` (exported from ``model``) as bytes,
    with its measured report; raises ``Int8QualityError`` below ``min_psnr``. With
    ``tuned_path`` (the same graph with weights fine-tuned for int8, written from ``tuned``),
    it is quantised too, with the activation ranges learned with it (``learned_overrides``)
    and with a percentile calibration, and the one closer to ``model`` is kept."""
    onnx, _ = _onnxruntime()
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    # the op types ``quantize_static`` quantises when not told which (both registries)
    quantised_ops = set(QDQRegistry) | set(QLinearOpsRegistry)

    calib = int8_inputs.calibration_inputs(calibration, example_inputs, calibration_count, degrade)
    held = int8_inputs.evaluation_inputs(calibration, example_inputs, evaluation_count, len(calib),
                                  degrade)
    reference = int8.float_outputs(model, held)
    convs = [n.name for n in onnx.load(str(float_path)).graph.node if n.op_type == "Conv"]
    work = Path(tempfile.mkdtemp(prefix="lwcompile-int8-"))
    feeds = onnx_values.feeds(calib, names)

    candidates = {name: (name, float_path, {}) for name in CALIBRATIONS}
    if tuned_path is not None and tuned is not None:
        from .int8_finetune import LEARNED, TUNED

        percentile = list(CALIBRATIONS)[1]
        # matched on a calibration crop: an example of zeros would make tensors alike
        overrides = learned_overrides(tuned_path, tuned, calib[0], names)
        candidates[LEARNED] = (percentile, tuned_path, overrides)
        # a tensor no torch node computes (an op the ONNX exporter adds) was not rounded
        # in training and keeps a calibration either way; a fresh calibration of all the
        # tuned tensors is measured too, so the learned ranges are kept only where better
        candidates[percentile + TUNED] = (percentile, tuned_path, {})

    def quantizer(calibration_name: str, source: Path,
                  overrides: dict[str, list[dict[str, Any]]]) -> int8.Quantize:
        cache = work / f"calibration-{calibration_name}-{source.stem}.json"

        def quantize(excluded: frozenset[str]) -> tuple[int8.Runner, bytes]:
            out = work / "model.int8.onnx"
            _quantize_static(source, out, feeds, calibration_name, overrides=overrides,
                             excluded=excluded, cache=cache)
            return _runner(session(out), names), out.read_bytes()
        return quantize

    def screen(source: Path) -> int8.Screen:
        def one_float_from(kept: bytes) -> Callable[[str], int8.Runner]:
            layers = FloatLayers(onnx.load_from_string(kept), onnx.load(str(source)),
                                 quantised_ops)
            return lambda name: _runner(session(layers.with_float(name).SerializeToString()),
                                        names)
        return one_float_from

    try:
        data, report = int8.choose_calibration(
            {name: quantizer(*candidate) for name, candidate in candidates.items()},
            convs, held, reference,
            target_psnr, max_float_layers, len(calib), min_psnr,
            {name: screen(source) for name, (_, source, _) in candidates.items()})
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    report.weight_bits = 7 if saturating_cpu() else 8
    int8.refuse_below(report, min_psnr)
    return data, report


def qat_config(config: Any) -> Any:
    """The x86 quantiser's QAT ``config`` with the weights onnxruntime int8 gets on this CPU:
    7-bit where ``saturating_cpu``."""
    if not saturating_cpu():
        return config
    return dataclasses.replace(config, weight=dataclasses.replace(
        config.weight, quant_min=-SEVEN_BIT_WEIGHT_MAX, quant_max=SEVEN_BIT_WEIGHT_MAX))


def quantization_aware(module: nn.Module, reference: nn.Module, example_inputs: tuple,
                       calibration: Any, degrade: Degrade | None, steps: int,
                       calibration_count: int, float_path: Path,
                       names: Sequence[str]) -> Tuned:
    """``module`` (the form written to ONNX at ``float_path``, inputs named ``names``)
    fine-tuned for ``steps`` under simulated onnxruntime int8 to reproduce ``reference``
    (``int8_finetune.finetune_on_crops``), on inputs drawn as the calibration is: its tuned
    values are loaded into ``module`` in place, and the ``int8_finetune.Tuned`` returned
    holds them with the learned activation ranges. The tensors fake-quantised are the ones
    onnxruntime quantises in that file (``onnxruntime_simulation``)."""
    try:
        with _logging_off(logging.WARNING):  # torchao's import warns that this CPU has no triton
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                get_default_x86_inductor_quantization_config,
            )

            from .onnxruntime_simulation import OnnxruntimeQuantizer
    except ImportError as exc:
        raise int8.Int8Error(
            f"quantisation-aware fine-tuning needs torchao, which is not installed "
            f"({one_line(exc)}); install it with `{INSTALL_HINT}`") from exc
    from .int8_finetune import FinetuneError, finetune_on_crops, learnable, load_values

    def export_at(args: tuple) -> torch.fx.GraphModule:
        return torch.export.export(module, args).module()

    graph = export_at(example_inputs)
    nodes = quantised_nodes(graph, float_path, example_inputs, names, calibration, degrade)
    if not nodes:
        raise FinetuneError("quantisation-aware fine-tuning found no tensor of the model that "
                            "onnxruntime quantises")
    config = learnable(qat_config(get_default_x86_inductor_quantization_config(is_qat=True)))
    quantizer = OnnxruntimeQuantizer(nodes, config)
    tuned = finetune_on_crops(graph, export_at, reference, example_inputs,
                              calibration, degrade, quantizer, steps, calibration_count)
    load_values(module, dict(tuned.graph.state_dict()))
    return tuned


def quantised_nodes(graph: torch.fx.GraphModule, float_path: Path, example_inputs: tuple,
                    names: Sequence[str], calibration: Any,
                    degrade: Degrade | None) -> set[str]:
    """The nodes of ``graph`` (exported from the model written to ``float_path``) whose
    outputs onnxruntime quantises in that file, found by quantising it once and matching
    the quantised tensors by value on one calibration input (``onnx_values``)."""
    onnx, _ = _onnxruntime()
    from .onnxruntime_simulation import quantised_activations

    args = int8_inputs.calibration_inputs(calibration, example_inputs, 1, degrade)[0]
    with tempfile.TemporaryDirectory(prefix="lwcompile-int8-") as work:
        out = Path(work) / "placement.onnx"
        _quantize_static(float_path, out, onnx_values.feeds([args], names), "minmax")
        quantised = quantised_activations(onnx.load(str(out)))
    nodes = onnx_values.node_of_tensor(graph, float_path, args, names)
    return {node for tensor, node in nodes.items() if tensor in quantised}


def learned_overrides(path: Path, tuned: Tuned, args: tuple,
                      names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` giving each tensor of the ONNX file at ``path``
    the activation range ``tuned`` (``int8_finetune.Tuned``, whose graph ``path`` was
    exported from) learned for the graph node that computes the same values on ``args``
    (``onnx_values.node_of_tensor``); tensors no node matches keep onnxruntime's
    calibration."""
    _onnxruntime()
    nodes = onnx_values.node_of_tensor(tuned.graph, path, args, names, set(tuned.ranges))
    return {tensor: [{"scale": np.array(tuned.ranges[node][0], dtype=np.float32),
                      "zero_point": np.array(tuned.ranges[node][1], dtype=np.uint8)}]
            for tensor, node in nodes.items()}
