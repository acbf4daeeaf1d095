"""A networkx view of a graph for analyses that are easier on a plain DiGraph.

Nodes are FX node names with attributes ``op`` (FX opcode), ``target`` (short op name),
``module`` (source nn.Module path) and ``shape``; edges follow data flow. Parameters appear
as ``get_attr`` nodes, so "which layers read this weight" is a successor query.

Two analyses used by passes:

* :func:`regions` -- maximal connected groups of nodes satisfying a predicate (fusion regions:
  e.g. conv -> bn -> relu chains);
* :func:`dependency_groups` -- nodes tied together because their outputs meet in a
  shape-preserving element-wise op (a residual add): a structured pruning pass must change
  their output channels together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import networkx as nx
import torch
import torch.fx as fx

from graphpress.ir.graph import op_name
from graphpress.ir.opsets import CHANNEL_PRESERVING, CONV_ANY, JOIN, LINEAR

if TYPE_CHECKING:
    from graphpress.ir.graph import Graph

# Ops that start a new channel space (the "producers" that pruning shrinks).
PRODUCERS = CONV_ANY | LINEAR


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def to_networkx(graph: "Graph") -> nx.DiGraph:
    """Build the data-flow DiGraph of ``graph`` (node attribute ``fx`` holds the FX node)."""
    g = nx.DiGraph(name=graph.name)
    for node in graph.nodes:
        val = node.meta.get("val")
        shape = tuple(val.shape) if isinstance(val, torch.Tensor) else None
        target = op_name(node) if node.op == "call_function" else str(node.target)
        g.add_node(node.name, op=node.op, target=target, module=graph.source_module(node), shape=shape, fx=node)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def regions(g: nx.DiGraph, keep: Callable[[dict], bool]) -> list[list[str]]:
    """Maximal weakly connected groups of nodes whose attributes satisfy ``keep``, each in
    topological order; a fusion pass compiles each region as one kernel."""
    sub = g.subgraph([n for n, d in g.nodes(data=True) if keep(d)])
    order = {n: i for i, n in enumerate(nx.topological_sort(g))}
    return [sorted(c, key=order.__getitem__) for c in nx.weakly_connected_components(sub)]


def producer_of(node: fx.Node) -> fx.Node | None:
    """Walk back through channel-preserving ops to the op that created ``node``'s channels."""
    while node.op == "call_function" and _packet(node) in CHANNEL_PRESERVING:
        node = node.args[0]
    if node.op == "call_function" and _packet(node) in PRODUCERS:
        return node
    return None


def dependency_groups(graph: "Graph") -> list[set[str]]:
    """Groups of producer nodes whose output channels are coupled by element-wise joins.

    Union-find over producers: for every element-wise join, the producers feeding both operands
    (through channel-preserving ops) are merged. Producers with no coupling form singleton groups.
    Operands not traceable to a producer (e.g. a graph input or a padded shortcut) make the
    group's members *pinned*: they are reported with a ``'<input>'`` marker so callers can refuse
    to change them.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in graph.call_nodes():
        if _packet(node) in PRODUCERS:
            find(node.name)
        if _packet(node) in JOIN:
            operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
            if len(operands) < 2:
                continue
            names = []
            for a in operands:
                p = producer_of(a)
                names.append(p.name if p is not None else "<input>")
            for other in names[1:]:
                union(names[0], other)
    groups: dict[str, set[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return list(groups.values())
