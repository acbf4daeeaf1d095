"""Element-wise arithmetic on :class:`~.values.ShapeValue` (shape computations).

Exporters compute target shapes with ordinary tensor ops: ``Shape``, ``Gather``, ``Mul``,
``Concat``, ``Equal``/``Where`` (``-1`` handling), ``ReduceProd``...  When such an op gets a
ShapeValue we redo the computation per element in Python -- known ints are computed right away,
symbolic ones become scalar fx nodes (``sym_size * 4``) -- so the result is again a ShapeValue that
``Reshape``/``Expand`` can consume without ever turning the batch size into data.

Every function returns ``None`` when it cannot stay symbolic; the caller then falls back to
tensor code (correct when run eagerly, but not traceable with a dynamic batch dimension).
"""

from __future__ import annotations

import operator
from typing import Callable

import torch

from .values import Const, ShapeValue, SymInt, Value, make_shape

# Consts bigger than this are data, not shapes; never unroll them element-wise.
_MAX_ELEMENTS = 64


def elements(value: Value) -> tuple[list[SymInt], bool] | None:
    """``(elements, is_scalar)`` of a ShapeValue or a small integer Const, else ``None``."""
    if isinstance(value, ShapeValue):
        return list(value.elems), value.scalar
    if isinstance(value, Const):
        t = value.value
        if t.dtype in (torch.int64, torch.int32) and t.dim() <= 1 and t.numel() <= _MAX_ELEMENTS:
            return [int(v) for v in t.reshape(-1).tolist()], t.dim() == 0
    return None


def involves_shape(*values: Value) -> bool:
    """Whether any of ``values`` is a ShapeValue (so symbolic handling should be tried)."""
    return any(isinstance(v, ShapeValue) for v in values)


def _is(value: SymInt, number: int) -> bool:
    return isinstance(value, int) and value == number


def _trunc_div(a: int, b: int) -> int:
    # ONNX integer Div truncates toward zero; Python's // floors.
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


# op_type -> (function on known ints, function emitted for symbolic ints)
_BINARY: dict[str, tuple[Callable[[int, int], int], Callable[..., object]]] = {
    "Add": (operator.add, operator.add),
    "Sub": (operator.sub, operator.sub),
    "Mul": (operator.mul, operator.mul),
    # Sizes are non-negative, where floor and truncation agree.
    "Div": (_trunc_div, operator.floordiv),
    "Mod": (operator.mod, operator.mod),
    "Max": (max, torch.sym_max),
    "Min": (min, torch.sym_min),
}


def _pairs(a: tuple[list[SymInt], bool], b: tuple[list[SymInt], bool]):
    (ea, sa), (eb, sb) = a, b
    if len(ea) == len(eb):
        return list(zip(ea, eb)), sa and sb
    if len(ea) == 1:
        return [(ea[0], y) for y in eb], False
    if len(eb) == 1:
        return [(x, eb[0]) for x in ea], False
    return None, False


def binary(ctx, op_type: str, a: Value, b: Value) -> Value | None:
    """``a <op> b`` element-wise for Add/Sub/Mul/Div/Mod/Max/Min on shape values."""
    if op_type not in _BINARY or not involves_shape(a, b):
        return None
    ea, eb = elements(a), elements(b)
    if ea is None or eb is None:
        return None
    pairs, scalar = _pairs(ea, eb)
    if pairs is None:
        return None
    known, symbolic = _BINARY[op_type]
    out: list[SymInt] = []
    for x, y in pairs:
        if isinstance(x, int) and isinstance(y, int):
            out.append(known(x, y))
        elif (op_type in ("Mul", "Div") and _is(y, 1)) or (op_type in ("Add", "Sub") and _is(y, 0)):
            out.append(x)  # keep generated code free of ``* 1`` / ``+ 0``
        elif (op_type == "Mul" and _is(x, 1)) or (op_type == "Add" and _is(x, 0)):
            out.append(y)
        else:
            out.append(ctx.graph.call_function(symbolic, (x, y)))
    return make_shape(out, scalar)


def equal(a: Value, b: Value) -> Value | None:
    """Element-wise ``a == b`` when decidable at import time.

    A symbolic size is never negative, so comparing it with ``-1`` (the exporters' "infer this
    dim" marker) is decidable; anything else symbolic is not.
    """
    if not involves_shape(a, b):
        return None
    ea, eb = elements(a), elements(b)
    if ea is None or eb is None:
        return None
    pairs, scalar = _pairs(ea, eb)
    if pairs is None:
        return None
    out = []
    for x, y in pairs:
        if isinstance(x, int) and isinstance(y, int):
            out.append(x == y)
        elif x is y:
            out.append(True)
        elif (isinstance(x, int) and x < 0) or (isinstance(y, int) and y < 0):
            out.append(False)
        else:
            return None
    return Const(torch.tensor(out[0] if scalar else out, dtype=torch.bool))


def where(cond: Value, a: Value, b: Value) -> Value | None:
    """Element-wise select between shape values with a condition known at import time."""
    if not involves_shape(a, b) or not isinstance(cond, Const) or cond.value.dim() > 1:
        return None
    ea, eb = elements(a), elements(b)
    if ea is None or eb is None:
        return None
    flags = [bool(v) for v in cond.value.reshape(-1).tolist()]
    n = max(len(flags), len(ea[0]), len(eb[0]))
    if any(len(lst) not in (1, n) for lst in (flags, ea[0], eb[0])):
        return None

    def pick(lst: list, i: int):
        return lst[0] if len(lst) == 1 else lst[i]

    out = [pick(ea[0], i) if pick(flags, i) else pick(eb[0], i) for i in range(n)]
    return make_shape(out, scalar=cond.value.dim() == 0 and ea[1] and eb[1])


def product(ctx, value: Value) -> SymInt | None:
    """Product of all elements (``ReduceProd`` over a shape, i.e. a number of elements)."""
    e = elements(value)
    if e is None:
        return None
    result: SymInt = 1
    for x in e[0]:
        if isinstance(result, int) and isinstance(x, int):
            result *= x
        elif _is(result, 1):
            result = x
        elif not _is(x, 1):
            result = ctx.graph.call_function(operator.mul, (result, x))
    return result


def gather(value: Value, indices: Value) -> Value | None:
    """``Gather(axis=0)`` of a shape value with indices known at import time."""
    e = elements(value)
    if e is None or not isinstance(value, ShapeValue) or not isinstance(indices, Const) or indices.value.dim() > 1:
        return None
    elems = e[0]
    n = len(elems)
    picked = [elems[i + n if i < 0 else i] for i in indices.value.reshape(-1).tolist()]
    return make_shape(picked, scalar=indices.value.dim() == 0)


def concat(values: list[Value]) -> Value | None:
    """``Concat(axis=0)`` of 1-d shape values."""
    if not involves_shape(*values):
        return None
    out: list[SymInt] = []
    for v in values:
        e = elements(v)
        if e is None or e[1]:
            return None
        out.extend(e[0])
    return make_shape(out)
