"""Quantizer math: integer grids for weights and activations, fake quantization, bit packing.

Everything here is pure torch and deterministic; the custom ops of
:mod:`graphpress.ir.ops_quant` and the ``quantize-layerwise`` / ``awq-scale`` passes build on it.

Weights, per output channel, symmetric (int-k, ``k <= 8``)::

    qmax = 2^(k-1) - 1,   s_o = max_i |W[o, i]| / qmax,   q = clamp(round(W / s_o), -qmax, qmax)
    W_hat = q * s_o

The grid is symmetric (``-128`` is never used for int8) so that ``-W`` quantizes to ``-q``; the
int8 ``q`` feed ONNX Runtime's U8S8 kernels (uint8 activations x int8 weights).

Weights, group-wise round-to-nearest (RTN), asymmetric with a zero point (the default: at
4 bits and below the asymmetric grid spends no level on the unused side of a skewed group), for
``g`` consecutive input channels of one output channel::

    lo = min(0, min W_g),  hi = max(0, max W_g),  s = (hi - lo) / (2^k - 1),  z = clamp(round(-lo / s), 0, 2^k - 1)
    q = clamp(round(W / s) + z, 0, 2^k - 1)   (unsigned),   W_hat = (q - z) * s

The range always contains 0 (so 0 is exactly representable and the zero point is an integer on
the grid). ``symmetric=True`` uses the fixed zero point ``z = 2^(k-1)`` (ONNX Runtime
``MatMulNBits``' default when no zero points are stored) and, per group, the least-error scale
among ``s = peak / -2^(k-1) * f`` (``peak`` the group's largest-magnitude weight, which lands on
the code ``-2^(k-1)`` at ``f = 1``: all ``2^k`` codes in use; ``f < 1`` clips it to round the
rest finer) and ``max |W_g| / (2^(k-1) - 1)``; see :func:`group_grid`. A
``K`` that is no multiple of ``g`` is zero-padded to whole groups (padding never changes the
range, which contains 0 anyway), as ``MatMulNBits`` expects.

Activations, per tensor, unsigned 8-bit asymmetric from a calibrated range ``[lo, hi]`` (min/max
or percentiles of the calibration values, or the MSE range below; widened to contain 0)::

    s = (hi - lo) / 255,   z = clamp(round(-lo / s), 0, 255),   x_hat = (clamp(round(x / s) + z, 0, 255) - z) * s

computed in float32 with round-half-to-even and a true division, as ONNX ``QuantizeLinear``
does, so the eager simulation and ONNX Runtime put every value on the same grid point.
:func:`mse_range` picks ``[lo, hi]`` minimising ``E (f(x) - f(x_hat))^2`` on calibration values
(``f`` the identity, or what the value flows through, e.g. ``relu(x + r)``) by a grid search over
shrink factors of min and max. Large calibration sets are subsampled at seeded random positions
(:func:`sample_indices`), not strided: a stride that is a multiple of an image row samples one
column of every image.
*Dynamic* activations (:func:`dynamic_act_params`) take ``lo, hi`` from the tensor itself at run
time, the formula of ONNX ``DynamicQuantizeLinear``.

Packing (:func:`pack_nbits`): ``MatMulNBits`` layout -- ``B[n, block, byte]`` with the k-bit
values of one block packed little-end first (at 4 bits: element ``2j`` in the low nibble, ``2j+1``
in the high nibble); zero points packed the same way along the blocks of one row, each row padded
to whole bytes.

Weights, GPTQ (:func:`gptq_per_channel`): the same per-channel grid, but the codes are chosen
column by column with error feedback so that ``||(W - W_hat) X||^2`` is small for calibration
inputs ``X`` (``H = X X^T``) rather than each ``|w - w_hat|``:
``e_j = (w_j - q_j s) / [H^-1]_jj``,  ``W[:, j:] -= e_j [H^-1]_{j, j:}``.

Error measures: :func:`sqnr_db` (re-exported from :mod:`graphpress.ir.compare`) and
:func:`weight_sqnr_db` for ``W`` vs ``W_hat``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from graphpress.ir.compare import sqnr_db

#: Group sizes of the group-wise quantizer (MatMulNBits block sizes: powers of two >= 16).
GROUP_SIZES = (16, 32, 64, 128, 256)
#: Bit widths the group-wise quantizer supports.
GROUP_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_QMIN, ACT_QMAX = 0, 255


# ---------------------------------------------------------------------------- per-channel symmetric
def symmetric_per_channel(w: torch.Tensor, bits: int = 8, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int-``bits`` quantization of ``w`` along ``axis``.

    Parameters
    ----------
    w : Tensor
        Float weight, e.g. ``(out, in)`` or ``(out, in, kh, kw)``.
    bits : int
        2..8; the grid is ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``.
    axis : int
        The channel axis that gets its own scale.

    Returns
    -------
    q : Tensor, int8
        Same shape as ``w``.
    scale : Tensor, float32 ``(w.shape[axis],)``
        A channel that is all zero gets scale 1 (its ``q`` are 0).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"symmetric_per_channel: bits must be in 2..8, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    dims = [d for d in range(w.dim()) if d != axis % w.dim()]
    amax = w.detach().abs().float().amax(dim=dims) if dims else w.detach().abs().float()
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).float()
    shape = [1] * w.dim()
    shape[axis] = -1
    q = torch.clamp(torch.round(w.detach().float() / scale.reshape(shape)), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """``q * scale`` broadcast along ``axis`` (float32)."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.float() * scale.float().reshape(shape)


