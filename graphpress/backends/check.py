"""The output check of the ``torch`` and ``tvm`` backends: run the lowered model and the graph on the
same inputs and compare (the ONNX Runtime backend has its own, with an SQNR floor for graphs that
round activations and extra batch sizes: ``graphpress.backends.onnxruntime.lower.check_onnx``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from graphpress.errors import BackendError
from graphpress.ir.compare import compare_outputs
from graphpress.ir.graph import Graph

TOLERANCE = "graphpress.ir.compare.tolerance (fp32: rtol 1e-4, atol 1e-5 x max(1, max|ref|); ints exact)"


def check_sets(graph: Graph, seeds: Sequence[int]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """The example inputs plus one seeded random input set per seed, with labels."""
    sets = [("example inputs", tuple(graph.example_inputs))]
    for seed in seeds:
        sets.append((f"random inputs (seed {seed})", graph.random_inputs(seed)))
    return sets


def check_against_graph(
    graph: Graph,
    run: Callable[..., list[np.ndarray]],
    backend: str,
    seeds: Sequence[int] = (0, 1),
    extra_sets: Sequence[tuple[str, tuple[torch.Tensor, ...]]] = (),
) -> dict[str, Any]:
    """Compare ``run(*inputs)`` (the lowered model) with ``graph.run`` on :func:`check_sets`
    plus ``extra_sets`` (labelled input tuples, e.g. the shapes a tuned library specializes).

    Returns the check report (``passed``, ``tolerance``, ``runs``, ``worst``, ``check_s``); raises
    one ``BackendError`` line, prefixed ``backend``, naming the first output outside tolerance.
    """
    t0 = time.perf_counter()
    runs, worst = [], None
    for label, inputs in [*check_sets(graph, seeds), *extra_sets]:
        refs = graph.run(*inputs)
        tests = [torch.from_numpy(o) for o in run(*inputs)]
        diffs = compare_outputs(refs, tests, graph.output_names)
        for d in diffs:
            if not d.within_tol:
                raise BackendError(f"{backend}: output {d.name!r} of {graph.name!r} differs from the graph on {label}: max abs err {d.max_abs:.3g}")
            if worst is None or d.max_abs > worst["max_abs"]:
                worst = {"output": d.name, "inputs": label, "max_abs": d.max_abs}
        runs.append({"inputs": label, "outputs": [d.to_dict() for d in diffs]})
    return {"passed": True, "tolerance": TOLERANCE, "runs": runs, "worst": worst, "check_s": round(time.perf_counter() - t0, 3)}


__all__ = ["TOLERANCE", "check_against_graph", "check_sets"]
