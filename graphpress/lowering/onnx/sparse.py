"""ONNX translations of the activation-sparse linear ops (:mod:`graphpress.ir.ops_sparse`).

``Where(Abs(x) [* s] > t, x, 0)`` then ``MatMul`` with the stored ``Wt`` (``Cast`` to float
first when it is bfloat16; ORT folds that at load) and ``Add`` of the bias. Correct, but dense:
ONNX Runtime has no kernel that skips the unselected rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import graphpress.ir.ops_sparse  # noqa: F401 -- registers graphpress::sparse_linear/sparse_linear_pc


def _onnx_product(x, keep, wt, bias):
    """``Where(keep, x, 0) @ wt (+ bias)`` in onnxscript trace mode."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    xh = op.Where(keep, x, op.CastLike(op.Constant(value_float=0.0), x))
    if getattr(wt, "dtype", None) == ir.DataType.BFLOAT16:
        wt = op.Cast(wt, to=ir.DataType.FLOAT)
    y = op.MatMul(xh, wt)
    return op.Add(y, bias) if bias is not None else y


def _onnx_sparse_linear(x, wt, bias, threshold: float):
    """onnxscript (trace mode) translation of ``graphpress::sparse_linear``."""
    from onnxscript import opset18 as op

    keep = op.Greater(op.Abs(x), op.CastLike(op.Constant(value_float=float(threshold)), x))
    return _onnx_product(x, keep, wt, bias)


def _onnx_sparse_linear_pc(x, wt, bias, thresholds, scores):
    """onnxscript (trace mode) translation of ``graphpress::sparse_linear_pc``."""
    from onnxscript import opset18 as op

    a = op.Abs(x)
    if scores is not None:
        a = op.Mul(a, scores)
    return _onnx_product(x, op.Greater(a, thresholds), wt, bias)


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the activation-sparse linear ops."""
    return {
        torch.ops.graphpress.sparse_linear.default: _onnx_sparse_linear,
        torch.ops.graphpress.sparse_linear_pc.default: _onnx_sparse_linear_pc,
    }
