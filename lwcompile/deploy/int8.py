"""What int8 deployment shares across runtimes: the measured error against float, which
layers stay float, and the report (calibration inputs: ``int8_inputs``).

Post-training int8 needs a few inputs like those the model will see (calibration) to choose
activation scales, and it changes the outputs: by how much depends on the model, so the
export measures it on held-out crops instead of assuming it. When the int8 output is too far
from float, the layers whose quantisation hurts most are kept float, chosen greedily by
measurement: the first round restores every conv alone and keeps the one that raises the
PSNR most; later rounds retry the few that helped most before. Where a model has many convs,
the first round ranks every conv by a cheap "this one conv float" (``Screen``: the quantised
graph rewired as leaving the conv out would, not quantised again) and quantises only the
best few for real, so a large graph's search costs a few quantisations instead of one per
conv. ``export_onnx`` (onnxruntime) and ``export_mobile`` (XNNPACK) hand this module a
function that quantises with a given set of layers left float, and their screen
(``qdq_float_layer``, ``pt2e_float_layer``); everything else here is runtime-agnostic.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LwCompileError, LwCompileWarning, one_line
from ..measure.inputs import fresh

PRECISIONS = ("fp32", "int8")
#: below this PSNR (dB, int8 output vs float) layers are restored to float, a few at most
DEFAULT_TARGET_PSNR = 40.0
DEFAULT_MAX_FLOAT_LAYERS = 3
#: a layer stays float only if restoring it raises the PSNR by at least this (dB): a layer
#: that helps less is not where the error comes from, and float costs it the int8 speed
MIN_GAIN_DB = 0.1
#: after the first round, which tries every conv, a round retries only this many of the
#: convs that helped most in the rounds before
RETRIED_PER_ROUND = 4
#: with more candidates than this and a ``Screen``, the first round screens every candidate
#: and quantises only the ``SCREEN_CONFIRMED`` that gained most in the screen
SCREEN_ABOVE = 16
SCREEN_CONFIRMED = 8
#: the percentile calibration both runtimes try beside their default: activation ranges clip
#: the top and bottom 0.05 % of the calibration values
CALIBRATION_PERCENTILE = 99.95

#: runs the quantised model on one tuple of inputs and returns its (first) output
Runner = Callable[[tuple], Tensor]
#: quantises with the named layers left float; returns a runner and what to keep of it
Quantize = Callable[[frozenset[str]], tuple[Runner, Any]]
#: given what ``Quantize`` kept for a quantised model, a function giving a runner of that
#: model with one more named layer float, made without quantising again: what ``Quantize``
#: gives with that layer excluded, or close to it, and cheap enough to rank every candidate
Screen = Callable[[Any], Callable[[str], Runner]]


class Int8Error(LwCompileError):
    """int8 export was asked for something it cannot do (unknown precision, missing extra)."""


class CalibrationDataError(Int8Error, ValueError):
    """The calibration or evaluation data does not fit the model's example input."""


