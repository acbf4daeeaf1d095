"""Which linear / conv layers of a graph a weight pass can rewrite, and what they see on calibration data.

Shared by ``quantize-layerwise``, ``awq-scale``, ``sparsify-activations``, ``prune`` and
``block-circulant`` (which asks for ``grouped=False, symmetric_padding=False``: circulance needs one
``out x in`` matrix per kernel position, and its own lowering pads asymmetric ``'same'`` convs).

Eligible: ``aten.linear`` with a constant 2-D float weight, and ``aten.conv2d`` with a constant
4-D float weight (any ``groups``). A layer is named by :mod:`graphpress.ir.names` (source module
path, falling back to the node name; a module called twice gets ``#1``...). Which of the eligible
layers a pass touches is its ``targets`` / ``ignore`` options (:mod:`graphpress.passes.select`).

A ``relu`` that is the *only* user of a layer is recorded with it (``QLayer.relu``): the
quantized op applies it before its output quantization (the fused form ONNX Runtime's integer
kernels run).

:func:`observe` (:mod:`graphpress.ir.observe`, the one recorder) runs the graph on calibration batches and
hands the value of each chosen node to a callback as it is computed (running reductions: sums,
moments, absolute means, without keeping a batch); :func:`record` keeps the values (detached, per
batch): layer inputs for activation ranges, AWQ and LIM, layer outputs for the error statistics.
Every "run the graph and look at some nodes" in the passes goes through these two; interpreters
that *change* what a node computes (masking, quantization) are not recorders and stay with their
pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from graphpress.ir.graph import Graph
from graphpress.ir.names import layer_name, unique_names
from graphpress.ir.observe import observe
from graphpress.ir.opsets import RELU
from graphpress.ir.rewrite import arg, is_op, pair

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


def find_layers(graph: Graph, *, convs: bool = True, grouped: bool = True, symmetric_padding: bool = True) -> tuple[list[QLayer], dict[str, str]]:
    """Eligible layers in graph order and ``{name: reason}`` for linear/conv nodes that are not.

    Parameters
    ----------
    graph : Graph
        The graph to scan (not modified).
    convs : bool
        False rejects every conv (weight-only quantization has no conv kernel to lower to).
    grouped : bool
        False rejects convs with ``groups != 1`` (block-circulant needs one channel matrix).
    symmetric_padding : bool
        True rejects ``padding='same'`` convs whose padding is asymmetric for their kernel
        (``QLinearConv`` pads symmetrically); False accepts them.

    Returns
    -------
    (list of QLayer, dict of str to str)
        The layers (names unique, :func:`graphpress.ir.names.unique_names`) and the rejected ones.
    """
    layers: list[QLayer] = []
    rejected: dict[str, str] = {}
    for node in graph.call_nodes(aten.linear, aten.conv2d):
        name = layer_name(graph, node)
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
        groups = arg(node, 6, "groups", 1)
        if not grouped and groups != 1:
            rejected[name] = f"grouped conv (groups={groups})"
            continue
        if w.dim() != 4:
            rejected[name] = f"conv2d weight has {w.dim()} dims"
            continue
        padding = arg(node, 4, "padding", [0, 0])
        if symmetric_padding and padding == "same":
            dilation = arg(node, 5, "dilation", [1, 1])
            dilation = [dilation] * 2 if isinstance(dilation, int) else list(dilation) * (2 // len(dilation))
            if any(d * (k - 1) % 2 for d, k in zip(dilation, w.shape[2:])):
                rejected[name] = "padding='same' is asymmetric for this kernel (QLinearConv pads symmetrically)"
                continue
        layers.append(
            QLayer(name, node, "conv2d", str(w_node.target), w.shape[0], w.shape[1], (w.shape[2], w.shape[3]), int(groups), _sole_relu(node))
        )
    for layer, name in zip(layers, unique_names(l.name for l in layers)):
        layer.name = name
    return layers, rejected


def record(graph: Graph, nodes: Iterable[fx.Node], batches: Sequence[tuple[torch.Tensor, ...]] | None = None) -> dict[str, list[torch.Tensor]]:
    """Values of ``nodes`` on each calibration batch: ``{node name: [value per batch]}``."""
    nodes = list(nodes)
    out: dict[str, list[torch.Tensor]] = {n.name: [] for n in nodes}
    observe(graph, nodes, lambda n, v: out[n.name].append(v), batches)
    return out


def rows(values: Sequence[torch.Tensor], kind: str) -> torch.Tensor:
    """Layer inputs as a ``(rows, channels)`` matrix: the last dim for linears, dim 1 (NCHW) for convs."""
    if kind == "conv2d":
        return torch.cat([v.transpose(0, 1).reshape(v.shape[1], -1).t() for v in values])
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in values])


#: im2col rows kept per calibration batch for a conv's H (enough for a well-conditioned H, and
#: bounded memory on large feature maps).
MAX_ROWS_PER_BATCH = 1 << 15


def conv_geometry(layer: QLayer) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(stride, padding, dilation)`` of a conv layer (``padding='same'``: symmetric)."""
    node = layer.node
    stride = tuple(pair(arg(node, 3, "stride", [1, 1]), 1))
    padding = arg(node, 4, "padding", [0, 0])
    dilation = tuple(pair(arg(node, 5, "dilation", [1, 1]), 1))
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): symmetric when the kernel allows it
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, layer.kernel))
    return stride, tuple(pair(padding, 0)), dilation


def input_hessians(layer: QLayer, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H = X^T X`` (float64) of the layer's input rows over the recorded batches ``values``;
    one per conv group (im2col rows, at most :data:`MAX_ROWS_PER_BATCH` per batch). What
    SparseGPT / iCBS / Wanda and group-wise GPTQ weigh a weight's error with."""
    groups = layer.groups if layer.kind == "conv2d" else 1
    hs: list[torch.Tensor] = [torch.zeros(0)] * groups
    gen = torch.Generator().manual_seed(0)
    for v in values:
        if layer.kind == "linear":
            cols = [v.reshape(-1, v.shape[-1]).double()]
        else:
            stride, padding, dilation = conv_geometry(layer)
            unf = F.unfold(v.float(), layer.kernel, dilation=dilation, padding=padding, stride=stride)  # N, C*kh*kw, L
            x = unf.transpose(1, 2).reshape(-1, unf.shape[1])
            if x.shape[0] > MAX_ROWS_PER_BATCH:
                x = x[torch.randperm(x.shape[0], generator=gen)[:MAX_ROWS_PER_BATCH]]
            per = x.shape[1] // groups
            cols = [x[:, g * per : (g + 1) * per].double() for g in range(groups)]
        for g, c in enumerate(cols):
            h = c.t() @ c
            hs[g] = h if hs[g].numel() == 0 else hs[g] + h
    return hs


__all__ = ["MAX_ROWS_PER_BATCH", "RELU", "QLayer", "conv_geometry", "find_layers", "input_hessians", "observe", "record", "rows"]
