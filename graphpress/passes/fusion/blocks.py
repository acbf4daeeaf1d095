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
from graphpress.ir.opsets import ACTIVATION, ADD, CONV_ANY, LINEAR_LIKE, RELU, RESHAPE, SHORTCUT_SLICE
from graphpress.ir.regions import (
    KINDS,
    clear_regions,
    is_kernel,
    kernel_count,
    set_region,
)
from graphpress.ir.rewrite import Skips, arg, constant_tensor, is_op, node_val, packet
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten

_LINEAR_ACT = torch.ops.graphpress.linear_act
_LINEARS = (*LINEAR_LIKE, _LINEAR_ACT)
# RESHAPE: shape-only ops that may sit inside an MLP block (GPT-2's Conv1D reshapes around addmm).


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


# ---------------------------------------------------------------------------- small queries
def _sole_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _inner_read_outside(members: list[fx.Node], output: fx.Node) -> bool:
    """Whether a member other than ``output`` is read by a node outside ``members``."""
    inside = set(members)
    return any(u not in inside for n in members if n is not output for u in n.users)


def _plain_add(node: fx.Node) -> bool:
    return is_op(node, *ADD) and arg(node, 2, "alpha", 1) == 1 and len(node.args) >= 2 and all(
        isinstance(a, fx.Node) for a in node.args[:2])


def _channel_bias_input(graph: Graph, node: fx.Node) -> fx.Node | None:
    """``p`` when ``node`` is ``p + b`` with ``b`` a constant holding one value per channel (dim 1) of ``p``."""
    if not _plain_add(node):
        return None
    for p, b in (node.args[:2], node.args[1::-1]):
        t = constant_tensor(graph, b)
        val = node_val(graph, p)
        if t is None or not isinstance(val, torch.Tensor) or val.dim() < 2 or t.dim() > val.dim():
            continue
        shape = [1] * (val.dim() - t.dim()) + list(t.shape)
        if all(s == 1 for d, s in enumerate(shape) if d != 1) and shape[1] in (1, val.shape[1]):
            return p
    return None


def _is_inference_bn(node: fx.Node) -> bool:
    return is_op(node, aten.batch_norm) and arg(node, 5, "training", False) is False


