"""ONNX translation of ``graphpress::linear_act`` (:mod:`graphpress.ir.ops`).

``MatMul(x, W^T) + b`` then the activation written with standard ops (``gelu`` as the ``Erf``
formula, ``silu`` as ``y * Sigmoid(y)``), patterns ONNX Runtime's graph optimizer fuses back into
``Gemm``/``FusedMatMul`` + ``Gelu``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from graphpress.ir.ops import LINEAR_ACTIVATIONS


def _onnx_linear_act(x, weight, bias, act: str):
    """onnxscript (trace mode) translation of ``graphpress::linear_act``."""
    from onnxscript import opset18 as op

    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)

    def const(v: float):
        return op.CastLike(op.Constant(value_float=v), y)

    if act == "relu":
        return op.Relu(y)
    if act == "sigmoid":
        return op.Sigmoid(y)
    if act == "tanh":
        return op.Tanh(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if act == "gelu":  # 0.5 * y * (1 + erf(y / sqrt(2)))
        return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Erf(op.Div(y, const(math.sqrt(2.0))))))
    if act == "gelu_tanh":  # 0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 y^3)))
        inner = op.Mul(const(math.sqrt(2.0 / math.pi)), op.Add(y, op.Mul(const(0.044715), op.Mul(op.Mul(y, y), y))))
        return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Tanh(inner)))
    raise ValueError(f"graphpress::linear_act: unknown activation {act!r}; expected one of {LINEAR_ACTIVATIONS}")


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the fused ops."""
    return {torch.ops.graphpress.linear_act.default: _onnx_linear_act}
