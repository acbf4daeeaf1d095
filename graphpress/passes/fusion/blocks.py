"""Group whole blocks into fused regions: conv-bn-relu chains, residual blocks, transformer MLP blocks.

The pass only annotates (:mod:`graphpress.ir.regions`): each match becomes a region, a set of
nodes with one output, which a backend that can compile a group of ops as one function (TVM)
turns into one kernel. No op, argument or tensor changes, so the graph computes exactly what it
computed before (checked with allclose; the outputs are bit-identical).

Region kinds (``v`` is a node's value; ``unit(u) = conv(u) [+ per-channel constant] [-> inference
batch_norm]``, the form ``fold-batchnorm`` leaves a conv-bn in; shape-only ops such as ``view``
may sit between the MLP ops)::

    conv_bn_relu    act(unit(x))                     act: relu, gelu, silu, sigmoid, tanh, hardtanh
    residual_block  [relu](unit_k(relu(...relu(unit_1(x)))) + s(x))    k >= 1, s one of
                        identity:  s(x) = x
                        option A:  s(x) = zero-pad(slice(x))  (any mix of slice and zero constant pad)
                        option B:  s(x) = unit(x)             (projection conv)
    mlp_block       linear(act(linear(x)))  or  linear(linear_act(x))           (linear = linear/addmm/mm)
                    linear(act(linear_g(x)) * linear_u(x))                    (gated: SwiGLU, GeGLU)

A match is refused (and counted under ``skipped``) when an inner node is read outside the block
(e.g. a conv whose output also feeds another op), when the two inputs of a residual add do not
meet the block shape (the shortcut is not derived from the main path's input, or the add
broadcasts), when it overlaps a region found earlier, or when it holds more than ``max_ops``
compute ops. Matching order: residual blocks, then MLP blocks, then conv-bn-relu chains on the
nodes left; re-running the pass replaces earlier regions.

The shapes above are the patterns ``CONV_CHAIN``, ``MLP`` and ``RESIDUAL`` (:mod:`graphpress.ir.pattern`;
``through(RESHAPE, ...)`` skips the shape-only ops, ``commute=True`` reads ``+`` and ``*`` both
ways); what a tree cannot say (zero padding, equal shapes, readers outside the block) is checked
on the match. A residual main path is matched up to ``_MAX_UNITS`` (16) units deep.

Kernel count (``kernels_before`` / ``kernels_after``): compute nodes outside regions + one per
region, where a compute node is a ``call_function`` node that is not a view, a tuple ``getitem``
or a shape check (:func:`graphpress.ir.regions.kernel_count`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphpress.errors import PassError
from graphpress.ir import ops as gp_ops  # noqa: F401 -- registers torch.ops.graphpress.linear_act
from graphpress.ir.graph import Graph
from graphpress.ir.opsets import ACTIVATION, ADD, CONV_ANY, LINEAR, LINEAR_LIKE, RELU, RESHAPE, SHORTCUT_SLICE
from graphpress.ir.pattern import alt, any as any_, argument, match, op, through
from graphpress.ir.regions import KINDS, clear_regions, is_kernel, kernel_count, set_region
from graphpress.ir.rewrite import Skips, constant_tensor, is_op, mutated_targets, node_val
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten

_LINEAR_ACT = torch.ops.graphpress.linear_act


@dataclass(frozen=True)
class FuseBlocksConfig:
    """``kinds``: region kinds to look for; ``max_ops``: largest region, in compute ops."""

    version: int = 1
    kinds: tuple[str, ...] = ("residual_block", "mlp_block", "conv_bn_relu")
    max_ops: int = 16

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise PassError(f"pass 'fuse-blocks': option 'kinds': unknown kind(s) {', '.join(map(repr, bad))}; "
                            f"choose from {', '.join(KINDS)}")
        if self.max_ops < 2:
            raise PassError(f"pass 'fuse-blocks': option 'max_ops' must be at least 2 (a region fuses two or more ops), got {self.max_ops}")


@register("fuse-blocks")
class FuseBlocks:
    """Annotate conv-bn-relu chains, residual blocks and MLP blocks as fused regions (module docstring)."""

    exact = True
    Config = FuseBlocksConfig

    def __init__(self, config: FuseBlocksConfig = FuseBlocksConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        before = kernel_count(graph)
        replaced = clear_regions(graph)
        skipped = Skips()
        taken: set[fx.Node] = set()
        found: list[tuple[str, list[fx.Node]]] = []
        order = [k for k in ("residual_block", "mlp_block", "conv_bn_relu") if k in self.config.kinds]
        for kind in order:
            for members in _MATCHERS[kind](graph, skipped):
                if taken.intersection(members):
                    if not taken.issuperset(members):  # a chain inside a block is no news
                        skipped.add(f"{kind}: overlaps a region found earlier")
                    continue
                ops = sum(1 for n in members if is_kernel(n))
                if ops > self.config.max_ops:
                    skipped.add(f"{kind}: more than max_ops ({self.config.max_ops}) compute ops")
                    continue
                taken.update(members)
                found.append((kind, members))
        index = {n: i for i, n in enumerate(graph.nodes)}
        found.sort(key=lambda km: max(index[n] for n in km[1]))
        by_kind = {k: 0 for k in self.config.kinds}
        for rid, (kind, members) in enumerate(found):
            for n in members:
                set_region(graph, n, rid, kind)
            by_kind[kind] += 1
        stats = {
            "regions": len(found),
            "by_kind": by_kind,
            "kernels_before": before,
            "kernels_after": kernel_count(graph),
            "ops_in_regions": sum(1 for _k, m in found for n in m if is_kernel(n)),
            "skipped": dict(skipped),
        }
        if replaced:
            stats["replaced_region_nodes"] = replaced
        return PassResult(graph, changed=bool(found) or bool(replaced), stats=stats)


# ---------------------------------------------------------------------------- patterns
def _channel_bias(node: fx.Node, m) -> str | None:
    """``node = p + b`` with ``b`` a constant holding one value per channel (dim 1) of ``p``."""
    if argument(node, "alpha", 1) != 1 or len(node.args) < 2:
        return "not a plain add"
    for p, b in (node.args[:2], node.args[1::-1]):
        t, val = constant_tensor(m.graph, b), node_val(m.graph, p)
        if t is None or not isinstance(val, torch.Tensor) or val.dim() < 2 or t.dim() > val.dim():
            continue
        shape = [1] * (val.dim() - t.dim()) + list(t.shape)
        if all(s == 1 for d, s in enumerate(shape) if d != 1) and shape[1] in (1, val.shape[1]):
            return None
    return "not a per-channel bias"


def _unit(x, name: str | None = None):
    """``conv(x) [+ per-channel constant] [-> inference batch_norm]``, matched from its last op."""
    conv = op(CONV_ANY, x, name=name, check=lambda n, m: "transposed convolution" if is_op(n, aten.convolution)
              and argument(n, "transposed", False) else None)
    biased = alt(conv, op(ADD, conv, any_(), commute=True, check=_channel_bias))
    return alt(biased, op(aten.batch_norm, biased, training=False))


def _linear(x):
    """A linear layer reading ``x`` (``addmm`` reads its input second)."""
    return alt(op(LINEAR | {aten.mm}, x), op(aten.addmm, any_(), x))


#: conv_bn_relu, rooted at the activation
CONV_CHAIN = op(ACTIVATION, _unit(any_(), name="conv"))
#: mlp_block, rooted at the down projection; the gated form captures the gate's and up's inputs
MLP = _linear(through(RESHAPE, alt(
    op(_LINEAR_ACT),
    op(ACTIVATION, through(RESHAPE, op(LINEAR_LIKE))),
    op(aten.mul, op(ACTIVATION, through(RESHAPE, _linear(any_("x_gate")))), through(RESHAPE, _linear(any_("x_up"))),
       commute=True))))


def _residual(relu_single_use: bool):
    """residual_block, rooted at the add: ``unit(relu(...unit(x))) + shortcut(x)``; the main path
    stops at a relu read elsewhere (the block input, which the shortcut reads too)."""
    x = any_("x")
    main = _unit(x)
    for _ in range(_MAX_UNITS - 1):
        main = _unit(alt(op(RELU, main, single_use=relu_single_use), x))
    short = alt(x, through(SHORTCUT_SLICE, x, name="pads"), _unit(x), name="short")
    return op(ADD, alt(main, name="main"), short, commute=True, check=_join)


def _join(node: fx.Node, m) -> str | None:
    if argument(node, "alpha", 1) != 1 or len(node.args) < 2 or any(
            not isinstance(a, fx.Node) or a.op != "call_function" for a in node.args[:2]):
        return "a bias add or a join of graph inputs"
    return None


_MAX_UNITS = 16  # conv units on one residual main path (the default max_ops allows 8)
RESIDUAL, RESIDUAL_LEAKY = _residual(True), _residual(False)
_ANY_UNIT_JOIN = op(ADD, _unit(any_()), any_(), commute=True, check=_join)


# ---------------------------------------------------------------------------- matchers
def _inner_read_outside(members: list[fx.Node], output: fx.Node) -> bool:
    """Whether a member other than ``output`` is read by a node outside ``members``."""
    inside = set(members)
    return any(u not in inside for n in members if n is not output for u in n.users)


def _zero_pad(node: fx.Node) -> bool:
    if is_op(node, aten.slice):
        return True
    if is_op(node, aten.pad):
        return argument(node, "mode", "constant") == "constant" and argument(node, "value", None) in (None, 0, 0.0)
    return argument(node, "value", 0) in (0, 0.0)  # constant_pad_nd


def _residual_blocks(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out, mutated = [], mutated_targets(graph)
    for add in graph.call_nodes(*ADD):
        if not match(_ANY_UNIT_JOIN, add, graph, mutated):
            continue  # no conv unit feeds this add: not a candidate
        m = match(RESIDUAL, add, graph, mutated)
        if not m or not all(_zero_pad(n) for n in m.get("pads", ())):
            skipped.add("residual_block: an inner node's output is read outside the block"
                        if match(RESIDUAL_LEAKY, add, graph, mutated) else
                        "residual_block: add inputs do not meet the block shape (shortcut not derived from the main path's input)")
            continue
        shapes = [node_val(graph, n) for n in (m["main"], m["short"], add)]
        if not all(isinstance(v, torch.Tensor) for v in shapes) or not (shapes[0].shape == shapes[1].shape == shapes[2].shape):
            skipped.add("residual_block: residual add broadcasts (main path and shortcut shapes differ)")
            continue
        block, output = list(m.nodes), add
        if len(add.users) == 1 and is_op(relu := next(iter(add.users)), *RELU) and relu.args[0] is add:
            block.append(relu)
            output = relu
        if _inner_read_outside(block, output):
            skipped.add("residual_block: an inner node's output is read outside the block")
            continue
        out.append(block)
    return out


def _mlp_blocks(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out, mutated = [], mutated_targets(graph)
    for down in graph.call_nodes(*LINEAR_LIKE):
        if not (m := match(MLP, down, graph, mutated)):
            continue
        if "x_gate" in m and m["x_gate"] is not m["x_up"]:
            skipped.add("mlp_block: gate and up projections read different inputs")
        elif _inner_read_outside(m.nodes, down):
            skipped.add("mlp_block: an inner node's output is read outside the block")
        else:
            out.append(m.nodes)
    return out


def _conv_chains(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out, mutated = [], mutated_targets(graph)
    for act in graph.call_nodes(*ACTIVATION):
        if not (m := match(CONV_CHAIN, act, graph, mutated)):
            continue
        shared = [n for n in reversed(m.nodes) if n is not act and len(n.users) > 1]  # conv first
        if shared:
            skipped.add("conv_bn_relu: conv output has other users" if shared[0] is m["conv"]
                        else "conv_bn_relu: an inner node's output is read outside the chain")
        else:
            out.append(m.nodes)
    return out


_MATCHERS = {"residual_block": _residual_blocks, "mlp_block": _mlp_blocks, "conv_bn_relu": _conv_chains}

__all__ = ["FuseBlocks", "FuseBlocksConfig"]