def _unit_back(graph: Graph, tail: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """``(members, conv)`` when ``tail`` ends a conv unit: conv [+ channel constant] [-> inference bn]."""
    members, cur = [], tail
    for _ in range(3):
        if is_op(cur, *CONV_ANY):
            if is_op(cur, aten.convolution) and arg(cur, 6, "transposed", False):
                return None
            return [cur, *members], cur
        if _is_inference_bn(cur):
            nxt = cur.args[0]
        else:
            nxt = _channel_bias_input(graph, cur)
        if not isinstance(nxt, fx.Node):
            return None
        members.insert(0, cur)
        cur = nxt
    return None


def _through(node: fx.Node, ops: tuple) -> tuple[list[fx.Node], fx.Node]:
    """Walk back from ``node`` through ops in ``ops``; returns (walked nodes in order, first other node)."""
    walked = []
    while isinstance(node, fx.Node) and is_op(node, *ops) and len(walked) < 8:
        walked.insert(0, node)
        node = node.args[0]
    return walked, node


def _linear_input(node: fx.Node) -> fx.Node:
    return node.args[1] if is_op(node, aten.addmm) else node.args[0]


# ---------------------------------------------------------------------------- matchers
def _residual_blocks(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out = []
    for add in graph.call_nodes(*ADD):
        if not _plain_add(add) or any(a.op != "call_function" for a in add.args[:2]):
            continue  # a bias (constant) add, or a join of graph inputs: not a candidate
        a, b = add.args[:2]
        sides = [(m, s) for m, s in ((a, b), (b, a)) if isinstance(m, fx.Node) and _unit_back(graph, m)]
        if not sides:
            continue  # no conv unit feeds this add: not a candidate
        result: list[fx.Node] | str = "residual_block: add inputs do not meet the block shape (shortcut not derived from the main path's input)"
        for main, short in sides:
            match = _residual_from(graph, add, main, short)
            if isinstance(match, list):
                result = match
                break
            if match is not None:
                result = match
        if isinstance(result, str):
            skipped.add(result)
        else:
            out.append(result)
    return out


def _residual_from(graph: Graph, add: fx.Node, main: fx.Node, short: fx.Node) -> list[fx.Node] | str | None:
    """The block members when ``add = main + short`` is a residual join, else why not (None: shape not met)."""
    members, conv = _unit_back(graph, main)
    stopped_at_shared_relu = False  # the main path goes on before a relu with other readers
    while True:
        relu = conv.args[0]
        prev = _unit_back(graph, relu.args[0]) if is_op(relu, *RELU) and isinstance(relu.args[0], fx.Node) else None
        if prev is None:
            break
        if _sole_user(relu) is not conv:  # the block input (read by the shortcut too), or a leak
            stopped_at_shared_relu = True
            break
        members = prev[0] + [relu] + members
        conv = prev[1]
    x = conv.args[0]
    shortcut = _shortcut(graph, short, x)
    if shortcut is None:
        return "residual_block: an inner node's output is read outside the block" if stopped_at_shared_relu else None
    shapes = [node_val(graph, n) for n in (main, short, add)]
    if not all(isinstance(v, torch.Tensor) for v in shapes) or not (shapes[0].shape == shapes[1].shape == shapes[2].shape):
        return "residual_block: residual add broadcasts (main path and shortcut shapes differ)"
    block = members + shortcut + [add]
    output = add
    relu = _sole_user(add)
    if relu is not None and is_op(relu, *RELU) and relu.args[0] is add:
        block.append(relu)
        output = relu
    if _inner_read_outside(block, output):
        return "residual_block: an inner node's output is read outside the block"
    return block


def _shortcut(graph: Graph, short: fx.Node, x: fx.Node) -> list[fx.Node] | None:
    """The shortcut's own nodes when ``short`` is ``x``, zero-pad/slice of ``x`` (option A) or a
    conv unit of ``x`` (option B); None otherwise."""
    if short is x:
        return []
    walked, root = _through(short, SHORTCUT_SLICE)
    if walked and root is x and all(_zero_pad(n) for n in walked):
        return walked
    unit = _unit_back(graph, short)
    if unit is not None and unit[1].args[0] is x:
        return unit[0]
    return None


def _zero_pad(node: fx.Node) -> bool:
    if is_op(node, aten.slice):
        return True
    if is_op(node, aten.pad):
        return arg(node, 2, "mode", "constant") == "constant" and arg(node, 3, "value", None) in (None, 0, 0.0)
    return arg(node, 2, "value", 0) in (0, 0.0)  # constant_pad_nd


def _mlp_blocks(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out = []
    for down in graph.call_nodes(*_LINEARS):
        if is_op(down, _LINEAR_ACT):
            continue  # a linear_act is the first layer of a block, never its output
        mid, hidden = _through(_linear_input(down), RESHAPE)
        if is_op(hidden, _LINEAR_ACT):
            block = [hidden, *mid, down]
        elif is_op(hidden, *ACTIVATION):
            pre, up = _through(hidden.args[0], RESHAPE)
            if not is_op(up, *_LINEARS) or is_op(up, _LINEAR_ACT):
                continue  # activation of something else: not a candidate
            block = [up, *pre, hidden, *mid, down]
        elif is_op(hidden, aten.mul) and all(isinstance(a, fx.Node) for a in hidden.args[:2]):
            gated = _gated(hidden)
            if gated is None:
                continue
            if isinstance(gated, str):
                skipped.add(gated)
                continue
            block = [*gated, hidden, *mid, down]
        else:
            continue
        if _inner_read_outside(block, down):
            skipped.add("mlp_block: an inner node's output is read outside the block")
            continue
        out.append(block)
    return out


def _gated(mul: fx.Node) -> list[fx.Node] | str | None:
    """Members before ``mul`` when ``mul = act(linear_g(x)) * linear_u(x)``, a reason, or None."""
    p, q = mul.args[:2]
    for g, u in ((p, q), (q, p)):
        if not is_op(g, *ACTIVATION):
            continue
        g_pre, gate = _through(g.args[0], RESHAPE)
        u_pre, up = _through(u, RESHAPE)
        if not (is_op(gate, aten.linear, aten.addmm, aten.mm) and is_op(up, aten.linear, aten.addmm, aten.mm)):
            continue
        if _linear_input(gate) is not _linear_input(up):
            return "mlp_block: gate and up projections read different inputs"
        return [gate, *g_pre, g, up, *u_pre]
    return None


def _conv_chains(graph: Graph, skipped: Skips) -> list[list[fx.Node]]:
    out = []
    for conv in graph.call_nodes(*CONV_ANY):
        if is_op(conv, aten.convolution) and arg(conv, 6, "transposed", False):
            continue
        block, cur = [conv], conv
        while True:
            nxt = [u for u in cur.users if _extends_chain(graph, cur, u, block)]
            if not nxt:
                break
            if len(cur.users) > 1:
                block = []
                skipped.add("conv_bn_relu: conv output has other users" if cur is conv
                            else "conv_bn_relu: an inner node's output is read outside the chain")
                break
            block.append(nxt[0])
            cur = nxt[0]
            if packet(cur) in ACTIVATION:
                break
        if len(block) >= 2 and packet(block[-1]) in ACTIVATION:
            out.append(block)
    return out


def _extends_chain(graph: Graph, cur: fx.Node, user: fx.Node, block: list[fx.Node]) -> bool:
    """Whether ``user`` continues conv chain ``block`` (ending at ``cur``): bias, inference bn, activation."""
    if is_op(user, *ACTIVATION):
        return user.args[0] is cur
    if _is_inference_bn(user):
        return user.args[0] is cur and not any(_is_inference_bn(n) for n in block)
    return _channel_bias_input(graph, user) is cur and len(block) == 1


_MATCHERS = {"residual_block": _residual_blocks, "mlp_block": _mlp_blocks, "conv_bn_relu": _conv_chains}

__all__ = ["FuseBlocks", "FuseBlocksConfig"]