def fake_quant_per_channel(w: torch.Tensor, bits: int = 8, axis: int = 0) -> torch.Tensor:
    """``dequantize_per_channel(*symmetric_per_channel(w, bits, axis), axis)`` in ``w``'s dtype."""
    q, s = symmetric_per_channel(w, bits, axis)
    return dequantize_per_channel(q, s, axis).to(w.dtype)


# ---------------------------------------------------------------------------- group-wise RTN
@dataclass
class GroupQuant:
    """A group-wise quantized ``(out, in)`` matrix.

    Attributes
    ----------
    q : Tensor, uint8 ``(out, blocks, group)``
        Unsigned codes in ``[0, 2^bits - 1]`` (the input dim zero-padded to whole groups).
    scale : Tensor, float32 ``(out, blocks)``
    zero : Tensor, uint8 ``(out, blocks)``
        Zero points (``2^(bits-1)`` everywhere when symmetric).
    bits, group_size, in_features : int
    symmetric : bool
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    in_features: int
    symmetric: bool = False

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def blocks(self) -> int:
        return int(self.q.shape[1])

    def dequantize(self) -> torch.Tensor:
        """``(q - zero) * scale`` as a float32 ``(out, in)`` matrix."""
        w = self.q.float()
        w.sub_(self.zero.float()[..., None]).mul_(self.scale[..., None])
        return w.reshape(self.out_features, -1)[:, : self.in_features]


#: Elements :func:`groupwise` quantizes at a time.
GROUPWISE_CHUNK = 1 << 20


def num_blocks(in_features: int, group_size: int) -> int:
    """Groups per output row (the last one zero-padded)."""
    return -(-in_features // group_size)


def groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 32, *, symmetric: bool = False) -> GroupQuant:
    """Group-wise RTN quantization of a ``(out, in)`` matrix (see module docstring).

    Parameters
    ----------
    w : Tensor ``(out, in)``
    bits : int
        One of :data:`GROUP_BITS`.
    group_size : int
        One of :data:`GROUP_SIZES`.
    symmetric : bool
        Symmetric grid with the fixed zero point ``2^(bits-1)`` instead of a per-group one.
    """
    if bits not in GROUP_BITS:
        raise ValueError(f"groupwise: bits must be one of {GROUP_BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"groupwise: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if w.dim() != 2:
        raise ValueError(f"groupwise: expected an (out, in) matrix, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    nb = num_blocks(in_f, group_size)
    levels = 2**bits - 1
    q = torch.empty((out_f, nb, group_size), dtype=torch.uint8)
    scale = torch.empty((out_f, nb), dtype=torch.float32)
    zero = torch.empty((out_f, nb), dtype=torch.uint8)
    # rows are independent: a chunk at a time keeps the float temporaries of a large matrix (an
    # LM head) to a few MB instead of several copies of it
    rows = max(1, GROUPWISE_CHUNK // (nb * group_size))
    for i in range(0, out_f, rows):
        j = min(out_f, i + rows)
        wf = w[i:j].detach().float()
        if nb * group_size != in_f:
            wf = torch.nn.functional.pad(wf, (0, nb * group_size - in_f))
        wg = wf.reshape(j - i, nb, group_size)
        s, z = group_grid(wg, bits, symmetric)
        q[i:j] = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, levels)
        scale[i:j], zero[i:j] = s, z
    return GroupQuant(q, scale, zero, bits, group_size, in_f, symmetric)


def group_grid(wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` of each group, the groups along the last dim of ``wg``: asymmetric,
    ``[min(w, 0), max(w, 0)]`` on ``2^bits - 1`` steps with a rounded zero point; symmetric, the
    least-error scale of :func:`_symmetric_grid` (its sign may be negative) around the fixed zero
    point ``2^(bits-1)``. A group of zeros gets scale 1."""
    levels = 2**bits - 1
    if symmetric:
        return _symmetric_grid(wg, bits), torch.full(wg.shape[:-1], float(2 ** (bits - 1)), dtype=wg.dtype, device=wg.device)
    lo = wg.amin(-1).clamp(max=0)
    hi = wg.amax(-1).clamp(min=0)
    s = (hi - lo) / levels
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.clamp(torch.round(-lo / s), 0, levels)


