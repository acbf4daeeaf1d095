"""Fixed-point quantization of the encrypted layers: what turns floats into the integers BFV computes on.

BFV computes exactly on integers modulo the plaintext modulus ``t``, so every encrypted
linear/conv layer ``y = W x + bias`` runs as an integer product::

    x_int = clip(round(x / s_x), lo, hi)                    per layer,  s_x from calibration
    W_int[o] = round(W[o] / s_w[o])                          per output channel o
    y_int = W_int x_int                                      exact, under encryption
    y ~= y_int * s_x * s_w[o] + bias[o]                      on the client, in float

* Activation scale ``s_x``: ``r / q_max`` with ``r`` the calibration range of the layer's input
  (``max |x|``, or a percentile of ``|x|``) and ``q_max = 2^(a-1) - 1`` for ``a`` activation
  bits. An input that is never negative on the calibration data (a ReLU output) is quantized
  *unsigned*: ``[0, 2^a - 1]``, one bit of resolution more. Inputs are clipped to the range, so
  the accumulator bound below holds for *any* input, not only calibration-like ones.
* Weight scale ``s_w[o] = max_i |W[o, i]| / (2^(w-1) - 1)`` per output channel. For a
  block-circulant weight every row of block-row ``i`` holds the same values (permuted), so the
  per-channel scale is constant within a block-row and the scaled compact vectors stay circulant:
  the scale is computed on the compact ``c`` directly.
* The bias is added on the client after dequantizing (float, no rounding).

Accumulator bound (what ``t`` must hold): ``|y_int[o]| <= max(|lo|, |hi|) * sum_i |W_int[o, i]|``;
the decrypted value is read centered modulo ``t``, so ``t > 2 * bound`` suffices and
``plain_bits = ceil(log2(2 * bound + 1))``. For a conv the sum runs over ``C_in * kh * kw`` (the
bound ignores zero padding, which only lowers it). For a compact circulant ``c (p, q, b)`` the
row sum is ``sum_{j, k} |c[i, j, k]|`` for every row of block-row ``i``.

Error: rounding ``x`` costs at most ``s_x / 2`` per input and ``W`` at most ``s_w / 2`` per weight,
so ``|y - y_float| <= s_x/2 * sum|W| + s_w/2 * sum|x| + ...``; with 8/8 bits the digits CNN keeps
its top-1 on the whole test split (``benchmarks/he_digits.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from graphpress.errors import BackendError

#: Values kept per layer and batch for a percentile range (a random subsample beyond this).
_PERCENTILE_SAMPLES = 1 << 18


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and the calibration rule.

    Attributes
    ----------
    act_bits : int
        Bits of the activation integers (2..16).
    weight_bits : int
        Bits of the weight integers (2..16).
    percentile : float or None
        ``None``: the activation range is ``max |x|`` over the calibration inputs; else this
        percentile of ``|x|`` (e.g. ``99.99``), clipping rare outliers for finer resolution.
    """

    act_bits: int = 8
    weight_bits: int = 8
    percentile: float | None = None

    def __post_init__(self) -> None:
        for name in ("act_bits", "weight_bits"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 2 <= v <= 16:
                raise BackendError(f"he: option '{name}': {v!r} is not an integer in 2..16")
        if self.percentile is not None and not 50.0 < float(self.percentile) <= 100.0:
            raise BackendError(f"he: option 'percentile': {self.percentile!r} is not in (50, 100]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RangeObserver:
    """Running input range of one layer: ``min``, ``max |x|`` and (for percentiles) a sample of ``|x|``."""

    def __init__(self, percentile: float | None = None, seed: int = 0):
        self.percentile = percentile
        self.lo = math.inf
        self.absmax = 0.0
        self._samples: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.absmax = max(self.absmax, float(np.abs(x).max()))
        if self.percentile is not None:
            a = np.abs(x)
            if a.size > _PERCENTILE_SAMPLES:
                a = self._rng.choice(a, _PERCENTILE_SAMPLES, replace=False)
            self._samples.append(a)

    @property
    def signed(self) -> bool:
        return self.lo < 0.0

    def range(self) -> float:
        """The range ``r`` mapped to the largest integer: max |x| or the percentile."""
        if self.percentile is None or not self._samples:
            r = self.absmax
        else:
            r = float(np.percentile(np.concatenate(self._samples), self.percentile))
        return r if r > 0.0 else 1.0  # an all-zero input: any scale works; 1 keeps it finite


@dataclass(frozen=True)
class HEInputQuant:
    """How one layer's input is quantized: ``x_int = clip(round(x / scale), lo, hi)``."""

    scale: float
    lo: int
    hi: int

    @property
    def bound(self) -> int:
        """``max |x_int|``."""
        return max(abs(self.lo), abs(self.hi))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float array -> int64 array, rounded half to even and clipped to ``[lo, hi]``."""
        q = np.rint(np.asarray(x, dtype=np.float64) / self.scale)
        return np.clip(q, self.lo, self.hi).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HEInputQuant":
        return cls(float(d["scale"]), int(d["lo"]), int(d["hi"]))


def act_quant(observer: RangeObserver, bits: int) -> HEInputQuant:
    """The activation quantizer for a calibrated range (unsigned when never negative)."""
    if observer.signed:
        qmax = (1 << (bits - 1)) - 1
        return HEInputQuant(observer.range() / qmax, -qmax, qmax)
    qmax = (1 << bits) - 1
    return HEInputQuant(observer.range() / qmax, 0, qmax)


def weight_scales(w: np.ndarray, bits: int, rows_axis: int) -> np.ndarray:
    """Per-output-row scales ``max |w[row]| / (2^(bits-1) - 1)`` (1 for an all-zero row).

    ``rows_axis`` is the axis indexing output rows (or block-rows of a compact circulant weight);
    the maximum runs over every other axis.
    """
    qmax = (1 << (bits - 1)) - 1
    a = np.moveaxis(np.abs(np.asarray(w, dtype=np.float64)), rows_axis, 0).reshape(w.shape[rows_axis], -1)
    m = a.max(axis=1) if a.shape[1] else np.zeros(a.shape[0])
    return np.where(m > 0, m / qmax, 1.0)


def quantize_weight(w: np.ndarray, bits: int, rows_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """``(w_int int64, scales float64)`` with ``w ~= w_int * scales`` broadcast along ``rows_axis``."""
    s = weight_scales(w, bits, rows_axis)
    shape = [1] * w.ndim
    shape[rows_axis] = -1
    w_int = np.rint(np.asarray(w, dtype=np.float64) / s.reshape(shape)).astype(np.int64)
    return w_int, s


def row_abs_sums(w_int: np.ndarray, rows_axis: int) -> np.ndarray:
    """``sum |w_int|`` per output row (block-row for compact circulant weights)."""
    a = np.moveaxis(np.abs(np.asarray(w_int, dtype=np.int64)), rows_axis, 0)
    return a.reshape(a.shape[0], -1).sum(axis=1)


def accumulator_bound(w_int: np.ndarray, rows_axis: int, x_bound: int) -> int:
    """``max_o |y_int[o]|`` over all inputs with ``|x_int| <= x_bound`` (exact worst case)."""
    sums = row_abs_sums(w_int, rows_axis)
    return int(sums.max() if sums.size else 0) * int(x_bound)


def plain_bits_for(bound: int) -> int:
    """Bits of the smallest ``t`` with ``t > 2 * bound`` (values read centered modulo ``t``)."""
    return max(2, math.ceil(math.log2(2 * int(bound) + 1)))


__all__ = [
    "HEInputQuant",
    "QuantConfig",
    "RangeObserver",
    "accumulator_bound",
    "act_quant",
    "plain_bits_for",
    "quantize_weight",
    "row_abs_sums",
    "weight_scales",
]
