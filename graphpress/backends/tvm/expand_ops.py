"""Expand graphpress ops into plain ATen ops and constants, for consumers that only know ATen.

A backend that imports an ATen graph and nothing else (TVM's Relax importer) cannot read a
``torch.ops.graphpress.*`` call. :func:`expand_graphpress_ops` returns a copy of a graph in which
every such call is replaced by ATen ops computing the op's function, with the stored weight
turned into a float constant once, at expansion time, by the same function the op's eager
implementation calls (so the constant is bit-identical to the weight eager multiplies by):

==================== ======================================================================
op                   expansion
==================== ======================================================================
``linear_act``       ``aten.linear`` + the activation op (``relu``, ``gelu``, ``silu``, ...)
``circulant_linear`` ``aten.linear`` with ``W = expand(c)``: dense ``(p*b, q*b)`` constant
``circulant_conv2d`` ``aten.conv2d`` with ``W = expand(c).permute(2, 3, 0, 1)``
``qlinear``          ``W_hat = q * s`` (and the int32 bias times ``in_scale * s``) as float
                     constants; the input (static grid, or per-tensor dynamic range) and the
                     output fake quantization stay ops: ``div``, ``round``, ``add``,
                     ``clamp``, ``sub``, ``mul`` (dynamic: ``min``/``max`` reductions too)
``qconv2d``          the same around ``aten.conv2d``
``wlinear_nbits``    ``aten.linear`` with the dequantized ``(out, in)`` constant; with
                     ``act_bits=8`` the per-(row, group) int8 input quantization as ops
                     (``pad``, ``unflatten``, ``abs``, ``max.dim``, ``reciprocal``, ``round``)
``quantize_act``     the fake-quantization ops
``wlinear_load``     ``aten.linear`` with the dequantized constant
``wembedding_load``  ``aten.embedding`` of the dequantized table
``sparse_linear``    ``where(abs(x) > t, x, 0)`` then ``matmul`` with ``Wt`` (+ bias)
``sparse_linear_pc`` ``where(abs(x) * s > t, x, 0)`` then ``matmul`` (+ bias)
``sparse_unpack``    the dense weight as a constant
==================== ======================================================================

Exactness. Every expansion computes the op's function with the same constants and the same
element-wise steps in the same dtypes (float32 true division, round half to even, eager's
``qmax / amax`` as ``reciprocal(amax) * qmax``, the fake-quantized input rounded to the input's
dtype and read back in float32). In torch the expanded graph is therefore bit-identical to the
original (measured on every op and on float32, bfloat16 and float16 inputs) except where the
eager op sums its product in another order: ``circulant_linear`` on its FFT path (dense weights
above 512 x 512) and ``sparse_linear(_pc)`` through the C++ kernel (batch <= 16), which agree to
float rounding. A compiler that sums in yet another order (TVM) agrees to float rounding too; on
the ops that round *activations* (``qlinear``, ``qconv2d``, ``quantize_act``, ``wlinear_nbits``
with ``act_bits > 0``) such a difference can move a value sitting on a rounding tie by one grid
step (see :mod:`graphpress.ir.ops_quant`): rare, not excluded.

Cost. The expansion is *dense*: each weight becomes a constant of its full dense size (float32,
the ops' compute dtype; circulant and bitmask-stored weights keep their own dtype) -- ``b`` times
the compact circulant storage, about ``32 / bits`` times the k-bit codes, ``1 / (kept fraction +
1/32)`` times a bitmask-stored float32 weight -- and the sparse activation ops multiply densely
(reading every weight row: their speed exists only in the torch backend's kernel). A tensor read
by several ops (a tied embedding and classifier) is expanded once. :func:`expand_graphpress_ops`
reports per op what it did and the bytes.

An op with no expansion here, or whose stored weight is not a constant of the graph, raises
:class:`ExpansionError` naming the node.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.ir.circulant import expand
from graphpress.ir.graph import Graph, op_name
from graphpress.ir.ops_circulant import conv_weight
from graphpress.ir.ops_quant import _bias_float
from graphpress.ir.ops_sparse_store import unpack_sparse
from graphpress.ir.quant import (
    ACT_QMAX,
    ACT_QMIN,
    dequantize_nbits,
    dequantize_per_channel,
    num_blocks,
)
from graphpress.ir.rewrite import (
    add_constant,
    arg,
    constant_tensor,
    erase_dead,
    fake_mode,
    insert_call,
    mutated_targets,
)

aten = torch.ops.aten
gp = torch.ops.graphpress


class ExpansionError(ValueError):
    """A graphpress op that cannot be expanded into ATen ops (one line naming the node)."""


def graphpress_nodes(graph: Graph) -> list[fx.Node]:
    """The ``call_function`` nodes of ``graph`` on an op in a ``graphpress*`` namespace."""
    return [n for n in graph.nodes if n.op == "call_function" and str(getattr(n.target, "namespace", "")).startswith("graphpress")]


# ---------------------------------------------------------------------------- the rewrite context
@dataclass
class _Op:
    """What the report says about one op: its nodes, the dense constants made, the stored bytes they replace."""

    nodes: int = 0
    shapes: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    stored_bytes: int = 0


@dataclass
class _Rewrite:
    """One expansion in progress: the graph copy, the node being replaced, shared constants, report."""

    graph: Graph
    mutated: set[str]
    mode: Any = None
    node: fx.Node | None = None
    constants: dict[tuple, fx.Node] = field(default_factory=dict)
    ops: dict[str, _Op] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)

    @property
    def entry(self) -> _Op:
        return self.ops.setdefault(op_name(self.node), _Op())

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return insert_call(self.graph, target, args, kwargs, before=self.node)

    def stored(self, value: Any, what: str, *, count: bool = True) -> torch.Tensor:
        """The constant tensor behind argument ``value`` of the current node, or ExpansionError;
        ``count``: part of a stored weight, its bytes count once in the op's report."""
        t = constant_tensor(self.graph, value, self.mutated)
        if t is None:
            raise ExpansionError(
                f"{op_name(self.node)} node {self.node.name!r}: its {what} is not a constant of the graph, "
                "so it cannot be expanded to a dense weight; lower with a backend that runs graphpress ops (onnxruntime, torch)"
            )
        if count and str(value.target) not in self.counted:
            self.counted.add(str(value.target))
            self.entry.stored_bytes += t.numel() * t.element_size()
        return t.detach()

    def constant(self, key: tuple, hint: str, make: Callable[[], torch.Tensor], *, weight: bool = False) -> fx.Node:
        """A ``get_attr`` for ``make()``, registered once per ``key`` (the stored tensors it derives
        from); ``weight``: a dense weight, reported with its shape and bytes."""
        node = self.constants.get(key)
        if node is None:
            value = make().contiguous()
            node = add_constant(self.graph, hint, value, before=_first_op(self.graph), parameter=False, mode=self.mode)
            self.constants[key] = node
            if weight:
                self.entry.shapes.append("x".join(map(str, value.shape)) + " " + str(value.dtype).removeprefix("torch."))
                self.entry.dense_bytes += value.numel() * value.element_size()
        return node

    # ------------------------------------------------------------------ float32 in and out
    @staticmethod
    def val(value: Any) -> torch.Tensor | None:
        """The (fake) tensor of a node: the captured graph has one on every node; the nodes made
        here compute in float32 and carry none (None)."""
        v = value.meta.get("val") if isinstance(value, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    def as_float(self, value: Any) -> Any:
        """``value.float()`` as an op when it is not float32 already (None stays None)."""
        v = self.val(value)
        if value is None or v is None or v.dtype == torch.float32:
            return value
        return self.call(aten._to_copy.default, value, dtype=torch.float32)

    def float_constant(self, value: Any, hint: str) -> Any:
        """A float32 version of a tensor argument: a converted constant, or a cast op."""
        t = constant_tensor(self.graph, value, self.mutated) if value is not None else None
        if t is None or t.dtype == torch.float32:
            return self.as_float(value)
        return self.constant(("float", str(value.target)), hint, lambda: t.detach().float())

    def cast_back(self, y: fx.Node, x: Any) -> fx.Node:
        """``y.to(x.dtype)`` as an op when ``x`` is not float32 (the ops return their input's dtype)."""
        v = self.val(x)
        if v is None or v.dtype == torch.float32:
            return y
        return self.call(aten._to_copy.default, y, dtype=v.dtype)

    def round_trip(self, y: fx.Node, x: Any) -> fx.Node:
        """``y.to(x.dtype).float()``: a fake-quantized input that eager returns in ``x``'s dtype and
        the product then reads in float32."""
        back = self.cast_back(y, x)
        return back if back is y else self.call(aten._to_copy.default, back, dtype=torch.float32)


def _first_op(graph: Graph) -> fx.Node:
    """Where new ``get_attr`` nodes go: before the first node that is neither a placeholder nor a get_attr."""
    return next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))


