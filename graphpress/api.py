"""The Python API behind ``compress run``: source -> verified passes -> backend artifact + report.

>>> from graphpress.api import compress
>>> result = compress("resnet20.th", arch="graphpress.zoo.resnet20:resnet20",
...                   recipe="default", out="out/resnet20")          # doctest: +SKIP
>>> result.metrics["latency_ms"], result.folder                     # doctest: +SKIP

The CLI is a thin layer over :func:`compress` (it only adds progress bars and tables).
"""

from __future__ import annotations

import contextlib
import os
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
Step = Callable[[int, int, str], None]


class LatencyInterrupted(KeyboardInterrupt):
    """Ctrl-C during the latency stage: the verified artifact is already on disk, without latency."""

    def __init__(self, folder: Path):
        super().__init__(f"the verified artifact is complete at {folder} (without latency figures; 'compress bench {folder}' measures it)")
        self.folder = folder


@dataclass
class CompressResult:
    """What :func:`compress` / :func:`export` produced."""

    folder: Path
    graph: Graph
    report: PipelineReport | None
    manifest: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail before any work if writing ``out`` would be refused later.

    Besides :func:`~graphpress.runtime.artifact.check_destination` (an existing folder, a file,
    a folder that is not ours), the nearest existing folder above ``out`` must take a new
    entry: the artifact is written to a temporary sibling and renamed into place, so a read-only
    parent would otherwise fail only after the whole pipeline ran. The probe creates and removes
    a temporary folder there (permission bits alone say nothing for root or read-only mounts).
    """
    from graphpress.errors import ArtifactError
    from graphpress.runtime.artifact import check_destination

    check_destination(out, overwrite)
    target = Path(os.path.abspath(out))
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"{target}: cannot write here ({parent} is not a folder); choose another -o folder")
    try:
        probe = tempfile.mkdtemp(prefix=".graphpress-probe-", dir=parent)
    except OSError as err:
        raise ArtifactError(
            f"{target}: cannot write here ({err.strerror or type(err).__name__} in {parent}); choose an -o folder you can write to"
        ) from None
    os.rmdir(probe)
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
    on_step: Step | None = None,
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
    on_step : callable, optional
        ``on_step(done, total, what)``: counts inside a stage -- a pass's layers (passes report
        them through :func:`graphpress.passes.base.report_progress`), verification sets,
        latency rounds.

    Everything that can be checked without the model is checked before the capture: the output
    folder (and that it can be written), the recipe (file, pass names, options), the backend,
    ``input_shape``, the fine-tuning options and the data files.
    """
    from graphpress.backends import get_backend
    from graphpress.frontends import load
    from graphpress.frontends.torch_module import parse_shape
    from graphpress.passes.base import progress_hook

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    pipeline = Pipeline.from_recipe(recipe)  # pass names and options fail here, before the capture
    get_backend(backend)  # an unknown backend fails before the capture, not after the passes
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    from graphpress.train import DistillConfig, distill, load_inputs

    if finetune is not None and not isinstance(finetune, DistillConfig):
        finetune = config_from_dict(DistillConfig, dict(finetune), owner="finetune")
    if isinstance(calibration, (str, Path)):
        calibration = load_inputs(calibration, label="--calibration")
    if isinstance(finetune_inputs, (str, Path)):
        finetune_inputs = load_inputs(finetune_inputs, label="--finetune-data")
    stage("capture")
    graph = load(source, arch=arch, example_inputs=example_inputs, input_shape=input_shape)
    if calibration is not None:
        graph.calibration = as_batches(calibration)
    stage("passes")
    with progress_hook(on_step):
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
        on_step=on_step,
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
    on_step: Step | None = None,
    threads: int | None = None,
) -> CompressResult:
    """Lower ``graph`` to ``backend`` and write an artifact folder with manifest and report.

    ``original`` (the graph before passes) is the reference for the accuracy metrics and the
    eager-latency baseline; it defaults to ``graph`` itself. ``extra`` entries are added to the
    manifest (e.g. the fine-tuning history).

    Write first, measure after: the verified artifact is written before the latency stage, which
    then rewrites ``manifest.json`` and ``report.md`` (atomically, re-hashed) with the figures.
    A latency stage that fails leaves the artifact with ``metrics["latency_error"]``; Ctrl-C
    during it raises :class:`LatencyInterrupted` with the artifact complete on disk.

    ``threads``: intra-op threads for the latency stage, the same for torch eager and the
    backend (default: ``torch.get_num_threads()``).
    """
    from graphpress.backends import get_backend
    from graphpress.runtime import make_manifest, write_artifact
    from graphpress.runtime.artifact import claim_scratch

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    original = original or graph
    be = get_backend(backend)
    check_inputs = check_inputs or [graph.example_inputs]
    with tempfile.TemporaryDirectory(prefix="graphpress-lower-") as tmp:
        claim_scratch(tmp)  # records this pid, so the next run removes the folder if this one is killed
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
        metrics["vs_original"] = _vs_original(original, runner, check_inputs, graph.output_names, on_step)
        metrics["check_batches"] = [int(x[0].shape[0]) if x and x[0].dim() else 1 for x in check_inputs]
        manifest = make_manifest(
            graph, lowered, recipe=recipe, passes=report.to_dict()["passes"] if report else [], metrics=metrics
        )
        manifest.update(extra or {})
        # the concrete shapes behind symbolic dims ("seq"): 'compress bench' fills them from here
        manifest["example_shapes"] = {n: [int(d) for d in x.shape] for n, x in zip(graph.input_names, graph.example_inputs)}
        manifest["host"] = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}
        stage("write")
        del runner  # release the session's file handle before the folder moves
        folder = write_artifact(out, files, manifest, render_report(manifest), overwrite=overwrite)
        if bench:
            stage("bench")
            try:
                metrics.update(_measure_latency(graph, original, be, lowered, Path(tmp), baseline, on_step, threads))
            except KeyboardInterrupt:
                raise LatencyInterrupted(folder) from None
            except Exception as err:  # noqa: BLE001 -- the verified artifact stands; say why latency is missing
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                metrics["latency_error"] = f"{type(err).__name__}: {first[:300]}"
            stage("write")
            try:
                manifest = _rewrite_with_metrics(folder, metrics)
            except KeyboardInterrupt:
                raise LatencyInterrupted(folder) from None
    return CompressResult(folder, graph, report, manifest, metrics)


