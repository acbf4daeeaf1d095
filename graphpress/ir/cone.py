"""What a graph's outputs are computed from, as a value two graphs can be compared by.

``cone_key(graph)`` walks back from the output node and records, for every node the outputs
depend on, its op, its target and its arguments, with other nodes named by their position in
the walk and constant tensors by their object identity and version counter. Nodes nothing reads
(dead code) are not part of it, nor are node names or annotations.

Claim: if ``cone_key(a) == cone_key(b)`` (and neither is None), ``a`` and ``b`` run the same
ATen calls, in the same order, on the same tensor objects, so on the same inputs they return
the same outputs bit for bit -- the pipeline then takes the graph before a pass's outputs as the
pass's own instead of running the model again (a dead-code elimination, a rename, an annotation
pass). Tensor identity is only meaningful while both graphs are alive and nobody writes into
the shared tensors; the pipeline checks the latter (``Graph.written_in_place``) before it asks.

The key is None -- "cannot tell, run it" -- for what it cannot see through: ``call_module`` and
``call_method`` nodes (module state or dynamic dispatch) and arguments it cannot hash.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

if TYPE_CHECKING:
    from graphpress.ir.graph import Graph

_ATOMS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Opaque(Exception):
    """An argument or node the key cannot describe."""


def cone_key(graph: "Graph") -> tuple | None:
    """The output cone of ``graph`` as a hashable tuple, or None where it cannot be described.

    Parameters
    ----------
    graph : Graph
        Any graph; it is not changed.

    Returns
    -------
    tuple or None
        Equal for two live graphs that compute their outputs with the same calls on the same
        tensor objects; None for a graph holding ``call_module`` / ``call_method`` nodes or
        arguments that are not plain values, nodes or tensors in its output cone.
    """
    out = next((n for n in reversed(graph.gm.graph.nodes) if n.op == "output"), None)
    if out is None:
        return None
    order: dict[fx.Node, int] = {}
    entries: list[tuple] = []

    def visit(root: fx.Node) -> None:
        # iterative post-order: a decoder is thousands of nodes deep
        stack: list[tuple[fx.Node, bool]] = [(root, False)]
        open_: set[fx.Node] = set()  # expanded, inputs not done yet: met again means a cycle
        while stack:
            node, expanded = stack.pop()
            if node in order:
                continue
            if expanded:
                open_.discard(node)
                order[node] = len(entries)
                entries.append(_entry(graph, node, order))
                continue
            if node in open_:
                raise _Opaque(f"cycle through {node.name}")  # a malformed graph: verify names it
            open_.add(node)
            stack.append((node, True))
            stack.extend((n, False) for n in reversed(node.all_input_nodes) if n not in order)

    try:
        visit(out)
    except _Opaque:
        return None
    return tuple(entries)


def _entry(graph: "Graph", node: fx.Node, order: dict[fx.Node, int]) -> tuple:
    if node.op in ("call_module", "call_method"):
        raise _Opaque(node.name)
    if node.op == "placeholder":
        return ("placeholder", str(node.target))
    if node.op == "get_attr":
        value = graph.tensor_of(node)
        if value is None:
            raise _Opaque(node.name)
        return ("get_attr", id(value), value._version)
    return (node.op, node.target, _arg(node.args, order), _arg(tuple(sorted(node.kwargs.items())), order))


def _arg(value: Any, order: dict[fx.Node, int]) -> Any:
    if isinstance(value, fx.Node):
        return ("node", order[value])
    if isinstance(value, _ATOMS):
        return (type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_arg(v, order) for v in value))
    if isinstance(value, slice):
        return ("slice", _arg((value.start, value.stop, value.step), order))
    raise _Opaque(type(value).__name__)