def _hint(value: Any, suffix: str) -> str:
    return f"{str(getattr(value, 'target', 'w')).replace('.', '_')}_{suffix}"


# ---------------------------------------------------------------------------- shared pieces
def _fake_quant(rw: _Rewrite, x: Any, scale: float, zero_point: int) -> fx.Node:
    """:func:`graphpress.ir.quant.fake_quant_act` as ATen ops: ``(clamp(round(x / s) + z, 0, 255) - z) * s``
    (``s`` a float32 value, so the float scalar ops compute in float32 as eager does)."""
    s = float(torch.tensor(scale, dtype=torch.float32))
    q = rw.call(aten.round.default, rw.call(aten.div.Scalar, rw.as_float(x), s))
    q = rw.call(aten.clamp.default, rw.call(aten.add.Scalar, q, int(zero_point)), ACT_QMIN, ACT_QMAX)
    return rw.call(aten.mul.Scalar, rw.call(aten.sub.Scalar, q, int(zero_point)), s)


def _fake_quant_dynamic(rw: _Rewrite, x: Any) -> fx.Node:
    """:func:`graphpress.ir.quant.fake_quant_act_dynamic` as ATen ops: the per-tensor range of ``x``
    itself (``DynamicQuantizeLinear``'s formula), then the uint8 grid."""
    xf = rw.as_float(x)
    lo = rw.call(aten.clamp_max.default, rw.call(aten.min.default, xf), 0.0)
    hi = rw.call(aten.clamp_min.default, rw.call(aten.max.default, xf), 0.0)
    s = rw.call(aten.div.Scalar, rw.call(aten.sub.Tensor, hi, lo), 255.0)
    one = rw.constant(("one",), "expand_one", lambda: torch.ones((), dtype=torch.float32))
    s = rw.call(aten.where.self, rw.call(aten.gt.Scalar, s, 0.0), s, one)
    z = rw.call(aten.clamp.default, rw.call(aten.round.default, rw.call(aten.div.Tensor, rw.call(aten.neg.default, lo), s)), ACT_QMIN, ACT_QMAX)
    q = rw.call(aten.round.default, rw.call(aten.div.Tensor, xf, s))
    q = rw.call(aten.clamp.default, rw.call(aten.add.Tensor, q, z), ACT_QMIN, ACT_QMAX)
    return rw.call(aten.mul.Tensor, rw.call(aten.sub.Tensor, q, z), s)


