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

Handles every batch norm of ``opsets.BATCH_NORM`` with ``training=False`` after a non-transposed
conv (``opsets.CONV_ANY``) or ``aten.linear``; the match is the pattern ``PATTERN`` below.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import BATCH_NORM, CONV_ANY, CONV_TRANSPOSED, LINEAR
from graphpress.ir.pattern import Match, Rule, apply_rules, argument, const, op
from graphpress.ir.rewrite import Skips, add_constant, erase_dead, is_op, is_parameter, rank_of, set_arg
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten
_NOT_CONST = "batch-norm parameters are not constants"


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
        params_before, bytes_before = graph.parameter_count(), graph.parameter_bytes()
        folded = apply_rules(graph, [RULE], skipped).get(RULE.name, 0)
        removed = graph.remove_unused_tensors()[0] if folded else 0
        if folded:
            graph.recompile()
        return PassResult(graph, changed=folded > 0, stats={
            "folded": folded, "tensors_removed": removed, "params_removed": params_before - graph.parameter_count(),
            # net: the old weights and BN tensors went, folded weights and new biases came
            "bytes_saved": bytes_before - graph.parameter_bytes(), "skipped": dict(skipped),
        })


def _inference_bn(bn: fx.Node, m: Match) -> str | None:
    """Eval-mode statistics and, for tuple-returning variants, one ``getitem(bn, 0)`` reading the
    output (captured as ``out``) and nothing reading the saved statistics."""
    if argument(bn, "training", False) is not False or None in (argument(bn, "running_mean"), argument(bn, "running_var")):
        return "batch-norm in training mode (uses batch statistics)"
    m["out"] = bn
    if len(bn.target._schema.returns) > 1:
        if any(u.op != "call_function" or u.target is not operator.getitem for u in bn.users):
            return "batch-norm tuple output used directly"
        if any(u.args[1] != 0 and u.users for u in bn.users):
            return "batch-norm saved statistics are used"
        firsts = [u for u in bn.users if u.args[1] == 0]
        if len(firsts) != 1:
            return "batch-norm output used through several getitems" if firsts else "batch-norm output unused"
        m["out"] = firsts[0]
    return None


def _check(graph: Graph, m: Match) -> str | None:
    """What the pattern cannot say: the weight is floating point and its rows are the BN's channels."""
    weight, producer = m.tensors["weight"], m["producer"]
    if not weight.dtype.is_floating_point:
        return "conv/linear weight is not floating point"
    if is_op(producer, *LINEAR) and (rank := rank_of(graph, producer)) != 2:
        # batch-norm normalizes dim 1; a linear's output features are the last dim
        return "unknown output rank of the linear" if rank is None else "batch-norm channel dim is not the linear's output-feature dim"
    if {m.tensors["mean"].numel(), m.tensors["var"].numel()} != {weight.shape[0]}:
        return "batch-norm channels differ from the producer's output channels"
    return None


def _rewrite(graph: Graph, m: Match) -> None:
    producer, bn, out, weight, bias = m["producer"], m["bn"], m["out"], m.tensors["weight"], m.tensors["bias"]

    def f64(name: str, absent: float = 0.0):
        return m.tensors[name].to(torch.float64) if m.tensors[name] is not None else absent

    # same float64 operations, in the same order, as the formula in the module docstring
    scale = torch.rsqrt(f64("var") + float(argument(bn, "eps", 1e-5))) * f64("gamma", 1.0)
    shift = -f64("mean") * scale + f64("bias") * scale + f64("beta")
    new_w = (weight.to(torch.float64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    new_b = shift.to(bias.dtype if bias is not None else weight.dtype)

    old_w, old_b, module = m["weight"], m["bias"], graph.source_module(producer)
    w_target, b_target = str(old_w.target), str(old_b.target) if old_b is not None else None
    b_name = f"{b_target or w_target.rpartition('.')[0] + '.bias'}_bnfold"
    b_param = is_parameter(graph, b_target) if b_target else True
    set_arg(producer, 1, "weight", add_constant(graph, f"{w_target}_bnfold", new_w, before=producer,
                                                parameter=is_parameter(graph, w_target), module=module))
    set_arg(producer, 2, "bias", add_constant(graph, b_name, new_b, before=producer, parameter=b_param, module=module))
    out.replace_all_uses_with(producer)
    graph.annotations(producer).setdefault("folded_batchnorm", []).append(graph.source_module(bn))
    # the batch norm, its getitems (of unused saved statistics too) and the replaced tensors
    erase_dead(graph, [n for n in (old_b, old_w, bn, out, *bn.users) if n is not None])


#: ``bn(conv_or_linear(x, W, b))``: checks in the order the skip reasons were always reported.
PATTERN = op(
    BATCH_NORM,
    op(
        CONV_ANY | CONV_TRANSPOSED | LINEAR, name="producer", why="input is not produced by a conv or linear",
        single_use="conv/linear output has other users",
        check=lambda n, m: "producer is a transposed convolution" if is_op(n, *CONV_TRANSPOSED)
        or (is_op(n, aten.convolution) and argument(n, "transposed")) else None,
        weight=const("weight", why="conv/linear weight is not a constant", single_use="conv/linear weight is shared with another op"),
        bias=const("bias", optional=True, why="conv/linear bias is not a constant"),
    ),
    name="bn", check=_inference_bn, running_mean=const("mean", why=_NOT_CONST), running_var=const("var", why=_NOT_CONST),
    weight=const("gamma", optional=True, why=_NOT_CONST), bias=const("beta", optional=True, why=_NOT_CONST),
)
RULE = Rule("fold-batchnorm", PATTERN, _rewrite, _check)
