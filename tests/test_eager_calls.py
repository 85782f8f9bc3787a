"""Eager's calls are recorded by function and argument values, for a graph to take."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.graph_check.eager_calls import EagerCalls, call_key, eager_call


def _value_of(t: torch.Tensor) -> tuple[int, int]:
    return id(t), t._version


def test_keys_tell_apart_what_python_equality_would_not():
    x = torch.ones(2)
    assert call_key(F.relu, (x, True), {}, _value_of) != call_key(F.relu, (x, 1), {}, _value_of)
    assert call_key(operator.getitem, (x, slice(0, 1)), {}, _value_of) == \
        call_key(operator.getitem, (x, slice(0, 1)), {}, _value_of)
    assert call_key(torch.cat, ((x, x), {"dim": 0}), {}, _value_of) is not None
    assert call_key(torch.cat, ((x, x), {0}), {}, _value_of) is None  # a set: no key
    assert call_key(torch.cat, ((x, x), {1: 0, "a": 1}), {}, _value_of) is None  # unsortable
    assert call_key([torch.cat], (x,), {}, _value_of) is None  # an unhashable callable
    before = call_key(torch.mul, (x, 2.0), {}, _value_of)
    x.add_(1)  # written in place: a new value of the same tensor
    assert call_key(torch.mul, (x, 2.0), {}, _value_of) != before


def test_a_result_is_kept_as_an_alias_until_forgotten():
    calls = EagerCalls()
    a, b = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)
    with calls:
        out = torch.cat((a, b), 1)
    key = call_key(torch.cat, ((a, b), 1), {}, calls.known_value)
    value, alias, copy = calls.results[key]
    assert value == calls.value(out) and alias is not out and not copy
    assert alias.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    calls.forget()
    assert calls.results == {}


def test_an_in_place_call_also_answers_for_its_functional_twin_of_the_same_dtype():
    """fx records ``y += x`` as ``y + x``."""
    calls = EagerCalls()
    y, x = torch.rand(4), torch.rand(4)
    half = torch.rand(4).half()
    before = call_key(torch.Tensor.add, (y, x), {}, calls.value)
    promoted = call_key(torch.Tensor.add, (half, x), {}, calls.value)
    with calls:
        y += x
        half.add_(x)  # functional add would promote to float32: no twin
    value, alias, copy = calls.results[before]
    assert value == calls.value(y) and copy  # the twin allocates: a graph copies
    assert promoted not in calls.results


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act(x) * 2.0


def test_a_watched_module_is_recorded_as_one_call_and_its_inside_is_not():
    model, x = _Block(), torch.randn(4)
    calls = EagerCalls()
    handles = calls.watching({"act": model.act}, recorded={"act"})
    with calls:
        model(x)
    for handle in handles:
        handle.remove()
    targets = [key[0] for key in calls.results]
    assert targets == [("module", "act"), torch.Tensor.mul]  # not F.leaky_relu inside


def test_fx_nodes_are_asked_for_as_eager_calls_them():
    x = torch.rand(2)
    assert eager_call("call_function", operator.mul, (0.5, x), "") == (torch.Tensor.mul, (x, 0.5))
    assert eager_call("call_method", "view", (x, 2), "") == (torch.Tensor.view, (x, 2))
    assert eager_call("call_module", "body.0", (x,), "net") == (("module", "net.body.0"), (x,))
    assert eager_call("get_attr", "weight", (), "") is None
