"""Layer names: how a pass, a report and a backend refer to one call of a module.

A layer is named by the dotted path of the ``nn.Module`` that produced its node
(``layers.0.attention.wq``, from :meth:`graphpress.ir.graph.Graph.source_module`), falling back to the
fx node name for an op written at the top level of ``forward``. A module called twice (a shared
block, a tied projection) produces two nodes with one path; the second and later calls get
``#1``, ``#2``, ... in graph order, so every name in a list is unique and the first call keeps the
plain path a user typed.

This is IR knowledge, not pass knowledge: passes (``graphpress.passes.layers``,
``graphpress.passes.select``) and backends (the HE program's layer scan) name layers the same way
through these two functions, and recipes written against one name the same layer in the other.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import fx

from graphpress.ir.graph import Graph

__all__ = ["layer_name", "unique_names"]


def layer_name(graph: Graph, node: fx.Node) -> str:
    """The source module path of ``node``, or its fx node name when it has none.

    Parameters
    ----------
    graph : Graph
        The graph holding ``node`` (its module annotations give the path).
    node : fx.Node
        A ``call_function`` node, usually a linear / conv.

    Returns
    -------
    str
        ``"layer1.0.conv1"``, or ``"linear_3"`` for an op outside any submodule.
    """
    return graph.source_module(node) or node.name


def unique_names(names: Iterable[str]) -> list[str]:
    """``names`` with the second and later copies of a name suffixed ``#1``, ``#2``, ...

    Parameters
    ----------
    names : iterable of str
        Layer names in graph order (repeats where a module is called more than once).

    Returns
    -------
    list of str
        Same length and order; ``["fc", "fc", "out"]`` becomes ``["fc", "fc#1", "out"]``.
    """
    seen: dict[str, int] = {}
    out: list[str] = []
    for name in names:
        k = seen.get(name, 0)
        seen[name] = k + 1
        out.append(f"{name}#{k}" if k else name)
    return out
