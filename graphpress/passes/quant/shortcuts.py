"""Quantized residual shortcuts: one value, one grid, for the layer that reads it and the sum that adds it.

In a residual network the block output ``y = relu(a + s)`` feeds the next block twice: the
first quantized layer of the block (which rounds ``y`` to its uint8 grid ``(scale, zp)``) and the
shortcut sum ``a' + y`` at the block's end. Left alone, the sum reads the *float* ``y``, so the
exported graph keeps ``DQ -> Add -> Relu`` in float and ONNX Runtime cannot fuse it.

The rewrite (``shortcuts="quantized"`` in ``quantize-layerwise``) inserts ``q = quantize_act(y,
scale, zp)`` (:func:`graphpress.ir.ops_quant.quantize_act`) and routes to it

* every static quantized op that reads ``y`` on that same grid (it requantizes ``q`` exactly:
  ``Q(DQ(q)) = q``), and
* every residual sum reading ``y``, directly or through a shortcut of slices, zero padding and
  views (ResNet's option-A downsampling shortcut ``pad(y[:, :, ::2, ::2])``); at the end of such
  a chain a second ``quantize_act`` on the same grid is inserted before the sum. It is exact:
  slicing and viewing keep values on the grid and a zero pad is the grid point ``zp``.

Other readers of ``y`` (a float layer, a layer on another grid) keep the float value.

Exactness: lossy by design -- the shortcut now carries ``y``'s rounding error (at most
``scale / 2`` per value, the same the next layer already sees). In exchange the sum's inputs are
both dequantized values and its relu'd output is quantized next, the pattern ONNX Runtime fuses
into ``QLinearAdd`` with the relu dropped into the quantizer (ORT's own ``quantize_static`` does
the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.ir.graph import Graph
from graphpress.ir.opsets import QUANT_SHORTCUT_OVERLOADS
from graphpress.ir.rewrite import insert_call

aten = torch.ops.aten
QUANTIZE_ACT = torch.ops.graphpress.quantize_act.default
_STATIC_OPS = (torch.ops.graphpress.qlinear.default, torch.ops.graphpress.qconv2d.default)
_SUM = aten.add.Tensor


def _static_grid(node: Any) -> tuple[float, int] | None:
    """``(in_scale, in_zero_point)`` of a static ``qlinear`` / ``qconv2d`` node, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _STATIC_OPS:
        return None
    in_scale, in_zp = node.args[-5], node.args[-4]
    return (float(in_scale), int(in_zp)) if in_scale > 0 else None


def _output_grid(node: fx.Node) -> tuple[float, int] | None:
    """The grid a node's output already lies on: a static op's output quantization or a ``quantize_act``."""
    if node.op != "call_function":
        return None
    if node.target is QUANTIZE_ACT:
        return float(node.args[1]), int(node.args[2])
    if node.target in _STATIC_OPS and node.args[-3] > 0:
        return float(node.args[-3]), int(node.args[-2])
    return None


def _is_shortcut_op(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target in QUANT_SHORTCUT_OVERLOADS:
        return True
    # a zero pad keeps values on any grid whose zero point is representable (0 -> zp)
    if node.target is aten.constant_pad_nd.default:
        return float(node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0.0)) == 0.0
    if node.target is aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        return mode == "constant" and (value is None or float(value) == 0.0)
    return False


def _is_sum(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is _SUM and node.kwargs.get("alpha", 1) == 1


def _sums_through_shortcut(node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """``(chain_end, sum)`` for each residual sum ``node`` reaches through shortcut ops only
    (``chain_end`` is the sum's input: ``node`` itself when the sum reads it directly)."""
    found: list[tuple[fx.Node, fx.Node]] = []
    for user in node.users:
        if _is_sum(user):
            found.append((node, user))
        elif _is_shortcut_op(user) and user.args[0] is node:
            found.extend(_sums_through_shortcut(user))
    return found


def quantize_shortcuts(graph: Graph) -> list[dict[str, Any]]:
    """Apply the rewrite of the module docstring to every static quantized op's input.

    Returns
    -------
    list of dict
        One entry per quantized value: ``value`` (node name), ``scale``, ``zero_point``,
        ``sums`` (names of the residual sums now reading it) and ``layers`` (quantized ops reading it).
    """
    gm = graph.gm
    done: list[dict[str, Any]] = []
    for op in list(gm.graph.nodes):
        grid = _static_grid(op)
        if grid is None:
            continue
        y = op.args[0]
        if not isinstance(y, fx.Node) or _output_grid(y) is not None:
            continue  # already on a grid: nothing float is left to share
        sums = _sums_through_shortcut(y)
        if not sums:
            continue
        layers = [u for u in y.users if _static_grid(u) == grid]
        direct = [u for u in y.users if _is_sum(u) or (_is_shortcut_op(u) and _sums_through_shortcut(u))]
        q = insert_call(graph, QUANTIZE_ACT, (y, grid[0], grid[1]), before=_first_user(gm, y), like=y)
        for user in layers + direct:
            user.replace_input_with(y, q)
        for end, s in _sums_through_shortcut(q):
            if end is not q:  # a chain of slices / pads: requantize its end on the same grid (exact)
                q_end = insert_call(graph, QUANTIZE_ACT, (end, grid[0], grid[1]), before=s, like=end)
                s.replace_input_with(end, q_end)
        done.append({"value": y.name, "scale": grid[0], "zero_point": grid[1], "sums": sorted(s.name for _, s in sums),
                     "layers": sorted(u.name for u in layers)})
    gm.graph.lint()
    gm.recompile()
    return done


def _first_user(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The earliest node (graph order) reading ``node``: the new op goes right before it."""
    users = set(node.users)
    for n in gm.graph.nodes:
        if n in users:
            return n
    raise AssertionError(f"{node.name} has no users")


__all__ = ["QUANTIZE_ACT", "quantize_shortcuts"]
