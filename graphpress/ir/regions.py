"""Fused regions: groups of nodes that a backend compiles as one function, hence one kernel.

A region is a set of ``call_function`` nodes with exactly one node whose value is read outside
the set (its *output*); every other member is read only by members. The ``fuse-blocks`` pass
finds them (conv-bn-relu chains, residual blocks, transformer MLP blocks); backends that can
compile a group of ops as one function (TVM) honour them, the others ignore them. A region
changes no value: it is an annotation only.

Membership is stored twice, as the same small dict ``{"id": int, "kind": str}``:

* ``Graph.annotations(node)["region"]`` (:data:`REGION_KEY`): what passes and reports read;
* ``node.meta["custom"]["graphpress_region"]`` (:data:`EXPORT_KEY`): ``torch.export`` keeps
  ``meta["custom"]`` through :meth:`Graph.export_program` and ``run_decompositions()`` (every
  ATen op a node decomposes into inherits it), so a backend that imports the exported program
  still knows which region each op came from.

Kernel count of a graph (the stat ``fuse-blocks`` reports): every compute node outside a region
counts 1 and every region counts 1, where a compute node is a ``call_function`` node whose op
is not in :data:`NON_KERNEL_OPS` -- ops that only re-describe existing data (views such as
``view``/``reshape``/``permute``/``slice``, tuple ``getitem``) or only check shapes. Constants,
inputs and the output node never count.
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import NON_KERNEL

REGION_KEY = "region"
EXPORT_KEY = "graphpress_region"
KINDS = ("conv_bn_relu", "residual_block", "mlp_block")

# Ops that launch no kernel: views of their input (torch returns an alias), tuple access, shape
# bookkeeping and assertions.
NON_KERNEL_OPS = NON_KERNEL


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def is_kernel(node: fx.Node) -> bool:
    """Whether ``node`` counts as a compute node (see module docstring)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    return node.target not in NON_KERNEL_OPS and _packet(node) not in NON_KERNEL_OPS


def region_of(node: fx.Node) -> dict[str, Any] | None:
    """``{"id", "kind"}`` of the region ``node`` belongs to, else None. Works on the nodes of a
    :class:`Graph` and on those of a program exported from it."""
    region = (node.meta.get("graphpress") or {}).get(REGION_KEY)
    if region is None:  # an exported program's node: only meta["custom"] came through
        region = (node.meta.get("custom") or {}).get(EXPORT_KEY)
    return region


def set_region(graph: Graph, node: fx.Node, region_id: int, kind: str) -> None:
    """Make ``node`` a member of region ``region_id`` of kind ``kind`` (both storage places)."""
    if kind not in KINDS:
        raise ValueError(f"unknown region kind {kind!r}; expected one of {KINDS}")
    value = {"id": int(region_id), "kind": kind}
    graph.annotations(node)[REGION_KEY] = value
    node.meta["custom"] = {**(node.meta.get("custom") or {}), EXPORT_KEY: dict(value)}


def clear_regions(graph: Graph) -> int:
    """Remove every region annotation; returns how many nodes had one."""
    cleared = 0
    for node in graph.nodes:
        had = graph.annotations(node).pop(REGION_KEY, None) is not None
        custom = node.meta.get("custom")
        if custom and EXPORT_KEY in custom:
            node.meta["custom"] = {k: v for k, v in custom.items() if k != EXPORT_KEY}
            had = True
        cleared += had
    return cleared


def regions(graph: Graph) -> dict[int, list[fx.Node]]:
    """Region id -> member nodes in graph order."""
    out: dict[int, list[fx.Node]] = {}
    for node in graph.nodes:
        r = region_of(node)
        if r is not None:
            out.setdefault(int(r["id"]), []).append(node)
    return out


def kernel_count(graph: Graph) -> int:
    """Compute nodes outside regions plus one per region (see module docstring)."""
    outside = sum(1 for n in graph.nodes if is_kernel(n) and region_of(n) is None)
    return outside + len(regions(graph))


__all__ = ["EXPORT_KEY", "KINDS", "NON_KERNEL_OPS", "REGION_KEY", "clear_regions", "is_kernel", "kernel_count",
           "region_of", "regions", "set_region"]
