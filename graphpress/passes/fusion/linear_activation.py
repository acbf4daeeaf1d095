"""Fuse linear/addmm + relu/gelu/silu/sigmoid/tanh into one graphpress::linear_act op: act(x @ W^T + b).

Pattern (the linear's output read only by the activation)::

    y = aten.linear(x, W, b)            | aten.addmm(b, x, W^T) | aten.mm(x, W^T)
    z = act(y)                          act in relu, gelu, silu, sigmoid, tanh (or in-place forms)
    ==>
    z = graphpress.linear_act(x, W, b, act)

``graphpress::linear_act`` (:mod:`graphpress.ir.ops`) computes exactly the same operations in
the same order -- the matrix product with bias, then the activation -- but applies the
activation in place on the product, so the torch backend saves one intermediate allocation;
the ONNX backend lowers it to ``MatMul + Add + activation``, which ONNX Runtime fuses itself.

Exact: the same float operations in the same order (bit-identical on the torch backend up to
the choice of ``addmm`` vs ``linear`` kernel); checked with allclose.

``gelu(approximate="tanh")`` becomes ``act="gelu_tanh"`` and is enabled by ``gelu`` in the
config. For ``addmm``/``mm`` the weight operand must be a 2-D matrix ``M``; ``W`` is ``M``'s
transpose source when ``M = t(W)`` (or ``transpose``/``permute``), else an ``aten.t(M)`` node is
inserted (``fold-constants`` folds it when ``M`` is a constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from graphpress.ir import ops as gp_ops  # registers torch.ops.graphpress.linear_act
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import Skips, arg, erase_dead, insert_call, is_op, node_val, packet, users_other_than
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten

# activation packet -> config name
_ACTS = {
    aten.relu: "relu", aten.relu_: "relu",
    aten.gelu: "gelu", aten.gelu_: "gelu",
    aten.silu: "silu", aten.silu_: "silu",
    aten.sigmoid: "sigmoid", aten.sigmoid_: "sigmoid",
    aten.tanh: "tanh", aten.tanh_: "tanh",
}
SUPPORTED = ("relu", "gelu", "silu", "sigmoid", "tanh")


@dataclass(frozen=True)
class FuseLinearActivationConfig:
    """``activations``: which activations to fuse (subset of relu, gelu, silu, sigmoid, tanh)."""

    version: int = 1
    activations: tuple[str, ...] = ("relu", "gelu", "silu")

    def __post_init__(self):
        bad = [a for a in self.activations if a not in SUPPORTED]
        if bad:
            from graphpress.errors import PassError

            raise PassError(
                f"pass 'fuse-linear-activation': unknown activation(s) {', '.join(map(repr, bad))}; "
                f"supported: {', '.join(SUPPORTED)}"
            )


@register("fuse-linear-activation")
class FuseLinearActivation:
    """Fuse linear + activation into ``graphpress::linear_act`` (see module docstring)."""

    exact = True
    Config = FuseLinearActivationConfig

    def __init__(self, config: FuseLinearActivationConfig = FuseLinearActivationConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        skipped = Skips()
        fused: dict[str, int] = {}
        for lin in list(graph.call_nodes(aten.linear, aten.addmm, aten.mm)):
            acts = [u for u in lin.users if packet(u) in _ACTS and u.args and u.args[0] is lin]
            if not acts:
                continue  # no activation after this linear: not a candidate
            act_node = acts[0]
            if users_other_than(lin, act_node):
                skipped.add("linear output has other users")
                continue
            name = _act_name(act_node)
            if name is None:
                skipped.add("unsupported activation options")
                continue
            family = "gelu" if name.startswith("gelu") else name
            if family not in self.config.activations:
                skipped.add(f"activation '{family}' not enabled in config")
                continue
            operands = _operands(graph, lin)
            if isinstance(operands, str):
                skipped.add(operands)
                continue
            x, w, b = operands
            fused_node = insert_call(
                graph, torch.ops.graphpress.linear_act.default, (x, w, b, name), before=act_node, like=act_node
            )
            graph.annotations(fused_node)["fused"] = ["linear", family]
            act_node.replace_all_uses_with(fused_node)
            graph.gm.graph.erase_node(act_node)  # in-place forms are impure: erase explicitly
            erase_dead(graph, [lin])
            fused[family] = fused.get(family, 0) + 1
        if fused:
            graph.recompile()
        total = sum(fused.values())
        return PassResult(graph, changed=total > 0, stats={"fused": total, "by_activation": fused, "skipped": dict(skipped)})


def _act_name(act: fx.Node) -> str | None:
    """``linear_act``'s ``act`` string for activation node ``act`` (None for unsupported options)."""
    name = _ACTS[packet(act)]
    if name == "gelu":
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(arg(act, 1, "approximate", "none"))
    elif len(act.args) > 1 or act.kwargs:
        return None
    return name if name in gp_ops.LINEAR_ACTIVATIONS else None


def _operands(graph: Graph, lin: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | str:
    """``(x, W, b)`` for ``linear_act``, or why the producer cannot be expressed as ``linear``."""
    if is_op(lin, aten.linear):
        return lin.args[0], lin.args[1], arg(lin, 2, "bias")
    if is_op(lin, aten.addmm):
        if arg(lin, 3, "beta", 1) != 1 or arg(lin, 4, "alpha", 1) != 1:
            return "addmm has alpha/beta scaling"
        bias, x, mat2 = lin.args[:3]
        bval, mval = node_val(graph, bias), node_val(graph, mat2)
        if not isinstance(bval, torch.Tensor) or not isinstance(mval, torch.Tensor):
            return "addmm operand shapes unknown"
        if bval.dim() != 1 or bval.shape[0] != mval.shape[1]:
            return "addmm bias is not a per-feature vector"
    else:  # aten.mm
        x, mat2 = lin.args[:2]
        bias = None
    weight = _untransposed(mat2)
    if weight is None:
        val = mat2.meta.get("val")
        weight = insert_call(graph, aten.t.default, (mat2,), before=lin, like=lin)
        if isinstance(val, torch.Tensor):
            weight.meta["val"] = val.t()
        else:
            weight.meta.pop("val", None)
    return x, weight, bias


def _untransposed(mat2: fx.Node) -> fx.Node | None:
    """``W`` when 2-D ``mat2`` is ``W`` transposed (``t``, ``transpose``, ``permute``)."""
    if not isinstance(mat2, fx.Node):
        return None
    if is_op(mat2, aten.t):
        return mat2.args[0]
    if is_op(mat2, aten.transpose) and int(mat2.args[1]) % 2 != int(mat2.args[2]) % 2:
        return mat2.args[0]
    if is_op(mat2, aten.permute) and [int(d) % 2 for d in mat2.args[1]] == [1, 0]:
        return mat2.args[0]
    return None
