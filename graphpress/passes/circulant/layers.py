"""Which layers of a graph can become block-circulant, and their shapes.

Eligible: ``aten.linear`` with a constant 2-D weight, and ``aten.conv2d`` with a constant 4-D
weight and ``groups == 1`` (circulance runs over the output x input channel dims at each kernel
position; grouped and depthwise convs have no such matrix). A layer is named by its source
module path (``layer1.0.conv1``), falling back to the node name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphpress.ir.circulant import can_use
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import pair  # noqa: F401 -- re-exported: circulant modules import it from here

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
    """Eligible layers in graph order, and ``{node name: reason}`` for linear/conv ops that are not.

    Runs shape propagation first (``graph.verify()``) so spatial sizes are known.
    """
    graph.verify()
    layers: list[Layer] = []
    rejected: dict[str, str] = {}
    for node in graph.call_nodes(aten.linear, aten.conv2d):
        name = graph.source_module(node) or node.name
        w = graph.tensor_of(node.args[1]) if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
        if w is None or not w.dtype.is_floating_point:
            rejected[name] = "weight is not a constant float tensor"
            continue
        if node.target.overloadpacket is aten.linear:
            if w.dim() != 2:
                rejected[name] = f"linear weight has {w.dim()} dims"
                continue
            layers.append(Layer(name, node, "linear", str(node.args[1].target), w.shape[0], w.shape[1], (1, 1), _positions(node)))
            continue
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if groups != 1:
            rejected[name] = f"grouped conv (groups={groups})"
            continue
        layers.append(
            Layer(name, node, "conv2d", str(node.args[1].target), w.shape[0], w.shape[1], (w.shape[2], w.shape[3]), _positions(node))
        )
    # a module called twice would get two names equal: make them unique
    seen: dict[str, int] = {}
    for layer in layers:
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        if k:
            layer.name = f"{layer.name}#{k}"
    return layers, rejected


__all__ = ["Layer", "find_layers"]
