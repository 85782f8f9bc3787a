"""int8 ONNX through onnxruntime's static quantiser: QDQ format, per-channel int8 weights,
uint8 activations (the pairing onnxruntime recommends for x86), activation ranges from
calibration inputs.

How the ranges are set is measured, not assumed (``CALIBRATIONS``): min/max lets one rare
large activation stretch a tensor's scale and coarsen every other value, a high percentile
clips such outliers instead; which costs less depends on the model and the data. Each is
calibrated, the whole model quantised and scored against float on the held-out inputs, and
the best kept. Its ranges are cached (``calibration_cache_path``), so the greedy search of
``int8.choose_float_layers`` requantises with convs excluded (``nodes_to_exclude``) without
calibrating again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import one_line
from ..train.data import Degrade
from . import int8, int8_inputs

INSTALL_HINT = "pip install lwcompile[export]"
#: activation-range calibrations tried: name -> (onnxruntime CalibrationMethod name, options)
CALIBRATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "minmax": ("MinMax", {}),
    f"percentile-{int8.CALIBRATION_PERCENTILE:g}": (
        "Percentile", {"CalibPercentile": int8.CALIBRATION_PERCENTILE}),
}


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


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _feeds(inputs: list[tuple], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    return [dict(zip(names, [a.numpy() for a in args if isinstance(a, Tensor)], strict=True))
            for args in inputs]


def session(path: str | Path, threads: int = 2, spinning: bool = False) -> Any:
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads. Without
    ``spinning`` its threads do not spin-wait after a run: spinning would take the CPU from
    whatever runs next (the next variant ``tune`` times). ``spinning=True`` is onnxruntime's
    default, what a deployed session gets: it shortens the hand-over between many small ops."""
    _, ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_onnx(float_path: Path, model: nn.Module, example_inputs: tuple,
                  names: Sequence[str], calibration: Any, *, min_psnr: float | None,
                  degrade: Degrade | None,
                  target_psnr: float, max_float_layers: int, calibration_count: int,
                  evaluation_count: int) -> tuple[bytes, int8.Int8Report]:
    """The int8 form of the float ONNX file ``float_path`` (exported from ``model``) as bytes,
    with its measured report; raises ``Int8QualityError`` below ``min_psnr``."""
    onnx, _ = _onnxruntime()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    calib = int8_inputs.calibration_inputs(calibration, example_inputs, calibration_count, degrade)
    held = int8_inputs.evaluation_inputs(calibration, example_inputs, evaluation_count, len(calib),
                                  degrade)
    reference = int8.float_outputs(model, held)
    convs = [n.name for n in onnx.load(str(float_path)).graph.node if n.op_type == "Conv"]
    work = Path(tempfile.mkdtemp(prefix="lwcompile-int8-"))
    feeds = _feeds(calib, names)

    def quantizer(calibration_name: str) -> int8.Quantize:
        method, options = CALIBRATIONS[calibration_name]
        cache = work / f"calibration-{calibration_name}.json"

        def quantize(excluded: frozenset[str]) -> tuple[int8.Runner, bytes]:
            out = work / "model.int8.onnx"
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)  # its advice to pre-process, on the root logger
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the histogram's progress
                    quantize_static(str(float_path), str(out), _Reader(list(feeds)),
                                    quant_format=QuantFormat.QDQ, per_channel=True,
                                    activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8,
                                    nodes_to_exclude=sorted(excluded),
                                    calibrate_method=getattr(CalibrationMethod, method),
                                    extra_options=options, calibration_cache_path=str(cache))
            finally:
                logging.disable(previous)
            sess = session(out)

            def run(args: tuple) -> Tensor:
                feed = _feeds([args], names)[0]
                return torch.from_numpy(sess.run(None, feed)[0])

            return run, out.read_bytes()
        return quantize

    try:
        data, report = int8.choose_calibration(
            {name: quantizer(name) for name in CALIBRATIONS}, convs, held, reference,
            target_psnr, max_float_layers, len(calib))
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    int8.refuse_below(report, min_psnr)
    return data, report
