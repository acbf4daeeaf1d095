"""Remove ops whose results nobody reads, then the parameters and buffers nothing reads.

A ``call_function`` node with no users and no side effects (``node.is_impure()`` is false: it
mutates none of its inputs, draws no random numbers and is not an assertion or other effectful
call) cannot change any output, so deleting it is exact -- bit-identical outputs. Removal
repeats until no such node is left (a chain dies back to front), then ``get_attr`` nodes with
no users go, then every parameter/buffer no ``get_attr`` reads
(:meth:`~graphpress.ir.graph.Graph.remove_unused_tensors`, plain tensor constants such as
``lifted_tensor_0`` included).

Never removed: placeholders (the model's inputs), the output node, ``call_module`` nodes such as
the export input-shape guard ``_guards_fn``, in-place/impure ops (``aten.relu_``, ``aten.copy_``,
random ops, asserts), and tensors some node still reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import Skips, is_removable
from graphpress.passes.base import PassResult, register


@dataclass(frozen=True)
class EliminateDeadCodeConfig:
    """``remove_tensors``: also delete parameters/buffers nothing reads (default true)."""

    version: int = 1
    remove_tensors: bool = True


@register("eliminate-dead-code")
class EliminateDeadCode:
    """Remove unused side-effect-free ops, unused ``get_attr`` nodes and unused tensors."""

    exact = True
    Config = EliminateDeadCodeConfig

    def __init__(self, config: EliminateDeadCodeConfig = EliminateDeadCodeConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        fx_graph = graph.gm.graph
        ops_removed = 0
        kept = Skips()
        while True:
            removed_now = 0
            for node in reversed(list(fx_graph.nodes)):
                if node.op == "call_function" and not node.users and is_removable(node):
                    fx_graph.erase_node(node)
                    removed_now += 1
            ops_removed += removed_now
            if not removed_now:
                break
        for node in fx_graph.nodes:
            if node.op == "call_function" and not node.users:
                kept.add("unused op has side effects")
        attrs_removed = 0
        for node in list(fx_graph.nodes):
            if node.op == "get_attr" and not node.users:
                fx_graph.erase_node(node)
                attrs_removed += 1
        tensors_removed, bytes_freed = graph.remove_unused_tensors() if self.config.remove_tensors else (0, 0)
        changed = bool(ops_removed or attrs_removed or tensors_removed)
        if changed:
            graph.recompile()
        stats = {
            "nodes_removed": ops_removed + attrs_removed,
            "ops_removed": ops_removed,
            "get_attrs_removed": attrs_removed,
            "tensors_removed": tensors_removed,
            "bytes_freed": bytes_freed,
            "skipped": dict(kept),
        }
        return PassResult(graph, changed=changed, stats=stats)