def _fake_quant_blockwise(rw: _Rewrite, x: Any, block: int, bits: int) -> fx.Node:
    """:func:`graphpress.ir.quant.fake_quant_act_blockwise` as ATen ops: symmetric int-``bits``
    per (row, group of ``block``) along the last dim, ``round(x * (qmax / amax)) * (amax / qmax)``
    with eager's ``qmax / amax = reciprocal(amax) * qmax`` (``Tensor.__rtruediv__``)."""
    v = rw.val(x)
    if v is None:
        raise ExpansionError(f"{op_name(rw.node)} node {rw.node.name!r}: its input has no recorded shape (meta['val']); re-capture the graph")
    rank, k = v.dim(), int(v.shape[-1])
    nb = num_blocks(k, block)
    xf = rw.as_float(x)
    if nb * block != k:
        xf = rw.call(aten.constant_pad_nd.default, xf, [0, nb * block - k], 0.0)
    xb = rw.call(aten.unflatten.int, xf, rank - 1, [nb, block])
    qmax = 2 ** (bits - 1) - 1
    amax = rw.call(operator.getitem, rw.call(aten.max.dim, rw.call(aten.abs.default, xb), rank, True), 0)
    s = rw.call(aten.div.Scalar, amax, qmax)
    zero = rw.constant(("zero",), "expand_zero", lambda: torch.zeros((), dtype=torch.float32))
    inv = rw.call(aten.where.self, rw.call(aten.gt.Scalar, amax, 0.0), rw.call(aten.mul.Scalar, rw.call(aten.reciprocal.default, amax), qmax), zero)
    q = rw.call(aten.clamp.default, rw.call(aten.round.default, rw.call(aten.mul.Tensor, xb, inv)), -qmax, qmax)
    out = rw.call(aten.flatten.using_ints, rw.call(aten.mul.Tensor, q, s), rank - 1, rank)
    if nb * block != k:
        out = rw.call(aten.slice.Tensor, out, rank - 1, 0, k)
    return out