class Int8QualityError(Int8Error):
    """The int8 output is further from float than ``min_psnr`` allows; nothing was written."""

    def __init__(self, message: str, report: Int8Report) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Int8Report:
    """How far the int8 model's output is from float's, measured on held-out crops."""

    psnr_db: float  # int8 vs float output; peak = the float outputs' range
    max_abs_error: float
    float_layers: list[str]  # layers kept float because quantising them cost most
    calibration_count: int  # inputs the activation ranges were calibrated on
    evaluation_count: int  # held-out inputs the error was measured on
    #: PSNR reached after each kept-float layer, in order: (layer, psnr_db)
    restorations: list[tuple[str, float]] = field(default_factory=list)
    #: gains (dB) of restoring each layer alone, in the last round measured, worst first
    sensitivity: dict[str, float] = field(default_factory=dict)
    #: where a round was screened: each candidate's gain in the latest screen, largest first
    #: (only the best ``SCREEN_CONFIRMED`` were then quantised and are in ``sensitivity``)
    screened: dict[str, float] = field(default_factory=dict)
    #: PSNR with every layer quantised, before any was kept float
    all_int8_psnr_db: float | None = None
    #: how activation ranges were set, where several were measured: the one kept, and the
    #: all-int8 PSNR each gave
    calibration_method: str | None = None
    calibration_psnr_db: dict[str, float] = field(default_factory=dict)
    #: calibrations that failed on this model (name -> the error), left out of the choice
    calibration_errors: dict[str, str] = field(default_factory=dict)
    #: bits of the int8 weights' range used (7 where the runtime's kernels would saturate)
    weight_bits: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"psnr_db": round(self.psnr_db, 3), "max_abs_error": self.max_abs_error,
                "float_layers": list(self.float_layers),
                "calibration_count": self.calibration_count,
                "evaluation_count": self.evaluation_count,
                "restorations": [[n, round(p, 3)] for n, p in self.restorations],
                "sensitivity": {n: round(g, 3) for n, g in self.sensitivity.items()},
                "screened": {n: round(g, 3) for n, g in self.screened.items()},
                "all_int8_psnr_db": (None if self.all_int8_psnr_db is None
                                     else round(self.all_int8_psnr_db, 3)),
                "calibration_method": self.calibration_method,
                "calibration_psnr_db": {n: round(p, 3)
                                        for n, p in self.calibration_psnr_db.items()},
                "calibration_errors": dict(self.calibration_errors),
                "weight_bits": self.weight_bits}

    def __str__(self) -> str:
        kept = ", ".join(self.float_layers) or "none"
        method = f" ({self.calibration_method})" if self.calibration_method else ""
        if self.weight_bits != 8:
            method += f", {self.weight_bits}-bit weights"
        searched = (f" (of the {SCREEN_CONFIRMED} best of {len(self.screened)} screened)"
                    if self.screened and self.float_layers else "")
        return (f"int8 vs float on {self.evaluation_count} held-out inputs: "
                f"PSNR {self.psnr_db:.2f} dB, max |error| {self.max_abs_error:.3g}; "
                f"calibrated on {self.calibration_count}{method}; float layers: {kept}"
                f"{searched}")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise Int8Error(f"unknown precision {precision!r}: valid ones are {', '.join(PRECISIONS)}")
    return precision


def first_output(out: Any) -> Tensor:
    """The model's first tensor output (the image)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise Int8Error(f"int8 measurement needs a tensor output, got {type(out).__name__}")


def float_outputs(model: nn.Module, inputs: list[tuple]) -> list[Tensor]:
    with torch.no_grad():
        return [first_output(model(*fresh(args))).detach().float() for args in inputs]


def compare(reference: list[Tensor], got: list[Tensor]) -> tuple[float, float]:
    """(PSNR in dB, max abs error) of ``got`` against ``reference`` over all outputs; the peak
    is the reference's range (max - min), so the PSNR means the same whatever the output's
    scale (an image in [0, 1], a predicted residual). An output that is not finite where the
    reference is (int8 rounding a divisor to zero) is infinitely far: -inf dB."""
    ref = torch.cat([r.flatten() for r in reference])
    out = torch.cat([g.detach().float().flatten() for g in got])
    mse = float((out - ref).pow(2).mean())
    peak = float(ref.max() - ref.min()) or 1.0
    max_error = float((out - ref).abs().max())
    if mse == 0:
        return math.inf, max_error
    ratio = peak * peak / mse if math.isfinite(mse) else 0.0
    return (10 * math.log10(ratio) if ratio > 0 else -math.inf), max_error


def score(runner: Runner, inputs: list[tuple], reference: list[Tensor]) -> tuple[float, float]:
    """(PSNR in dB, max abs error) of ``runner``'s outputs on ``inputs`` against ``reference``."""
    return compare(reference, [first_output(runner(fresh(args))) for args in inputs])


