"""Dense layers with coefficient encoding (Cheetah, USENIX Security 2022).

Linear. The input chunk ``x`` (length ``n_i``) is the polynomial ``sum_j x_j X^j``; an
``n_o x n_i`` weight tile puts row ``i`` reversed at offset ``i*n_i``:
``sum_{i,j} W_ij X^(i*n_i + n_i - 1 - j)``. In the product, coefficient ``i*n_i + n_i - 1``
collects exactly ``sum_j W_ij x_j`` (terms meet there only when ``j - j' = (i - i') n_i``), and
nothing wraps around ``X^N = -1`` onto a read position while ``n_o * n_i <= N``. So an ``m x n``
matrix costs about ``ceil(m n / N)`` products, no rotations; several input vectors share a
product when ``V * n_o * n_i <= N`` (vector ``nu`` at offset ``nu * n_o * n_i``).

Conv (HomConv). The client zero-pads; input channel ``c``, row ``h``, column ``w`` sit at
``c*H_t*W' + h*W' + w``; the kernel of output channel ``o`` is placed reversed,
``(C-1-c)*H_t*W' + (kh-1-dy)*W' + (kw-1-dx)``, and coefficient
``(C-1)*H_t*W' + (h+kh-1)*W' + (w+kw-1)`` holds output ``(o, h, w)``: cross terms differ in
their spatial offset by less than one row (columns) or one channel block (rows), so they land
on unread positions for every valid ``h <= H_t - kh``, ``w <= W' - kw``; channels, output
channels and row tiles are partitioned so each product fits ``N``.

This is the ``b = 1`` case of :mod:`.coeff_circulant` (``M = N``, no twist), and the code is
shared: the kernel views a dense ``(m, n)`` weight as compact ``(m, n, 1)`` blocks and a dense
``(C_out, C_in, kh, kw)`` conv weight as ``(kh, kw, C_out, C_in, 1)``. Layouts and counts:
:func:`graphpress.lowering.he.counts.plan_coeff_linear` / ``plan_coeff_conv`` with ``b = 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphpress.backends.he.kernels.base import where
from graphpress.backends.he.kernels.coeff_circulant import CoeffCirculant
from graphpress.errors import BackendError


class CoeffDense(CoeffCirculant):
    """``coeff-dense``: dense ``(m, n)`` / ``(C_out, C_in, kh, kw)`` integer weights, coefficient encoding."""

    name = "coeff-dense"
    compact = False

    def _compact_linear(self, w: np.ndarray, what: str) -> np.ndarray:
        if w.ndim != 2:
            raise BackendError(f"{where(what)}coeff-dense linear weight must be (out, in), got shape {w.shape}")
        return w[:, :, None]

    def _compact_conv(self, w: np.ndarray, what: str) -> np.ndarray:
        if w.ndim != 4:
            raise BackendError(f"{where(what)}coeff-dense conv weight must be (C_out, C_in, kh, kw), got shape {w.shape}")
        return np.ascontiguousarray(w.transpose(2, 3, 0, 1)[..., None])

    def counts_linear(self, m: int, n: int, poly_degree: int, b: int = 1, vectors: int = 1, bias: bool = False) -> dict[str, int]:
        return super().counts_linear(m, n, poly_degree, 1, vectors, bias)

    def counts_conv(self, c_out: int, c_in: int, h: int, w: int, kh: int, kw: int, poly_degree: int, b: int = 1, *args: Any, **kw_: Any) -> dict[str, int]:
        return super().counts_conv(c_out, c_in, h, w, kh, kw, poly_degree, 1, *args, **kw_)


__all__ = ["CoeffDense"]