_ACTIVATIONS: dict[str, tuple[Any, dict[str, Any]]] = {
    "relu": (aten.relu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "silu": (aten.silu.default, {}),
    "sigmoid": (aten.sigmoid.default, {}),
    "tanh": (aten.tanh.default, {}),
}


# ---------------------------------------------------------------------------- one expander per op
def _linear_act(rw: _Rewrite, n: fx.Node) -> fx.Node:
    x, w, b, act = (arg(n, i, name) for i, name in enumerate(("x", "weight", "bias", "act")))
    if act not in _ACTIVATIONS:
        raise ExpansionError(f"graphpress.linear_act node {n.name!r}: unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)}")
    target, kwargs = _ACTIVATIONS[act]
    return rw.call(target, rw.call(aten.linear.default, x, w, b), **kwargs)


def _circulant_linear(rw: _Rewrite, n: fx.Node) -> fx.Node:
    x, c, b = arg(n, 0, "x"), arg(n, 1, "c"), arg(n, 2, "bias")
    ct = rw.stored(c, "compact weight c")
    w = rw.constant(("circulant", str(c.target)), _hint(c, "dense"), lambda: expand(ct), weight=True)
    return rw.call(aten.linear.default, x, w, b)


def _circulant_conv2d(rw: _Rewrite, n: fx.Node) -> fx.Node:
    x, c, b = arg(n, 0, "x"), arg(n, 1, "c"), arg(n, 2, "bias")
    stride, padding, dilation = (list(arg(n, i, name)) for i, name in ((3, "stride"), (4, "padding"), (5, "dilation")))
    ct = rw.stored(c, "compact weight c")
    w = rw.constant(("circulant_conv", str(c.target)), _hint(c, "dense"), lambda: conv_weight(ct), weight=True)
    return rw.call(aten.conv2d.default, x, w, b, stride, padding, dilation, 1)


def _dequantized(rw: _Rewrite, w_q: Any, w_scale: Any) -> fx.Node:
    q, s = rw.stored(w_q, "int8 weight"), rw.stored(w_scale, "weight scale")
    key = ("per_channel", str(w_q.target), str(w_scale.target))
    return rw.constant(key, _hint(w_q, "dequant"), lambda: dequantize_per_channel(q, s, 0), weight=True)


def _static_bias(rw: _Rewrite, bias: Any, in_scale: float, w_scale: Any) -> fx.Node | None:
    if bias is None:
        return None
    bt, s = rw.stored(bias, "int32 bias", count=False), rw.stored(w_scale, "weight scale")
    return rw.constant(("bias", str(bias.target), in_scale, str(w_scale.target)), _hint(bias, "float"), lambda: _bias_float(bt, in_scale, s))


def _quantized_tail(rw: _Rewrite, y: fx.Node, x: Any, out_scale: float, out_zero_point: int, relu: bool) -> fx.Node:
    if relu:
        y = rw.call(aten.relu.default, y)
    if out_scale > 0:
        y = _fake_quant(rw, y, out_scale, out_zero_point)
    return rw.cast_back(y, x)


def _qlinear(rw: _Rewrite, n: fx.Node) -> fx.Node:
    names = ("x", "w_q", "w_scale", "bias", "in_scale", "in_zero_point", "out_scale", "out_zero_point", "relu")
    x, w_q, w_scale, bias, in_scale, in_zp, out_scale, out_zp, relu = (arg(n, i, name) for i, name in enumerate(names))
    w = _dequantized(rw, w_q, w_scale)
    if in_scale > 0:
        xh, b = _fake_quant(rw, x, in_scale, in_zp), _static_bias(rw, bias, in_scale, w_scale)
    else:
        xh, b = _fake_quant_dynamic(rw, x), rw.float_constant(bias, _hint(bias, "float"))
    y = rw.call(aten.linear.default, rw.round_trip(xh, x), w, b)
    return _quantized_tail(rw, y, x, out_scale, out_zp, relu)


def _qconv2d(rw: _Rewrite, n: fx.Node) -> fx.Node:
    names = ("x", "w_q", "w_scale", "bias", "stride", "padding", "dilation", "groups",
             "in_scale", "in_zero_point", "out_scale", "out_zero_point", "relu")
    x, w_q, w_scale, bias, stride, padding, dilation, groups, in_scale, in_zp, out_scale, out_zp, relu = (
        arg(n, i, name) for i, name in enumerate(names))
    w = _dequantized(rw, w_q, w_scale)
    xh = rw.round_trip(_fake_quant(rw, x, in_scale, in_zp), x)
    y = rw.call(aten.conv2d.default, xh, w, _static_bias(rw, bias, in_scale, w_scale), list(stride), list(padding), list(dilation), int(groups))
    return _quantized_tail(rw, y, x, out_scale, out_zp, relu)


def _nbits_weight(rw: _Rewrite, packed: Any, scales: Any, zeros: Any, n_in: int, bits: int, group_size: int) -> fx.Node:
    p, s = rw.stored(packed, "packed weight"), rw.stored(scales, "scales")
    z = None if zeros is None else rw.stored(zeros, "zero points")
    key = ("nbits", str(packed.target), str(scales.target), str(getattr(zeros, "target", None)), n_in, bits, group_size)
    return rw.constant(key, _hint(packed, "dequant"), lambda: dequantize_nbits(p, s, z, bits, group_size, n_in), weight=True)


def _wlinear_nbits(rw: _Rewrite, n: fx.Node) -> fx.Node:
    names = ("x", "packed", "scales", "zeros", "bias", "in_features", "bits", "group_size", "act_bits")
    x, packed, scales, zeros, bias, n_in, bits, group_size, act_bits = (arg(n, i, name) for i, name in enumerate(names))
    w = _nbits_weight(rw, packed, scales, zeros, int(n_in), int(bits), int(group_size))
    xh = rw.round_trip(_fake_quant_blockwise(rw, x, int(group_size), int(act_bits)), x) if act_bits else rw.as_float(x)
    return rw.cast_back(rw.call(aten.linear.default, xh, w, rw.float_constant(bias, _hint(bias, "float"))), x)


def _quantize_act(rw: _Rewrite, n: fx.Node) -> fx.Node:
    x, scale, zp = arg(n, 0, "x"), arg(n, 1, "scale"), arg(n, 2, "zero_point")
    return rw.cast_back(_fake_quant(rw, x, scale, zp), x)


def _wlinear_load(rw: _Rewrite, n: fx.Node) -> fx.Node:
    names = ("x", "packed", "scales", "zeros", "bias", "in_features", "bits", "group_size")
    x, packed, scales, zeros, bias, n_in, bits, group_size = (arg(n, i, name) for i, name in enumerate(names))
    w = _nbits_weight(rw, packed, scales, zeros, int(n_in), int(bits), int(group_size))
    return rw.cast_back(rw.call(aten.linear.default, rw.as_float(x), w, rw.float_constant(bias, _hint(bias, "float"))), x)


def _wembedding_load(rw: _Rewrite, n: fx.Node) -> fx.Node:
    names = ("ids", "packed", "scales", "zeros", "dim", "bits", "group_size")
    ids, packed, scales, zeros, dim, bits, group_size = (arg(n, i, name) for i, name in enumerate(names))
    table = _nbits_weight(rw, packed, scales, zeros, int(dim), int(bits), int(group_size))
    return rw.call(aten.embedding.default, table, ids)


def _sparse_product(rw: _Rewrite, n: fx.Node, keep: fx.Node, xf: Any) -> fx.Node:
    wt, bias = arg(n, 1, "wt"), arg(n, 2, "bias")
    zero = rw.constant(("zero",), "expand_zero", lambda: torch.zeros((), dtype=torch.float32))
    xh = rw.call(aten.where.self, keep, xf, zero)
    y = rw.call(aten.matmul.default, xh, rw.float_constant(wt, _hint(wt, "float")))
    if bias is not None:
        y = rw.call(aten.add.Tensor, y, rw.float_constant(bias, _hint(bias, "float")))
    return rw.cast_back(y, arg(n, 0, "x"))


def _sparse_linear(rw: _Rewrite, n: fx.Node) -> fx.Node:
    xf = rw.as_float(arg(n, 0, "x"))
    keep = rw.call(aten.gt.Scalar, rw.call(aten.abs.default, xf), float(arg(n, 3, "threshold")))
    return _sparse_product(rw, n, keep, xf)


def _sparse_linear_pc(rw: _Rewrite, n: fx.Node) -> fx.Node:
    xf = rw.as_float(arg(n, 0, "x"))
    thresholds, scores = arg(n, 3, "thresholds"), arg(n, 4, "scores")
    a = rw.call(aten.abs.default, xf)
    if scores is not None:
        a = rw.call(aten.mul.Tensor, a, rw.float_constant(scores, _hint(scores, "float")))
    keep = rw.call(aten.gt.Tensor, a, rw.float_constant(thresholds, _hint(thresholds, "float")))
    return _sparse_product(rw, n, keep, xf)


def _sparse_unpack(rw: _Rewrite, n: fx.Node) -> fx.Node:
    bitmask, values, shape = arg(n, 0, "bitmask"), arg(n, 1, "values"), arg(n, 2, "shape")
    m, v = rw.stored(bitmask, "bitmask"), rw.stored(values, "values")
    key = ("sparse", str(bitmask.target), str(values.target))
    return rw.constant(key, _hint(values, "dense"), lambda: unpack_sparse(m, v, shape), weight=True)


_ROUNDS = "activation fake quantization kept as round/clamp ops (exact up to summation order, which can move a rounding tie one grid step)"
_SUM_ORDER = "exact up to summation order"

#: op overload -> (expander, how it is lowered: the text of the report).
EXPANSIONS: dict[Any, tuple[Callable[[_Rewrite, fx.Node], fx.Node], str]] = {
    gp.linear_act.default: (_linear_act, f"aten.linear + activation op ({_SUM_ORDER})"),
    gp.circulant_linear.default: (_circulant_linear, f"dense expansion: expand(c) as a float constant + aten.linear ({_SUM_ORDER})"),
    gp.circulant_conv2d.default: (_circulant_conv2d, f"dense expansion: expand(c) conv weight as a constant + aten.conv2d ({_SUM_ORDER})"),
    gp.qlinear.default: (_qlinear, f"int8 weight dequantized to a float constant + aten.linear; {_ROUNDS}"),
    gp.qconv2d.default: (_qconv2d, f"int8 weight dequantized to a float constant + aten.conv2d; {_ROUNDS}"),
    gp.wlinear_nbits.default: (_wlinear_nbits, f"k-bit weight dequantized to a float constant + aten.linear; act_bits=8: {_ROUNDS}"),
    gp.quantize_act.default: (_quantize_act, "uint8 fake quantization as div/round/add/clamp/sub/mul ops (exact)"),
    gp.wlinear_load.default: (_wlinear_load, f"k-bit weight dequantized to a float constant + aten.linear ({_SUM_ORDER})"),
    gp.wembedding_load.default: (_wembedding_load, "k-bit table dequantized to a float constant + aten.embedding (exact)"),
    gp.sparse_linear.default: (_sparse_linear, f"where(|x| > t, x, 0) + dense matmul ({_SUM_ORDER}; reads every weight row)"),
    gp.sparse_linear_pc.default: (_sparse_linear_pc, f"where(|x| * s > t, x, 0) + dense matmul ({_SUM_ORDER}; reads every weight row)"),
    gp.sparse_unpack.default: (_sparse_unpack, "dense weight materialized as a constant (exact)"),
}


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _summary(entry: _Op, how: str) -> str:
    text = f"{how}; {entry.nodes} node{'s' if entry.nodes != 1 else ''}"
    if entry.shapes:
        text += f"; dense constants {', '.join(entry.shapes)} ({_kib(entry.dense_bytes)}, stored {_kib(entry.stored_bytes)})"
    return text


def expand_graphpress_ops(graph: Graph) -> tuple[Graph, dict[str, str]]:
    """A copy of ``graph`` with every graphpress op replaced by ATen ops and constants (module docstring).

    Parameters
    ----------
    graph : Graph
        Left unchanged.

    Returns
    -------
    expanded : Graph
        ``graph`` itself when it holds no graphpress op, else a clone in which none is left (the
        stored compact tensors the expansion no longer reads are removed from it).
    report : dict of str to str
        ``"graphpress.<op>" -> how it was lowered``: the method and exactness, the node count
        and, for weight expansions, the dense constants' shapes and bytes against the stored ones.

    Raises
    ------
    ExpansionError
        One line naming the first node whose op has no expansion or whose weight is not a constant.
    """
    if not graphpress_nodes(graph):
        return graph, {}
    unknown = [n for n in graphpress_nodes(graph) if n.target not in EXPANSIONS]
    if unknown:
        n = unknown[0]
        raise ExpansionError(f"{op_name(n)} node {n.name!r} has no ATen expansion (graphpress/backends/tvm/expand_ops.py); "
                             "lower with a backend that runs graphpress ops (onnxruntime, torch)")
    g = graph.clone()
    rw = _Rewrite(g, mutated_targets(g), fake_mode(g))
    how: dict[str, str] = {}
    for node in graphpress_nodes(g):
        rw.node = node
        expander, how[op_name(node)] = EXPANSIONS[node.target]
        new = expander(rw, node)
        rw.entry.nodes += 1
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
        node.replace_all_uses_with(new)
        inputs = list(node.all_input_nodes)
        g.gm.graph.erase_node(node)
        erase_dead(g, inputs)
    g.remove_unused_tensors()
    g.recompile()
    return g, {op: _summary(entry, how[op]) for op, entry in sorted(rw.ops.items())}


__all__ = ["EXPANSIONS", "ExpansionError", "expand_graphpress_ops", "graphpress_nodes"]