def choose_float_layers(quantize: Quantize, candidates: Sequence[str], inputs: list[tuple],
                        reference: list[Tensor], target_psnr: float, max_float_layers: int,
                        calibration_count: int, min_psnr: float | None = None,
                        all_int8: tuple[Runner, Any] | None = None,
                        screen: Screen | None = None) -> tuple[Any, Int8Report]:
    """Quantise everything; while the PSNR against ``reference`` is below ``target_psnr`` and
    fewer than ``max_float_layers`` are float, restore candidates one at a time and keep the
    one that helps most, if it helps by ``MIN_GAIN_DB`` or more.

    The first round tries every candidate; later rounds retry only the ``RETRIED_PER_ROUND``
    that helped most before (restoring one layer rarely reorders the rest), so the search
    costs about one quantisation per conv, not one per conv and float layer; with ``screen``
    and more than ``SCREEN_ABOVE`` candidates, the first round quantises only the
    ``SCREEN_CONFIRMED`` that gain most in the screen. The report's
    ``sensitivity`` holds each still-quantised layer's gain from the latest round that
    measured it, largest first. With no round run (``max_float_layers=0``, or the target
    met) but the PSNR below ``min_psnr``, one round is measured anyway so that the refusal
    can name the worst layers. ``all_int8``: what ``quantize`` already gave with no layer
    float (it is not made again: a large graph takes minutes to quantise). Returns what
    ``quantize`` gave for the chosen set, and the report."""
    excluded: frozenset[str] = frozenset()
    runner, kept = all_int8 if all_int8 is not None else quantize(excluded)
    psnr, max_error = score(runner, inputs, reference)
    first_psnr = psnr
    restorations: list[tuple[str, float]] = []
    sensitivity: dict[str, float] = {}
    screened: dict[str, float] = {}

    def first_round(names: list[str]) -> list[str]:
        """The candidates the first round quantises: all, or the best few in the screen."""
        if screen is None or len(names) <= SCREEN_ABOVE:
            return names
        try:
            one_float = screen(kept)
            gains = {name: score(one_float(name), inputs, reference)[0] - psnr
                     for name in names}
        except Exception as exc:  # a graph the rewiring does not understand
            warnings.warn(LwCompileWarning(
                f"int8: the float-layer search could not screen this graph "
                f"({one_line(exc)}); it quantises the model once per layer instead"),
                stacklevel=2)
            return names
        screened.clear()  # a later screen (of a model with more layers float) replaces it
        screened.update(sorted(gains.items(), key=lambda item: -item[1]))
        return list(screened)[:SCREEN_CONFIRMED]

    def measure(names: Sequence[str]) -> tuple[str, tuple[float, float, Any, Any]] | None:
        """Each of ``names`` restored alone; the gains go into ``sensitivity``; the best
        trial is returned (only it is held: a quantised model per conv would not fit)."""
        best: tuple[str, tuple[float, float, Any, Any]] | None = None
        for name in names:
            trial_runner, trial_kept = quantize(excluded | {name})
            trial_psnr, trial_error = score(trial_runner, inputs, reference)
            sensitivity[name] = trial_psnr - psnr
            if best is None or trial_psnr > best[1][0]:
                best = name, (trial_psnr, trial_error, trial_runner, trial_kept)
        ranked = sorted(sensitivity.items(), key=lambda item: -item[1])
        sensitivity.clear()
        sensitivity.update(ranked)
        return best

    while psnr < target_psnr and len(excluded) < max_float_layers:
        names = first_round([n for n in candidates if n not in excluded]) if not sensitivity \
            else list(sensitivity)[:RETRIED_PER_ROUND]
        best = measure(names)
        if best is None or sensitivity[best[0]] < MIN_GAIN_DB:
            break
        name, (psnr, max_error, runner, kept) = best
        excluded = excluded | {name}
        del sensitivity[name]
        restorations.append((name, psnr))
    if not sensitivity and min_psnr is not None and psnr < min_psnr:
        measure(first_round([n for n in candidates if n not in excluded]))
    report = Int8Report(psnr, max_error, [n for n, _ in restorations], calibration_count,
                        len(inputs), restorations, sensitivity, screened, first_psnr)
    return kept, report


