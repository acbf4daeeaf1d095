"""Per-backend cost tables of ``compress auto``, measured on this machine and cached.

Latency (ONNX Runtime, CPU): for every choice ``c`` some layer may take, the *uniform* model --
every layer that may take ``c`` takes it -- is built, lowered and run under ORT's node profiler
(:func:`graphpress.backends.onnxruntime.profile.profile_layers`); each layer's kernel time in
that model is its cost under ``c``, measured in its context (its real input shape, its
neighbours' layouts, the fusions ORT makes around it). A channel-pruning choice also charges the
layers that read the pruned channels with their change: ``cost(l, c) = t_c(l) + sum_{k reads l}
(t_c(k) - t_{c without pruning}(k))``.

So one lowering per distinct choice (six for a ResNet), not one per (layer, choice). The table is
a prediction -- Q/DQ transitions between float and int8 neighbours, for one, are not additive --
and ``auto`` verifies every candidate it keeps by timing it end to end; the report puts the
predicted and the measured per-layer times side by side.

Size: the bytes each layer's stored weights take under each choice, counted on the uniform
model's rewritten graph (codes, scales, zero points, sparse indices), so the same code that
writes the artifact prices it.

HE latency: the ``he-measured`` cost model of ``circulant-search`` -- each layer's exact HE
operation counts under coefficient encoding at block size ``b`` (dense at ``b = 1``) times the
per-operation seconds this machine measured (``compress he-calibrate``; measured here first when
the cache lacks the ring degree). Milliseconds per encrypted layer.

Tables are cached as JSON under ``$GRAPHPRESS_CACHE`` (default ``~/.cache/graphpress``)
``/auto-costs/<key>.json``, keyed by the model and data, the choices, the thread count, the
ONNX Runtime version and the CPU: a second search on the same machine skips the measurement.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from graphpress.auto.space import Choice, LayerInfo, layer_choices, uniform
from graphpress.auto.trials import Job, build


def cache_root() -> Path:
    """``$GRAPHPRESS_CACHE`` or ``~/.cache/graphpress``."""
    return Path(os.environ.get("GRAPHPRESS_CACHE") or Path.home() / ".cache" / "graphpress")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(job: Job, objective: str, choices: Sequence[Choice], threads: int, batch: int) -> str:
    import onnxruntime as ort

    ident = [job.key, objective, [c.label for c in choices], threads, batch, ort.__version__, _cpu_model(), os.cpu_count()]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]


def _layer_bytes(graph: Any) -> dict[str, int]:
    """Stored bytes of the constants each layer's op reads (weights, codes, scales, indices)."""
    from graphpress.ir.names import layer_name

    out: dict[str, int] = {}
    seen: set[str] = set()
    for node in graph.gm.graph.nodes:
        if node.op != "call_function":
            continue
        total = 0
        for a in node.all_input_nodes:
            if a.op == "get_attr" and a.target not in seen:
                t = graph.tensor_of(a)
                if t is not None:
                    seen.add(a.target)
                    total += t.numel() * t.element_size()
        if total:
            name = layer_name(graph, node)
            out[name] = out.get(name, 0) + total
    return out


