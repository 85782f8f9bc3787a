"""Property-based fuzzing: lighten random image-to-image networks and check the contract.

For every generated network, ``lighten`` either returns a model with the same output shape
that runs forward and backward (every parameter gets a finite gradient), or refuses with an
``LwCompileError`` naming why; it never raises anything else, never hides an internal crash
as ``CompileFailed``, and never changes the input model's weights or mode.

The networks are drawn from a spec (see ``specs``): convs of random kernel, stride,
dilation, groups and width, residual adds, channel concats, pixel shuffles, interpolations
and transposed convs, on tiny inputs so that 300 examples stay well under a minute.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = 300
WIDTHS = (8, 16, 24, 32, 48)
MAX_SIZE = 32
#: transposed convs as (kernel, stride, padding, output_padding): all keep sizes sane
TRANSPOSED = ((4, 2, 1, 0), (3, 2, 1, 1), (3, 1, 1, 0), (2, 2, 0, 0))


@dataclass(frozen=True)
class Spec:
    """A network: ``ops`` applied in order to a 1 x channels x size x size image."""

    channels: int
    size: int
    ops: tuple[tuple, ...]
    global_residual: bool


def _groups(draw, c_in: int, c_out: int) -> int:
    options = [g for g in (1, 2, 4, 8, c_in) if c_in % g == 0 and c_out % g == 0]
    return draw(st.sampled_from(sorted(set(options))))


@st.composite
def specs(draw) -> Spec:
    channels = draw(st.sampled_from((1, 3)))
    size = draw(st.sampled_from((8, 12, 16)))
    width = draw(st.sampled_from(WIDTHS))
    ops: list[tuple] = [("conv", channels, width, 3, 1, 1, 1, "relu")]  # image -> features
    c, s = width, size
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("conv", "conv", "residual", "concat", "shuffle",
                                     "interpolate", "transposed")))
        act = draw(st.sampled_from(("", "relu", "leaky")))
        if kind in ("conv", "residual", "concat"):
            k, d = draw(st.sampled_from((1, 3, 5))), draw(st.sampled_from((1, 2)))
            stride = draw(st.sampled_from((1, 2))) if kind == "conv" and s >= 4 else 1
            out = c if kind == "residual" else draw(st.sampled_from((c, *WIDTHS)))
            g = _groups(draw, c, out)
            ops.append((kind, c, out, k, stride, d, g, act))
            c = c + out if kind == "concat" else out
            s = -(-s // stride)
        elif kind == "shuffle" and s * 2 <= MAX_SIZE:
            out = draw(st.sampled_from((2, 4, 6, 8, 12)))  # conv to out * 4 in WIDTHS
            ops.append(("shuffle", c, out, draw(st.sampled_from((1, 3))), act))
            c, s = out, s * 2
        elif kind == "interpolate":
            scale = 2.0 if s * 2 <= MAX_SIZE and draw(st.booleans()) else 0.5
            ops.append(("interpolate", scale, draw(st.sampled_from(("nearest", "bilinear")))))
            s = int(s * scale)
        elif kind == "transposed":
            k, stride, p, op = draw(st.sampled_from(TRANSPOSED))
            if (s - 1) * stride - 2 * p + k + op > MAX_SIZE:
                continue
            out = draw(st.sampled_from(WIDTHS))
            ops.append(("transposed", c, out, k, stride, p, op, _groups(draw, c, out), act))
            c, s = out, (s - 1) * stride - 2 * p + k + op
    ops.append(("conv", c, channels, 3, 1, 1, 1, ""))  # back to an image
    return Spec(channels, size, tuple(ops), s == size and draw(st.booleans()))


def _act(name: str) -> list[nn.Module]:
    return {"": [], "relu": [nn.ReLU()], "leaky": [nn.LeakyReLU(0.1)]}[name]


class FuzzNet(nn.Module):
    """The network a ``Spec`` describes (plain control flow over a fixed plan: traceable)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.plan = [op[0] for op in spec.ops]
        self.resize = [op[1:] if op[0] == "interpolate" else None for op in spec.ops]
        self.global_residual = spec.global_residual
        self.layers = nn.ModuleList(self._layer(op) for op in spec.ops)

    @staticmethod
    def _layer(op: tuple) -> nn.Module:
        kind = op[0]
        if kind in ("conv", "residual", "concat"):
            _, c_in, c_out, k, stride, d, g, act = op
            conv = nn.Conv2d(c_in, c_out, k, stride, d * (k - 1) // 2, d, g)
            return nn.Sequential(conv, *_act(act))
        if kind == "shuffle":
            _, c_in, c_out, k, act = op
            return nn.Sequential(nn.Conv2d(c_in, c_out * 4, k, padding=k // 2), *_act(act),
                                 nn.PixelShuffle(2))
        if kind == "transposed":
            _, c_in, c_out, k, stride, p, out_p, g, act = op
            return nn.Sequential(nn.ConvTranspose2d(c_in, c_out, k, stride, p, out_p, g),
                                 *_act(act))
        return nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x
        for kind, resize, layer in zip(self.plan, self.resize, self.layers, strict=True):
            if kind == "residual":
                x = x + layer(x)
            elif kind == "concat":
                x = torch.cat([x, layer(x)], 1)
            elif kind == "interpolate":
                x = F.interpolate(x, scale_factor=resize[0], mode=resize[1])
            else:
                x = layer(x)
        return x + image if self.global_residual else x


STATS: Counter[str] = Counter()


def check_contract(spec: Spec) -> None:
    torch.manual_seed(0)
    model = FuzzNet(spec)
    x = torch.rand(1, spec.channels, spec.size, spec.size)
    expected_shape = model(x).shape
    before = {k: v.clone() for k, v in model.state_dict().items()}
    STATS["examples"] += 1
    try:
        light = lwcompile.lighten(model, (x,))
    except lwcompile.CompileFailed:
        raise  # an internal crash wrapped for the user: an engine bug, not a refusal
    except lwcompile.LwCompileError as exc:
        STATS[f"refused: {type(exc).__name__}"] += 1
        light = None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before), "lighten changed the input model's weights"
    assert model.training, "lighten changed the input model's mode"
    if light is None:
        return
    applied = len(light.lwcompile_report.applied)
    STATS["lightened"] += 1
    STATS["with rewrites"] += applied > 0
    y = light(x)
    assert y.shape == expected_shape
    y.square().mean().backward()
    params = list(light.parameters())
    assert params and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.slow  # 300 networks lightened
def test_lighten_keeps_its_contract_on_random_networks(one_thread) -> None:
    STATS.clear()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(specs())
    def check(spec: Spec) -> None:
        check_contract(spec)

    check()
    print(f"\nfuzz: {dict(STATS)}")
    assert STATS["examples"] >= EXAMPLES, dict(STATS)
    # the generator must exercise rewrites, not only refusals
    assert STATS["with rewrites"] >= EXAMPLES // 5, dict(STATS)
