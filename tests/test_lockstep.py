"""The root's traced graph is checked alongside the eager run, taking eager's conv outputs."""

import operator
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import dncnn
from lwcompile.compiler.driver import reference_run
from lwcompile.graph_check.graph_run import check_after
from lwcompile.graph_check.lockstep import Lockstep
from lwcompile.measure.cost import measure
from lwcompile.tracing.trace import Call, trace_graph
from tests.test_replay import ConvTwice, CountsCalls, RewritesItsWeights

pytestmark = pytest.mark.usefixtures("one_thread")


def _alongside(model: nn.Module, x: torch.Tensor, spoil=None):
    """Trace ``model``, then run it eagerly with the graph paired: (region, pairing)."""
    model.eval()
    attempt = trace_graph("", model, Call((x,), {}, None))
    if spoil is not None:
        spoil(attempt.graph_module)
    pairing = Lockstep(attempt)
    with pairing.alongside(model), torch.no_grad():
        out = model(x)
    region, _ = pairing.region(out, eager_read_values=False)
    return region, pairing


def test_a_faithful_graph_takes_every_conv_output_from_eager_and_counts_memory_alike():
    model, x = dncnn.DnCNN(features=16, depth=5), torch.rand(1, 1, 20, 20)
    region, pairing = _alongside(model, x)
    assert region.traced and pairing.hits == 5
    with torch.no_grad():
        computed, _ = check_after(trace_graph("", model, Call((x,), {}, None)), model(x))
    assert region.timeline == computed.timeline  # a copied output costs what a computed one does
    conv = next(n for n in region.graph_module.graph.nodes if n.target == "body.0")
    assert tuple(conv.meta["tensor_meta"].shape) == (1, 16, 20, 20)


def test_an_in_place_activation_after_a_conv_spoils_neither_side():
    """ReLU(inplace=True) overwrites eager's conv output after the hook: the graph holds a copy."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                          nn.Conv2d(8, 3, 3, padding=1))
    region, pairing = _alongside(model, torch.randn(1, 3, 12, 12))
    assert region.traced and pairing.hits == 3


def test_a_graph_that_bakes_in_python_disagrees_and_computes_from_there():
    region, pairing = _alongside(CountsCalls(), torch.rand(1, 3, 12, 12))
    assert region.opaque_reason == "traced graph disagrees with eager"
    assert pairing.hits == 1  # the second conv's input differed: it was computed


def test_a_graph_that_writes_weights_is_never_given_eager_outputs():
    region, pairing = _alongside(RewritesItsWeights(), torch.rand(1, 3, 8, 8))
    assert pairing.hits == 0 and pairing.cost.preexisting_writes == 1
    assert region.opaque_reason == "traced graph disagrees with eager"  # as computed


def test_a_conv_called_twice_is_paired_call_by_call():
    region, pairing = _alongside(ConvTwice(), torch.rand(1, 4, 10, 10))
    assert region.traced and pairing.hits == 2


def test_a_graph_that_fails_leaves_the_eager_run_alone():
    def spoil(gm):
        def broken(*_args, **_kwargs):
            raise ValueError("spoilt on purpose")
        next(n for n in gm.graph.nodes if n.target is F.relu).target = broken

    region, pairing = _alongside(_FunctionalRelu(), torch.rand(1, 1, 8, 8), spoil)
    assert region.opaque_reason == "traced graph fails to run: ValueError: spoilt on purpose"
    assert pairing.hits == 1


class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return self.second(F.relu(self.first(x)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -x


class WithAnOpaqueBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head, self.block = nn.Conv2d(3, 8, 3, padding=1), DataDependent()

    def forward(self, x):
        return self.block(self.head(x))


def test_a_root_that_traced_whole_is_paired_else_conv_outputs_are_recorded():
    whole = reference_run(dncnn.DnCNN(features=8, depth=3), (torch.rand(1, 1, 8, 8),), {},
                          False, (nn.Conv2d,), Counter())
    region, opaque = whole.root
    assert region.traced and opaque == set() and whole.graph_check.paired
    assert whole.graph_check.replay is None
    # an opaque leaf would run its hooked convs during eager's forward: checked afterwards
    partial = reference_run(WithAnOpaqueBlock(), (torch.rand(1, 3, 8, 8),), {}, False,
                            (nn.Conv2d,), Counter())
    region, opaque = partial.root
    assert region.traced and opaque == {"block"} and not partial.graph_check.paired
    assert partial.graph_check.replay.hits == 1  # the root's own conv, replayed in its check


def test_the_data_flow_counts_eager_calls_only():
    """After the pairing ends the graph computes convs itself, inside eager's forward."""
    reference = reference_run(CountsCalls(), (torch.rand(1, 3, 8, 8),), {}, False,
                              (nn.Conv2d,), Counter())
    assert reference.root[0].opaque_reason == "traced graph disagrees with eager"
    assert reference.flow.calls == {"first": 1, "second": 1}


