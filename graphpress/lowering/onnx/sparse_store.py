"""ONNX translation of ``graphpress::sparse_unpack`` (:mod:`graphpress.ir.ops_sparse_store`).

Standard ops on the two initializers, evaluated by ONNX Runtime's constant folding when it
creates the session (the file keeps the packed bytes)::

    bits = Reshape(BitwiseAnd(BitShift(Unsqueeze(bitmask, -1), [0..7]), 1), [-1])[:n]
    pos  = CumSum(bits) * bits              # 1-based index of a kept element, 0 for a zero
    W    = Reshape(Gather(Concat([0], values), pos), shape)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

import graphpress.ir.ops_sparse_store  # noqa: F401 -- registers graphpress::sparse_unpack
from graphpress.lowering.onnx.common import const


def _onnx_sparse_unpack(bitmask, values, shape):
    """onnxscript (trace mode) translation of ``graphpress::sparse_unpack`` (the graph in the module docstring)."""
    from onnxscript import opset18 as op

    shape = [int(d) for d in shape]
    n = math.prod(shape)
    # int32 positions halve the memory of the fold at session creation; int64 only past 2**31 elements
    index_type, index_np = (6, np.int32) if n < 2**31 - 1 else (7, np.int64)
    bits = op.BitwiseAnd(
        op.BitShift(op.Unsqueeze(bitmask, const(np.array([-1], dtype=np.int64))), const(np.arange(8, dtype=np.uint8)), direction="RIGHT"),
        const(np.array(1, dtype=np.uint8)),
    )
    bits = op.Reshape(bits, const(np.array([-1], dtype=np.int64)))
    if n % 8:
        bits = op.Slice(bits, const(np.array([0], dtype=np.int64)), const(np.array([n], dtype=np.int64)))
    bits = op.Cast(bits, to=index_type)
    pos = op.Mul(op.CumSum(bits, const(np.array(0, dtype=index_np))), bits)
    padded = op.Concat(op.CastLike(const(np.zeros(1, dtype=np.float32)), values), values, axis=0)
    return op.Reshape(op.Gather(padded, pos, axis=0), const(np.array(shape, dtype=np.int64)))


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the stored-sparse op."""
    return {torch.ops.graphpress.sparse_unpack.default: _onnx_sparse_unpack}
