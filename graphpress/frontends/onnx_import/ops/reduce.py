"""Reductions and scans: Reduce*, ArgMax/ArgMin, CumSum, TopK.

``axes`` moved from attribute to input in opset 13 for ReduceSum and in opset 18 for the other
Reduce ops; both forms are registered and share :func:`_reduce`.  An empty/absent ``axes``
reduces everything -- or nothing, if ``noop_with_empty_axes`` is set.
"""

from __future__ import annotations

import operator

import torch

from .. import symbolic
from ..emitter import Emitter
from ..registry import OnnxNode, converter
from ..values import ShapeValue, Value, make_shape

_REDUCE_OPS = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)

# Ops that torch reduces over several dims in one call.
_MULTI_DIM = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
    "ReduceLogSumExp": torch.logsumexp,
}


def _reduce(ctx: Emitter, node: OnnxNode, x: Value, axes: list | None) -> Value:
    keepdim = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return x
        axes = None
    op = node.op_type
    if op == "ReduceProd" and isinstance(x, ShapeValue) and axes in (None, [0], [-1]):
        count = symbolic.product(ctx, x)  # number of elements of a shape
        return make_shape([count], scalar=not keepdim)
    if axes is not None and not all(isinstance(a, int) for a in axes):
        ctx.fail("axes must be constant")
    rank = ctx.rank(x)
    dims = tuple(range(rank)) if axes is None else tuple(ctx.axis(a, rank) for a in axes)

    if op in _MULTI_DIM:
        return ctx.call(_MULTI_DIM[op], x, dim=dims, keepdim=keepdim)
    if op == "ReduceProd":
        # torch.prod reduces one dim at a time; go from the last so indices stay valid.
        for d in sorted(dims, reverse=True):
            x = ctx.call(torch.prod, x, d, keepdim=keepdim)
        return x
    if op == "ReduceL2":
        return ctx.call(torch.linalg.vector_norm, x, 2, dim=dims, keepdim=keepdim)
    if op == "ReduceL1":
        return ctx.call(torch.sum, ctx.call(torch.abs, x), dim=dims, keepdim=keepdim)
    if op == "ReduceSumSquare":
        return ctx.call(torch.sum, ctx.call(operator.mul, x, x), dim=dims, keepdim=keepdim)
    if op == "ReduceLogSum":
        return ctx.call(torch.log, ctx.call(torch.sum, x, dim=dims, keepdim=keepdim))
    ctx.fail(f"no reduction for {op}")


@converter(*_REDUCE_OPS, since=1)
def reduce_attr_axes(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Reductions with an ``axes`` attribute."""
    return _reduce(ctx, node, x, node.attr("axes"))


@converter("ReduceSum", since=13)
def reduce_sum_v13(ctx: Emitter, node: OnnxNode, x: Value, axes: Value = None) -> Value:
    """ReduceSum with an optional ``axes`` input (opset >= 13)."""
    return _reduce(ctx, node, x, ctx.ints(axes, "axes"))


@converter(*(op for op in _REDUCE_OPS if op != "ReduceSum"), since=18)
def reduce_input_axes(ctx: Emitter, node: OnnxNode, x: Value, axes: Value = None) -> Value:
    """The other reductions with an optional ``axes`` input (opset >= 18)."""
    return _reduce(ctx, node, x, ctx.ints(axes, "axes"))


@converter("ArgMax", "ArgMin")
def arg_max_min(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Index of the max/min along ``axis``; ``select_last_index`` picks the last of equal ones."""
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    axis, keepdim = node.attr("axis", 0), bool(node.attr("keepdims", 1))
    if not node.attr("select_last_index", 0):
        return ctx.call(fn, x, dim=axis, keepdim=keepdim)
    # argmax returns the first hit; on the flipped axis that is the last one, counted from the end.
    index = ctx.call(fn, ctx.call(torch.flip, x, [axis]), dim=axis, keepdim=keepdim)
    last = ctx.dim(x, axis)
    last = last - 1 if isinstance(last, int) else ctx.graph.call_function(operator.sub, (last, 1))
    return ctx.call(operator.sub, last, index)


@converter("CumSum", since=11)
def cumsum(ctx: Emitter, node: OnnxNode, x: Value, axis: Value) -> Value:
    """Cumulative sum along ``axis`` (``exclusive``: shifted by one, ``reverse``: from the end)."""
    dim = ctx.int_value(axis, "axis")
    reverse, exclusive = node.attr("reverse", 0), node.attr("exclusive", 0)
    if reverse:
        x = ctx.call(torch.flip, x, [dim])
    y = ctx.call(torch.cumsum, x, dim)
    if exclusive:
        y = ctx.call(operator.sub, y, x)
    return ctx.call(torch.flip, y, [dim]) if reverse else y


def _topk(ctx: Emitter, node: OnnxNode, x: Value, k) -> tuple:
    result = ctx.call(
        torch.topk, x, k, dim=node.attr("axis", -1),
        largest=bool(node.attr("largest", 1)), sorted=bool(node.attr("sorted", 1)),
    )
    return ctx.call(operator.getitem, result, 0), ctx.call(operator.getitem, result, 1)


@converter("TopK", since=1)
def topk_v1(ctx: Emitter, node: OnnxNode, x: Value) -> tuple:
    """TopK with a ``k`` attribute (opset < 10)."""
    return _topk(ctx, node, x, node.attr("k"))


@converter("TopK", since=10)
def topk_v10(ctx: Emitter, node: OnnxNode, x: Value, k: Value) -> tuple:
    """TopK with a ``k`` input (opset >= 10)."""
    return _topk(ctx, node, x, ctx.int_value(k, "k"))
