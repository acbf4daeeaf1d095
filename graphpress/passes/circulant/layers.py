"""Which layers of a graph can become block-circulant, and their shapes.

Eligible: ``aten.linear`` with a constant 2-D weight, and ``aten.conv2d`` with a constant 4-D
weight and ``groups == 1`` (circulance runs over the output x input channel dims at each kernel
position; grouped and depthwise convs have no such matrix). The scan is the shared one
(:func:`graphpress.passes.layers.find_layers` with ``grouped=False, symmetric_padding=False``), so
layers are named as every other pass names them (source module path, node name fallback, ``#k``
for repeated calls); this module adds the circulant view: output positions and feasible block sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphpress.ir.circulant import can_use
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import pair  # noqa: F401 -- re-exported: circulant modules import it from here
from graphpress.passes.layers import find_layers as shared_find_layers

aten = torch.ops.aten


@dataclass
class Layer:
    """One eligible layer: ``out x in`` matrix (per kernel position for convs)."""

    name: str
    node: fx.Node
    kind: str  # "linear" | "conv2d"
    weight_target: str
    out_features: int
    in_features: int
    kernel: tuple[int, int]  # (1, 1) for linear
    out_positions: int  # output spatial positions per sample (H*W for convs, tokens for linear)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features * self.kernel[0] * self.kernel[1]

    def fits(self, b: int) -> bool:
        return can_use(self.out_features, self.in_features, b)

    def feasible(self, candidates: tuple[int, ...]) -> list[int]:
        """Candidate block sizes this layer can take (always includes 1)."""
        return sorted({1, *(b for b in candidates if self.fits(b))})


def _positions(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() >= 2:
        # every dim but batch and features/channels
        shape = [int(d) for d in val.shape]
        if val.dim() == 4:  # conv: N, C, H, W
            return shape[2] * shape[3]
        n = 1
        for d in shape[1:-1]:
            n *= d
        return n
    return 1


def find_layers(graph: Graph) -> tuple[list[Layer], dict[str, str]]:
    """Eligible layers in graph order, and ``{name: reason}`` for linear/conv ops that are not.

    Runs shape propagation first (``graph.verify()``) so spatial sizes are known.
    """
    graph.verify()
    layers, rejected = shared_find_layers(graph, grouped=False, symmetric_padding=False)
    return [
        Layer(l.name, l.node, l.kind, l.weight_target, l.out_features, l.in_features, l.kernel, _positions(l.node)) for l in layers
    ], rejected


__all__ = ["Layer", "find_layers"]
