"""Linears that read the same input become one linear and slices of its output.

Math: for ``y_i = W_i x + b_i`` (``i = 1..n``, all reading the same ``x``),

    y = [W_1; ...; W_n] x + [b_1; ...; b_n],   y_i = y[..., o_i : o_i + out_i]

with ``o_i`` the rows before ``W_i``. An attention block's ``q``/``k``/``v`` projections and an MLP's
``gate``/``up`` are the usual groups: one ``MatMulNBits`` instead of three (two) per layer, which on
a 0.1B Llama's decode step is a tenth of ONNX Runtime's kernel launches.

Exactness: every output value is the dot product of the same weight row with the same input.
``graphpress::wlinear_nbits`` rows keep their codes, scales and zero points (the grid is per
(row, group)), and its int8 activation rounding is per (row of ``x``, group): a function of ``x``
alone, the same for every member. Only the order a BLAS kernel sums a longer output in may
differ, so the pass is exact up to float32 rounding and checked with ``allclose``.

Matches ``aten.linear`` (float weights) and ``graphpress::wlinear_nbits`` (k-bit groups) nodes
whose weights (and biases) are constant tensors and that agree on everything but their output
rows (dtype, bits, group size, activation bits, zero points present or not, bias present or not).
Does not match (skip counted with the reason): a linear alone on its input, members that
disagree (a 4-bit ``q`` beside an 8-bit ``k``: grouped by agreement, so only the agreeing ones
fuse), weights computed in the graph.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

import graphpress.ir.ops_quant  # noqa: F401 -- registers graphpress::wlinear_nbits
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import Skips, erase_dead
from graphpress.passes.base import PassResult, register

LINEAR = torch.ops.aten.linear.default
NBITS = torch.ops.graphpress.wlinear_nbits.default


@dataclass(frozen=True)
class FuseParallelLinearsConfig:
    """``min_group``: fuse groups of at least this many linears (>= 2)."""

    version: int = 1
    min_group: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.min_group, int) or self.min_group < 2:
            from graphpress.errors import PassError

            raise PassError(f"fuse-parallel-linears: min_group must be an integer >= 2, got {self.min_group!r}")


def _key(graph: Graph, node: fx.Node) -> tuple | str:
    """What members of a group must share, or why ``node`` cannot be a member."""
    tensors = [graph.tensor_of(a) if isinstance(a, fx.Node) else a for a in node.args[1:5 if node.target is NBITS else 3]]
    if any(isinstance(a, fx.Node) and t is None for a, t in zip(node.args[1:], tensors)):
        return "weight computed in the graph"
    if node.target is LINEAR:
        w = tensors[0]
        bias = tensors[1] if len(tensors) > 1 else None
        if w is None or w.dim() != 2:
            return "weight computed in the graph"
        return ("linear", w.dtype, w.shape[1], bias is None)
    packed, scales, zeros, bias = tensors
    in_features, bits, group_size, act_bits = node.args[5:9]
    return ("nbits", packed.shape[1:], scales.dtype, in_features, bits, group_size, act_bits, zeros is None, bias is None)


@register("fuse-parallel-linears")
class FuseParallelLinears:
    """Concatenate linears that share their input into one (module docstring)."""

    exact = True
    Config = FuseParallelLinearsConfig

    def __init__(self, config: FuseParallelLinearsConfig = FuseParallelLinearsConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        skips = Skips()
        by_input: dict[fx.Node, list[fx.Node]] = defaultdict(list)  # members in graph order
        for node in graph.gm.graph.nodes:
            if node.op == "call_function" and node.target in (LINEAR, NBITS) and isinstance(node.args[0], fx.Node):
                by_input[node.args[0]].append(node)
        groups, fused_rows, fused_linears = 0, 0, 0
        for members in by_input.values():
            if len(members) < 2:
                skips.add("a linear alone on its input")
                continue
            agreeing: dict[tuple, list[fx.Node]] = defaultdict(list)
            for node in members:
                key = _key(graph, node)
                if isinstance(key, str):
                    skips.add(key)
                else:
                    agreeing[key].append(node)
            if len(agreeing) > 1:
                skips.add("linears on one input that disagree (dtype, bits, group size, bias or zero points)", len(agreeing) - 1)
            for group in agreeing.values():
                if len(group) < self.config.min_group:
                    continue
                fused_rows += self._fuse(graph, group)
                groups += 1
                fused_linears += len(group)
        if groups:
            graph.remove_unused_tensors()
            graph.recompile()
        stats = {"groups_fused": groups, "linears_fused": fused_linears, "rows": fused_rows, "skipped": dict(skips)}
        return PassResult(graph, changed=bool(groups), stats=stats)

    @staticmethod
    def _fuse(graph: Graph, group: list[fx.Node]) -> int:
        """Replace ``group`` (in graph order) by one linear and slices; returns its output rows."""
        g = graph.gm.graph
        first = group[0]
        nbits = first.target is NBITS
        n_tensor_args = 4 if nbits else 2

        def tensors(i: int) -> list[torch.Tensor | None]:
            return [graph.tensor_of(n.args[1 + i]) if len(n.args) > 1 + i and n.args[1 + i] is not None else None for n in group]

        rows = [int(t.shape[0]) for t in tensors(0)]
        cat: list[torch.Tensor | None] = []
        for i in range(n_tensor_args):
            parts = tensors(i)
            if parts[0] is None:
                cat.append(None)
                continue
            if nbits and i in (1, 2):  # scales / zero points: flat, row-major per output row
                parts = [p.reshape(r, -1) for p, r in zip(parts, rows)]
                cat.append(torch.cat(parts, 0).reshape(-1).contiguous())
            else:
                cat.append(torch.cat(parts, 0).contiguous())
        names = ["packed", "scales", "zeros", "bias"] if nbits else ["weight", "bias"]
        hint = str(first.name) + "_fused"
        with g.inserting_before(first):
            args = [first.args[0]]
            for name, t in zip(names, cat):
                args.append(None if t is None else g.get_attr(graph.add_tensor(f"{hint}_{name}", t, parameter=not nbits)))
            if nbits:
                fused = g.call_function(NBITS, tuple(args) + tuple(first.args[5:9]))
            else:
                fused = g.call_function(LINEAR, tuple(args))
        start = 0
        for node, r in zip(group, rows):
            with g.inserting_before(node):
                part = g.call_function(torch.ops.aten.slice.Tensor, (fused, -1, start, start + r))
            node.replace_all_uses_with(part)
            start += r
        erase_dead(graph, group)  # the members, and the weights only they read
        return start


__all__ = ["FuseParallelLinears", "FuseParallelLinearsConfig"]
