"""Shape and data-movement converters: Shape, Size, Reshape, Flatten, Transpose, Concat, Split,
Slice, Gather, GatherElements, Squeeze, Unsqueeze, Expand, Tile, Pad, ConstantOfShape, Constant,
Range.

Shape computations are kept symbolic (:class:`~..values.ShapeValue`): ``Shape`` yields
``[sym_size(x, 0), 3, 32, 32]`` rather than a tensor, ``Gather``/``Slice``/``Concat``/
``Unsqueeze`` of such values are evaluated element-wise at import time, and ``Reshape``/
``Expand``/``ConstantOfShape`` receive plain lists of ints and symbolic ints.  The emitted module
therefore contains ``torch.reshape(x, [sym_size_int, 8, 4])`` -- valid for every batch size and
traceable by ``torch.export`` with a dynamic batch dimension.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .. import symbolic
from ..emitter import Emitter
from ..registry import OnnxNode, converter
from ..values import Const, ShapeValue, SymInt, Value, make_shape

# Exporters write "to the end" as INT64_MAX (or INT32_MAX) and "before the start" as INT64_MIN.
_HUGE = 2**31 - 1


# ---------------------------------------------------------------------------- shape queries


@converter("Shape")
def shape(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Sizes of ``x`` (dims ``start:end`` from opset 15): ints where static, ``sym_size`` else."""
    if isinstance(x, ShapeValue):
        sizes: list[SymInt] = [] if x.scalar else [len(x.elems)]
    else:
        sizes = ctx.sizes(x)
    return make_shape(sizes[node.attr("start", 0) : node.attr("end", None)])


