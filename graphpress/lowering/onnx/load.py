"""ONNX translations of the load-time dequantized ops (:mod:`graphpress.ir.ops_load`).

The packed codes, scales and zero points are initializers.

* ``wlinear_load``: their dequantization is plain ONNX ops on them (unpack, ``Sub``, ``Mul``),
  constant-folded by ONNX Runtime at session creation, then ``MatMul`` with the transpose (+
  ``Add``).
* ``wembedding_load``: the step's rows are gathered first -- codes, scales and zero points -- and
  only those are dequantized. The table stays in k bits in memory, and nothing is folded at
  session creation: folding a whole table took several float32 copies of it at once (a 1B Llama's
  session peaked at 2.4x the builder's). A row is dequantized by the same elementwise
  ``(q - z) * s`` in float32 either way, so the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import graphpress.ir.ops_load  # noqa: F401 -- registers graphpress::wlinear_load/wembedding_load
from graphpress.lowering.onnx.common import const


def _unpack(packed, bits: int, rows: int | None, cols: int):
    """uint8 codes ``(rows, cols)`` from ``(rows, cols * bits / 8)`` packed bytes, low bits first
    (the order of :func:`graphpress.ir.quant.pack_nbits`); ``rows=None``: as many as ``packed``
    has at run time (an embedding's gathered rows)."""
    from onnxscript import opset18 as op

    if bits == 8:
        return packed
    per = 8 // bits
    mask = const(np.array(2**bits - 1, dtype=np.uint8))
    parts = [op.Unsqueeze(op.BitwiseAnd(op.BitShift(packed, const(np.array(bits * j, dtype=np.uint8)), direction="RIGHT"), mask),
                          const(np.array([-1], dtype=np.int64))) for j in range(per)]
    shape = (const(np.array([rows, -1], dtype=np.int64)) if rows is not None
             else op.Concat(op.Shape(packed, start=0, end=1), const(np.array([-1], dtype=np.int64)), axis=0))
    codes = op.Reshape(op.Concat(*parts, axis=-1), shape)
    # the last byte of a row may hold padding codes (zero points of an odd block count)
    return op.Slice(codes, const(np.array([0], dtype=np.int64)), const(np.array([cols], dtype=np.int64)), const(np.array([1], dtype=np.int64)))


def _dequantized(packed, scales, zeros, n_in: int, bits: int, group_size: int, what: str):
    """The float ``(rows, n_in)`` weight as ONNX ops on initializers (constant-folded by ORT)."""
    from onnxscript import opset18 as op

    try:
        rows, nb, _nbytes = (int(d) for d in packed.shape)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: the stored weight needs a static shape, got {packed.shape}") from None
    q = op.Cast(_unpack(op.Reshape(packed, const(np.array([rows, -1], dtype=np.int64))), bits, rows, nb * group_size), to=1)
    q = op.Reshape(q, const(np.array([rows, nb, group_size], dtype=np.int64)))
    if zeros is None:
        z = const(np.array(2.0 ** (bits - 1), dtype=np.float32))
    else:
        z = op.Unsqueeze(op.Cast(_unpack(op.Reshape(zeros, const(np.array([rows, -1], dtype=np.int64))), bits, rows, nb), to=1),
                         const(np.array([-1], dtype=np.int64)))
    s = op.Reshape(scales, const(np.array([rows, nb, 1], dtype=np.int64)))
    w = op.Reshape(op.Mul(op.Sub(q, z), s), const(np.array([rows, nb * group_size], dtype=np.int64)))
    if nb * group_size != n_in:
        w = op.Slice(w, const(np.array([0], dtype=np.int64)), const(np.array([n_in], dtype=np.int64)), const(np.array([1], dtype=np.int64)))
    return w


def _onnx_wlinear_load(x, packed, scales, zeros, bias, in_features: int, bits: int, group_size: int):
    """onnxscript (trace mode) translation of ``graphpress::wlinear_load``."""
    from onnxscript import opset18 as op

    w = _dequantized(packed, scales, zeros, int(in_features), int(bits), int(group_size), "graphpress::wlinear_load")
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return op.Add(y, bias) if bias is not None else y


def _onnx_wembedding_load(ids, packed, scales, zeros, dim: int, bits: int, group_size: int):
    """onnxscript (trace mode) translation of ``graphpress::wembedding_load``: gather the rows'
    codes, scales and zero points, then dequantize those rows (module docstring)."""
    from onnxscript import opset18 as op

    try:
        rows, nb, _nbytes = (int(d) for d in packed.shape)
    except (TypeError, ValueError):
        raise ValueError(f"graphpress::wembedding_load: the stored table needs a static shape, got {packed.shape}") from None
    bits, group_size, dim = int(bits), int(group_size), int(dim)
    flat_ids = op.Reshape(ids, const(np.array([-1], dtype=np.int64)))
    n_by = lambda k: const(np.array([-1, k], dtype=np.int64))  # noqa: E731 -- (n, k) for the gathered rows

    def gathered(table):  # a (rows, ...) initializer of static shape -> (n, row width) of the ids' rows
        width = int(np.prod([int(d) for d in table.shape])) // rows  # zero points are stored flat, MatMulNBits-style
        return op.Reshape(op.Gather(op.Reshape(table, const(np.array([rows, width], dtype=np.int64))), flat_ids, axis=0), n_by(width))

    q = op.Cast(_unpack(gathered(packed), bits, None, nb * group_size), to=1)
    q = op.Reshape(q, const(np.array([-1, nb, group_size], dtype=np.int64)))
    if zeros is None:
        z = const(np.array(2.0 ** (bits - 1), dtype=np.float32))
    else:
        z = op.Unsqueeze(op.Cast(_unpack(gathered(zeros), bits, None, nb), to=1), const(np.array([-1], dtype=np.int64)))
    s = op.Reshape(gathered(scales), const(np.array([-1, nb, 1], dtype=np.int64)))
    w = op.Reshape(op.Mul(op.Sub(q, z), s), n_by(nb * group_size))
    if nb * group_size != dim:
        w = op.Slice(w, const(np.array([0], dtype=np.int64)), const(np.array([dim], dtype=np.int64)), const(np.array([1], dtype=np.int64)))
    return op.Reshape(w, op.Concat(op.Shape(ids), const(np.array([dim], dtype=np.int64)), axis=0))


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the load-time dequantized ops."""
    return {
        torch.ops.graphpress.wlinear_load.default: _onnx_wlinear_load,
        torch.ops.graphpress.wembedding_load.default: _onnx_wembedding_load,
    }
