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
from graphpress.ir.opsets import ACTIVATION, LINEAR_LIKE
from graphpress.ir.pattern import Match, Rule, apply_rules, argument, op
from graphpress.ir.rewrite import Skips, erase_dead, insert_call, is_op, node_val
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten
SUPPORTED = ("relu", "gelu", "silu", "sigmoid", "tanh")
#: ``act(linear(...))``, the linear read by the activation alone; a node that is not an activation
#: of a linear is no candidate (quiet), a linear with other readers is a skip.
PATTERN = op(
    frozenset(p for p in ACTIVATION if p.__name__.rstrip("_") in SUPPORTED),
    op(LINEAR_LIKE, name="lin", quiet=True, single_use="linear output has other users"),
    name="act",
)


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
        skipped, fused = Skips(), {}
        apply_rules(graph, [Rule("fuse-linear-activation", PATTERN, lambda g, m: _rewrite(g, m, fused), self._check)], skipped)
        if fused:
            graph.recompile()
        total = sum(fused.values())
        return PassResult(graph, changed=total > 0, stats={"fused": total, "by_activation": fused, "skipped": dict(skipped)})

    def _check(self, graph: Graph, m: Match) -> str | None:
        """Refuse activation options ``linear_act`` lacks, activations off in the config, scaled or
        broadcast ``addmm``."""
        name, lin = _act_name(m["act"]), m["lin"]
        if name is None:
            return "unsupported activation options"
        if name.partition("_")[0] not in self.config.activations:
            return f"activation '{name.partition('_')[0]}' not enabled in config"
        if is_op(lin, aten.addmm):
            if argument(lin, "beta", 1) != 1 or argument(lin, "alpha", 1) != 1:
                return "addmm has alpha/beta scaling"
            bval, mval = node_val(graph, lin.args[0]), node_val(graph, lin.args[2])
            if not isinstance(bval, torch.Tensor) or not isinstance(mval, torch.Tensor):
                return "addmm operand shapes unknown"
            if bval.dim() != 1 or bval.shape[0] != mval.shape[1]:
                return "addmm bias is not a per-feature vector"
        return None


def _rewrite(graph: Graph, m: Match, fused: dict[str, int]) -> None:
    """``act(linear(x, W, b))`` -> ``linear_act(x, W, b, act)``; ``mm``/``addmm`` give ``W`` untransposed."""
    act, lin, name = m["act"], m["lin"], _act_name(m["act"])
    if is_op(lin, aten.linear):
        x, weight, bias = lin.args[0], lin.args[1], argument(lin, "bias", None)
    else:
        bias, x, mat2 = lin.args[:3] if is_op(lin, aten.addmm) else (None, *lin.args[:2])
        weight = _untransposed(mat2)
        if weight is None:  # fold-constants folds this t() when mat2 is a constant
            weight = insert_call(graph, aten.t.default, (mat2,), before=lin, like=lin)
            weight.meta.pop("val", None)
            if isinstance(val := mat2.meta.get("val"), torch.Tensor):
                weight.meta["val"] = val.t()
    node = insert_call(graph, torch.ops.graphpress.linear_act.default, (x, weight, bias, name), before=act, like=act)
    family = name.partition("_")[0]
    graph.annotations(node)["fused"] = ["linear", family]
    act.replace_all_uses_with(node)
    graph.gm.graph.erase_node(act)  # in-place forms are impure: erase explicitly
    erase_dead(graph, [lin])
    fused[family] = fused.get(family, 0) + 1


def _act_name(act: fx.Node) -> str | None:
    """``linear_act``'s ``act`` string for activation node ``act`` (None for unsupported options)."""
    name = packet_name = act.target.overloadpacket.__name__.rstrip("_")
    if packet_name == "gelu":
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(argument(act, "approximate", "none"))
    elif len(act.args) > 1 or act.kwargs:
        return None
    return name if name in gp_ops.LINEAR_ACTIVATIONS else None


def _untransposed(mat2: fx.Node) -> fx.Node | None:
    """``W`` when 2-D ``mat2`` is ``W`` transposed (``t``, ``transpose``, ``permute``)."""
    if is_op(mat2, aten.t) or (is_op(mat2, aten.transpose) and int(mat2.args[1]) % 2 != int(mat2.args[2]) % 2) or (
            is_op(mat2, aten.permute) and [int(d) % 2 for d in mat2.args[1]] == [1, 0]):
        return mat2.args[0]
    return None