def test_pairing_leaves_the_eager_run_measurements_as_they_were():
    """The graph's work runs outside eager's count, and holds none of eager's tensors."""
    model, x = dncnn.DnCNN(features=16, depth=5).eval(), torch.rand(1, 1, 20, 20)
    alone = measure(model, (x,))
    pairing = Lockstep(trace_graph("", model, Call((x,), {}, None)))
    with pairing.alongside(model):
        paired = measure(model, (x,))
    assert pairing.region(paired.output, eager_read_values=False)[0].traced and pairing.hits == 5
    assert (paired.macs, paired.peak_bytes) == (alone.macs, alone.peak_bytes)
    torch.testing.assert_close(paired.output, alone.output, rtol=0, atol=0)


class DenseBlock(nn.Module):
    """RRDBNet's pattern: in-place activation module, concat, scaled residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(12, 8, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        x1 = self.act(self.conv1(x))
        return self.conv2(torch.cat((x, x1), 1)) * 0.2 + x


def test_the_graph_takes_what_eager_computed_between_the_convs():
    model, x = DenseBlock(), torch.rand(1, 8, 10, 10)
    region, pairing = _alongside(model, x)
    assert region.traced and pairing.hits == 2
    assert pairing.reused == 4  # act, cat, mul, add: nothing computed twice
    with torch.no_grad():
        computed, _ = check_after(trace_graph("", model, Call((x,), {}, None)), model(x))
    assert region.timeline == computed.timeline  # taken where it would have been computed


class InPlaceResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.tail = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y += x
        return self.tail(y)


def test_an_in_place_residual_is_taken_from_eager_not_added_twice():
    model, x = InPlaceResidual().eval(), torch.rand(1, 4, 8, 8)
    with torch.no_grad():
        alone = model(x)
    attempt = trace_graph("", model, Call((x,), {}, None))
    pairing = Lockstep(attempt)
    with pairing.alongside(model), torch.no_grad():
        paired = model(x)
    assert pairing.region(paired, eager_read_values=False)[0].traced
    assert pairing.hits == 2 and pairing.reused == 1
    torch.testing.assert_close(paired, alone, rtol=0, atol=0)


class ScaledInPlaceResidual(InPlaceResidual):
    def forward(self, x):
        y = self.conv(x)
        y += x
        return self.tail(y * 2.0)


def test_a_copy_of_an_in_place_result_still_holds_eagers_value():
    """The graph copies ``y += x``'s result; the scaling after it is still eager's."""
    region, pairing = _alongside(ScaledInPlaceResidual(), torch.rand(1, 4, 8, 8))
    assert region.traced and pairing.hits == 2 and pairing.reused == 2


def test_a_graph_never_writes_into_a_tensor_it_shares_with_eager():
    """A write eager does not make (so not eager's to hand over) stops the graph first."""
    def spoil(gm):
        conv = next(n for n in gm.graph.nodes if n.target == "first")
        with gm.graph.inserting_after(conv):
            extra = gm.graph.call_method("mul_", (conv, 2.0))
        conv.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
        gm.recompile()

    model, x = _FunctionalRelu().eval(), torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        alone = model(x)
    attempt = trace_graph("", model, Call((x,), {}, None))
    spoil(attempt.graph_module)
    pairing = Lockstep(attempt)
    with pairing.alongside(model), torch.no_grad():
        paired = model(x)
    region, _ = pairing.region(paired, eager_read_values=False)
    assert region.opaque_reason.startswith("traced graph fails to run: SharedWrite")
    torch.testing.assert_close(paired, alone, rtol=0, atol=0)  # eager's run is untouched


class WritesAfterUse(InPlaceResidual):
    def forward(self, x):
        y = self.conv(x)
        z = y * 2.0
        y.add_(1.0)
        return self.tail(z + y)


def test_a_graph_never_reads_what_eager_wrote_after_handing_it_over():
    """The graph computes its own ``y * 3`` after eager's ``y.add_``: y is no longer y."""
    def spoil(gm):
        next(n for n in gm.graph.nodes if n.target is operator.mul).args = (
            next(n for n in gm.graph.nodes if n.target == "conv"), 3.0)
        gm.recompile()

    region, pairing = _alongside(WritesAfterUse(), torch.rand(1, 4, 8, 8), spoil)
    assert region.opaque_reason.startswith("traced graph fails to run: Stale")
    _, faithful = _alongside(WritesAfterUse(), torch.rand(1, 4, 8, 8))
    assert faithful.reused == 3  # mul, add_, add


class CountsPositives(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.nonzero(y.flatten() > 0).shape[0]


def test_a_value_eager_read_marks_the_graph_check_value_dependent():
    """The graph took nonzero's result from eager, so only eager's run saw the value read."""
    reference = reference_run(CountsPositives(), (torch.rand(1, 3, 8, 8),), {}, False,
                              (nn.Conv2d,), Counter())
    region, _ = reference.root
    assert region.traced and reference.run.reads_values
    assert region.timeline.value_dependent


class ScalesItsInput(nn.Module):
    """fx keeps using ``x`` after ``x.mul_``: the graph's copy of the input must be scaled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x.mul_(2.0)
        return self.conv(x)


def test_a_write_into_the_graphs_own_copy_is_made_by_the_graph():
    region, pairing = _alongside(ScalesItsInput(), torch.rand(1, 3, 8, 8))
    assert region.traced and pairing.reused == 0