def _rewrite_with_metrics(folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Rewrite ``folder``'s manifest and report with new ``metrics``, as one atomic swap.

    The files are copied into a temporary sibling with the new ``manifest.json`` and
    ``report.md`` (every file re-hashed) and renamed over the folder, so a reader or a kill sees
    either the artifact as first written or the updated one, never a manifest whose hashes do
    not match.
    """
    import json

    from graphpress.runtime.artifact import MANIFEST, REPORT, write_artifact

    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    manifest["metrics"] = metrics
    files = {name: folder / name for name in manifest.get("files", {}) if name != REPORT}
    write_artifact(folder, files, manifest, render_report(manifest), overwrite=True)
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


@contextlib.contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _measure_latency(
    graph: Graph, original: Graph, be: Any, lowered: Any, tmp: Path, baseline: bool, on_step: Step | None, threads: int | None
) -> dict[str, Any]:
    """Batch-1 latency of torch eager (original), the backend on the original graph (with
    ``baseline``) and on the compressed one: interleaved medians with p10-p90 spreads, the
    thread count and the machine's load (see :func:`graphpress.runtime.bench.latency_warnings`)."""
    from graphpress.runtime.bench import compare_latency, machine_load

    n = int(threads or torch.get_num_threads())
    x1 = batch_one(graph)
    variants: dict[str, Callable[[], Any]] = {"torch eager (original)": _torch_call(original, x1)}
    load_before = machine_load()
    from graphpress.runtime.artifact import claim_scratch

    with tempfile.TemporaryDirectory(prefix="graphpress-baseline-") as tmp_base:
        claim_scratch(tmp_base)  # a killed run's baseline folder is removed by the next run
        if baseline and original is not graph:
            base = be.lower(original, Path(tmp_base), check=False)
            variants[f"{lowered.backend} (original)"] = _runner_call(be.runner(Path(tmp_base) / base.model_file, threads=n), x1)
        variants[f"{lowered.backend} (compressed)"] = _runner_call(be.runner(tmp / lowered.model_file, threads=n), x1)
        with torch_threads(n):  # torch eager gets the threads the backend's session gets
            timing = compare_latency(variants, on_round=(lambda r, total: on_step(r, total, "rounds")) if on_step else None)
    load_after = machine_load()
    return {
        "latency_ms": {name: round(r.median_ms, 4) for name, r in timing.results.items()},
        "latency_spread_ms": {name: [round(r.p10_ms, 4), round(r.p90_ms, 4)] for name, r in timing.results.items()},
        "latency_batch": int(x1[0].shape[0]) if x1 and x1[0].dim() else 1,
        "latency_threads": n,
        "latency_load": {
            "cpus": load_before["cpus"],
            "loadavg_1m": max(load_before["loadavg_1m"], load_after["loadavg_1m"]),
        },
    }


def _vs_original(original: Graph, runner: Any, check_inputs, names: Sequence[str], on_step: Step | None = None) -> list[dict[str, Any]]:
    """Worst error per output of the lowered model against the original graph."""
    per_set = []
    for i, inputs in enumerate(check_inputs):
        if on_step is not None:
            on_step(i, len(check_inputs), "input sets")
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
        from graphpress.runtime.bench import latency_warnings

        reasons, withheld = latency_warnings(m)
        spread = m.get("latency_spread_ms") or {}
        first = next(iter(lat.values()))
        threads = f", {m['latency_threads']} threads" if m.get("latency_threads") else ""
        lines += [
            "",
            f"### Latency (batch {m.get('latency_batch', 1)}{threads}, median of interleaved runs)",
            "",
            "| runtime | ms | p10-p90 ms | speed-up vs first |",
            "|---|---|---|---|",
        ]
        for k, v in lat.items():
            sp = f"{spread[k][0]:.4f}-{spread[k][1]:.4f}" if k in spread else "-"
            lines.append(f"| {k} | {v:.4f} | {sp} | {'-' if k in withheld else f'{first / v:.2f}x'} |")
        if reasons:
            lines += ["", "Speed-ups withheld: " + "; ".join(reasons) + ". Rerun `compress bench` on a quiet machine."]
    if m.get("latency_error"):
        lines += ["", f"Latency not measured: {m['latency_error']}"]
    lines += ["", "## Lost (artifact vs original model)", "", "| output | max abs error | SQNR dB |", "|---|---|---|"]
    lines += [f"| {d['name']} | {d['max_abs']:.3g} | {_fmt_db(d['sqnr_db'])} |" for d in m.get("vs_original", [])]
    passes = manifest.get("passes", [])
    if passes:
        lines += ["", "## Passes", "", "| pass | exact | changed | time s | stats |", "|---|---|---|---|---|"]
        for p in passes:
            lines.append(f"| {p['name']} | {p['exact']} | {p['changed']} | {p['time_s']:.3f} | `{p['stats']}` |")
    return "\n".join(lines) + "\n"


__all__ = ["compress", "export", "CompressResult", "LatencyInterrupted", "render_report", "check_out_dir", "torch_threads"]
