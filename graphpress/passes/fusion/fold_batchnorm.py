"""Fold inference batch-norm into the preceding conv or linear: W' = W*g/sqrt(v+eps), b' = (b-m)*g/sqrt(v+eps) + beta.

An inference batch-norm is a per-channel affine map ``y = (x - m) * s + beta`` with
``s = g / sqrt(v + eps)`` (``g``/``beta`` its weight/bias, ``m``/``v`` its running mean/variance).
When ``x = conv(u, W, b)`` (or ``linear``) and the channel the batch-norm normalizes is the
producer's output channel, scaling output channel ``c`` of the producer is the same as scaling
row ``c`` of ``W``::

    W'[c, ...] = W[c, ...] * s[c]
    b'[c]      = (b[c] - m[c]) * s[c] + beta[c]        (b = 0 when the conv had no bias)

Exact up to float rounding: the folded tensors are computed in float64 and cast back to the
weight's dtype, so the only difference is the rounding of one multiply-add per output; checked
with allclose. The batch-norm node is removed and the tensors nothing reads any more (the old
weight, the batch-norm's statistics) are deleted.

Handles ``aten.batch_norm`` (training IR), ``aten._native_batch_norm_legit_no_training`` and
``aten.native_batch_norm`` / ``aten._native_batch_norm_legit`` with ``training=False``, after
``aten.conv1d/conv2d/conv3d`` (any overload), non-transposed ``aten.convolution`` or
``aten.linear``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import CONV, CONV_TRANSPOSED
from graphpress.ir.rewrite import (
    Skips,
    add_constant,
    arg,
    constant_tensor,
    erase_dead,
    is_op,
    is_parameter,
    mutated_targets,
    packet,
    rank_of,
    set_arg,
    users_other_than,
)
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten

# batch-norm variants: packet -> (index of `training` arg or None, index of `momentum`, index of `eps`, returns tuple)
_BN_VARIANTS = {
    aten.batch_norm: (5, 6, 7, False),
    aten._native_batch_norm_legit_no_training: (None, 5, 6, True),
    aten._native_batch_norm_legit: (5, 6, 7, True),
    aten.native_batch_norm: (5, 6, 7, True),
}


@dataclass(frozen=True)
class FoldBatchNormConfig:
    """``fold-batchnorm`` has no knobs besides the config version."""

    version: int = 1


@register("fold-batchnorm")
class FoldBatchNorm:
    """Fold inference batch-norm into the preceding conv/linear (see module docstring)."""

    exact = True
    Config = FoldBatchNormConfig

    def __init__(self, config: FoldBatchNormConfig = FoldBatchNormConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        skipped = Skips()
        folded = 0
        params_before, bytes_before = graph.parameter_count(), graph.parameter_bytes()
        mutated = mutated_targets(graph)
        bns = [n for n in graph.call_nodes() if packet(n) in _BN_VARIANTS]
        for bn in bns:
            plan = _plan(graph, bn, mutated)
            if isinstance(plan, str):
                skipped.add(plan)
                continue
            _rewrite(graph, bn, plan)
            folded += 1
        removed = 0
        if folded:
            removed, _ = graph.remove_unused_tensors()
            graph.recompile()
        stats = {
            "folded": folded,
            "tensors_removed": removed,
            "params_removed": params_before - graph.parameter_count(),
            # net: the old weights and BN tensors went, folded weights and new biases came
            "bytes_saved": bytes_before - graph.parameter_bytes(),
            "skipped": dict(skipped),
        }
        return PassResult(graph, changed=folded > 0, stats=stats)


@dataclass
class _Plan:
    producer: fx.Node
    out: fx.Node  # the node whose users read the batch-norm's output (bn, or getitem(bn, 0))
    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def _plan(graph: Graph, bn: fx.Node, mutated: set[str]) -> _Plan | str:
    """What to fold for ``bn``, or the reason it cannot be folded."""
    training_idx, _momentum_idx, eps_idx, returns_tuple = _BN_VARIANTS[packet(bn)]
    training = bn.args[training_idx] if training_idx is not None and training_idx < len(bn.args) else bn.kwargs.get("training", False)
    running = [arg(bn, 3, "running_mean"), arg(bn, 4, "running_var")]
    if training is not False or any(r is None for r in running):
        return "batch-norm in training mode (uses batch statistics)"
    mean, var = (constant_tensor(graph, r, mutated) for r in running)
    w_node, b_node = arg(bn, 1, "weight"), arg(bn, 2, "bias")
    gamma = constant_tensor(graph, w_node, mutated) if w_node is not None else None
    beta = constant_tensor(graph, b_node, mutated) if b_node is not None else None
    if mean is None or var is None or (w_node is not None and gamma is None) or (b_node is not None and beta is None):
        return "batch-norm parameters are not constants"
    eps = float(arg(bn, eps_idx, "eps", 1e-5))

    out = bn
    if returns_tuple:
        getitems = list(bn.users)
        if any(u.op != "call_function" or u.target is not operator.getitem for u in getitems):
            return "batch-norm tuple output used directly"
        if any(u.args[1] != 0 and u.users for u in getitems):
            return "batch-norm saved statistics are used"
        firsts = [u for u in getitems if u.args[1] == 0]
        if len(firsts) != 1:
            return "batch-norm output used through several getitems" if firsts else "batch-norm output unused"
        out = firsts[0]

    producer = bn.args[0]
    if is_op(producer, *CONV_TRANSPOSED) or (is_op(producer, aten.convolution) and arg(producer, 6, "transposed", False)):
        return "producer is a transposed convolution"
    if not (is_op(producer, *CONV) or is_op(producer, aten.convolution) or is_op(producer, aten.linear)):
        return "input is not produced by a conv or linear"
    if users_other_than(producer, bn):
        return "conv/linear output has other users"
    weight_node, bias_node = arg(producer, 1, "weight"), arg(producer, 2, "bias")
    weight = constant_tensor(graph, weight_node, mutated)
    if weight is None:
        return "conv/linear weight is not a constant"
    bias = constant_tensor(graph, bias_node, mutated) if bias_node is not None else None
    if bias_node is not None and bias is None:
        return "conv/linear bias is not a constant"
    if len(graph.tensor_users(str(weight_node.target))) > 1:
        return "conv/linear weight is shared with another op"
    if not weight.dtype.is_floating_point:
        return "conv/linear weight is not floating point"
    if is_op(producer, aten.linear):
        rank = rank_of(graph, producer)
        if rank is None:
            return "unknown output rank of the linear"
        if rank != 2:
            # batch-norm normalizes dim 1; a linear's output features are the last dim
            return "batch-norm channel dim is not the linear's output-feature dim"
    if mean.numel() != weight.shape[0] or var.numel() != weight.shape[0]:
        return "batch-norm channels differ from the producer's output channels"
    return _Plan(producer, out, weight, bias, gamma, beta, mean, var, eps)


def _rewrite(graph: Graph, bn: fx.Node, plan: _Plan) -> None:
    producer = plan.producer
    f64 = torch.float64
    scale = torch.rsqrt(plan.var.to(f64) + plan.eps)
    if plan.gamma is not None:
        scale = scale * plan.gamma.to(f64)
    shift = -plan.mean.to(f64) * scale
    if plan.bias is not None:
        shift = shift + plan.bias.to(f64) * scale
    if plan.beta is not None:
        shift = shift + plan.beta.to(f64)
    w = plan.weight.to(f64) * scale.reshape(-1, *([1] * (plan.weight.dim() - 1)))
    new_w = w.to(plan.weight.dtype)
    new_b = shift.to(plan.bias.dtype if plan.bias is not None else plan.weight.dtype)

    old_w_node, old_b_node = arg(producer, 1, "weight"), arg(producer, 2, "bias")
    module = graph.source_module(producer)
    w_target, b_target = str(old_w_node.target), str(old_b_node.target) if old_b_node is not None else None
    w_node = add_constant(
        graph, f"{w_target}_bnfold", new_w, before=producer,
        parameter=is_parameter(graph, w_target), module=module,
    )
    b_node = add_constant(
        graph, f"{b_target or w_target.rpartition('.')[0] + '.bias'}_bnfold", new_b, before=producer,
        parameter=is_parameter(graph, b_target) if b_target else True, module=module,
    )
    set_arg(producer, 1, "weight", w_node)
    set_arg(producer, 2, "bias", b_node)
    plan.out.replace_all_uses_with(producer)
    ann = graph.annotations(producer)
    ann.setdefault("folded_batchnorm", []).append(graph.source_module(bn))
    dead = [plan.out, bn] if plan.out is not bn else [bn]
    for d in dead:
        for u in list(d.users):  # remaining getitems of unused saved statistics
            if not u.users:
                graph.gm.graph.erase_node(u)
    erase_dead(graph, dead + [old_w_node] + ([old_b_node] if old_b_node is not None else []))
