"""Pass instruments: code that runs around every pass of a :class:`~graphpress.passes.pipeline.Pipeline`.

After TVM's ``PassInstrument``: timing, progress, memory and the first-divergence diagnosis are
not written into ``Pipeline.run`` but are objects with hooks the pipeline calls in order, so a
user adds one (a profiler, a logger, a dump of the graph after each pass) without touching the
pipeline::

    run_start(graph, passes)            once, before the first pass
    pass_start(index, p, graph, record) before each pass (graph: the graph the pass starts from)
    pass_end(index, p, graph, record)   after a pass was verified (graph: what it produced)
    pass_failed(index, p, before, after, record) -> str | None
                                        a pass broke the model; a returned text is added to
                                        the error the pipeline raises
    run_end(report)                     once, after the last pass

Verification itself is not an instrument: the pipeline acts on its verdict (it backs a lossy
pass off, or stops), so it stays the pipeline's job; instruments only observe.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from graphpress.ir.compare import tolerance
from graphpress.ir.graph import Graph
from graphpress.ir.memory import rss_mb
from graphpress.ir.observe import observe

if TYPE_CHECKING:
    from graphpress.passes.base import Pass
    from graphpress.passes.pipeline import PipelineReport, StepRecord


class PassInstrument:
    """Base class: every hook does nothing; override the ones you need."""

    def run_start(self, graph: Graph, passes: Sequence["Pass"]) -> None:
        """Called once before the first pass."""

    def pass_start(self, index: int, p: "Pass", graph: Graph, record: "StepRecord") -> None:
        """Called before pass ``index`` runs on ``graph``."""

    def pass_end(self, index: int, p: "Pass", graph: Graph, record: "StepRecord") -> None:
        """Called after pass ``index`` produced ``graph`` and it passed verification."""

    def pass_failed(self, index: int, p: "Pass", before: Graph, after: Graph, record: "StepRecord") -> str | None:
        """Called when pass ``index`` broke the model; the text returned (if any) is appended to
        the error."""
        return None

    def run_end(self, report: "PipelineReport") -> None:
        """Called once after the last pass."""


class Timing(PassInstrument):
    """``record.time_s``: wall time of each pass, its verification and any back-off included."""

    def pass_start(self, index, p, graph, record):
        self._t0 = time.perf_counter()

    def pass_end(self, index, p, graph, record):
        record.time_s = time.perf_counter() - self._t0

    def pass_failed(self, index, p, before, after, record):
        record.time_s = time.perf_counter() - self._t0
        return None


class Progress(PassInstrument):
    """Calls ``on_event(kind, index, total, record)`` with kind ``"start"`` / ``"end"`` (the CLI
    drives its progress display with it)."""

    def __init__(self, on_event: Callable[[str, int, int, Any], None]):
        self.on_event = on_event
        self.total = 0

    def run_start(self, graph, passes):
        self.total = len(passes)

    def pass_start(self, index, p, graph, record):
        self.on_event("start", index, self.total, record)

    def pass_end(self, index, p, graph, record):
        self.on_event("end", index, self.total, record)


class Memory(PassInstrument):
    """``record.memory``: resident memory (MB) before and after each pass and the process's peak
    so far. The peak is never reset (a benchmark may be measuring it around the whole run)."""

    def pass_start(self, index, p, graph, record):
        self._before = rss_mb()

    def pass_end(self, index, p, graph, record):
        after = rss_mb()
        if after is None or self._before is None:
            return
        record.memory = {"rss_before_mb": self._before, "rss_after_mb": after, "process_peak_mb": rss_mb("VmHWM")}


class Diagnose(PassInstrument):
    """On a failure, names the first node (in the new graph's order) whose value differs from
    the same-named node before the pass, on the first check input set."""

    def __init__(self, inputs: Sequence[torch.Tensor] | None = None):
        self.inputs = inputs

    def run_start(self, graph, passes):
        if self.inputs is None:
            self.inputs = graph.example_inputs

    def pass_failed(self, index, p, before, after, record):
        node = first_divergence(before, after, self.inputs)
        return f"first diverging node: '{node}'" if node else None


@torch.no_grad()
def first_divergence(before: Graph, after: Graph, inputs: Sequence[torch.Tensor]) -> str | None:
    """Name of the first node (in ``after``'s order) whose value differs from the same-named
    node in ``before`` beyond the exact tolerance; None when nodes cannot be paired."""
    values: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    try:
        for graph, into in zip((before, after), values):
            calls = [n for n in graph.gm.graph.nodes if n.op == "call_function"]
            observe(graph, calls, lambda n, v, into=into: into.__setitem__(n.name, v), [tuple(inputs)])
    except Exception:  # noqa: BLE001 -- diagnosis is best-effort
        return None
    for name, val in values[1].items():
        ref = values[0].get(name)
        if ref is None or ref.shape != val.shape or ref.dtype != val.dtype or not ref.dtype.is_floating_point:
            continue
        rtol, atol = tolerance(ref.dtype, float(ref.abs().max()) if ref.numel() else 1.0)
        if not torch.allclose(val.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=True):
            return name
    return None


def default_instruments() -> list[PassInstrument]:
    """What every pipeline run has: timing, memory and the failure diagnosis."""
    return [Timing(), Memory(), Diagnose()]


__all__ = ["Diagnose", "Memory", "PassInstrument", "Progress", "Timing", "default_instruments", "first_divergence", "rss_bytes"]
