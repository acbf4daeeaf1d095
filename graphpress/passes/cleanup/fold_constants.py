"""Evaluate ops whose inputs are all constants once, ahead of time, and store the result as a tensor.

A node is *constant* when it is a ``get_attr`` tensor the graph never writes to, or a pure
``call_function`` whose tensor inputs are all constant (python scalars, shapes and dtypes are
constant too), transitively -- e.g. ``aten.t(W)``, ``aten.permute(W)``, ``aten.mul(W, 2.0)``,
``aten.reshape(c)``, ``aten.to(c, dtype)``. For every *frontier* node -- a constant node that a
non-constant node (or the output) reads -- the pass computes its value with the same ATen
kernels the graph would run, registers it as a new parameter (when a parameter feeds it and it
is floating point) or buffer, points the readers at a ``get_attr`` of it, and deletes the chain
that became dead (nodes, then tensors nothing reads).

Exact up to float rounding: the value is produced by the very ops the graph would execute on
the same tensors, so the folded tensor is bit-identical to what the graph computed at run time.
It is stored as a contiguous copy (never a view of another tensor), so a consumer may pick a
different kernel for it -- e.g. a matmul on a stored ``W^T`` instead of a transposed view of
``W`` -- which can reorder a reduction and change the last bits (~1e-7 relative); checked with
allclose. Element-wise consumers give bit-identical outputs.

Not folded (each counted in ``skipped``): random ops (``aten.rand*``, ``randn``, ``dropout``,
``bernoulli`` ...) and ops with side effects (in-place, asserts) -- nor anything reading a tensor
such an op writes; ops that are not ATen/graphpress ops; results that are not tensors; results
larger than ``max_bytes``; and, for results larger than ``small_bytes``, size-expanding ones
(numel above ``max_expand_ratio`` times the numel of the constant tensors they are computed from,
e.g. ``aten.expand`` of a bias, ``aten.zeros``) and ones computed from a tensor that other ops
keep reading (folding would store the data twice, e.g. ``t(W)`` of a tied embedding). When a
frontier is refused, its constant inputs are tried as frontiers instead (``mul(b, 2)`` under a
refused ``expand`` still folds). Dtype assertions on constants that ``aten.to`` leaves behind
(``aten._assert_tensor_metadata``) are checked once at fold time and removed.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import (
    METADATA_ONLY_INPLACE,
    Skips,
    add_constant,
    erase_dead,
    is_alive,
    is_parameter,
    mutated_targets,
    topo_index,
)
from graphpress.passes.base import PassResult, register

aten = torch.ops.aten


@dataclass(frozen=True)
class FoldConstantsConfig:
    """Size limits of folded results.

    ``max_bytes``: largest folded tensor. ``max_expand_ratio``: largest ratio of a folded tensor's
    numel to the numel of the constants it is computed from. ``small_bytes``: results up to this
    size are folded even when they expand their inputs or duplicate a tensor still read elsewhere.
    """

    version: int = 1
    max_bytes: int = 64 * 1024 * 1024
    max_expand_ratio: float = 4.0
    small_bytes: int = 4096


_CONSTANT_ASSERTS = (aten._assert_tensor_metadata,)
_RANDOM_NAMES = ("rand", "randn", "randint", "randperm", "dropout", "bernoulli", "multinomial", "normal", "uniform", "poisson")


def _why_not_foldable(node: fx.Node) -> str | None:
    """Why a ``call_function`` with all-constant inputs must not be evaluated ahead of time."""
    target = node.target
    if target is operator.getitem:
        return None
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "higher-order op"
    if not isinstance(target, torch._ops.OpOverload):
        return "not an ATen/graphpress op"
    name = target.overloadpacket.__name__.lstrip("_")
    if torch.Tag.nondeterministic_seeded in target.tags or name.startswith(_RANDOM_NAMES) or "dropout" in name:
        return "random op"
    if target.overloadpacket in METADATA_ONLY_INPLACE:
        return None  # detach_ after lift_fresh_copy: metadata only
    if target._schema.is_mutable or node.is_impure():
        return "op has side effects"
    if name in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"):
        return "uninitialized memory"
    return None


@register("fold-constants")
class FoldConstants:
    """Pre-compute constant sub-graphs into tensors (see module docstring)."""

    exact = True
    Config = FoldConstantsConfig

    def __init__(self, config: FoldConstantsConfig = FoldConstantsConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        skipped = Skips()
        mutated = mutated_targets(graph)

        initially_unused = {n for n in graph.nodes if n.op == "get_attr" and not n.users}

        # 1. which nodes are constant
        const: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "get_attr":
                if str(node.target) not in mutated and graph.tensor_of(node) is not None:
                    const.add(node)
            elif node.op == "call_function":
                if all(i in const for i in node.all_input_nodes):
                    why = _why_not_foldable(node)
                    if why is None:
                        const.add(node)
                    elif node.users:
                        skipped.add(why)

        # 2. metadata assertions on constants (``aten.to`` leaves one per cast) are checked once
        #    here and dropped, so they do not keep the cast's source tensor alive
        asserts_checked = 0
        for node in list(graph.call_nodes(*_CONSTANT_ASSERTS)):
            if not node.users and all(i in const for i in node.all_input_nodes):
                try:
                    _evaluate_call(graph, node)
                except Exception:  # noqa: BLE001 -- a failing assertion stays in the graph
                    skipped.add("assertion on a constant fails")
                    continue
                graph.gm.graph.erase_node(node)
                asserts_checked += 1

        # 3. frontier: constant call_function nodes read by something non-constant
        def is_frontier(n: fx.Node) -> bool:
            return n.op == "call_function" and n in const and any(u not in const for u in n.users)

        work = [n for n in graph.nodes if is_frontier(n)]
        folded = 0
        folded_bytes = 0
        order = topo_index(graph)
        work.sort(key=order.__getitem__)
        done: set[fx.Node] = set()
        while work:
            node = work.pop(0)
            if node in done or not is_alive(node):
                continue
            done.add(node)
            cone, leaves = _cone(node, const)
            why = self._check_before_eval(node)
            value = None
            if why is None:
                try:
                    value = _evaluate(graph, node)
                except Exception as err:  # noqa: BLE001 -- report, do not fail the pass
                    skipped.add(f"evaluation failed ({type(err).__name__})")
                    continue
                why = self._check_value(graph, value, cone, leaves)
            if why is not None:
                skipped.add(why)
                # try its constant inputs instead (e.g. fold mul(bias, 2) under an expand)
                work.extend(i for i in node.all_input_nodes if i.op == "call_function" and i in const and i not in done)
                work.sort(key=lambda n: order.get(n, -1))
                continue
            parameter = value.dtype.is_floating_point and any(is_parameter(graph, str(leaf.target)) for leaf in leaves)
            hint = f"{leaves[0].target}_{node.name}" if len(leaves) == 1 else f"const_{node.name}"
            new = add_constant(
                graph, hint, value.detach().clone(memory_format=torch.contiguous_format),
                before=node, parameter=parameter, module=graph.source_module(node),
            )
            const.add(new)
            graph.annotations(new)["folded_from"] = node.name
            node.replace_all_uses_with(new)
            erase_dead(graph, [node])
            folded += 1
            folded_bytes += value.numel() * value.element_size()

        tensors_removed, bytes_freed = (0, 0)
        if folded or asserts_checked:
            erase_dead(graph, [n for n in graph.nodes if n.op == "get_attr" and n in const and not n.users and n not in initially_unused])
            tensors_removed, bytes_freed = graph.remove_unused_tensors()
            graph.recompile()
        stats = {
            "folded": folded,
            "asserts_checked": asserts_checked,
            "folded_bytes": folded_bytes,
            "tensors_removed": tensors_removed,
            "bytes_freed": bytes_freed,
            "skipped": dict(skipped),
        }
        return PassResult(graph, changed=bool(folded or asserts_checked), stats=stats)

    def _check_before_eval(self, node: fx.Node) -> str | None:
        """Refuse from ``meta['val']`` before materializing anything."""
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            try:
                nbytes = int(val.numel()) * val.element_size()
            except Exception:  # noqa: BLE001 -- symbolic size: not a constant really
                return "result has a symbolic shape"
            if nbytes > self.config.max_bytes:
                return "result larger than max_bytes"
        return None

    def _check_value(self, graph: Graph, value: Any, cone: set[fx.Node], leaves: list[fx.Node]) -> str | None:
        cfg = self.config
        if not isinstance(value, torch.Tensor):
            return "result is not a tensor"
        nbytes = value.numel() * value.element_size()
        if nbytes > cfg.max_bytes:
            return "result larger than max_bytes"
        leaf_numel = sum(graph.tensor_of(leaf).numel() for leaf in leaves)
        if nbytes <= cfg.small_bytes:
            return None
        if value.numel() > cfg.max_expand_ratio * max(1, leaf_numel):
            return "size-expanding result (numel above max_expand_ratio x inputs)"
        stays_alive = any(u not in cone for leaf in leaves for u in graph.tensor_users(str(leaf.target)))
        if stays_alive:
            return "input constant also read elsewhere (folding would duplicate it)"
        return None


def _cone(node: fx.Node, const: set[fx.Node]) -> tuple[set[fx.Node], list[fx.Node]]:
    """Constant nodes ``node`` is computed from (itself included) and its ``get_attr`` leaves."""
    cone: set[fx.Node] = set()
    leaves: dict[str, fx.Node] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if n in cone:
            continue
        cone.add(n)
        if n.op == "get_attr":
            leaves.setdefault(str(n.target), n)
        else:
            stack.extend(i for i in n.all_input_nodes if i in const)
    return cone, list(leaves.values())


@torch.no_grad()
def _evaluate_call(graph: Graph, node: fx.Node) -> Any:
    """Run ``node`` on the values of its (constant) inputs."""
    inputs = {i: _evaluate(graph, i) for i in node.all_input_nodes}
    return node.target(*fx.node.map_arg(node.args, inputs.__getitem__), **fx.node.map_arg(node.kwargs, inputs.__getitem__))


@torch.no_grad()
def _evaluate(graph: Graph, node: fx.Node) -> Any:
    """Value of constant ``node``, evaluating its constant inputs first."""
    values: dict[fx.Node, Any] = {}
    stack = [node]
    while stack:
        n = stack[-1]
        if n in values:
            stack.pop()
            continue
        if n.op == "get_attr":
            values[n] = graph.tensor_of(n)
            stack.pop()
            continue
        pending = [i for i in n.all_input_nodes if i not in values]
        if pending:
            stack.extend(pending)
            continue
        args = fx.node.map_arg(n.args, values.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
        values[n] = n.target(*args, **kwargs)
        stack.pop()
    return values[node]
