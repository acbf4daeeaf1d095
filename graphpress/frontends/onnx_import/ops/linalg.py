"""Linear-algebra converters: MatMul, Gemm, Einsum, Trilu."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from ..emitter import Emitter
from ..registry import OnnxNode, converter
from ..values import Value


@converter("MatMul")
def matmul(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """numpy ``matmul`` semantics, shared by ``torch.matmul``."""
    return ctx.call(torch.matmul, a, b)


@converter("Gemm")
def gemm(ctx: Emitter, node: OnnxNode, a: Value, b: Value, c: Value = None) -> Value:
    """``alpha * A' @ B' + beta * C``.

    The common exporter form (``transB=1``, alpha = beta = 1, 1-d bias of size N) becomes
    ``F.linear(x, weight, bias)`` so the weight keeps its ``[out, in]`` layout and name; everything
    else is spelled out with ``matmul``.
    """
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    trans_a, trans_b = node.attr("transA", 0), node.attr("transB", 0)
    if trans_a:
        a = ctx.method("t", ctx.lift(a))
    b_shape, c_shape = ctx.shape(b), ctx.shape(c)
    bias_is_vector = c is None or (
        beta == 1.0 and c_shape is not None and len(c_shape) == 1 and b_shape is not None
        and isinstance(c_shape[0], int) and c_shape[0] == b_shape[0] and c_shape[0] != 1
    )
    if trans_b and alpha == 1.0 and bias_is_vector:
        return ctx.call(F.linear, a, b) if c is None else ctx.call(F.linear, a, b, c)
    # lift() before transposing: a transposed *constant* would otherwise be folded into a new,
    # anonymous tensor instead of staying the named weight.
    b = ctx.method("t", ctx.lift(b)) if trans_b else b
    y = ctx.call(torch.matmul, a, b)
    if alpha != 1.0:
        y = ctx.call(operator.mul, y, alpha)
    if c is not None and beta != 0.0:
        c = ctx.scalar(c)
        if beta != 1.0:
            c = c * beta if isinstance(c, (int, float)) else ctx.call(operator.mul, ctx.lift(c), beta)
        y = ctx.call(operator.add, y, c)
    return y


@converter("Einsum", since=12)
def einsum(ctx: Emitter, node: OnnxNode, *operands: Value) -> Value:
    """``torch.einsum`` understands the same equation syntax."""
    equation = node.attr("equation", "").replace(" ", "")
    return ctx.call(torch.einsum, equation, *operands)


@converter("Trilu", since=14)
def trilu(ctx: Emitter, node: OnnxNode, x: Value, k: Value = None) -> Value:
    """Upper (``triu``) or lower (``tril``) triangle of the last two dims, offset ``k``."""
    diagonal = 0 if k is None else ctx.int_value(k, "k")
    fn = torch.triu if node.attr("upper", 1) else torch.tril
    return ctx.call(fn, x, diagonal)