def measure_table(
    job: Job,
    layers: Sequence[LayerInfo],
    objective: str,
    *,
    threads: int = 1,
    use_cache: bool = True,
    poly_degree: int = 4096,
    on_step: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """The cost of every (layer, choice) under ``objective``; see the module docstring.

    Returns
    -------
    dict
        ``{"cost": {layer: {choice label: cost}}, "unit": "us" | "bytes", "uniform": {choice
        label: {layer: cost}}, "other": {choice label: cost outside the searched layers},
        "cached": bool, "key": str}``.
    """
    choices = sorted({c for lay in layers for c in layer_choices(lay, objective)})
    batch = 1
    key = table_key(job, objective, choices, threads, batch if objective != "he-latency" else poly_degree)
    path = cache_root() / "auto-costs" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            table["cached"] = True
            return table
        except (OSError, ValueError):
            pass  # a damaged cache entry is measured again
    if objective == "he-latency":
        table = _he_table(job, layers, poly_degree)
        table.update(key=key, threads=threads, batch=batch)
        if use_cache:
            _store(path, table)
        table["cached"] = False
        return table
    per_choice: dict[str, dict[str, float]] = {}
    other: dict[str, float] = {}
    names = {lay.name for lay in layers}
    for i, c in enumerate(choices):
        if on_step is not None:
            on_step(i, len(choices), f"cost of {c.label}")
        graph = build(job, uniform(layers, c, objective))
        if objective == "latency":
            costs = _profile(graph, job, threads)
        else:
            costs = {k: float(v) for k, v in _layer_bytes(graph).items()}
        per_choice[c.label] = {k: v for k, v in costs.items() if k in names}
        other[c.label] = round(sum(v for k, v in costs.items() if k not in names), 2)
    cost: dict[str, dict[str, float]] = {}
    for lay in layers:
        row = {}
        for c in layer_choices(lay, objective):
            v = per_choice[c.label].get(lay.name, 0.0)
            if c.prune:
                plain = Choice(c.bits, 0.0, c.sparsity).label
                v += sum(per_choice[c.label].get(k, 0.0) - per_choice[plain].get(k, 0.0) for k in lay.consumers)
            row[c.label] = round(v, 2)
        cost[lay.name] = row
    table = {"cost": cost, "unit": "us" if objective == "latency" else "bytes", "uniform": per_choice, "other": other,
             "threads": threads, "batch": batch, "key": key}
    if use_cache:
        _store(path, table)
    table["cached"] = False
    return table


def _store(path: Path, table: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _he_table(job: Job, layers: Sequence[LayerInfo], poly_degree: int) -> dict[str, Any]:
    """Predicted ms per (layer, block size) from this machine's measured HE op costs."""
    from graphpress.auto.trials import base_of
    from graphpress.lowering.he import op_costs
    from graphpress.passes.circulant.cost import get_cost_model
    from graphpress.passes.circulant.layers import find_layers as circulant_layers

    if op_costs.find_entry(poly_degree) is None:  # measured once per machine, as 'compress he-calibrate -N' does
        from graphpress.backends.he import require_tenseal

        require_tenseal()
        from graphpress.backends.he.costmodel import calibrate

        calibrate((poly_degree,))
    model = get_cost_model("he-measured", owner="auto")
    by_name = {lay.name: lay for lay in circulant_layers(base_of(job)[0])[0]}
    cost: dict[str, dict[str, float]] = {}
    for lay in layers:
        row = {}
        for c in layer_choices(lay, "he-latency"):
            row[c.label] = round(model(by_name[lay.name], c.block, poly_degree=poly_degree), 4) if lay.name in by_name else 0.0
        cost[lay.name] = row
    return {"cost": cost, "unit": "ms (predicted HE)", "poly_degree": poly_degree, "source": "he-measured"}


def profile_graph(graph: Any, job: Job, threads: int) -> dict[str, Any]:
    """``graph`` lowered to ONNX Runtime and profiled per layer on one evaluation input
    (:func:`graphpress.backends.onnxruntime.profile.profile_layers`'s result)."""
    from graphpress.backends import get_backend
    from graphpress.backends.onnxruntime.profile import profile_layers

    be = get_backend("onnxruntime")
    x1 = tuple(t[:1] for t in job.evaluation)
    with tempfile.TemporaryDirectory(prefix="graphpress-auto-prof-") as tmp:
        lowered = be.lower(graph, Path(tmp), check=False)
        return profile_layers(Path(tmp) / lowered.model_file, x1, lowered.node_layers, threads=threads)


def _profile(graph: Any, job: Job, threads: int) -> dict[str, float]:
    return dict(profile_graph(graph, job, threads)["layers_us"])


def predicted(table: Mapping[str, Any], choices: Mapping[str, Choice], layers: Sequence[LayerInfo]) -> dict[str, float]:
    """Per-layer predicted cost of a candidate (float where it names no choice)."""
    return {lay.name: float(table["cost"][lay.name][choices.get(lay.name, Choice()).label]) for lay in layers}


__all__ = ["cache_root", "measure_table", "predicted", "profile_graph", "table_key"]
