"""A readable per-layer summary of a graph: op, source module, output shape, params, FLOPs.

FLOPs count a multiply-add as 2 and are given for the example inputs' batch size. Only
matrix-like ops (conv, linear, matmul and friends) are counted; element-wise work is small
next to them and is left out rather than guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from graphpress.ir.graph import op_name
from graphpress.ir.opsets import CONV_ANY, MATMUL_LIKE

if TYPE_CHECKING:
    from graphpress.ir.graph import Graph

aten = torch.ops.aten


@dataclass
class LayerRow:
    name: str
    op: str
    module: str
    shape: tuple
    params: int
    flops: int


@dataclass
class GraphSummary:
    name: str
    rows: list[LayerRow] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)
    params: int = 0
    param_bytes: int = 0
    flops: int = 0
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: {len(self.rows)} ops, {self.params:,} params ({self.param_bytes / 1e6:.2f} MB), "
            f"{self.flops / 1e6:.2f} MFLOPs",
            "inputs:  " + ", ".join(f"{s.name}{list(s.shape)} {s.dtype}" for s in self.inputs),
            "outputs: " + ", ".join(f"{s.name}{list(s.shape)} {s.dtype}" for s in self.outputs),
            "ops:     " + ", ".join(f"{k} x{v}" for k, v in self.op_counts.items()),
        ]
        for r in self.rows:
            if r.params or r.flops:
                lines.append(f"  {r.name:<28} {r.op:<24} {r.module:<28} {str(list(r.shape)):<20} {r.params:>10,} {r.flops:>14,}")
        return "\n".join(lines)


def _val_shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in val.shape)
    return ()


def _numel(shape: tuple) -> int:
    return math.prod(d for d in shape if isinstance(d, int)) if shape else 0


def node_flops(node: fx.Node) -> int:
    """Multiply-add FLOPs of a matrix-like node from its ``meta['val']`` shapes, else 0."""
    out = _val_shape(node)
    packet = getattr(node.target, "overloadpacket", None)
    args = node.args
    if packet in CONV_ANY and len(args) > 1:
        w = _val_shape(args[1])
        if len(w) >= 3:
            return 2 * _numel(out) * _numel(w[1:])
    if packet in MATMUL_LIKE:
        a_idx = 1 if packet in (aten.addmm, aten.baddbmm) else 0
        a = _val_shape(args[a_idx]) if isinstance(args[a_idx], fx.Node) else ()
        if a:
            return 2 * _numel(out) * int(a[-1])
    # graphpress custom ops declare their own cost
    cost = getattr(node.target, "_graphpress_flops", None)
    if callable(cost):
        return int(cost(node))
    return 0


def summarize(graph: "Graph") -> GraphSummary:
    """Build a :class:`GraphSummary` (runs shape propagation on the example inputs first)."""
    graph.verify()
    s = GraphSummary(graph.name, inputs=graph.input_specs, outputs=graph.output_specs)
    for node in graph.call_nodes():
        params = 0
        for a in node.all_input_nodes:
            t = graph.tensor_of(a)
            if t is not None and t.dtype.is_floating_point:
                params += t.numel()
        flops = node_flops(node)
        s.rows.append(LayerRow(node.name, op_name(node), graph.source_module(node), _val_shape(node), params, flops))
        s.flops += flops
    s.op_counts = graph.op_counts()
    s.params = graph.parameter_count()
    s.param_bytes = graph.parameter_bytes()
    return s
