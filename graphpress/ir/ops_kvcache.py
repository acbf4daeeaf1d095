"""``graphpress::kv_quant_write``: a KV cache stored in k bits, quantized when it is written.

``kv_quant_write(past, present, bits) -> present'`` sits between a decoder layer's cache update
(``present = concat(past, new)`` along the sequence, dim 2 of ``(batch, kv_heads, seq, head_dim)``)
and the graph output that becomes the next step's ``past``. It rounds only the step's new rows::

    present' = concat(past, Q_b(present[:, :, P:]))          P = past.shape[2]

``Q_b`` is asymmetric round-to-nearest per (batch, head, token) row of ``head_dim`` values
``x``, with the row's minimum and step stored in float16 (what the artifact keeps)::

    m = fp16(min x)                   s = fp16(max((max x - min x) / (2^b - 1), 2^-20))
    q = clamp(round((x - m) / s), 0, 2^b - 1)                Q_b(x) = q * s + m

``bits`` is 2, 4 or 8; 16 means "not quantized" (``present' = present``), the value a search
starts from. Rows already in ``past`` are never rounded again: they were rounded when they were
written, so a token's keys and values are rounded exactly once whatever the number of steps.

The layer's own attention at this step reads ``present`` (its new rows in full precision); the
*next* steps read the rounded rows through ``past``. That is KIVI's and KVTuner's "quantize on
write, dequantize on read", and it is what the ONNX artifact does with real storage: its caches
are ``uint8`` codes (``b/8`` bytes per value, packed) plus the float16 ``(s, m)`` of each row
(:mod:`graphpress.lowering.onnx.kv_cache`), dequantized with ``q * s + m`` before attention, so
the float graph here and the packed artifact compute the same numbers.

Exactness: lossy by construction (the pass ``quantize-kv-cache`` measures what it costs); the
eager kernel and the ONNX lowering use the same float32 operations in the same order.
"""

from __future__ import annotations

import torch

from graphpress.ir.fakes import shape_function

#: Code widths of a quantized cache; 16 leaves it in float.
KV_BITS = (2, 4, 8)
FLOAT_BITS = 16
#: Smallest stored step: a constant row gets this instead of 0 (a power of two, exact in float16).
MIN_STEP = 2.0 ** -20


def row_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, m)`` of each last-dim row of ``x`` as float16 values held in float32 (module docstring)."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    step = ((hi - lo) / float(2 ** bits - 1)).clamp_min(MIN_STEP)
    return step.to(torch.float16).to(torch.float32), lo.to(torch.float16).to(torch.float32)


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, s, m)``: codes (float32 holding integers in ``[0, 2^bits)``) and the row grid."""
    s, m = row_grid(x.float(), bits)
    q = torch.clamp(torch.round((x.float() - m) / s), 0, 2 ** bits - 1)
    return q, s, m


def qdq_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q_b(x)`` (module docstring); ``x`` unchanged for ``bits >= 16``."""
    if bits >= FLOAT_BITS:
        return x
    q, s, m = quantize_rows(x, bits)
    return (q * s + m).to(x.dtype)


def _check(past: torch.Tensor, present: torch.Tensor, bits: int) -> None:
    if past.dim() != 4 or present.dim() != 4 or past.shape[:2] != present.shape[:2] or past.shape[3] != present.shape[3]:
        raise RuntimeError(f"graphpress::kv_quant_write: past {tuple(past.shape)} and present {tuple(present.shape)} must be "
                           f"(batch, kv_heads, seq, head_dim) with the same batch, heads and head_dim")
    if bits not in KV_BITS and bits != FLOAT_BITS:
        raise RuntimeError(f"graphpress::kv_quant_write: bits must be one of {KV_BITS} or {FLOAT_BITS}, got {bits}")


@torch.library.custom_op("graphpress::kv_quant_write", mutates_args=(), schema="(Tensor past, Tensor present, int bits) -> Tensor")
def kv_quant_write(past, present, bits):
    """``concat(past, Q_bits(present[:, :, past_len:]))`` (module docstring)."""
    _check(past, present, bits)
    if bits >= FLOAT_BITS:
        return present.clone()
    n = past.shape[2]
    return torch.cat([past, qdq_rows(present[:, :, n:], bits)], dim=2)


@shape_function(kv_quant_write)
def _kv_quant_write_fake(past, present, bits):
    _check(past, present, bits)
    return torch.empty_like(present)


def kv_bytes_per_token(kv_heads: int, head_dim: int, bits: int) -> float:
    """Bytes one token adds to one cache (keys or values of one layer): the codes plus the
    float16 ``(s, m)`` of each head's row; float16 storage (2 bytes a value) for ``bits >= 16``."""
    if bits >= FLOAT_BITS:
        return kv_heads * head_dim * 2.0
    return kv_heads * (head_dim * bits / 8.0 + 4.0)


__all__ = ["FLOAT_BITS", "KV_BITS", "kv_bytes_per_token", "kv_quant_write", "qdq_rows", "quantize_rows", "row_grid"]
