"""Which linear / conv layers of a graph a weight pass can rewrite, and what they see on calibration data.

Shared by ``quantize-layerwise``, ``awq-scale``, ``sparsify-activations`` and ``prune``
(``block-circulant`` has its own scanner: it refuses grouped convs and needs output positions).

Eligible: ``aten.linear`` with a constant 2-D float weight, and ``aten.conv2d`` with a constant
4-D float weight (any ``groups``). A layer is named by its source module path (``fc1``,
``layers.0.attention.wq``), falling back to the node name; a module called twice gets ``#1``...

A ``relu`` that is the *only* user of a layer is recorded with it (``QLayer.relu``): the
quantized op applies it before its output quantization (the fused form ONNX Runtime's integer
kernels run).

:func:`record` runs the graph on calibration batches with an :class:`torch.fx.Interpreter` and
keeps the values of chosen nodes (detached, per batch): layer inputs for activation ranges, AWQ
and LIM, layer outputs for the error statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import RELU
from graphpress.ir.rewrite import arg, is_op

aten = torch.ops.aten


@dataclass
class QLayer:
    """One quantizable layer."""

    name: str
    node: fx.Node
    kind: str  # "linear" | "conv2d"
    weight_target: str
    out_features: int
    in_features: int  # per group for convs (the weight's dim 1)
    kernel: tuple[int, int]
    groups: int
    relu: fx.Node | None

    @property
    def params(self) -> int:
        """Weights in the layer (``out * in * kh * kw``)."""
        return self.out_features * self.in_features * self.kernel[0] * self.kernel[1]

    @property
    def input_node(self) -> fx.Node:
        return self.node.args[0]

    @property
    def output_node(self) -> fx.Node:
        """The node whose value leaves the layer (the fused relu when there is one)."""
        return self.relu if self.relu is not None else self.node

    def bias_node(self) -> fx.Node | None:
        b = arg(self.node, 2, "bias")
        return b if isinstance(b, fx.Node) else None


def _sole_relu(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and is_op(users[0], *RELU) and users[0].args[0] is node:
        return users[0]
    return None


def find_layers(graph: Graph, *, convs: bool = True) -> tuple[list[QLayer], dict[str, str]]:
    """Eligible layers in graph order and ``{name: reason}`` for linear/conv nodes that are not.

    ``convs=False`` rejects every conv (weight-only quantization has no conv kernel to lower to).
    """
    layers: list[QLayer] = []
    rejected: dict[str, str] = {}
    for node in graph.call_nodes(aten.linear, aten.conv2d):
        name = graph.source_module(node) or node.name
        w_node = node.args[1] if len(node.args) > 1 else None
        w = graph.tensor_of(w_node) if isinstance(w_node, fx.Node) else None
        if w is None or not w.dtype.is_floating_point:
            rejected[name] = "weight is not a constant float tensor"
            continue
        if node.target.overloadpacket is aten.linear:
            if w.dim() != 2:
                rejected[name] = f"linear weight has {w.dim()} dims"
                continue
            layers.append(QLayer(name, node, "linear", str(w_node.target), w.shape[0], w.shape[1], (1, 1), 1, _sole_relu(node)))
            continue
        if not convs:
            rejected[name] = "conv2d has no weight-only integer kernel in ONNX Runtime (use activations: int8)"
            continue
        if w.dim() != 4:
            rejected[name] = f"conv2d weight has {w.dim()} dims"
            continue
        groups = arg(node, 6, "groups", 1)
        padding = arg(node, 4, "padding", [0, 0])
        if padding == "same":
            dilation = arg(node, 5, "dilation", [1, 1])
            dilation = [dilation] * 2 if isinstance(dilation, int) else list(dilation) * (2 // len(dilation))
            if any(d * (k - 1) % 2 for d, k in zip(dilation, w.shape[2:])):
                rejected[name] = "padding='same' is asymmetric for this kernel (QLinearConv pads symmetrically)"
                continue
        layers.append(
            QLayer(name, node, "conv2d", str(w_node.target), w.shape[0], w.shape[1], (w.shape[2], w.shape[3]), int(groups), _sole_relu(node))
        )
    seen: dict[str, int] = {}
    for layer in layers:
        k = seen.get(layer.name, 0)
        seen[layer.name] = k + 1
        if k:
            layer.name = f"{layer.name}#{k}"
    return layers, rejected


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


@torch.no_grad()
def record(graph: Graph, nodes: Iterable[fx.Node], batches: Sequence[tuple[torch.Tensor, ...]] | None = None) -> dict[str, list[torch.Tensor]]:
    """Values of ``nodes`` on each calibration batch: ``{node name: [value per batch]}``."""
    batches = list(batches) if batches is not None else graph.calibration_batches()
    wanted = {n.name for n in nodes}
    out: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
    for batch in batches:
        rec = _Recorder(graph.gm, wanted)
        rec.run(*batch)
        for name in wanted:
            if name in rec.values:
                out[name].append(rec.values[name])
    return out


def rows(values: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """Layer inputs as a ``(rows, channels)`` matrix: the last dim for linears, dim 1 (NCHW) for convs."""
    if kind == "conv2d":
        return torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1).t() for v in values])
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in values])


__all__ = ["RELU", "QLayer", "find_layers", "record", "rows"]
