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
the grid). ``symmetric=True`` uses ``s = max |W_g| / (2^(k-1) - 1)`` and the fixed zero point
``z = 2^(k-1)`` (ONNX Runtime ``MatMulNBits``' default when no zero points are stored). A
``K`` that is no multiple of ``g`` is zero-padded to whole groups (padding never changes the
range, which contains 0 anyway), as ``MatMulNBits`` expects.

Activations, per tensor, unsigned 8-bit asymmetric from a calibrated range ``[lo, hi]`` (min/max
or percentiles of the calibration values, widened to contain 0)::

    s = (hi - lo) / 255,   z = clamp(round(-lo / s), 0, 255),   x_hat = (clamp(round(x / s) + z, 0, 255) - z) * s

computed in float32 with round-half-to-even and a true division, as ONNX ``QuantizeLinear``
does, so the eager simulation and ONNX Runtime put every value on the same grid point.
*Dynamic* activations (:func:`dynamic_act_params`) take ``lo, hi`` from the tensor itself at run
time, the formula of ONNX ``DynamicQuantizeLinear``.

Packing (:func:`pack_nbits`): ``MatMulNBits`` layout -- ``B[n, block, byte]`` with the k-bit
values of one block packed little-end first (at 4 bits: element ``2j`` in the low nibble, ``2j+1``
in the high nibble); zero points packed the same way along the blocks of one row, each row padded
to whole bytes.

Error measures: :func:`sqnr_db` (re-exported from :mod:`graphpress.ir.compare`) and
:func:`weight_sqnr_db` for ``W`` vs ``W_hat``.
"""

from __future__ import annotations

import math
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
        w = (self.q.float() - self.zero.float()[..., None]) * self.scale[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]


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
    wf = w.detach().float()
    if nb * group_size != in_f:
        wf = torch.nn.functional.pad(wf, (0, nb * group_size - in_f))
    wg = wf.reshape(out_f, nb, group_size)
    levels = 2**bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        amax = wg.abs().amax(-1)
        scale = torch.where(amax > 0, amax / (half - 1), torch.ones_like(amax))
        zero = torch.full_like(scale, float(half))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-lo / scale), 0, levels)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, levels)
    return GroupQuant(q.to(torch.uint8), scale.float(), zero.to(torch.uint8), bits, group_size, in_f, symmetric)


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
    q = q.reshape(*q.shape[:-1], -1, per).to(torch.int32)
    out = torch.zeros(q.shape[:-1], dtype=torch.int32)
    for j in range(per):
        out |= (q[..., j] & (2**bits - 1)) << (bits * j)
    return out.to(torch.uint8)


def unpack_nbits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nbits`: the first ``n`` codes along the last dim (uint8)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_nbits: bits must be 2, 4 or 8, got {bits}")
    if bits == 8:
        return packed[..., :n].to(torch.uint8)
    per = 8 // bits
    p = packed.to(torch.int32)
    parts = [(p >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :n].to(torch.uint8)


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
    q = unpack_nbits(packed, bits, group_size).float()  # (out, nb, g)
    if zeros is None:
        z = torch.full((out_f, nb), float(2 ** (bits - 1)))
    else:
        z = unpack_nbits(zeros.reshape(out_f, -1), bits, nb).float()
    w = (q - z[..., None]) * scales.float().reshape(out_f, nb)[..., None]
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


def calibrate_range(values: torch.Tensor | list[torch.Tensor], method: str = "minmax", percentile: float = 99.99, max_samples: int = 1 << 20) -> tuple[float, float]:
    """``(lo, hi)`` of calibration values: ``"minmax"`` or ``"percentile"`` (the ``100 - p`` and
    ``p`` percentiles; on at most ``max_samples`` evenly strided values)."""
    vals = values if isinstance(values, torch.Tensor) else torch.cat([v.detach().reshape(-1).float() for v in values])
    vals = vals.detach().reshape(-1).float()
    if vals.numel() == 0:
        return 0.0, 0.0
    if method == "minmax":
        return float(vals.min()), float(vals.max())
    if method != "percentile":
        raise ValueError(f"calibrate_range: method must be 'minmax' or 'percentile', got {method!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"calibrate_range: percentile must be in (50, 100], got {percentile}")
    if vals.numel() > max_samples:
        vals = vals[:: -(-vals.numel() // max_samples)]
    qs = torch.quantile(vals.double(), torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], dtype=torch.float64))
    return float(qs[0]), float(qs[1])


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
    "GROUP_BITS",
    "GROUP_SIZES",
    "ActQuant",
    "GroupQuant",
    "NBitsWeight",
    "act_params",
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
    "groupwise",
    "num_blocks",
    "pack_nbits",
    "sqnr_db",
    "symmetric_per_channel",
    "to_nbits",
    "unpack_nbits",
    "weight_bytes",
    "weight_sqnr_db",
]
