"""Integer sorts written as topk (deploy.sort_as_topk): a stable sort's indices and values,
and exported files that run where the runtimes have no sort (ATD's category attention)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lwcompile
from lwcompile.deploy.sort_as_topk import sorts_as_topk
from tests.helpers import runs_in_executorch_as_eager

aten = torch.ops.aten
#: long enough that torch's unstable CPU sort leaves index order for equal values
ROW = 300


class Sorter(nn.Module):
    """Sorts integer keys made from ``x`` (4 values, so many are equal) of ``dtype``, or
    the argmax over ``x``'s rows for int64; returns values and indices."""

    def __init__(self, dtype: torch.dtype, descending: bool = False,
                 stable: bool = True) -> None:
        super().__init__()
        self.dtype, self.descending, self.stable = dtype, descending, stable

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is torch.int64:
            return x.argmax(1)
        if self.dtype is torch.bool:
            return x[:, 0] > 0.5
        return (x[:, 0] * 4).to(self.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sort(self.keys(x), dim=-1, descending=self.descending,
                          stable=self.stable)


def rewritten(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, int]:
    module = torch.export.export(model, (x,)).module()
    return module, sorts_as_topk(module)


def targets(module: torch.fx.GraphModule) -> list:
    return [n.target for n in module.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8, torch.bool])
def test_integer_sorts_become_topk_with_a_stable_sorts_values_and_indices(dtype, descending):
    torch.manual_seed(0)
    x = torch.rand(2, 4, ROW)
    model = Sorter(dtype, descending)
    module, done = rewritten(model, x)
    assert done == 1
    assert aten.topk.default in targets(module)
    assert not {aten.sort.default, aten.sort.stable} & set(targets(module))
    values, indices = module(x)
    want_values, want_indices = torch.sort(model.keys(x), dim=-1, descending=descending,
                                           stable=True)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    assert values.dtype == dtype


def test_an_unstable_sort_is_rewritten_with_a_warning_and_a_stable_one_without():
    x = torch.rand(1, 4, ROW)
    for stable, warned in ((False, 1), (True, 0)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module, done = rewritten(Sorter(torch.int64, stable=stable), x)
        ours = [str(w.message) for w in caught
                if issubclass(w.category, lwcompile.LwCompileWarning)]
        assert done == 1 and len(ours) == warned
        assert all("1 unstable sort(s)" in message for message in ours)
    # eager's unstable order differs at this length; the rewrite keeps index order
    keys = Sorter(torch.int64).keys(x)
    assert not torch.equal(torch.sort(keys, stable=False)[1], torch.sort(keys, stable=True)[1])
    assert torch.equal(module(x)[1], torch.sort(keys, stable=True)[1])


class FloatAndWideSorts(nn.Module):
    """Sorts the rewrite cannot prove exact: floats, and int64 keys of unknown range."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sort(x, dim=-1)[1], torch.sort((x * 1e6).long(), dim=-1)[1]


def test_sorts_whose_keys_may_not_fit_are_left_to_the_exporter():
    module, done = rewritten(FloatAndWideSorts(), torch.rand(1, 2, 8))
    assert done == 0
    assert targets(module).count(aten.sort.default) + targets(module).count(
        aten.sort.stable) == 2


class CategoryOrder(nn.Module):
    """ATD's grouping of tokens: each pixel's category (argmax of a 1x1 conv), the pixels
    gathered in category order and summed cumulatively, so that the order shows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.categories = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # b, hw, c
        category = self.categories(x).flatten(2).argmax(1)  # b, hw
        order = torch.sort(category, dim=-1, stable=True)[1]
        grouped = torch.gather(tokens, 1, order.unsqueeze(-1).expand_as(tokens))
        return grouped.cumsum(1).transpose(1, 2).reshape(b, c, h, w) / (h * w)


def test_a_category_sort_exports_to_onnx_and_runs_at_other_sizes(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = CategoryOrder().eval()
    path = lwcompile.export_onnx(model, (torch.rand(1, 3, 16, 16),), tmp_path / "s.onnx")
    assert path.exporter == "torch.export"  # the TorchScript-based one has no stable sort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in ((16, 16), (20, 13)):
        x = torch.rand(1, 3, *size)
        (got,) = session.run(None, {"input_0": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.slow  # lowers to ExecuTorch
def test_a_category_sort_runs_in_executorch(tmp_path):
    pytest.importorskip("executorch")
    export = runs_in_executorch_as_eager(CategoryOrder().eval(), torch.rand(1, 3, 16, 16),
                                         tmp_path / "s.pte")
    assert export.forms["sort-as-topk"] == 1