@converter("Size")
def size(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Number of elements, as a 0-d int64 value."""
    if isinstance(x, Const):
        return Const(torch.tensor(x.value.numel(), dtype=torch.int64))
    if ctx.shape(x) is None:
        return ShapeValue([ctx.method("numel", x)], scalar=True)
    count = symbolic.product(ctx, make_shape(ctx.sizes(x)))
    return make_shape([count], scalar=True)


# ---------------------------------------------------------------------------- reshaping


@converter("Reshape", since=5)
def reshape(ctx: Emitter, node: OnnxNode, x: Value, target: Value) -> Value:
    """Reshape; a 0 in the target copies the input's size at that position unless ``allowzero``."""
    dims = ctx.ints(target, "shape")
    if not node.attr("allowzero", 0):
        dims = [ctx.dim(x, i) if isinstance(d, int) and d == 0 else d for i, d in enumerate(dims)]
    if isinstance(x, ShapeValue):
        if len(dims) == 0 and len(x.elems) == 1:
            return ShapeValue(x.elems, scalar=True)
        if len(dims) == 1:
            return ShapeValue(x.elems, scalar=False)
    return ctx.call(torch.reshape, x, dims)


@converter("Flatten")
def flatten(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """2-D view ``[prod(shape[:axis]), prod(shape[axis:])]``."""
    axis = node.attr("axis", 1)
    if axis < 0:
        axis += ctx.rank(x)
    if axis == 0:
        return ctx.call(torch.reshape, x, (1, -1))
    shape_ = ctx.shape(x)
    if shape_ is not None and axis == len(shape_):
        return ctx.call(torch.reshape, x, (-1, 1))
    y = ctx.call(torch.flatten, x, axis)
    return ctx.call(torch.flatten, y, 0, axis - 1) if axis > 1 else y


@converter("Transpose")
def transpose(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Permute dims (default: reverse them)."""
    perm = node.attr("perm")
    if perm is None:
        perm = list(reversed(range(ctx.rank(x))))
    if list(perm) == sorted(perm):
        return x
    return ctx.call(torch.permute, x, tuple(perm))


@converter("Squeeze", since=1)
def squeeze_v1(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Squeeze with an ``axes`` attribute (opset < 13)."""
    return _squeeze(ctx, x, node.attr("axes"))


@converter("Squeeze", since=13)
def squeeze_v13(ctx: Emitter, node: OnnxNode, x: Value, axes: Value = None) -> Value:
    """Squeeze with an optional ``axes`` input (opset >= 13)."""
    return _squeeze(ctx, x, ctx.ints(axes, "axes"))


def _static_axes(ctx: Emitter, axes: list[SymInt]) -> list[int]:
    if not all(isinstance(a, int) for a in axes):
        ctx.fail("axes must be constant")
    return [int(a) for a in axes]


def _squeeze(ctx: Emitter, x: Value, axes: list[SymInt] | None) -> Value:
    if isinstance(x, ShapeValue) and not x.scalar and len(x.elems) == 1 and axes in (None, [0], [-1]):
        return ShapeValue(x.elems, scalar=True)
    if axes is None:
        return ctx.call(torch.squeeze, x)
    axes = _static_axes(ctx, axes)
    return ctx.call(torch.squeeze, x, axes[0] if len(axes) == 1 else tuple(axes))


@converter("Unsqueeze", since=1)
def unsqueeze_v1(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Unsqueeze with an ``axes`` attribute (opset < 13)."""
    return _unsqueeze(ctx, x, node.attr("axes") or [])


@converter("Unsqueeze", since=13)
def unsqueeze_v13(ctx: Emitter, node: OnnxNode, x: Value, axes: Value) -> Value:
    """Unsqueeze with an ``axes`` input (opset >= 13)."""
    return _unsqueeze(ctx, x, ctx.ints(axes, "axes"))


def _unsqueeze(ctx: Emitter, x: Value, axes: list[SymInt]) -> Value:
    axes = _static_axes(ctx, axes)
    if isinstance(x, ShapeValue) and x.scalar and axes in ([0], [-1]):
        return ShapeValue(x.elems, scalar=False)
    if any(a < 0 for a in axes):
        # Negative axes count in the *output* rank.
        out_rank = ctx.rank(x) + len(axes)
        axes = [a + out_rank if a < 0 else a for a in axes]
    for a in sorted(axes):
        x = ctx.call(torch.unsqueeze, x, a)
    return x


# ---------------------------------------------------------------------------- joining / splitting


@converter("Concat")
def concat(ctx: Emitter, node: OnnxNode, *xs: Value) -> Value:
    """``torch.cat``; concatenated shape values stay symbolic."""
    axis = node.attr("axis", 0)
    if axis in (0, -1):
        folded = symbolic.concat(list(xs))
        if folded is not None:
            return folded
    return ctx.call(torch.cat, [x for x in xs if x is not None], dim=axis)


def _split(ctx: Emitter, node: OnnxNode, x: Value, sizes: list[SymInt] | None):
    axis = node.attr("axis", 0)
    count = node.attr("num_outputs", len(node.outputs))
    if not sizes:
        length = ctx.dim(x, axis)
        if not isinstance(length, int):
            parts = ctx.call(torch.chunk, x, count, axis)  # same ceil-sized chunks as ONNX
            return tuple(ctx.call(operator.getitem, parts, i) for i in range(count))
        chunk = -(-length // count)
        sizes = [chunk] * (count - 1) + [length - chunk * (count - 1)]
    parts = ctx.call(torch.split, x, list(sizes), axis)
    return tuple(ctx.call(operator.getitem, parts, i) for i in range(len(sizes)))


@converter("Split", since=2)
def split_v2(ctx: Emitter, node: OnnxNode, x: Value):
    """Split with a ``split`` attribute (opset < 13); equal parts when absent."""
    return _split(ctx, node, x, node.attr("split"))


@converter("Split", since=13)
def split_v13(ctx: Emitter, node: OnnxNode, x: Value, split: Value = None):
    """Split with a ``split`` input (opset >= 13; ``num_outputs`` attribute from opset 18)."""
    return _split(ctx, node, x, ctx.ints(split, "split"))


# ---------------------------------------------------------------------------- slicing / indexing


@converter("Slice", since=1)
def slice_v1(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Slice with ``starts``/``ends``/``axes`` attributes (opset < 10)."""
    return _slice(ctx, x, node.attr("starts"), node.attr("ends"), node.attr("axes"), None)


@converter("Slice", since=10)
def slice_v10(ctx: Emitter, node: OnnxNode, x: Value, starts: Value, ends: Value, axes: Value = None, steps: Value = None) -> Value:
    """Slice with ``starts``/``ends``/``axes``/``steps`` inputs (opset >= 10)."""
    return _slice(ctx, x, ctx.ints(starts, "starts"), ctx.ints(ends, "ends"), ctx.ints(axes, "axes"), ctx.ints(steps, "steps"))


def _readable_start(value: SymInt) -> SymInt | None:
    # Drop bounds that mean "from the start"/"to the end" so the code reads x[:, 1:].
    return None if isinstance(value, int) and value == 0 else value


def _readable_end(value: SymInt) -> SymInt | None:
    return None if isinstance(value, int) and value >= _HUGE else value


def _slice(ctx: Emitter, x: Value, starts, ends, axes, steps) -> Value:
    """ONNX slicing == Python slicing (clamping, negative indices) for each listed axis."""
    if axes is None:
        axes = list(range(len(starts)))
    axes = _static_axes(ctx, axes)
    steps = steps or [1] * len(starts)
    if not all(isinstance(s, int) and s != 0 for s in steps):
        ctx.fail("steps must be constant and non-zero")
    if isinstance(x, ShapeValue):
        if axes not in ([0], [-1]) or not isinstance(starts[0], int) or not isinstance(ends[0], int):
            x = ctx.lift(x)
        else:
            return make_shape(x.elems[starts[0] : ends[0] : steps[0]])

    shape_ = ctx.shape(x)
    rank = None if shape_ is None else len(shape_)
    if rank is not None:
        axes = [ctx.axis(a, rank) for a in axes]
    index: dict[int, slice] = {}
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step > 0:
            index[axis] = slice(_readable_start(start), _readable_end(end), None if step == 1 else step)
            continue
        # torch has no negative-step slicing: flip the axis, then slice forward.
        length = ctx.dim(x, axis)
        full = isinstance(start, int) and (start == -1 or start >= _HUGE) and isinstance(end, int) and end <= -_HUGE
        if full and step == -1:
            x = ctx.call(torch.flip, x, [axis])
            continue
        if not (isinstance(length, int) and isinstance(start, int) and isinstance(end, int)):
            ctx.fail("negative-step Slice needs a static size and constant bounds")
        picked = range(length)[start:end:step]
        x = ctx.call(torch.flip, x, [axis])
        if len(picked) == 0:
            index[axis] = slice(0, 0)
        else:
            first = length - 1 - picked[0]
            index[axis] = slice(first or None, first + (len(picked) - 1) * -step + 1, None if step == -1 else -step)
    if not index:
        return x
    if all(a >= 0 for a in index):
        key: tuple = tuple(index.get(a, slice(None)) for a in range(max(index) + 1))
    elif all(a < 0 for a in index):
        key = (Ellipsis,) + tuple(index.get(a, slice(None)) for a in range(min(index), 0))
    else:
        ctx.fail("mixed positive/negative slice axes need a known input rank")
    return ctx.call(operator.getitem, x, key)


@converter("Gather")
def gather(ctx: Emitter, node: OnnxNode, x: Value, indices: Value) -> Value:
    """``take`` along one axis: ``select`` for a constant scalar index, indexing otherwise."""
    axis = node.attr("axis", 0)
    if isinstance(x, ShapeValue) and axis in (0, -1):
        folded = symbolic.gather(x, indices)
        if folded is not None:
            return folded
    static = ctx.static(indices)
    if static is not None and static.dim() == 0:
        return ctx.call(torch.select, x, axis, int(static))
    # Advanced indexing with one index tensor places the index dims at ``axis`` -- exactly
    # ONNX Gather, negative indices included.
    if axis >= 0:
        key: tuple = (slice(None),) * axis + (indices,)
    else:
        key = (Ellipsis, indices) + (slice(None),) * (-axis - 1)
    return ctx.call(operator.getitem, x, key[0] if len(key) == 1 else key)


@converter("GatherElements", since=11)
def gather_elements(ctx: Emitter, node: OnnxNode, x: Value, indices: Value) -> Value:
    """``torch.gather``; negative indices (allowed by ONNX, not torch) are wrapped first."""
    axis = node.attr("axis", 0)
    static = ctx.static(indices)
    if static is None or bool((static < 0).any()):
        length = ctx.dim(x, axis)
        indices = ctx.call(torch.where, ctx.call(operator.lt, indices, 0), ctx.call(operator.add, indices, length), indices)
    if ctx.dtype(indices) not in (None, torch.int64):
        indices = ctx.method("long", indices)
    return ctx.call(torch.gather, x, axis, indices)


# ---------------------------------------------------------------------------- broadcasting / tiling


@converter("Expand", since=8)
def expand(ctx: Emitter, node: OnnxNode, x: Value, target: Value) -> Value:
    """Bidirectional broadcast of ``x`` to ``target``.

    ``Tensor.expand`` cannot shrink, but ONNX allows target dims of 1 where ``x`` is bigger (the
    result keeps ``x``'s size); those become ``-1`` ("keep"), as do dims already equal.
    """
    dims = ctx.ints(target, "shape")
    xshape = ctx.shape(x)
    if xshape is None:
        return ctx.method("expand", x, dims)
    rank = len(xshape)
    n = max(rank, len(dims))
    dims = [1] * (n - len(dims)) + list(dims)
    args: list[SymInt] = []
    for i, d in enumerate(dims):
        j = i - (n - rank)  # matching dim of x, negative for new leading dims
        if j < 0:
            args.append(d)
        elif isinstance(d, int) and (d == 1 or d == xshape[j]):
            args.append(-1)
        else:
            args.append(d)
    if n == rank and all(isinstance(a, int) and a == -1 for a in args):
        return x  # already the target shape
    return ctx.method("expand", x, args)


@converter("Tile", since=6)
def tile(ctx: Emitter, node: OnnxNode, x: Value, repeats: Value) -> Value:
    """Repeat the whole tensor ``repeats[i]`` times along each dim."""
    return ctx.call(torch.tile, x, ctx.ints(repeats, "repeats"))


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad(ctx: Emitter, node: OnnxNode, x: Value, pads: list[SymInt], value, axes: list[SymInt] | None) -> Value:
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        ctx.fail(f"pad mode {mode!r} is not supported")
    n = len(pads) // 2
    if axes is None:
        rank, axes = n, list(range(n))  # without axes, pads cover every dim
    else:
        rank = ctx.rank(x)
        axes = [ctx.axis(a, rank) for a in _static_axes(ctx, axes)]
    begins = dict(zip(axes, pads[:n]))
    ends = dict(zip(axes, pads[n:]))
    padded = [a for a in axes if not (isinstance(begins[a], int) and begins[a] == 0 and isinstance(ends[a], int) and ends[a] == 0)]
    if not padded:
        return x
    # F.pad lists pads from the last dim backwards, down to the first padded one.
    dims = range(min(padded), rank)
    torch_pads = torch_pad_list([begins.get(a, 0) for a in dims], [ends.get(a, 0) for a in dims])
    if mode == "constant":
        if isinstance(value, (int, float)) and value == 0:
            return ctx.call(F.pad, x, torch_pads)
        return ctx.call(F.pad, x, torch_pads, value=value)
    return ctx.call(F.pad, x, torch_pads, mode=_PAD_MODES[mode])


def torch_pad_list(begins: list, ends: list) -> list:
    """ONNX begin/end pads per dim (first dim first) -> ``F.pad`` order (last dim first)."""
    out: list = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


@converter("Pad", since=2)
def pad_v2(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Pad with ``pads``/``value`` attributes (opset < 11)."""
    return _pad(ctx, node, x, node.attr("pads"), node.attr("value", 0.0), None)


@converter("Pad", since=11)
def pad_v11(ctx: Emitter, node: OnnxNode, x: Value, pads: Value, value: Value = None, axes: Value = None) -> Value:
    """Pad with ``pads``/``constant_value`` (and from opset 18 ``axes``) inputs."""
    fill = 0 if value is None else ctx.number(value, "constant_value")
    return _pad(ctx, node, x, ctx.ints(pads, "pads"), fill, ctx.ints(axes, "axes"))


# ---------------------------------------------------------------------------- tensor creation


@converter("Constant")
def constant(ctx: Emitter, node: OnnxNode) -> Value:
    """A constant from whichever ``value*`` attribute is set."""
    attrs = node.attrs
    if "value" in attrs:
        return Const(attrs["value"])
    if "value_float" in attrs:
        return Const(torch.tensor(attrs["value_float"], dtype=torch.float32))
    if "value_floats" in attrs:
        return Const(torch.tensor(attrs["value_floats"], dtype=torch.float32))
    if "value_int" in attrs:
        return Const(torch.tensor(attrs["value_int"], dtype=torch.int64))
    if "value_ints" in attrs:
        return Const(torch.tensor(attrs["value_ints"], dtype=torch.int64))
    ctx.fail(f"Constant with attribute(s) {sorted(attrs)} is not supported (string/sparse constants)")


@converter("ConstantOfShape", since=9)
def constant_of_shape(ctx: Emitter, node: OnnxNode, target: Value) -> Value:
    """``torch.full(shape, value)``; value/dtype from the 1-element ``value`` attribute."""
    fill = node.attr("value")
    if fill is None:
        fill = torch.zeros(1, dtype=torch.float32)
    return ctx.call(torch.full, ctx.ints(target, "shape"), fill.reshape(-1)[0].item(), dtype=fill.dtype)


@converter("Range", since=11)
def range_(ctx: Emitter, node: OnnxNode, start: Value, limit: Value, delta: Value) -> Value:
    """``torch.arange(start, limit, delta)`` in the inputs' dtype."""
    dtype = ctx.dtype(start) or ctx.dtype(limit) or torch.int64
    bounds = [ctx.number(v) for v in (start, limit, delta)]
    return ctx.call(torch.arange, *bounds, dtype=dtype)
