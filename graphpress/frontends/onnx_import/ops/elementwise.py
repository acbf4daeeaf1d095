"""Element-wise converters: arithmetic, unary math, comparison/logic, Where, Clip, Cast, variadic.

ONNX broadcasting for these ops is numpy broadcasting (from opset 7), which torch shares, so most
converters are one call. Before opset 7 a binary op broadcast only with ``broadcast=1``, and then
``B``'s dims lined up with ``A``'s from ``axis`` on (``A`` (2, 3, 4, 5) + ``B`` (3,) with
``axis=1``), not from the right: :func:`legacy_broadcast` reshapes ``B`` so that numpy rules
give the same result.  Where semantics differ (integer ``Div`` truncates, ``Mod`` has two flavours, ``Pow``
keeps the base's type) the converter says so.  0-d constants are passed as Python scalars
(``x * 0.5`` instead of a buffer holding 0.5) where torch accepts them.
"""

from __future__ import annotations

import operator

import torch

from .. import symbolic
from ..emitter import Emitter
from ..onnx_types import torch_dtype
from ..registry import OnnxNode, converter
from ..values import Const, ShapeValue, Value, is_runtime


def _scalars(ctx: Emitter, *values: Value) -> tuple:
    """0-d constants -> Python numbers, but only when another operand is a runtime value
    (otherwise the op is folded at import time and must see tensors)."""
    if not is_runtime(values):
        return values
    return tuple(ctx.scalar(v) for v in values)


def _is_integral(dtype: torch.dtype | None) -> bool:
    return dtype is not None and not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def legacy_broadcast(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """``b`` reshaped for numpy broadcasting under the opset < 7 rules.

    With ``broadcast=1`` and an ``axis``, ``b``'s dims match ``a``'s dims ``axis ..
    axis + rank(b) - 1``: trailing size-1 dims are appended so numpy aligns them the same way.
    Without ``axis`` the old rule is suffix matching, which numpy already does. With
    ``broadcast=0`` the shapes must be equal and nothing changes.
    """
    if node.opset >= 7 or not node.attr("broadcast", 0) or node.attr("axis") is None:
        return b
    rank_a, rank_b = ctx.rank(a, "input A"), ctx.rank(b, "input B")
    axis = int(node.attr("axis"))
    axis = axis + rank_a if axis < 0 else axis
    if not 0 <= axis <= rank_a - rank_b:
        ctx.fail(f"axis {node.attr('axis')} does not fit input B of rank {rank_b} into input A of rank {rank_a}")
    trailing = rank_a - axis - rank_b
    if trailing == 0 or rank_b == 0:
        return b
    return ctx.method("reshape", b, [*(ctx.dim(b, i) for i in range(rank_b)), *([1] * trailing)])


_ARITHMETIC = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul}


