"""The Python API behind ``compress run``: source -> verified passes -> backend artifact + report.

>>> from graphpress.api import compress
>>> result = compress("resnet20.th", arch="graphpress.zoo.resnet20:resnet20",
...                   recipe="default", out="out/resnet20")          # doctest: +SKIP
>>> result.metrics["latency_ms"], result.folder                     # doctest: +SKIP

The CLI is a thin layer over :func:`compress` (it only adds progress bars and tables).
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from graphpress.ir.compare import compare_outputs
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline, PipelineReport, config_from_dict
from graphpress.passes.recipes import Recipe, load_recipe

Stage = Callable[[str], None]


@dataclass
class CompressResult:
    """What :func:`compress` / :func:`export` produced."""

    folder: Path
    graph: Graph
    report: PipelineReport | None
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail before any work if writing ``out`` would be refused later."""
    from graphpress.runtime.artifact import check_destination

    check_destination(out, overwrite)
    return Path(out)


def batch_one(graph: Graph) -> tuple[torch.Tensor, ...]:
    """Batch-1 inputs for latency (the example inputs when the batch is static)."""
    if graph.dynamic_batch:
        return tuple(x[:1] for x in graph.example_inputs)
    return graph.example_inputs


def compress(
    source: Any,
    *,
    out: str | Path,
    recipe: str | Path | Recipe | dict = "default",
    backend: str = "onnxruntime",
    arch: str | None = None,
    input_shape: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    overwrite: bool = False,
    bench: bool = True,
    baseline: bool = True,
    calibration: Any = None,
    finetune_inputs: Any = None,
    finetune: dict[str, Any] | Any | None = None,
    on_event=None,
    on_epoch=None,
    on_stage: Stage | None = None,
) -> CompressResult:
    """Load ``source``, run ``recipe`` with verification, lower to ``backend``, write ``out``.

    Parameters
    ----------
    source : nn.Module, str or Path
        Anything :func:`graphpress.frontends.load` accepts.
    out : path
        Artifact folder; refused if it exists unless ``overwrite``.
    recipe : str, Path, Recipe or dict
        A YAML path, a built-in recipe name (``default``), or a recipe object.
    backend : str
        ``"onnxruntime"``.
    bench : bool
        Measure batch-1 latency (torch eager of the original graph, and the artifact).
    baseline : bool
        With ``bench``, also lower the *original* graph to the backend and time it, so the
        report separates what the passes gained from what the backend gained.
    calibration : Tensor, tuple of Tensor, or path, optional
        Representative inputs for data-driven passes (Fisher sensitivity, calibration), set as
        ``graph.calibration``; a path is read with :func:`graphpress.train.load_inputs`.
    finetune_inputs : Tensor, tuple of Tensor, or path, optional
        Unlabelled inputs for recovery fine-tuning by distillation from the original model,
        after the passes (see :func:`graphpress.train.distill`); only tensors that passes mark
        trainable change, so compressed structure is preserved.
    finetune : dict or DistillConfig, optional
        Fine-tuning options (epochs, lr, patience, ...).
    on_event, on_epoch, on_stage : callable, optional
        Progress hooks: pipeline events (see :meth:`Pipeline.run`), fine-tuning epochs and stage names.
    """
    from graphpress.frontends import load

    from graphpress.backends import get_backend

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    get_backend(backend)  # an unknown backend fails before the capture, not after the passes
    from graphpress.train import DistillConfig, distill, load_inputs

    if finetune is not None and not isinstance(finetune, DistillConfig):
        finetune = config_from_dict(DistillConfig, dict(finetune), owner="finetune")
    if isinstance(calibration, (str, Path)):
        calibration = load_inputs(calibration)
    if isinstance(finetune_inputs, (str, Path)):
        finetune_inputs = load_inputs(finetune_inputs)
    stage("capture")
    graph = load(source, arch=arch, example_inputs=example_inputs, input_shape=input_shape)
    if calibration is not None:
        graph.calibration = as_batches(calibration)
    stage("passes")
    pipeline = Pipeline.from_recipe(recipe)
    report = pipeline.run(graph, on_event=on_event)
    finetuned = None
    if finetune_inputs is not None:
        stage("finetune")
        finetuned = distill(report.graph, graph, finetune_inputs, finetune or DistillConfig(), on_epoch=on_epoch)
    return export(
        report.graph,
        out,
        backend=backend,
        original=graph,
        report=report,
        recipe=pipeline.to_recipe_dict(),
        overwrite=overwrite,
        bench=bench,
        baseline=baseline,
        on_stage=stage,
        check_inputs=pipeline.check_inputs(graph),
        extra={"finetune": finetuned.to_dict()} if finetuned is not None else None,
    )


