"""Per-layer latency in context: ONNX Runtime's node profiler, summed back to graphpress layers.

A session with ``enable_profiling`` records every kernel's wall time on every run. Node names
survive ORT's graph optimizations with suffixes (``node_Conv_10_token_1`` for a Conv fused into a
``QLinearConv``, ``.../duplicated`` for a Q/DQ node ORT copied, ``fused node_linear`` for a
``FusedGemm``, ``relu_nchwc`` -- the written value's name -- for an NCHWc conv), so stripping them recovers the
exported node, and :attr:`LoweredModel.node_layers` (read from the exporter's name scopes) names
its layer. Nodes ORT itself inserted (layout ``Transpose``) or graphpress's QDQ clean-up created
have no scope: they count under :data:`UNATTRIBUTED`.

The profile's times are kernel times inside the session (no Python, no input copies) and add
a little profiler overhead per node; they are for attribution -- which layer costs what, in the
model it runs in -- while end-to-end claims come from unprofiled, interleaved timing
(:func:`graphpress.runtime.bench.compare_latency`).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphpress.backends.onnxruntime.session import CPU, to_numpy

#: Layer name of the kernels no exported node accounts for.
UNATTRIBUTED = "(onnxruntime)"
_SUFFIX = re.compile(r"(_token_\d+)+$|/duplicated$|_nchwc$")


def _exported_name(kernel: str) -> str:
    name = kernel[: -len("_kernel_time")] if kernel.endswith("_kernel_time") else kernel
    if name.startswith("fused "):  # FusedGemm / FusedConv: "fused <first node>"
        name = name[len("fused "):]
    prev = None
    while prev != name:
        prev, name = name, _SUFFIX.sub("", name)
    return name


def profile_layers(
    model_path: str | os.PathLike,
    inputs: Sequence[Any],
    node_layers: Mapping[str, str],
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Median per-run kernel time of each layer of an ONNX model, from ORT's profiler.

    Parameters
    ----------
    model_path : path
        The ``.onnx`` file.
    inputs : sequence of arrays or tensors
        One positional input set (the session's inputs in order).
    node_layers : mapping
        Exported node name -> layer (:func:`graphpress.backends.onnxruntime.lower.node_layers`).
    runs, warmup : int
        Profiled runs (after ``warmup`` unrecorded ones).
    threads : int, optional
        Intra-op threads (use the count the end-to-end timing uses).

    Returns
    -------
    dict
        ``{"layers_us": {layer: median us per run}, "total_us": median sum per run,
        "runs": int, "kernels": {layer: [op types]}}``; kernels without a layer count under
        :data:`UNATTRIBUTED`.
    """
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    arrays = [to_numpy(x) for x in inputs]
    with tempfile.TemporaryDirectory(prefix="graphpress-profile-") as tmp:
        # warm-up on a plain session: the profiler would record these runs too
        plain = ort.InferenceSession(str(model_path), opts, providers=[CPU])
        names = [i.name for i in plain.get_inputs()]
        feed = dict(zip(names, arrays))
        for _ in range(warmup):
            plain.run(None, feed)
        del plain
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(model_path), opts, providers=[CPU])
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8"))
    # one "model_run" event per run; node events fall inside their run's [ts, ts + dur]
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-runs:]
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in model_runs]
    kernels: dict[str, set[str]] = defaultdict(set)
    starts = [a for a, _b in model_runs]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        i = int(np.searchsorted(starts, ts, side="right")) - 1
        if i < 0 or ts > model_runs[i][1]:
            continue  # a warm-up run
        layer = node_layers.get(_exported_name(e["name"]), UNATTRIBUTED)
        per_run[i][layer] += float(e["dur"])
        kernels[layer].add(str(e.get("args", {}).get("op_name", "?")))
    layers = sorted({k for r in per_run for k in r})
    return {
        "layers_us": {k: round(statistics.median(r.get(k, 0.0) for r in per_run), 2) for k in layers},
        "total_us": round(statistics.median(sum(r.values()) for r in per_run), 2) if per_run else 0.0,
        "runs": len(per_run),
        "kernels": {k: sorted(v) for k, v in sorted(kernels.items())},
    }


__all__ = ["UNATTRIBUTED", "profile_layers"]
