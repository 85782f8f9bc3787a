"""Real 2-D FFTs and the complex arithmetic between them written with real matrix
products, for ExecuTorch, which has neither FFT kernels nor complex tensors.

LaMa's fast Fourier convolutions (``rfftn``, a conv on the real and imaginary parts,
``irfftn``) and FFTformer's frequency-domain attention (``rfft2`` of 8x8 patches, a product
of spectra, ``irfft2``) could not be made into ExecuTorch programs. An exported program has
fixed sizes, so each transform is a pair of constant matrices per axis: with
``c = cos(2 pi k n / N)`` and ``s = sin(2 pi k n / N)``,

- ``rfft2(x)`` over the last two axes (H, W): ``A + iB = x (C_W - i S_W)`` on W, keeping
  the ``W // 2 + 1`` non-negative frequencies, then ``(C_H - i S_H)(A + iB)`` on H;
- ``irfft2(Z, s=(H, W))``: ``P = (C_H + i S_H) Z`` on H, then on W
  ``Re(P) E - Im(P) F`` with ``E = w_l c``, ``F = w_l s`` and ``w_l`` = 1 for the zero
  and (even W) Nyquist frequency, 2 between: a Hermitian spectrum's real inverse, which
  like torch's reads neither of those two frequencies' imaginary parts;
- the normalisation (``norm=``) scales the W matrices.

Every complex value becomes a pair (real part, imaginary part) of real tensors:
``Z1 Z2 = (a c - b d) + i(a d + b c)``, ``Z r = a r + i b r``, ``real``/``imag`` pick a part,
``complex(a, b)`` makes a pair. The rewrite applies to a graph only where every complex value
is made and read by these ops (else nothing changes and the exporter names what it could
not take). Exact in real arithmetic; in float32 the matrix products round differently from
an FFT (far below the other ops' rounding at these sizes: at most 1e-6 of the input's
scale on 8x8).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from ..tracing.fx_helpers import argument, node_shape, stored_constant, tidied, unrounded

aten = torch.ops.aten
_FORWARD = (aten.fft_rfft2.default, aten.fft_rfftn.default)
_INVERSE = (aten.fft_irfft2.default, aten.fft_irfftn.default)
_MUL = aten.mul.Tensor
_MAKE = aten.complex.default
_PARTS = {aten.real.default: 0, aten.imag.default: 1}


def ffts_as_matmuls(gm: fx.GraphModule) -> int:
    """Rewrite, in place, the real FFTs of ``gm`` (an ATen graph) and the complex arithmetic
    between them as real matrix products (module docstring); returns how many transforms
    were rewritten, 0 where any complex value is made or read by another op."""
    complex_nodes = {n for n in gm.graph.nodes if _is_complex(n)}
    if not complex_nodes or not all(map(_rewritable, complex_nodes)):
        return 0
    rewrite = _RealPairs(gm)
    done = 0
    for node in list(gm.graph.nodes):
        with gm.graph.inserting_before(node):
            done += rewrite.node(node, node in complex_nodes)
    tidied(gm)
    return done


class _RealPairs:
    """The rewrite of one graph: each complex value's (real, imaginary) pair of real nodes,
    and the transform matrices stored so far (each once, however often read: its get_attr
    is made before its first reader, so before every later one)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm, self.graph = gm, gm.graph
        self.pairs: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        self.matrices: dict[tuple, fx.Node] = {}

    def node(self, node: fx.Node, is_complex: bool) -> int:
        """Rewrite ``node`` (at the graph's cursor); returns 1 for a transform."""
        source = node.args[0] if node.args else None
        if node.target in _FORWARD and is_complex:
            self.pairs[node] = self.rfft2(node)
        elif node.target is _MUL and is_complex:
            self.pairs[node] = self.product(node)
        elif node.target is _MAKE:
            self.pairs[node] = (node.args[0], node.args[1])
        elif node.target in _PARTS and source in self.pairs:
            node.replace_all_uses_with(self.pairs[source][_PARTS[node.target]])
        elif node.target in _INVERSE and source in self.pairs:
            node.replace_all_uses_with(self.irfft2(node, self.pairs[source]))
        else:
            return 0
        return int(node.target in _FORWARD or node.target in _INVERSE)

    def rfft2(self, fft: fx.Node) -> tuple[fx.Node, fx.Node]:
        x = fft.args[0]
        height, width = _shape(x)[-2:]
        scale = _scale(_norm(fft), height * width, inverse=False)
        on_width = _angles(width, width // 2 + 1, width)
        a = self.times(x, torch.cos(on_width) * scale)
        b = self.times(x, -torch.sin(on_width) * scale)
        on_height = _angles(height, height, height)
        cos, sin = torch.cos(on_height), torch.sin(on_height)  # symmetric
        # (C - iS)(a + ib) = (C a + S b) + i(C b - S a)
        return (self.call(aten.add.Tensor, self.before(cos, a), self.before(sin, b)),
                self.call(aten.sub.Tensor, self.before(cos, b), self.before(sin, a)))

    def irfft2(self, inverse: fx.Node, spectrum: tuple[fx.Node, fx.Node]) -> fx.Node:
        height, width = _inverse_size(inverse)
        re, im = spectrum
        on_height = _angles(height, height, height)
        cos, sin = torch.cos(on_height), torch.sin(on_height)
        # (C + iS)(re + i im) = (C re - S im) + i(C im + S re)
        p_re = self.call(aten.sub.Tensor, self.before(cos, re), self.before(sin, im))
        p_im = self.call(aten.add.Tensor, self.before(cos, im), self.before(sin, re))
        frequencies = width // 2 + 1
        weights = torch.full((frequencies, 1), 2.0, dtype=torch.float64)
        weights[0] = 1.0
        if width % 2 == 0:
            weights[-1] = 1.0
        weights *= _scale(_norm(inverse), height * width, inverse=True)
        on_width = _angles(frequencies, width, width)
        return self.call(aten.sub.Tensor, self.times(p_re, weights * torch.cos(on_width)),
                         self.times(p_im, weights * torch.sin(on_width)))

    def product(self, mul: fx.Node) -> tuple[fx.Node, fx.Node]:
        left, right = mul.args[:2]
        if left not in self.pairs:
            left, right = right, left
        a, b = self.pairs[left]
        if right not in self.pairs:  # a real factor
            return self.call(_MUL, a, right), self.call(_MUL, b, right)
        c, d = self.pairs[right]
        return (self.call(aten.sub.Tensor, self.call(_MUL, a, c), self.call(_MUL, b, d)),
                self.call(aten.add.Tensor, self.call(_MUL, a, d), self.call(_MUL, b, c)))

    def times(self, x: fx.Node, matrix: torch.Tensor) -> fx.Node:
        """``x @ matrix`` over the last axis."""
        matrix = matrix.to(torch.float32)
        key = (tuple(matrix.shape), matrix.numpy().tobytes())
        if key not in self.matrices:
            self.matrices[key] = stored_constant(self.gm, matrix, "_fft_matrix")
        return self.call(aten.matmul.default, x, self.matrices[key])

    def before(self, symmetric: torch.Tensor, x: fx.Node) -> fx.Node:
        """``symmetric @ x`` over the second-to-last axis, as a product over the last one."""
        turned = self.call(aten.transpose.int, x, -1, -2)
        return self.call(aten.transpose.int, self.times(turned, symmetric), -1, -2)

    def call(self, op: object, *args: object) -> fx.Node:
        return self.graph.call_function(op, args)


def _is_complex(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_complex()


def _rewritable(node: fx.Node) -> bool:
    """A complex value made by a supported op from supported inputs, read only by
    supported ops."""
    if node.target in _FORWARD:  # of a real input of fixed size, at its own size
        made = _last_two_axes(node) and _static(node.args[0]) \
            and argument(node, 1, node.kwargs.get("s")) is None
    else:  # the other operands of a product are complex values (checked themselves) or real
        made = node.target in (_MUL, _MAKE)
    read = all(u.target in (_MUL, *_PARTS) or (u.target in _INVERSE and _inverse_fits(u))
               for u in node.users)
    return made and read


def _static(node: fx.Node) -> bool:
    shape = _shape(node)
    return shape is not None and all(isinstance(n, int) for n in shape)


def _shape(node: object) -> torch.Size | None:
    """``node``'s recorded shape; in a converted int8 graph, whose quantize and dequantize
    nodes record none, that of the value they round."""
    return node_shape(unrounded(node))


def _last_two_axes(fft: fx.Node) -> bool:
    """The transform runs over the last two axes of its input, in order (the last one is
    the halved one), and only those."""
    shape = _shape(fft.args[0])
    dims = argument(fft, 2, fft.kwargs.get("dim"))
    if shape is None:
        return False
    rank = len(shape)
    dims = [rank - 2, rank - 1] if dims is None and fft.target in (
        aten.fft_rfft2.default, aten.fft_irfft2.default) else dims
    dims = list(range(rank)) if dims is None else dims
    return [d % rank for d in dims] == [rank - 2, rank - 1]


def _inverse_fits(inverse: fx.Node) -> bool:
    """``irfft2``/``irfftn`` over the last two axes whose output size matches its input's
    half spectrum (torch would pad or trim it otherwise)."""
    spectrum = node_shape(inverse.args[0])
    if not _last_two_axes(inverse) or spectrum is None:
        return False
    height, width = _inverse_size(inverse)
    return spectrum[-2] == height and spectrum[-1] == width // 2 + 1


def _inverse_size(inverse: fx.Node) -> tuple[int, int]:
    spectrum = node_shape(inverse.args[0])
    size = argument(inverse, 1, inverse.kwargs.get("s"))
    return tuple(size) if size is not None else (spectrum[-2], 2 * (spectrum[-1] - 1))


def _norm(node: fx.Node) -> str:
    return argument(node, 3, node.kwargs.get("norm")) or "backward"


def _scale(norm: str, count: int, inverse: bool) -> float:
    if norm == "ortho":
        return 1 / math.sqrt(count)
    return 1 / count if (norm == "forward") != inverse else 1.0


def _angles(rows: int, columns: int, period: int) -> torch.Tensor:
    """``2 pi r c / period`` for r < rows, c < columns, in float64."""
    r = torch.arange(rows, dtype=torch.float64)[:, None]
    c = torch.arange(columns, dtype=torch.float64)[None, :]
    return 2 * math.pi * torch.remainder(r * c, period) / period
