"""The one recorder: run a graph and hand chosen nodes' values to a callback.

Calibration statistics (activation ranges, AWQ and LIM inputs, channel means, sparsity counts),
the HE backend's input ranges and the pipeline's first-divergence diagnosis all need "the value of
these nodes on these inputs"; :func:`observe` is that, once. ``fn`` may reduce as it goes (a
running sum, a range), so memory stays flat over many batches.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import fx

from graphpress.ir.graph import Graph


class _Observer(fx.Interpreter):
    """Runs the graph and hands each chosen node's tensor value to ``fn(node, value)``."""

    def __init__(self, gm: fx.GraphModule, wanted: Collection[fx.Node], fn: Callable[[fx.Node, torch.Tensor], None]):
        super().__init__(gm)
        self.wanted = {n.name for n in wanted}
        self.fn = fn

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.fn(n, out.detach())
        return out


@torch.no_grad()
def observe(
    graph: Graph,
    nodes: Iterable[fx.Node],
    fn: Callable[[fx.Node, torch.Tensor], None],
    batches: Sequence[tuple[torch.Tensor, ...]] | None = None,
) -> int:
    """Run ``graph`` on each calibration batch and call ``fn(node, value)`` for each of ``nodes``.

    Parameters
    ----------
    graph : Graph
        The graph to run (not modified).
    nodes : iterable of fx.Node
        The nodes whose values ``fn`` sees (a node that yields no tensor is not reported).
    fn : callable
        ``fn(node, value)`` with the detached value, once per node per batch, in graph order:
        accumulate a reduction there to keep memory flat over many batches.
    batches : sequence of input tuples, optional
        Default: ``graph.calibration_batches()``.

    Returns
    -------
    int
        The number of batches run.
    """
    batches = list(batches) if batches is not None else graph.calibration_batches()
    wanted = list(nodes)
    for batch in batches:
        _Observer(graph.gm, wanted, fn).run(*batch)
    return len(batches)


__all__ = ["observe"]
