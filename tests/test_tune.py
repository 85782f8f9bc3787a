"""lwcompile.tune: each LIST's deployed form chosen by timing, exact whatever it chooses;
DenseLIST, the form it can choose besides the chain of thin convs."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy import identities
from lwcompile.deploy.emit import emit_fast
from lwcompile.deploy.tune import TuneError, list_groups, tune, with_forms
from lwcompile.nn import LIST, DenseLIST
from tests.helpers import close, run


def _net() -> nn.Module:
    """Two LISTs alike (one group) and one of another shape, with BNs after them."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        LIST(16, 16), nn.BatchNorm2d(16), nn.ReLU(),
        LIST(16, 16), nn.BatchNorm2d(16), nn.ReLU(),
        LIST(16, 8, kernel_size=5), nn.ReLU(),
        nn.Conv2d(8, 3, 3, padding=1)).eval()


def _inputs() -> tuple[torch.Tensor]:
    return (torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1)),)


@pytest.mark.parametrize("kernel, padding_mode", [(3, "zeros"), (5, "reflect")])
def test_dense_list_is_the_same_function(kernel: int, padding_mode: str) -> None:
    torch.manual_seed(0)
    lst = LIST(32, 24, kernel_size=kernel, padding_mode=padding_mode).eval()
    dense = DenseLIST(lst)
    x = torch.randn(2, 32, 11, 13)
    close(dense(x), lst(x))
    # squeeze 32->8 (+bias), then one dense kxk conv 8->24 (+bias)
    assert sum(p.numel() for p in dense.parameters()) == 32 * 8 + 8 + 8 * 24 * kernel**2 + 24
    assert dense.conv.padding_mode == padding_mode


def test_depthwise_then_pointwise_identity() -> None:
    torch.manual_seed(0)
    dw, pw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.Conv2d(6, 4, 1)
    w, b = identities.depthwise_then_pointwise((dw.weight, dw.bias), (pw.weight, pw.bias))
    x = torch.randn(1, 6, 9, 9)
    close(torch.nn.functional.conv2d(x, w, b, padding=1), pw(dw(x)))


def test_batchnorm_after_dense_list_folds_in_emit_fast() -> None:
    model = with_forms(_net(), {"2": "dense", "5": "dense"})
    fast = emit_fast(model, _inputs(), channels_last=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    close(run(fast, _inputs()), run(_net(), _inputs()))


def test_sites_group_by_shape_and_configuration() -> None:
    assert list_groups(_net(), _inputs()) == [["2", "5"], ["8"]]


def test_tune_for_torch_is_exact_and_reports_every_site() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = tune(model, _inputs(), target="torch", runs=1)
    close(run(tuned.model, _inputs()), run(model, _inputs()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert tuned.precision == "fp32" and tuned.target == "torch"
    report = tuned.report
    assert [(s.site, s.group) for s in report.sites] == [("2", 0), ("5", 0), ("8", 1)]
    chosen = {s.site: s.form_after for s in report.sites}
    assert chosen["2"] == chosen["5"] and set(chosen.values()) <= {"chain", "dense"}
    kinds = {name: type(m) for name, m in tuned.model.named_children()}
    assert all(kinds[s] is (DenseLIST if f == "dense" else LIST) for s, f in chosen.items())
    assert {"fp32: as given", "fp32: group 0 dense", "fp32: group 1 dense"} <= \
        set(report.timings)
    assert report.ms_before > 0 and report.ms_after > 0
    assert "group 0 (2 sites: 2, 5)" in str(report)


def test_tune_for_onnxruntime_auto_times_both_precisions() -> None:
    pytest.importorskip("onnxruntime")
    tuned = tune(_net(), _inputs(), target="onnxruntime", precision="auto", runs=1)
    assert tuned.precision in ("fp32", "int8")
    assert {"fp32: as given", "int8: as given"} <= set(tuned.report.timings)
    close(run(tuned.model, _inputs()), run(_net(), _inputs()))


@pytest.mark.slow
def test_tune_int8_below_min_psnr_is_skipped_with_the_reason() -> None:
    pytest.importorskip("onnxruntime")
    tuned = tune(_net(), _inputs(), target="onnxruntime", precision="auto", runs=1,
                 min_psnr=200.0)
    assert tuned.precision == "fp32"
    assert "int8" in tuned.report.skipped and "200" in tuned.report.skipped["int8"]
    with pytest.raises(TuneError, match="no precision"):
        tune(_net(), _inputs(), target="onnxruntime", precision="int8", runs=1,
             min_psnr=200.0)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "tflite"}, "unknown target 'tflite'; valid targets: torch, onnxruntime, xnnpack"),
    ({"precision": "int4"}, "unknown precision 'int4'"),
    ({"target": "torch", "precision": "int8"}, "fp32 only"),
    ({"runs": 0}, "runs"),
    ({"threads": "two"}, "threads"),
])
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(lwcompile.ArgumentError, match=match):
        tune(_net(), _inputs(), **kwargs)


def test_missing_runtime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(TuneError, match=r"pip install lwcompile\[export\]"):
        tune(_net(), _inputs(), target="onnxruntime")


def test_a_model_without_lists_is_returned_as_given() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1)).eval()
    tuned = tune(model, _inputs(), target="torch", runs=1)
    assert tuned.report.sites == [] and set(tuned.report.timings) == {"fp32: as given"}
    close(run(tuned.model, _inputs()), run(model, _inputs()))
