"""The search for layers to keep float (``deploy.int8``), on a simulated quantiser.

Each named layer adds a known variance of error to the output when quantised, so every
PSNR, gain and quantisation count the search sees can be computed by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

import lwcompile
from lwcompile.deploy import int8

REFERENCE = [torch.linspace(0, 1, 64).view(1, 1, 8, 8)]  # peak (range) 1
SIGN = torch.tensor([1.0, -1.0]).repeat(32).view(1, 1, 8, 8)  # mean square 1


class Simulated:
    """Quantising adds ``variances[name]`` of error for each layer not left float; counts
    the quantisations it is asked for."""

    def __init__(self, variances: dict[str, float]) -> None:
        self.variances = variances
        self.calls: list[frozenset[str]] = []

    def __call__(self, excluded: frozenset[str]) -> tuple[int8.Runner, frozenset[str]]:
        self.calls.append(excluded)
        variance = sum(v for n, v in self.variances.items() if n not in excluded)
        return (lambda args: REFERENCE[0] + math.sqrt(variance) * SIGN), excluded

    def psnr(self, excluded: set[str]) -> float:
        return 10 * math.log10(1 / sum(v for n, v in self.variances.items()
                                       if n not in excluded))


VARIANCES = {f"conv{i}": 1e-5 * (i + 1) for i in range(10)}  # conv9 hurts most


def search(quantize: Simulated, max_float_layers: int, target: float = 100.0,
           min_psnr: float | None = None) -> tuple[frozenset[str], int8.Int8Report]:
    return int8.choose_float_layers(quantize, list(VARIANCES), [()], REFERENCE, target,
                                    max_float_layers, 1, min_psnr)


def test_first_round_tries_every_conv_later_rounds_only_the_best_few():
    quantize = Simulated(VARIANCES)
    kept, report = search(quantize, max_float_layers=3)
    assert report.float_layers == ["conv9", "conv8", "conv7"] and kept == set(report.float_layers)
    # all-int8, 10 alone, then RETRIED_PER_ROUND per further layer: not 10 + 9 + 8
    assert len(quantize.calls) == 1 + 10 + 2 * int8.RETRIED_PER_ROUND
    assert report.psnr_db == pytest.approx(quantize.psnr({"conv9", "conv8", "conv7"}), abs=1e-4)
    assert report.all_int8_psnr_db == pytest.approx(quantize.psnr(set()), abs=1e-4)
    # every layer still int8 has a gain, largest first; the retried ones measured last
    assert list(report.sensitivity) == [f"conv{i}" for i in range(6, -1, -1)]
    after_two = quantize.psnr({"conv9", "conv8"})
    assert report.sensitivity["conv6"] == pytest.approx(
        quantize.psnr({"conv9", "conv8", "conv6"}) - after_two, abs=1e-4)


def test_no_float_layers_means_no_search():
    quantize = Simulated(VARIANCES)
    _, report = search(quantize, max_float_layers=0)
    assert quantize.calls == [frozenset()]
    assert report.float_layers == [] and report.sensitivity == {}


def test_a_refusal_still_measures_one_round_to_name_the_worst_layers():
    quantize = Simulated(VARIANCES)
    _, report = search(quantize, max_float_layers=0, min_psnr=100.0)
    assert len(quantize.calls) == 1 + 10
    assert list(report.sensitivity)[:3] == ["conv9", "conv8", "conv7"]
    with pytest.raises(lwcompile.Int8QualityError, match="conv9, conv8, conv7"):
        int8.refuse_below(report, 100.0)


def test_search_stops_at_the_target_and_when_no_layer_helps_enough():
    quantize = Simulated(VARIANCES)
    target = quantize.psnr({"conv9"}) - 0.01  # met after one layer
    _, report = search(quantize, max_float_layers=3, target=target)
    assert report.float_layers == ["conv9"] and len(quantize.calls) == 1 + 10
    flat = Simulated({**{f"conv{i}": 1e-9 for i in range(10)}, "rest": 1e-3})
    _, report = int8.choose_float_layers(flat, [f"conv{i}" for i in range(10)], [()],
                                         REFERENCE, 100.0, 3, 1)
    assert report.float_layers == []  # each gains far less than MIN_GAIN_DB


def test_a_failing_calibration_is_left_out_and_reported():
    def broken(excluded: frozenset[str]) -> tuple[int8.Runner, None]:
        raise ValueError("Too many bins for data range")

    kept, report = int8.choose_calibration(
        {"histogram": broken, "minmax": Simulated(VARIANCES)}, list(VARIANCES), [()],
        REFERENCE, 0.0, 3, 1)
    assert report.calibration_method == "minmax" and list(report.calibration_psnr_db) == [
        "minmax"]
    assert report.calibration_errors == {"histogram": "ValueError: Too many bins for data range"}
    assert report.to_dict()["calibration_errors"] == report.calibration_errors
    with pytest.raises(lwcompile.Int8Error, match="every method: histogram: ValueError"):
        int8.choose_calibration({"histogram": broken}, list(VARIANCES), [()], REFERENCE,
                                0.0, 3, 1)


def test_the_chosen_calibrations_all_int8_model_is_not_made_again():
    first, second = Simulated(VARIANCES), Simulated({n: v * 2 for n, v in VARIANCES.items()})
    _, report = int8.choose_calibration({"a": second, "b": first}, list(VARIANCES), [()],
                                        REFERENCE, 100.0, 1, 1)
    assert report.calibration_method == "b" and report.float_layers == ["conv9"]
    assert second.calls == [frozenset()]
    assert first.calls.count(frozenset()) == 1 and len(first.calls) == 1 + 10


MANY = {f"conv{i}": 1e-6 * (i + 1) for i in range(30)}  # conv29 hurts most


def screen_of(simulated: Simulated, misjudged: dict[str, float]):
    """A screen that sees each layer's variance times ``misjudged[name]`` (1 elsewhere): a
    cheap approximation of ``simulated`` that may rank layers wrongly."""
    def one_float_from(excluded: frozenset[str]):
        def one_float(name: str) -> int8.Runner:
            seen = {n: v * misjudged.get(n, 1.0) for n, v in simulated.variances.items()}
            variance = sum(v for n, v in seen.items() if n not in excluded | {name})
            return lambda args: REFERENCE[0] + math.sqrt(variance) * SIGN
        return one_float
    return one_float_from


def test_a_screen_ranks_many_layers_and_only_its_best_are_quantised():
    quantize = Simulated(MANY)
    # the screen overrates conv3 and underrates conv28 (it ranks 9th, not confirmed)
    screen = screen_of(quantize, {"conv3": 100.0, "conv28": 0.2})
    _, report = int8.choose_float_layers(quantize, list(MANY), [()], REFERENCE, 100.0, 2, 1,
                                         screen=screen)
    screened = list(report.screened)
    assert len(screened) == 30 and screened[:2] == ["conv3", "conv29"]
    assert "conv28" not in screened[:int8.SCREEN_CONFIRMED]
    # all-int8, the confirmed ones, then one retried round
    assert len(quantize.calls) == 1 + int8.SCREEN_CONFIRMED + int8.RETRIED_PER_ROUND
    assert {next(iter(c)) for c in quantize.calls[1:1 + int8.SCREEN_CONFIRMED]} == set(
        screened[:int8.SCREEN_CONFIRMED])
    # the real trials decide: conv3 helps less than conv29 and conv27 once quantised for real
    assert report.float_layers == ["conv29", "conv27"]
    assert report.psnr_db == pytest.approx(quantize.psnr({"conv29", "conv27"}), abs=1e-4)
    assert report.to_dict()["screened"]["conv3"] == round(report.screened["conv3"], 3)
    assert str(report).endswith(
        f"float layers: conv29, conv27 (of the {int8.SCREEN_CONFIRMED} best of 30 screened)")


def test_few_layers_are_not_screened():
    quantize = Simulated(VARIANCES)
    _, report = int8.choose_float_layers(quantize, list(VARIANCES), [()], REFERENCE, 100.0, 1,
                                         1, screen=screen_of(quantize, {}))
    assert len(VARIANCES) <= int8.SCREEN_ABOVE and report.screened == {}
    assert len(quantize.calls) == 1 + len(VARIANCES)


def test_a_screen_that_fails_leaves_the_search_to_quantise_every_layer():
    quantize = Simulated(MANY)

    def broken(kept):
        def one_float(name: str) -> int8.Runner:
            raise KeyError(f"{name}_DequantizeLinear_Output")
        return one_float

    with pytest.warns(lwcompile.LwCompileWarning, match="could not screen this graph "
                      r"\(KeyError: 'conv0_DequantizeLinear_Output'\); it quantises"):
        _, report = int8.choose_float_layers(quantize, list(MANY), [()], REFERENCE, 100.0, 1,
                                             1, screen=broken)
    assert report.screened == {} and report.float_layers == ["conv29"]
    assert len(quantize.calls) == 1 + len(MANY)