#: Scales tried per group by the symmetric grid, as fractions of ``peak / -2^(bits-1)``.
SYMMETRIC_SHRINK = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.76)


def _symmetric_grid(wg: torch.Tensor, bits: int) -> torch.Tensor:
    """The scale of each symmetric group (zero point ``2^(bits-1)``): the one of least squared
    error among ``peak / -2^(bits-1) * f`` for ``f`` in :data:`SYMMETRIC_SHRINK` and
    ``max |w| / (2^(bits-1) - 1)``, where ``peak`` is the group's largest-magnitude weight.

    ``peak / -2^(bits-1)`` puts that weight on the code ``-2^(bits-1)`` exactly (the scale takes
    its sign), so all ``2^bits`` codes are in use: a step of ``max |w| / 8`` at 4 bits instead of
    ``max |w| / 7`` (llama.cpp's Q4_0 grid). Shrinking it clips the few largest weights of the
    group to round the many others finer, where that lowers the group's error (the clip search
    of AWQ and llama.cpp's k-quants, without activations). A group of zeros gets scale 1."""
    half = 2 ** (bits - 1)
    levels = 2**bits - 1
    peak = torch.gather(wg, -1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    amax = peak.abs()
    candidates = [peak / -half * f for f in SYMMETRIC_SHRINK] + [amax / (half - 1)]
    best_s, best_err = None, None
    for s in candidates:
        s = torch.where(s != 0, s, torch.ones_like(s))
        q = torch.clamp(torch.round(wg / s[..., None]) + half, 0, levels)
        err = ((q - half) * s[..., None] - wg).pow(2).sum(-1)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s


def gptq_groupwise(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 32, *, symmetric: bool = False,
                   act_order: bool = False, damp: float = 0.01, block: int = 128) -> GroupQuant:
    """:func:`groupwise` codes chosen by GPTQ: the same storage (``MatMulNBits`` groups along the
    input dim), codes that minimise ``||(W - W_hat) X||^2`` instead of each weight's own error.

    Columns are rounded in order and each one's error ``e_j = (w_j - q_j) / [H^-1]_jj`` is pushed
    onto the columns not rounded yet (``W[:, j:] -= e_j [H^-1]_{j, j:}``, ``H^-1`` in upper
    Cholesky form, blocks of ``block`` columns; Frantar et al., 2023). A group's grid
    (:func:`group_grid`) is set when the first of its columns is reached, from the columns as
    the errors so far have moved them. ``act_order``: columns go in order of decreasing
    ``H_jj`` (the inputs with most energy first, while the most columns are left to absorb their
    error), and every group's grid is then fixed up front from the original weights ("static
    groups"), so the stored layout stays the input order. ``H`` is damped by ``damp * mean(diag
    H)``; an input that is always 0 gets ``H_jj = 1``.

    Parameters
    ----------
    w : Tensor ``(out, k)``
    hessian : Tensor ``(k, k)``
        ``X^T X`` of the layer's input rows (any positive multiple of it).
    bits, group_size, symmetric
        As in :func:`groupwise`.

    Returns
    -------
    GroupQuant
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_groupwise: need w (out, k) and hessian (k, k), got {tuple(w.shape)} and {tuple(hessian.shape)}")
    if bits not in GROUP_BITS or group_size not in GROUP_SIZES:
        raise ValueError(f"gptq_groupwise: bits must be one of {GROUP_BITS} and group_size one of {GROUP_SIZES}")
    out_f, k = w.shape
    nb = num_blocks(k, group_size)
    levels = 2**bits - 1
    W = w.detach().double().clone()
    H, dead = _live_hessian(hessian)
    W[:, dead] = 0.0
    order = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, order], H[order][:, order]
    U = _inverse_factor(H, damp)
    scale = torch.ones((out_f, nb), dtype=torch.float64)
    zero = torch.zeros((out_f, nb), dtype=torch.float64)
    if act_order:  # static groups: every grid from the original weights, in input order
        padded = torch.nn.functional.pad(w.detach().float(), (0, nb * group_size - k))
        scale, zero = (t.double() for t in group_grid(padded.reshape(out_f, nb, group_size), bits, symmetric))
    groups = order // group_size  # the group of the column at each position
    q = torch.zeros((out_f, nb * group_size), dtype=torch.float64)

    def dequantized(pos: int, Wb: torch.Tensor, j: int) -> torch.Tensor:
        g = int(groups[pos])
        if not act_order and pos % group_size == 0:
            # the group's columns as moved by every error so far (this block's included)
            cols = Wb[:, j:j + group_size]  # the last group of a matrix may be short: padded
            cols = torch.nn.functional.pad(cols, (0, group_size - cols.shape[1]))
            # the grid in float32, as groupwise computes it (no feedback: the same codes)
            s_g, z_g = group_grid(cols.float()[:, None, :], bits, symmetric)
            scale[:, g], zero[:, g] = s_g[:, 0].double(), z_g[:, 0].double()
        s_g, z_g = scale[:, g], zero[:, g]
        qc = torch.clamp(torch.round(Wb[:, j] / s_g) + z_g, 0, levels)
        q[:, int(order[pos])] = qc
        return (qc - z_g) * s_g

    _error_feedback(W, U, max(block, group_size), dequantized)  # whole groups per block (both powers of two)
    if nb * group_size > k:  # padding columns hold the zero point: they dequantize to 0
        q[:, k:] = zero.repeat_interleave(group_size, dim=1)[:, k:]
    return GroupQuant(q.reshape(out_f, nb, group_size).to(torch.uint8), scale.float(), zero.to(torch.uint8), bits, group_size, k, symmetric)


def fake_quant_groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 32, *, symmetric: bool = False) -> torch.Tensor:
    """``groupwise(w, ...).dequantize()`` in ``w``'s dtype."""
    return groupwise(w, bits, group_size, symmetric=symmetric).dequantize().to(w.dtype)


# ---------------------------------------------------------------------------- packing
def container_bits(bits: int) -> int:
    """The ``MatMulNBits`` storage width for ``bits``-bit codes: 2, 4 or 8 (3-bit codes use 4)."""
    if bits <= 2:
        return 2
    if bits <= 4:
        return 4
    return 8


def pack_nbits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim, ``8 // bits`` per byte, lowest bits first.

    ``bits`` is 2, 4 or 8; the last dim is padded with zeros to whole bytes.
    Returns uint8 of shape ``(..., ceil(n * bits / 8))``.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_nbits: bits must be 2, 4 or 8, got {bits}")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    per = 8 // bits
    n = q.shape[-1]
    pad = (-n) % per
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    # in uint8 throughout: an int32 copy of the codes was 4x their size (0.7 GB for one slice
    # of an 8B model's head) for values that fit a byte
    q = q.reshape(*q.shape[:-1], -1, per)
    out = q[..., 0] & (2**bits - 1)
    for j in range(1, per):
        out |= (q[..., j] & (2**bits - 1)) << (bits * j)
    return out.contiguous()


def unpack_nbits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nbits`: the first ``n`` codes along the last dim (uint8)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_nbits: bits must be 2, 4 or 8, got {bits}")
    if bits == 8:
        return packed[..., :n].to(torch.uint8)
    per = 8 // bits
    p = packed.to(torch.uint8)
    parts = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]


@dataclass
class NBitsWeight:
    """A :class:`GroupQuant` in ``MatMulNBits`` storage.

    ``packed (out, blocks, group * bits / 8)`` uint8, ``scales (out * blocks,)`` float32,
    ``zeros (out * ceil(blocks * bits / 8),)`` uint8 or None (symmetric: implicit
    ``2^(bits-1)``); ``bits`` is the container width (2, 4 or 8), ``code_bits`` the quantizer's.
    """

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    code_bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.packed.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.zeros) if t is not None)


def to_nbits(gq: GroupQuant) -> NBitsWeight:
    """Store ``gq`` in ``MatMulNBits`` layout (3-bit codes in a 4-bit container, zero points
    shifted to the container's midpoint convention only when symmetric)."""
    bits = container_bits(gq.bits)
    q, zero = gq.q, gq.zero
    if gq.symmetric and bits != gq.bits:
        # symmetric codes are centred on 2^(k-1); MatMulNBits' implicit zero point is 2^(c-1)
        shift = 2 ** (bits - 1) - 2 ** (gq.bits - 1)
        q = (q.to(torch.int32) + shift).to(torch.uint8)
        zero = (zero.to(torch.int32) + shift).to(torch.uint8)
    packed = pack_nbits(q, bits)
    zeros = None if gq.symmetric else pack_nbits(zero, bits).reshape(-1)
    return NBitsWeight(packed.contiguous(), gq.scale.reshape(-1).contiguous(), zeros, bits, gq.bits, gq.group_size, gq.in_features)


def dequantize_nbits(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """Float32 ``(out, in)`` matrix of a ``MatMulNBits``-layout weight."""
    out_f, nb = packed.shape[0], packed.shape[1]
    w = unpack_nbits(packed, bits, group_size).float()  # (out, nb, g); one float buffer, updated in place
    if zeros is None:
        w.sub_(float(2 ** (bits - 1)))
    else:
        w.sub_(unpack_nbits(zeros.reshape(out_f, -1), bits, nb).float()[..., None])
    w.mul_(scales.float().reshape(out_f, nb)[..., None])
    return w.reshape(out_f, -1)[:, :in_features]


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActQuant:
    """Per-tensor uint8 affine parameters: ``x_hat = (clamp(round(x / scale) + zero_point, 0, 255) - zero_point) * scale``."""

    scale: float
    zero_point: int

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_act(x, self.scale, self.zero_point)


def act_params(lo: float, hi: float) -> ActQuant:
    """uint8 parameters of the range ``[lo, hi]`` (widened to contain 0); the scale is a float32 value."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(torch.tensor((hi - lo) / 255.0, dtype=torch.float32))
    if not scale > 0 or not math.isfinite(scale):
        return ActQuant(1.0, 0)
    zp = int(min(max(round(-lo / scale), ACT_QMIN), ACT_QMAX))
    return ActQuant(scale, zp)


def fake_quant_act(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` in float32 (true division, round half to even)."""
    s = torch.tensor(scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x.float() / s) + zero_point, ACT_QMIN, ACT_QMAX)
    return ((q - zero_point) * s).to(x.dtype)


def dynamic_act_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of ONNX ``DynamicQuantizeLinear`` for ``x`` (0-d float32 tensors):
    ``lo = min(0, min x)``, ``hi = max(0, max x)``, ``s = (hi - lo) / 255``, ``z = clamp(round(-lo / s), 0, 255)``.
    An all-zero ``x`` gets ``s = 1`` so that it quantizes to 0."""
    xf = x.detach().float()
    lo = torch.clamp(xf.min(), max=0.0) if xf.numel() else torch.tensor(0.0)
    hi = torch.clamp(xf.max(), min=0.0) if xf.numel() else torch.tensor(0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / scale), ACT_QMIN, ACT_QMAX)
    return scale, zero