@converter("Add", "Sub", "Mul")
def arithmetic(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """``a + b`` / ``a - b`` / ``a * b`` (shape values stay symbolic)."""
    b = legacy_broadcast(ctx, node, a, b)
    folded = symbolic.binary(ctx, node.op_type, a, b)
    if folded is not None:
        return folded
    return ctx.call(_ARITHMETIC[node.op_type], *_scalars(ctx, a, b))


@converter("Div")
def div(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """True division for floats; integer division truncates toward zero in ONNX."""
    b = legacy_broadcast(ctx, node, a, b)
    folded = symbolic.binary(ctx, "Div", a, b)
    if folded is not None:
        return folded
    if _is_integral(ctx.dtype(a) or ctx.dtype(b)):
        # torch.div needs a tensor as first argument; only the divisor may become a Python scalar.
        divisor = ctx.scalar(b) if is_runtime(a) else b
        return ctx.call(torch.div, a, divisor, rounding_mode="trunc")
    return ctx.call(operator.truediv, *_scalars(ctx, a, b))


@converter("Mod")
def mod(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """``fmod=1``: C-style remainder (sign of dividend); ``fmod=0``: Python-style (sign of divisor)."""
    if not node.attr("fmod", 0):
        folded = symbolic.binary(ctx, "Mod", a, b)
        if folded is not None:
            return folded
    fn = torch.fmod if node.attr("fmod", 0) else torch.remainder
    return ctx.call(fn, a, ctx.scalar(b) if is_runtime(a) else b)


@converter("Pow")
def pow_(ctx: Emitter, node: OnnxNode, base: Value, exponent: Value) -> Value:
    """``base ** exponent``; the result keeps the base's dtype as ONNX requires."""
    exponent = legacy_broadcast(ctx, node, base, exponent)
    result = ctx.call(torch.pow, *_scalars(ctx, base, exponent))
    base_dtype, exp_dtype = ctx.dtype(base), ctx.dtype(exponent)
    if _is_integral(base_dtype) and exp_dtype is not None and exp_dtype.is_floating_point:
        result = ctx.method("to", result, base_dtype)  # torch would promote int ** float to float
    return result


_UNARY = {
    "Abs": torch.abs,
    "Neg": operator.neg,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Reciprocal": torch.reciprocal,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # both round half to even
    "Sign": torch.sign,
    "Erf": torch.erf,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "BitwiseNot": torch.bitwise_not,
}


@converter(*_UNARY)
def unary(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """One-argument math functions with identical torch semantics."""
    return ctx.call(_UNARY[node.op_type], x)


@converter("IsInf", since=10)
def is_inf(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``isinf`` restricted to the signs selected by ``detect_negative``/``detect_positive``."""
    neg, pos = node.attr("detect_negative", 1), node.attr("detect_positive", 1)
    if neg and pos:
        return ctx.call(torch.isinf, x)
    if pos:
        return ctx.call(torch.isposinf, x)
    if neg:
        return ctx.call(torch.isneginf, x)
    return ctx.call(torch.zeros_like, x, dtype=torch.bool)


_COMPARE = {
    "Equal": operator.eq,
    "Less": operator.lt,
    "Greater": operator.gt,
    "LessOrEqual": operator.le,
    "GreaterOrEqual": operator.ge,
    # ONNX And/Or/Xor are boolean-only, where & | ^ are the logical ops.
    "And": operator.and_,
    "Or": operator.or_,
    "Xor": operator.xor,
    "BitwiseAnd": operator.and_,
    "BitwiseOr": operator.or_,
    "BitwiseXor": operator.xor,
}


@converter(*_COMPARE)
def compare(ctx: Emitter, node: OnnxNode, a: Value, b: Value) -> Value:
    """Comparisons and logical ops, written as Python operators (``x < 0``)."""
    b = legacy_broadcast(ctx, node, a, b)
    if node.op_type == "Equal":
        folded = symbolic.equal(a, b)
        if folded is not None:
            return folded
    return ctx.call(_COMPARE[node.op_type], *_scalars(ctx, a, b))


@converter("Where", since=9)
def where(ctx: Emitter, node: OnnxNode, cond: Value, a: Value, b: Value) -> Value:
    """``torch.where``; a shape value selected by a constant condition stays symbolic."""
    folded = symbolic.where(cond, a, b)
    if folded is not None:
        return folded
    if not is_runtime((cond, a, b)):
        return ctx.call(torch.where, cond, a, b)
    # At most one branch may be a Python scalar or the result dtype would be torch's default.
    sa, sb = ctx.scalar(a), ctx.scalar(b)
    if isinstance(sa, (int, float, bool)) and isinstance(sb, (int, float, bool)):
        return ctx.call(torch.where, cond, a, sb)
    return ctx.call(torch.where, cond, sa, sb)


_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": operator.add, "Mean": operator.add}


@converter("Max", "Min", "Sum", "Mean")
def variadic(ctx: Emitter, node: OnnxNode, *xs: Value) -> Value:
    """Element-wise max/min/sum/mean of any number of broadcastable inputs."""
    if len(xs) == 1:
        return xs[0]
    if len(xs) == 2 and node.op_type in ("Max", "Min"):
        folded = symbolic.binary(ctx, node.op_type, *xs)
        if folded is not None:
            return folded
    fn = _VARIADIC[node.op_type]
    acc = xs[0]
    for x in xs[1:]:
        acc = ctx.call(fn, *(_scalars(ctx, acc, x) if fn is operator.add else (acc, x)))
    if node.op_type == "Mean":
        acc = ctx.call(operator.truediv, acc, len(xs))
    return acc


def _clip(ctx: Emitter, x: Value, low: Value | float | None, high: Value | float | None) -> Value:
    if low is None and high is None:
        return x
    low, high = ctx.scalar(low), ctx.scalar(high)
    numbers = all(v is None or isinstance(v, (int, float)) for v in (low, high))
    if not numbers:
        # torch.clamp takes either numbers or tensors for both bounds, not a mix.
        dtype = ctx.dtype(x) or torch.float32
        low, high = (Const(torch.tensor(v, dtype=dtype)) if isinstance(v, (int, float)) else v for v in (low, high))
    return ctx.call(torch.clamp, x, low, high)


@converter("Clip", since=1)
def clip_v1(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Clip with ``min``/``max`` attributes (opset < 11)."""
    return _clip(ctx, x, node.attr("min"), node.attr("max"))


@converter("Clip", since=11)
def clip_v11(ctx: Emitter, node: OnnxNode, x: Value, low: Value = None, high: Value = None) -> Value:
    """Clip with optional ``min``/``max`` inputs (opset >= 11)."""
    return _clip(ctx, x, low, high)


def _cast(ctx: Emitter, x: Value, dtype: torch.dtype) -> Value:
    if isinstance(x, ShapeValue) and dtype in (torch.int64, torch.int32):
        return x  # sizes are exact in either width
    if ctx.dtype(x) == dtype and not isinstance(x, Const):
        return x
    return ctx.method("to", x, dtype)


@converter("Cast")
def cast(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x.to(dtype)``; no-op casts are dropped."""
    try:
        dtype = torch_dtype(node.attr("to"))
    except KeyError as err:
        ctx.fail(str(err.args[0]))
    return _cast(ctx, x, dtype)


@converter("CastLike", since=15)
def cast_like(ctx: Emitter, node: OnnxNode, x: Value, like: Value) -> Value:
    """Cast to the dtype of the second input."""
    dtype = ctx.dtype(like)
    if dtype is None:
        ctx.fail("the target dtype (second input) is unknown")
    return _cast(ctx, x, dtype)


@converter("Identity")
def identity(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Pass-through."""
    return x