def choose_calibration(quantizers: dict[str, Quantize], candidates: Sequence[str],
                       inputs: list[tuple], reference: list[Tensor], target_psnr: float,
                       max_float_layers: int, calibration_count: int,
                       min_psnr: float | None = None,
                       screens: dict[str, Screen] | None = None) -> tuple[Any, Int8Report]:
    """Quantise everything once per activation calibration in ``quantizers`` (name ->
    quantise function), keep the one whose all-int8 model is closest to float, then choose
    the float layers with it (``choose_float_layers``, starting from that all-int8 model
    rather than quantising it again, screening with ``screens[name]`` where given); the
    report names the calibration
    kept and the all-int8 PSNR each gave. A calibration that fails (a histogram over a
    tensor of one value, say) is left out and its error reported; if all fail, ``Int8Error``."""
    scores: dict[str, float] = {}
    errors: dict[str, str] = {}
    best: tuple[str, tuple[Runner, Any]] | None = None
    for name, quantize in quantizers.items():
        try:
            quantized = quantize(frozenset())
            scores[name] = score(quantized[0], inputs, reference)[0]
        except LwCompileError:
            raise
        except Exception as exc:  # the runtime's quantiser, on this model's tensors
            errors[name] = one_line(exc)
            continue
        if best is None or scores[name] > scores[best[0]]:
            best = name, quantized  # only the best is held
    if best is None:
        raise Int8Error("int8 calibration failed with every method: " + "; ".join(
            f"{name}: {error}" for name, error in errors.items()))
    kept, report = choose_float_layers(quantizers[best[0]], candidates, inputs, reference,
                                       target_psnr, max_float_layers, calibration_count,
                                       min_psnr, all_int8=best[1],
                                       screen=(screens or {}).get(best[0]))
    report.calibration_method = best[0]
    report.calibration_psnr_db = scores
    report.calibration_errors = errors
    return kept, report


def refuse_below(report: Int8Report, min_psnr: float | None) -> None:
    """Raise ``Int8QualityError`` naming the worst layers when PSNR < ``min_psnr``."""
    if min_psnr is None or report.psnr_db >= min_psnr:
        return
    worst = list(report.sensitivity)[:3]
    named = (f"; the layers whose int8 error is largest: {', '.join(worst)}" if worst
             else "")
    floated = f" with {', '.join(report.float_layers)} kept float" if report.float_layers else ""
    raise Int8QualityError(
        f"int8 output is {report.psnr_db:.2f} dB PSNR from float{floated}, below "
        f"min_psnr={min_psnr}{named}; nothing was written (raise max_float_layers, give "
        "calibration data like the deployment's, or export fp32)", report)


def check_qat_steps(where: str, steps: Any, precision: str) -> int:
    """``steps`` of quantisation-aware fine-tuning: an int >= 0, and 0 unless int8."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise Int8Error(f"{where}: qat_steps must be an int >= 0, got {steps!r}")
    if steps and precision != "int8":
        raise Int8Error(f"{where}: qat_steps={steps} fine-tunes for int8, but precision is "
                        f"{precision!r}")
    return steps


def validate_options(min_psnr: float | None, target_psnr: float, max_float_layers: int,
                     calibration_count: int, evaluation_count: int) -> None:
    if calibration_count < 1 or evaluation_count < 1:
        raise Int8Error("calibration_count and evaluation_count must be at least 1")
    if max_float_layers < 0:
        raise Int8Error(f"max_float_layers must be >= 0, got {max_float_layers}")
    for name, value in (("min_psnr", min_psnr), ("target_psnr", target_psnr)):
        if value is not None and not isinstance(value, (int, float)):
            raise Int8Error(f"{name} must be a number in dB, got {value!r}")