def as_batches(data: Any, batch_size: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """A tensor or a tuple of per-input tensors (rows = samples) as a list of input tuples."""
    cols = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    n = cols[0].shape[0]
    return [tuple(c[i : i + batch_size] for c in cols) for i in range(0, n, batch_size)]


def export(
    graph: Graph,
    out: str | Path,
    *,
    backend: str = "onnxruntime",
    original: Graph | None = None,
    report: PipelineReport | None = None,
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    bench: bool = True,
    baseline: bool = True,
    on_stage: Stage | None = None,
    check_inputs: list[tuple[torch.Tensor, ...]] | None = None,
    extra: dict[str, Any] | None = None,
) -> CompressResult:
    """Lower ``graph`` to ``backend`` and write an artifact folder with manifest and report.

    ``original`` (the graph before passes) is the reference for the accuracy metrics and the
    eager-latency baseline; it defaults to ``graph`` itself. ``extra`` entries are added to the
    manifest (e.g. the fine-tuning history).
    """
    from graphpress.backends import get_backend
    from graphpress.runtime import compare_latency, make_manifest, write_artifact

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    original = original or graph
    be = get_backend(backend)
    check_inputs = check_inputs or [graph.example_inputs]
    with tempfile.TemporaryDirectory(prefix="graphpress-lower-") as tmp:
        stage("lower")
        lowered = be.lower(graph, Path(tmp))
        files = {name: Path(tmp) / name for name in lowered.files}
        runner = be.runner(Path(tmp) / lowered.model_file)
        metrics: dict[str, Any] = {
            "params_before": original.parameter_count(),
            "params_after": graph.parameter_count(),
            "param_bytes_before": original.parameter_bytes(),
            "param_bytes_after": graph.parameter_bytes(),
            "model_file_bytes": sum(p.stat().st_size for p in files.values()),
            "backend_check": lowered.check,
        }
        stage("verify")
        metrics["vs_original"] = _vs_original(original, runner, check_inputs, graph.output_names)
        metrics["check_batches"] = [int(x[0].shape[0]) if x and x[0].dim() else 1 for x in check_inputs]
        if bench:
            stage("bench")
            x1 = batch_one(graph)
            variants: dict[str, Callable[[], Any]] = {"torch eager (original)": _torch_call(original, x1)}
            with tempfile.TemporaryDirectory(prefix="graphpress-baseline-") as tmp_base:
                if baseline and original is not graph:
                    base = be.lower(original, Path(tmp_base), check=False)
                    variants[f"{lowered.backend} (original)"] = _runner_call(be.runner(Path(tmp_base) / base.model_file), x1)
                variants[f"{lowered.backend} (compressed)"] = _runner_call(runner, x1)
                timing = compare_latency(variants)
            metrics["latency_ms"] = {name: round(r.median_ms, 4) for name, r in timing.results.items()}
            metrics["latency_batch"] = int(x1[0].shape[0]) if x1 and x1[0].dim() else 1
        manifest = make_manifest(
            graph, lowered, recipe=recipe, passes=report.to_dict()["passes"] if report else [], metrics=metrics
        )
        manifest.update(extra or {})
        manifest["host"] = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
        stage("write")
        del runner  # release the session's file handle before the folder moves
        folder = write_artifact(out, files, manifest, render_report(manifest), overwrite=overwrite)
    return CompressResult(folder, graph, report, manifest, metrics)


def _vs_original(original: Graph, runner: Any, check_inputs, names: Sequence[str]) -> list[dict[str, Any]]:
    """Worst error per output of the lowered model against the original graph."""
    per_set = []
    for inputs in check_inputs:
        ref = original.run(*inputs)
        got = [torch.from_numpy(a) for a in runner(*[x.numpy() for x in inputs])]
        per_set.append(compare_outputs(ref, got, names))
    return [
        {"name": name, "max_abs": max(d[i].max_abs for d in per_set), "sqnr_db": _jsonable(min(d[i].sqnr_db for d in per_set))}
        for i, name in enumerate(names)
    ]


def _torch_call(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    def call():
        with torch.inference_mode():
            return graph.gm(*inputs)

    return call


def _runner_call(runner: Any, inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
    arrays = [x.numpy() for x in inputs]
    return lambda: runner(*arrays)


def _jsonable(x: float) -> float | str:
    return x if x == x and abs(x) != float("inf") else str(x)


def _fmt_db(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.1f}"


def render_report(manifest: dict[str, Any]) -> str:
    """``report.md``: what was gained and what was lost, in a few tables."""
    m = manifest.get("metrics", {})
    lines = [
        f"# graphpress report: {manifest.get('source', {}).get('name', 'model')}",
        "",
        f"- created: {manifest.get('created')} with graphpress {manifest.get('graphpress_version')}",
        f"- source: {manifest.get('source', {})}",
        f"- recipe: {manifest.get('recipe', {}).get('name', '-')}, backend: {manifest.get('backend')}",
        "",
        "## Gained",
        "",
        "| metric | before | after |",
        "|---|---|---|",
        f"| parameters | {m.get('params_before', 0):,} | {m.get('params_after', 0):,} |",
        f"| parameter bytes | {m.get('param_bytes_before', 0):,} | {m.get('param_bytes_after', 0):,} |",
        f"| model file bytes | - | {m.get('model_file_bytes', 0):,} |",
    ]
    lat = m.get("latency_ms") or {}
    if lat:
        first = next(iter(lat.values()))
        lines += ["", f"### Latency (batch {m.get('latency_batch', 1)}, median of interleaved runs)", "", "| runtime | ms | speed-up vs first |", "|---|---|---|"]
        lines += [f"| {k} | {v:.4f} | {first / v:.2f}x |" for k, v in lat.items()]
    lines += ["", "## Lost (artifact vs original model)", "", "| output | max abs error | SQNR dB |", "|---|---|---|"]
    lines += [f"| {d['name']} | {d['max_abs']:.3g} | {_fmt_db(d['sqnr_db'])} |" for d in m.get("vs_original", [])]
    passes = manifest.get("passes", [])
    if passes:
        lines += ["", "## Passes", "", "| pass | exact | changed | time s | stats |", "|---|---|---|---|---|"]
        for p in passes:
            lines.append(f"| {p['name']} | {p['exact']} | {p['changed']} | {p['time_s']:.3f} | `{p['stats']}` |")
    return "\n".join(lines) + "\n"


__all__ = ["compress", "export", "CompressResult", "render_report", "check_out_dir"]
