"""Thin large-kernel convs on pixel phases (emit_fast) and the onnxruntime forms
(export_onnx): exact rewrites, equal in onnxruntime at sizes that are not multiples of 4."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lwcompile.deploy.emit import emit_fast
from lwcompile.deploy.export import export_onnx
from lwcompile.deploy.module_rewrites import on_phases, onnxruntime_forms, thin_convs_on_phases
from lwcompile.measure.cost import measure
from lwcompile.nn import ThinConvPhases
from tests.helpers import close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("c_in", "c_out", "k", "bias", "size"), [
    (16, 3, 9, True, (32, 32)),
    (16, 3, 9, True, (37, 50)),  # neither side a multiple of 4: padded, then cropped
    (8, 1, 11, False, (13, 9)),
    (4, 4, 9, True, (3, 5)),  # smaller than the kernel
])
def test_thin_conv_phases_equals_the_conv(c_in, c_out, k, bias, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)
    phases = on_phases(conv)
    assert phases.conv.stride == (4, 4) and phases.conv.out_channels == 16 * c_out
    x = torch.randn(2, c_in, *size)
    with torch.no_grad():
        close(phases(x), conv(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.PReLU()  # one slope: becomes a LeakyReLU
        self.wide_act = nn.PReLU(16)  # a slope per channel: kept
        self.tail = nn.Conv2d(16, 3, 9, padding=4)  # thin, large: phases
        self.small_tail = nn.Conv2d(16, 3, 3, padding=1)  # 3x3: kept
        self.wide = nn.Conv2d(16, 8, 9, padding=4)  # 8 outputs: kept
        self.reflect = nn.Conv2d(16, 3, 9, padding=4, padding_mode="reflect")  # kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wide_act(self.act(self.head(x)))
        return (self.tail(h) + self.small_tail(h) + self.reflect(h)
                + self.wide(h)[:, :3])


def test_forms_rewrite_only_what_they_name_and_keep_the_output():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        model.act.weight.fill_(0.375)  # exact in float32
    rewritten = copy.deepcopy(model)
    assert thin_convs_on_phases(rewritten) == 1
    assert onnxruntime_forms(rewritten) == {"prelu-as-leaky-relu": 1}
    assert isinstance(rewritten.act, nn.LeakyReLU) and rewritten.act.negative_slope == 0.375
    assert isinstance(rewritten.wide_act, nn.PReLU)
    assert isinstance(rewritten.tail, ThinConvPhases)
    assert [type(m) for m in (rewritten.small_tail, rewritten.wide, rewritten.reflect)] == [
        nn.Conv2d] * 3
    x = torch.randn(1, 3, 22, 17)
    with torch.no_grad():
        close(rewritten(x), model(x))


@pytest.mark.parametrize("phases", [True, False])
def test_emit_fast_puts_thin_convs_on_phases_unless_told_not_to(phases):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(1, 3, 21, 26)
    fast = emit_fast(model, (x,), phases=phases, channels_last=False)
    assert isinstance(fast.tail, ThinConvPhases) == phases
    assert isinstance(fast.act, nn.PReLU)  # the LeakyReLU form is onnxruntime's only
    with torch.no_grad():
        close(fast(x), model(x))


def test_export_onnx_applies_them_and_onnxruntime_agrees_at_odd_sizes(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.rand(1, 3, 24, 24)
    path = export_onnx(model, (x,), tmp_path / "net.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "PRelu" in ops and "LeakyRelu" in ops  # the per-channel one stays a PRelu
    assert ops.count("Conv") == 5 and ops.count("DepthToSpace") == 1
    plain = [n.op_type for n in onnx.load(str(export_onnx(
        model, (x,), tmp_path / "plain.onnx", fast=False))).graph.node]
    assert "LeakyRelu" not in plain and "DepthToSpace" not in plain
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for y in (x, torch.rand(1, 3, 19, 30)):
        with torch.no_grad():
            close(torch.from_numpy(session.run(None, {"input_0": y.numpy()})[0]), model(y))


def test_thin_conv_phases_copies_no_input_when_eager_sizes_divide():
    """A zero pad would still copy the input: eager skips it, and needs it only otherwise."""
    torch.manual_seed(0)
    phases = on_phases(nn.Conv2d(16, 3, 9, padding=4))
    fits, odd = torch.rand(1, 16, 32, 32), torch.rand(1, 16, 30, 32)
    outputs = 2 * 3 * 32 * 32 * 4  # the stride-4 conv's 48 x 8 x 8 and the shuffled 3 x 32 x 32
    assert measure(phases, (fits,)).peak_bytes == outputs
    assert measure(phases, (odd,)).peak_bytes == outputs + 16 * 32 * 32 * 4  # padded copy


class GrayTail(nn.Module):
    """A gray denoiser's end: a 3x3 conv to one channel (rewritten) beside convs that are
    not (three outputs, few inputs, a 9x9 kernel: phases)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 32, 3, padding=1)
        self.gray = nn.Conv2d(32, 1, 3, padding=1)
        self.reflect_gray = nn.Conv2d(32, 1, 5, padding=2, padding_mode="reflect", bias=False)
        self.color = nn.Conv2d(32, 3, 3, padding=1)
        self.narrow = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.head(x))
        return (self.gray(h) + self.reflect_gray(h) + self.color(h).mean(1, keepdim=True)
                + self.narrow(h[:, :8]))


@pytest.mark.parametrize("depthwise_sum", [True, False])
def test_emit_fast_runs_single_output_convs_as_depthwise_and_sum(depthwise_sum):
    torch.manual_seed(0)
    model = GrayTail().eval()
    x = torch.rand(1, 1, 19, 24)
    fast = emit_fast(model, (x,), depthwise_sum=depthwise_sum, channels_last=False)
    for name in ("gray", "reflect_gray"):
        module = getattr(fast, name)
        if not depthwise_sum:
            assert type(module) is nn.Conv2d
            continue
        depthwise, total = module
        assert (depthwise.groups, depthwise.out_channels, total.kernel_size) == (32, 32, (1, 1))
        assert depthwise.padding_mode == getattr(model, name).padding_mode
        assert (total.bias is None) == (getattr(model, name).bias is None)
        # each kernel scaled to peak magnitude one, its scale moved to the sum
        assert torch.allclose(depthwise.weight.abs().amax(dim=(1, 2, 3)), torch.ones(32))
        torch.testing.assert_close(total.weight.flatten(),
                                   getattr(model, name).weight[0].abs().amax(dim=(1, 2)))
    assert [type(m) for m in (fast.color, fast.narrow)] == [nn.Conv2d] * 2
    with torch.no_grad():
        close(fast(x), model(x))