def fake_quant_act_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``x`` with its own :func:`dynamic_act_params`."""
    s, z = dynamic_act_params(x)
    q = torch.clamp(torch.round(x.float() / s) + z, ACT_QMIN, ACT_QMAX)
    return ((q - z) * s).to(x.dtype)


def fake_quant_act_blockwise(x: torch.Tensor, block: int, bits: int = 8) -> torch.Tensor:
    """Symmetric per-(row, block) int-``bits`` fake quantization of ``x``'s last dim:
    ``s = max |x_block| / (2^(bits-1) - 1)``, ``x_hat = round(x / s) * s`` -- the input
    quantization of ``MatMulNBits`` with ``accuracy_level=4`` (int8 compute)."""
    k = x.shape[-1]
    nb = num_blocks(k, block)
    xf = x.float()
    if nb * block != k:
        xf = torch.nn.functional.pad(xf, (0, nb * block - k))
    xb = xf.reshape(*xf.shape[:-1], nb, block)
    qmax = 2 ** (bits - 1) - 1
    amax = xb.abs().amax(-1, keepdim=True)
    s = amax / qmax
    inv = torch.where(amax > 0, qmax / amax, torch.zeros_like(amax))
    out = torch.round(xb * inv).clamp(-qmax, qmax) * s
    return out.reshape(*xf.shape[:-1], -1)[..., :k].to(x.dtype)


CALIBRATION_METHODS = ("minmax", "percentile", "mse")


def sample_indices(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """``min(n, k)`` distinct positions in ``range(n)``, sorted, drawn with a private seeded generator.

    Random rather than strided: a stride that is a multiple of an image row picks one column of
    every image (for a conv output, the zero-padded border), a biased sample."""
    if n <= k:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


def _subsample(vals: torch.Tensor, max_samples: int) -> torch.Tensor:
    return vals[sample_indices(vals.numel(), max_samples)] if vals.numel() > max_samples else vals


def act_quant_mse(vals: torch.Tensor, lo: float, hi: float, after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Mean squared error ``E (f(x) - f(x_hat))^2`` of the uint8 grid of ``[lo, hi]``
    (:func:`act_params`) on ``vals``; ``f`` is ``after`` (the identity when None)."""
    return _grid_errors(vals, [(lo, hi)], after)[0]


