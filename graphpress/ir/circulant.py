"""Block-circulant matrices: projection, expansion and FFT products (the math behind PrivCirNet).

A matrix ``W`` of shape ``(p*b, q*b)`` is *block-circulant with block size b* when every b x b
block ``W_ij`` is circulant, i.e. defined by one vector ``c_ij`` of length b::

    W_ij[r, s] = c_ij[(r - s) mod b]

so ``W`` is stored compactly as ``c`` of shape ``(p, q, b)``: b times fewer numbers. The product
with a vector is a sum of circular convolutions, ``y_i = sum_j c_ij (*) x_j``, which the FFT
diagonalizes: ``Y_i = sum_j C_ij * X_j`` with ``C = rfft(c)``, ``X = rfft(x)`` per block, i.e. a
complex ``(p x q)`` matrix product per frequency -- O(p q b log b) instead of O(p q b^2).

Projection (nearest block-circulant matrix in the Frobenius norm, optionally weighted)::

    c_ij[k] = sum_{(r-s) mod b = k} F[r,s] W_ij[r,s] / sum_{(r-s) mod b = k} F[r,s]

With ``F = 1`` it is the plain mean along each wrapped diagonal; with ``F`` = the diagonal Fisher
information (accumulated squared gradients) it is the Fisher-weighted mean PrivCirNet reports as
the better initialization: it minimizes ``sum F (W - W_b)^2``, the second-order estimate of the
loss increase, among block-circulant ``W_b``. Lossy by construction; exact when ``W`` is already
block-circulant.

Convolution weights ``(C_out, C_in, kh, kw)`` are circulant over the channel dims at each kernel
position: the same functions apply to ``w.permute(2, 3, 0, 1)`` (leading dims are batch dims).
"""

from __future__ import annotations

import torch


def can_use(out_features: int, in_features: int, b: int) -> bool:
    """Block size ``b`` (a power of two) divides both dims; ``b = 1`` (dense) always fits."""
    return b >= 1 and (b & (b - 1)) == 0 and out_features % b == 0 and in_features % b == 0


def diagonal_index(b: int, device: torch.device | None = None) -> torch.Tensor:
    """``idx[r, s] = (r - s) mod b``: which vector entry sits at block position (r, s)."""
    r = torch.arange(b, device=device)
    return (r[:, None] - r[None, :]) % b


def _blocks(w: torch.Tensor, b: int) -> torch.Tensor:
    """``(..., p*b, q*b) -> (..., p, q, b, b)``."""
    *lead, m, n = w.shape
    return w.reshape(*lead, m // b, b, n // b, b).transpose(-3, -2)


def project(w: torch.Tensor, b: int, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Nearest block-circulant matrix to ``w`` as compact vectors ``(..., p, q, b)``.

    Parameters
    ----------
    w : Tensor ``(..., p*b, q*b)``
        Dense weight (leading dims are independent matrices, e.g. kernel positions).
    b : int
        Block size; must divide both trailing dims.
    fisher : Tensor, optional
        Non-negative importance of each entry of ``w`` (same shape). Diagonals whose weights sum
        to zero fall back to the plain mean.
    """
    m, n = w.shape[-2:]
    if not can_use(m, n, b):
        raise ValueError(f"block size {b} does not divide weight dims {m}x{n} (or is not a power of two)")
    if b == 1:
        return w.reshape(*w.shape[:-2], m, n, 1).clone()
    idx = diagonal_index(b, w.device).reshape(-1)
    blocks = _blocks(w.double(), b).reshape(*w.shape[:-2], m // b, n // b, b * b)
    weights = torch.ones_like(blocks) if fisher is None else _blocks(fisher.double(), b).reshape(blocks.shape)
    num = torch.zeros(*blocks.shape[:-1], b, dtype=torch.float64, device=w.device).index_add_(-1, idx, weights * blocks)
    den = torch.zeros_like(num).index_add_(-1, idx, weights)
    plain = torch.zeros_like(num).index_add_(-1, idx, blocks) / b
    c = torch.where(den > 0, num / den.clamp_min(1e-300), plain)
    return c.to(w.dtype)


def expand(c: torch.Tensor) -> torch.Tensor:
    """Dense matrix of compact vectors ``c`` ``(..., p, q, b) -> (..., p*b, q*b)``."""
    *lead, p, q, b = c.shape
    blocks = c[..., diagonal_index(b, c.device)]  # (..., p, q, b, b)
    return blocks.transpose(-3, -2).reshape(*lead, p * b, q * b)


def fft_matmul(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x @ expand(c).T`` through the FFT: ``x (..., q*b) -> (..., p*b)``.

    rfft of each input block, one complex ``(p x q)`` product per frequency, irfft back.
    """
    p, q, b = c.shape
    xf = torch.fft.rfft(x.reshape(*x.shape[:-1], q, b), dim=-1)  # (..., q, f)
    cf = torch.fft.rfft(c, dim=-1)  # (p, q, f)
    # per frequency f: y[..., p, f] = sum_q c[p, q, f] x[..., q, f]
    yf = torch.einsum("...qf,pqf->...pf", xf, cf)
    y = torch.fft.irfft(yf, n=b, dim=-1)  # (..., p, b)
    return y.reshape(*x.shape[:-1], p * b)


def sensitivity(w: torch.Tensor, b: int, fisher: torch.Tensor | None = None) -> float:
    """``sum F (W - W_b)^2`` for the (Fisher-weighted) projection ``W_b`` at block size ``b``."""
    if b == 1:
        return 0.0
    wb = expand(project(w, b, fisher))
    err = (w.double() - wb.double()).pow(2)
    return float((err if fisher is None else fisher.double() * err).sum())


__all__ = ["can_use", "diagonal_index", "project", "expand", "fft_matmul", "sensitivity"]
