"""Exact QDQ clean-ups of an exported ONNX graph, so that ONNX Runtime's QDQ fusions recognise it.

Each graphpress quantized op exports as a self-contained QDQ unit (its own ``Q -> DQ`` on the
input, its own on the output). Where units meet, that leaves patterns ONNX Runtime's own
quantizer never writes and its fusions do not match. Three rewrites, all exact:

``drop requantization``: ``QuantizeLinear(DequantizeLinear(q, s, z), s, z) -> q``
    When one op's output grid is the next op's input grid (a layer reusing its producer's grid,
    or a :func:`graphpress.ir.ops_quant.quantize_act` feeding a quantized layer), the middle
    pair is the identity on the integers: ``round((q - z) s / s) + z = q``. A ``DequantizeLinear``
    of the same codes on the same grid left behind is merged into the first one, so that the
    dequantized value has several readers (a layer and a residual sum): the shared QDQ pair ORT's
    quantizer writes.

``drop relu``: ``QuantizeLinear(Relu(x), s, z) -> QuantizeLinear(x, s, z)`` when ``z`` is the
    lowest code (0 for uint8, -128 for int8) and the relu has no other reader.
    Quantization clamps to ``[qmin, qmax]``, and every negative ``x`` lands on ``qmin`` either way.
    ORT removes such a relu itself, but only after its ``QLinearAdd`` fusion has run: a sum
    followed by a relu stayed a float ``DQ -> Add -> Relu -> Q`` (measured, ResNet-20).

``scalar grids``: a one-element scale or zero point of shape ``[1]`` becomes a scalar ``[]``.
    The exporter writes per-tensor grids as ``[1]``; ONNX Runtime's ``QLinearAdd`` fusion requires
    scalars (measured: 0 of 9 sums fused with ``[1]``, 8 of 9 with scalars). Per-tensor and
    per-axis quantization with one channel are the same function.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_DOMAINS = ("", "ai.onnx")
_QMIN = {np.dtype(np.uint8): 0, np.dtype(np.int8): -128}


def _const(value: Any) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None else None
    return None if tensor is None else tensor.numpy()


def _same(a: Any, b: Any) -> bool:
    x, y = _const(a), _const(b)
    return x is not None and y is not None and x.dtype == y.dtype and x.size == y.size and bool(np.array_equal(x.ravel(), y.ravel()))


def _params(node: Any) -> tuple[Any, Any, int]:
    inputs = list(node.inputs) + [None] * 3
    axis = node.attributes.get("axis")
    return inputs[1], inputs[2], 1 if axis is None else axis.as_int()


def _params_equal(a: Any, b: Any) -> bool:
    """Same scale, zero point (both given or both left out) and axis: only constants compare equal."""
    (sa, za, xa), (sb, zb, xb) = _params(a), _params(b)
    return xa == xb and _same(sa, sb) and (za is None) == (zb is None) and (za is None or _same(za, zb))


def _is(node: Any, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in _DOMAINS


def _plain_quantize(node: Any) -> bool:
    # saturate (float8) and block_size (blocked quantization) change what Q computes
    return _is(node, "QuantizeLinear") and node.attributes.get("saturate") is None and node.attributes.get("block_size") is None


def drop_requantizations(graph: Any) -> int:
    """The first rewrite of the module docstring on an ``onnx_ir`` graph; returns how many ``Q`` went."""
    dropped = 0
    for node in list(graph):
        if not _plain_quantize(node) or node.inputs[0] is None:
            continue
        dq = node.inputs[0].producer()
        if not _is(dq, "DequantizeLinear") or not _params_equal(node, dq):
            continue
        codes = dq.inputs[0]
        if codes.dtype != node.outputs[0].dtype or node.outputs[0].is_graph_output():
            continue
        readers = [use.node for use in node.outputs[0].uses()]
        node.outputs[0].replace_all_uses_with(codes)
        graph.remove(node, safe=True)
        dropped += 1
        for twin in readers:
            if _is(twin, "DequantizeLinear") and twin is not dq and _params_equal(twin, dq) and not twin.outputs[0].is_graph_output():
                twin.outputs[0].replace_all_uses_with(dq.outputs[0])
                graph.remove(twin, safe=True)
    for node in reversed(list(graph)):  # a DQ whose only reader was a dropped Q
        if _is(node, "DequantizeLinear") and not any(v.uses() or v.is_graph_output() for v in node.outputs):
            graph.remove(node, safe=True)
    if dropped:  # grids only the dropped pairs read
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                del graph.initializers[name]
    return dropped


def drop_relus_before_quantize(graph: Any) -> int:
    """The second rewrite of the module docstring; returns how many ``Relu`` went."""
    dropped = 0
    for node in list(graph):
        if not _is(node, "Relu"):
            continue
        out = node.outputs[0]
        readers = [use.node for use in out.uses()]
        if out.is_graph_output() or not readers or not all(_plain_quantize(r) and r.inputs[0] is out for r in readers):
            continue
        zps = [_const(r.inputs[2]) if len(r.inputs) > 2 else None for r in readers]
        if any(z is None or z.dtype not in _QMIN or not np.all(z == _QMIN[z.dtype]) for z in zps):
            continue
        out.replace_all_uses_with(node.inputs[0])
        graph.remove(node, safe=True)
        dropped += 1
    return dropped


def scalar_grids(graph: Any) -> int:
    """The third rewrite of the module docstring; returns how many initializers became scalars.
    Only initializers that every reader uses as a ``Q`` / ``DQ`` scale or zero point change."""
    import onnx_ir as ir

    changed = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tuple(tensor.shape) != (1,) or value.is_graph_input() or value.is_graph_output():
            continue
        uses = list(value.uses())
        if not uses or not all((_is(u.node, "QuantizeLinear") or _is(u.node, "DequantizeLinear")) and u.idx in (1, 2) for u in uses):
            continue
        value.const_value = ir.tensor(tensor.numpy().reshape(()), name=value.name)
        value.shape = ir.Shape([])
        changed += 1
    return changed


def clean_qdq(model: Any) -> dict[str, int]:
    """The three rewrites on ``model`` (an ``onnx_ir.Model``), in place; returns the counts."""
    relus = drop_relus_before_quantize(model.graph)
    requant = drop_requantizations(model.graph)
    return {"requantizations": requant, "relus": relus, "scalar_grids": scalar_grids(model.graph)}


__all__ = ["clean_qdq", "drop_relus_before_quantize", "drop_requantizations", "scalar_grids"]