def _grid_errors(vals: torch.Tensor, ranges: list[tuple[float, float]], after: Callable[[torch.Tensor], torch.Tensor] | None) -> list[float]:
    """:func:`act_quant_mse` of each range, several ranges per tensor op (a leading candidate
    dim; ``after`` must broadcast over it): few large kernels instead of many small ones."""
    x = vals.detach().reshape(-1).float()
    ref = after(x) if after is not None else x
    out: list[float] = []
    chunk = max(1, (1 << 22) // max(1, x.numel()))
    for i in range(0, len(ranges), chunk):
        params = [act_params(lo, hi) for lo, hi in ranges[i : i + chunk]]
        s = torch.tensor([p.scale for p in params], dtype=torch.float32)[:, None]
        z = torch.tensor([float(p.zero_point) for p in params], dtype=torch.float32)[:, None]
        xh = (torch.clamp(torch.round(x[None, :] / s) + z, ACT_QMIN, ACT_QMAX) - z) * s
        if after is not None:
            xh = after(xh)
        out += ((xh - ref[None, :]) ** 2).mean(1).tolist()
    return out


def mse_range(vals: torch.Tensor, steps: int = 48, after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
    """The clip range ``[lo, hi]`` whose uint8 grid minimises ``E (f(x) - f(Q(x)))^2`` over ``vals``.

    ``f`` (``after``, default the identity) is what the value goes through before it is used,
    elementwise on the same samples and broadcasting over a leading dim -- e.g.
    ``lambda v: relu(v + r)`` for a conv output that is summed with a residual ``r`` and
    rectified, where an error on a value the relu zeroes costs nothing. Candidates are
    ``[t_lo * min, t_hi * max]`` (``min <= 0 <= max``) for shrink factors ``t`` on a grid of
    ``steps`` values in ``(0, 1]``, refined once on a grid ``steps`` times finer around the best:
    first one factor for both ends, then each end with the other fixed (coordinate descent; a
    one-sided range such as a relu output searches ``t_hi`` only). The error is measured with the
    exact quantizer (zero-point rounding and clamping included); min/max starts the search and
    each step keeps its starting point as a candidate, so the result is never worse than min/max
    on ``vals``.
    """
    mn, mx = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
    if mx - mn <= 0:
        return 0.0, 0.0

    def search(range_of: Callable[[float], tuple[float, float]], start: float) -> float:
        # ``start`` (the current factor) stays a candidate: each step can only lower the error
        def best(ts: list[float]) -> float:
            errs = _grid_errors(vals, [range_of(t) for t in ts], after)
            return ts[min(range(len(ts)), key=errs.__getitem__)]

        t = best([k / steps for k in range(1, steps + 1)])
        return best([start] + [u for u in (t + k / steps**2 for k in range(-steps + 1, steps)) if 0 < u <= 1])

    lo, hi = mn, mx
    if mn < 0 < mx:
        t = search(lambda t: (mn * t, mx * t), 1.0)
        lo, hi = mn * t, mx * t
    if mx > 0:
        lo_fixed = lo
        hi = mx * search(lambda t: (lo_fixed, mx * t), hi / mx)
    if mn < 0:
        hi_fixed = hi
        lo = mn * search(lambda t: (mn * t, hi_fixed), lo / mn)
    return lo, hi


def calibrate_range(values: torch.Tensor | list[torch.Tensor], method: str = "minmax", percentile: float = 99.99, max_samples: int = 1 << 20) -> tuple[float, float]:
    """``(lo, hi)`` of calibration values.

    ``"minmax"``; ``"percentile"`` (the ``100 - p`` and ``p`` percentiles); ``"mse"`` (the clip
    range minimising the uint8 grid's squared error, :func:`mse_range`; on at most
    ``max_samples / 8`` values whose min and max are kept). Percentile and MSE use a seeded random
    sample (:func:`sample_indices`) when there are more values than that.
    """
    vals = values if isinstance(values, torch.Tensor) else torch.cat([v.detach().reshape(-1).float() for v in values])
    vals = vals.detach().reshape(-1).float()
    if vals.numel() == 0:
        return 0.0, 0.0
    if method == "minmax":
        return float(vals.min()), float(vals.max())
    if method == "mse":
        # the extremes bound the search: keep them in the sample
        sample = torch.cat([_subsample(vals, max_samples // 8), vals.min().reshape(1), vals.max().reshape(1)])
        return mse_range(sample)
    if method != "percentile":
        raise ValueError(f"calibrate_range: method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate_range: percentile must be in (50, 100], got {percentile}")
    vals = _subsample(vals, max_samples)
    qs = torch.quantile(vals.double(), torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], dtype=torch.float64))
    return float(qs[0]), float(qs[1])


# ---------------------------------------------------------------------------- error-feedback rounding
def gptq_per_channel(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int = 8, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Codes of ``w (out, k)`` on the fixed symmetric per-row grid ``scale`` chosen by GPTQ.

    Minimises ``||(W - W_hat) X||^2`` for inputs ``X`` with ``hessian = X X^T`` (``(k, k)``)
    instead of each weight's own rounding error: columns are rounded in order, and each one's
    error ``e_j = (w_j - q_j s) / [H^-1]_jj`` is pushed onto the columns not rounded yet
    (``W[:, j:] -= e_j [H^-1]_{j, j:}``, with ``H^-1`` in upper Cholesky form; Frantar et al.,
    2023, blocked as there). ``H`` is damped by ``damp * mean(diag H)``; an input that is always 0
    (``H_jj = 0``) gets ``H_jj = 1`` so its column is rounded to nearest. The grid (``scale``, codes
    in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``) is the one :func:`symmetric_per_channel` uses, so
    the op and its ONNX lowering are unchanged; only which grid point each weight takes differs.

    Returns
    -------
    Tensor, int8 ``(out, k)``
    """
    if w.dim() != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"gptq_per_channel: need w (out, k) and hessian (k, k), got {tuple(w.shape)} and {tuple(hessian.shape)}")
    qmax = 2 ** (bits - 1) - 1
    W = w.detach().double().clone()
    H, _dead = _live_hessian(hessian)
    U = _inverse_factor(H, damp)
    s = scale.detach().double().reshape(-1)
    q = torch.zeros_like(W)

    def dequantized(pos: int, Wb: torch.Tensor, j: int) -> torch.Tensor:
        qc = torch.clamp(torch.round(Wb[:, j] / s), -qmax, qmax)
        q[:, pos] = qc
        return qc * s

    _error_feedback(W, U, block, dequantized)
    return q.to(torch.int8)


def _live_hessian(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 copy of ``H`` with ``H_jj = 1`` for every input that is always 0, and those
    inputs (``dead``)."""
    H = hessian.detach().double().clone()
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    return H, dead


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` (``H`` is damped in place)."""
    H += damp * float(torch.diag(H).mean()) * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def _error_feedback(W: torch.Tensor, U: torch.Tensor, block: int, dequantized: Callable[[int, torch.Tensor, int], torch.Tensor]) -> None:
    """GPTQ's blocked column loop over ``W`` (changed in place). ``dequantized(pos, Wb, j)``
    rounds column ``pos`` (``Wb[:, j]`` of the current block, as moved by the errors so far) and
    returns its dequantized value; the error over ``U_jj`` then moves the columns not rounded yet,
    within the block at once and beyond it when the block ends."""
    k = W.shape[1]
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        Wb, Ub = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.zeros_like(Wb)
        for j in range(i2 - i1):
            e = (Wb[:, j] - dequantized(i1 + j, Wb, j)) / Ub[j, j]
            Wb[:, j:] -= e[:, None] * Ub[j, j:][None, :]
            err[:, j] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]


# ---------------------------------------------------------------------------- sizes and errors
def weight_bytes(out_features: int, in_features: int, bits: int, group_size: int | None, *, symmetric: bool = False, kernel: int = 1) -> int:
    """Stored bytes of a quantized weight: codes plus float32 scales (plus zero points).

    ``group_size=None``: per-output-channel (int8 storage for any ``bits <= 8``: the ONNX
    QDQ path keeps one byte per weight). Otherwise the ``MatMulNBits`` container layout.
    ``bits >= 32`` means float32 (4 bytes per weight). ``kernel`` multiplies the input dim (conv).
    """
    k = in_features * kernel
    if bits >= 32:
        return 4 * out_features * k
    if group_size is None:
        return out_features * k + 4 * out_features
    c = container_bits(bits)
    nb = num_blocks(k, group_size)
    codes = out_features * nb * (group_size * c // 8)
    scales = 4 * out_features * nb
    zeros = 0 if symmetric else out_features * -(-nb * c // 8)
    return codes + scales + zeros


def weight_sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """SQNR of a quantized weight against the original, in dB."""
    return sqnr_db(w, w_hat)


__all__ = [
    "ACT_QMAX",
    "ACT_QMIN",
    "CALIBRATION_METHODS",
    "GROUP_BITS",
    "GROUP_SIZES",
    "ActQuant",
    "GroupQuant",
    "NBitsWeight",
    "act_params",
    "act_quant_mse",
    "calibrate_range",
    "container_bits",
    "dequantize_nbits",
    "dequantize_per_channel",
    "dynamic_act_params",
    "fake_quant_act",
    "fake_quant_act_blockwise",
    "fake_quant_act_dynamic",
    "fake_quant_groupwise",
    "fake_quant_per_channel",
    "gptq_groupwise",
    "gptq_per_channel",
    "group_grid",
    "groupwise",
    "mse_range",
    "num_blocks",
    "pack_nbits",
    "sample_indices",
    "sqnr_db",
    "symmetric_per_channel",
    "to_nbits",
    "unpack_nbits",
    "weight_bytes",
    "weight_sqnr_db",
]
