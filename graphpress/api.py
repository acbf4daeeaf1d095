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

from graphpress.errors import ArtifactError, GraphpressError
from graphpress.ir.compare import compare_outputs
from graphpress.ir.graph import Graph
from graphpress.lowering.onnx.kv_cache import CacheStorage, storage_of
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
    backend: Any = None,
    backend_options: dict[str, Any] | None = None,
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
    kv_cache: bool = False,
    require_speedup: float | None = None,
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
    backend : str or Backend, optional
        A backend name (``"onnxruntime"``, ``"torch"``, ``"tvm"``, ``"he"``) or a configured
        backend from :func:`graphpress.backends.get_backend`; default: the recipe's ``backend``
        section, else ``"onnxruntime"``.
    backend_options : dict, optional
        The backend's options (see :func:`resolve_backend`), over the recipe's ones key by key.
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
    kv_cache : bool
        Capture a Hugging Face causal LM as one generation step with a KV cache (past keys and
        values in, present ones out; :mod:`graphpress.frontends.hf_kv`), so that the artifact
        generates one token per step; token-id calibration data is fed as prompts (prefill).
    require_speedup : float, optional
        Fail (one line, naming the layers that cost time; the artifact stays for inspection) when
        the artifact is not at least this many times faster than the original graph on the
        backend (needs ``bench`` and ``baseline``).

    Everything that can be checked without the model is checked before the capture: the output
    folder (and that it can be written), the recipe (file, pass names, options), the backend and
    its options, ``input_shape``, the fine-tuning options and the data files.
    """
    from graphpress.frontends import load
    from graphpress.frontends.torch_module import parse_shape
    from graphpress.passes.base import progress_hook

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    pipeline = Pipeline.from_recipe(recipe)  # pass names and options fail here, before the capture
    # an unknown backend or option fails before the capture, not after the passes
    backend = resolve_backend(backend, backend_options, recipe=recipe)
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
    graph = load(source, arch=arch, example_inputs=example_inputs, input_shape=input_shape, kv_cache=kv_cache)
    if calibration is not None:
        from graphpress.frontends.hf_kv import prefill_batches

        graph.calibration = prefill_batches(graph, as_batches(calibration))
    stage("passes")
    with progress_hook(on_step):
        report = pipeline.run(graph, on_event=on_event)
    finetuned = None
    if finetune_inputs is not None:
        stage("finetune")
        finetuned = distill(report.graph, graph, finetune_inputs, finetune or DistillConfig(), on_epoch=on_epoch)
    if require_speedup is not None and not (bench and baseline):
        raise GraphpressError("--require-speedup needs the latency stage and its baseline (drop --no-bench / --no-baseline)")
    result = export(
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
    check_speedup(result, require_speedup)
    return result


AUTO_OBJECTIVES = ("latency", "size", "he-latency")
AUTO_METRICS = ("agreement", "accuracy", "kl", "sqnr")


def _split(data: tuple[torch.Tensor, ...], what: str) -> tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    n = int(data[0].shape[0])
    if n < 4:
        raise GraphpressError(f"{what}: {n} samples; auto needs at least 4 (half calibrate, half measure), or give --eval-data")
    half = n // 2
    return [tuple(t[:half] for t in data)], tuple(t[half:] for t in data)


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """One-line error unless ``address`` (``host:port`` or ``ray://host:port``; ``auto`` = the
    cluster this machine is part of) accepts a TCP connection -- before any search work."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise GraphpressError(f"--ray-address {address!r}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise GraphpressError(f"--ray-address {address}: unreachable ({err.strerror or err}); start the cluster with 'ray start --head' or drop the flag for a local Ray") from None


def auto(
    source: Any,
    *,
    out: str | Path,
    calibration: Any,
    objective: str = "latency",
    max_drop: float = 0.01,
    metric: str = "agreement",
    eval_data: Any = None,
    labels: Any = None,
    backend: str = "onnxruntime",
    arch: str | None = None,
    input_shape: Sequence[int] | str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    workers: int = 2,
    seed: int = 0,
    bench: bool = True,
    require_speedup: float | None = None,
    poly_degree: int = 4096,
    finetune_data: Any = None,
    finetune: dict[str, Any] | None = None,
    on_stage: Stage | None = None,
    on_step: Step | None = None,
) -> CompressResult:
    """Search every technique's per-layer choices under one quality budget, write the best artifact.

    See :mod:`graphpress.auto.search` for the method and ``docs/auto.md`` for the report.

    Parameters
    ----------
    source : nn.Module, str or Path
        Anything :func:`graphpress.frontends.load` accepts.
    out : path
        Artifact folder (refused if it exists unless ``overwrite``); nothing is written when no
        candidate meets the budget.
    calibration : Tensor, tuple of Tensor, or path
        Representative inputs: quantization ranges and per-layer sensitivity. Without
        ``eval_data`` its second half is held out to measure the candidates.
    objective : "latency", "size" or "he-latency"
        Minimise the measured batch-1 latency on ONNX Runtime, the artifact's bytes, or the
        measured latency of one encrypted inference on the HE backend (``backend="he"``:
        block-circulant block sizes per layer, priced by this machine's measured HE op costs).
    max_drop : float
        Quality budget in ``metric``'s unit: a fraction for agreement / accuracy (0.01 = 1%),
        nats for KL, or the lowest SQNR in dB for ``sqnr``.
    metric : "agreement", "accuracy", "kl" or "sqnr"
        Quality against the float model (``accuracy`` needs ``labels``).
    eval_data, labels : Tensor or path, optional
        Held-out inputs (and class labels) the candidates are measured on.
    backend : str
        ``onnxruntime`` (latency, size) or ``he`` (he-latency): where costs are measured and the
        artifact is lowered.
    threads : int, optional
        Intra-op threads of the cost table and the timing (default: ``torch.get_num_threads()``).
    ray, ray_address, workers : optional
        Run the trials as Ray tasks: a local Ray with ``workers`` CPUs started and stopped here,
        or the cluster at ``ray_address``.
    require_speedup : float, optional
        As for :func:`compress`: fail when the written artifact is not this much faster than the
        float model on the backend (ONNX Runtime objectives).
    poly_degree : int
        ``he-latency``: the ring degree N the HE costs are predicted and measured at.
    finetune_data : Tensor or path, optional
        Unlabelled inputs: every measured candidate is distilled from the float model on them
        before its quality is measured (and the written one is the distilled one), so the
        search trades on recovered quality. ``finetune``: :class:`~graphpress.train.DistillConfig`
        options (default: 3 epochs).

    Returns
    -------
    CompressResult
        The artifact; its manifest's ``auto`` entry summarizes the search, and ``auto.json``,
        ``pareto.png`` and ``pareto.html`` in the folder hold the whole record.

    Raises
    ------
    GraphpressError
        One line, before the search where possible: an objective the backend cannot measure, a
        metric the data cannot give, a budget no candidate meets (naming the closest), an
        unreachable Ray address.
    """
    import json

    from graphpress.auto import AutoConfig, Job, RayTrials, SerialTrials, search
    from graphpress.auto.pareto import HTML, JSON, PNG, page_html, plot_png
    from graphpress.auto.trials import build_report, finetuned
    from graphpress.frontends.torch_module import parse_shape
    from graphpress.train import load_inputs

    out = check_out_dir(out, overwrite)
    if objective not in AUTO_OBJECTIVES:
        raise GraphpressError(f"--objective {objective!r}: use one of {', '.join(AUTO_OBJECTIVES)}")
    if metric not in AUTO_METRICS:
        raise GraphpressError(f"--metric {metric!r}: use one of {', '.join(AUTO_METRICS)}")
    if objective == "he-latency" and backend != "he":
        raise GraphpressError(f"--objective he-latency: the {backend} backend cannot measure encrypted latency; add --backend he")
    if objective != "he-latency" and backend != "onnxruntime":
        raise GraphpressError(f"--backend {backend!r}: auto measures its {objective} costs on onnxruntime only"
                              + (" (--backend he goes with --objective he-latency)" if backend == "he" else ""))
    if backend == "he":
        from graphpress.backends.he import require_tenseal

        require_tenseal()
        if require_speedup is not None:
            raise GraphpressError("--require-speedup: encrypted artifacts are timed with 'compress bench', not by the latency stage")
    if metric != "sqnr" and not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise GraphpressError(f"--max-drop {max_drop!r}: must be a number >= 0 (a fraction for {metric})")
    if metric in ("agreement", "accuracy") and max_drop >= 1:
        raise GraphpressError(f"--max-drop {max_drop:g}: {metric} drops are fractions (0.01 = 1%)")
    if metric == "accuracy" and labels is None:
        raise GraphpressError("--metric accuracy needs --labels (class ids of the evaluation inputs); use --metric agreement without labels")
    if ray_address:
        check_ray_address(ray_address)
    if isinstance(calibration, (str, Path)):
        calibration = load_inputs(calibration, label="--calibration")
    if calibration is None:
        raise GraphpressError("auto needs --calibration: inputs to calibrate and rank the layers on")
    calib = _as_tuple(calibration)
    if eval_data is not None:
        if isinstance(eval_data, (str, Path)):
            eval_data = load_inputs(eval_data, label="--eval-data")
        cal_batches, evaluation = [calib], _as_tuple(eval_data)
    else:
        cal_batches, evaluation = _split(calib, "--calibration")
    if labels is not None:
        if isinstance(labels, (str, Path)):
            labels = load_inputs(labels, label="--labels")
        labels = _as_tuple(labels)[0].long().reshape(-1)
        if labels.numel() != int(evaluation[0].shape[0]):
            where = "--eval-data" if eval_data is not None else "the held-out half of --calibration"
            raise GraphpressError(f"--labels: {labels.numel()} labels for {int(evaluation[0].shape[0])} inputs of {where}")
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    ft_inputs, ft_config = None, None
    if finetune_data is not None:
        from graphpress.train import DistillConfig

        if isinstance(finetune_data, (str, Path)):
            finetune_data = load_inputs(finetune_data, label="--finetune-data")
        ft_inputs = _as_tuple(finetune_data)
        ft_config = {"epochs": 3, **dict(finetune or {})}
        config_from_dict(DistillConfig, dict(ft_config), owner="finetune")  # unknown options fail before the search
    n = int(threads or torch.get_num_threads())
    job = Job(source, cal_batches, evaluation, metric=metric, labels=labels, arch=arch,
              input_shape=tuple(input_shape) if input_shape else None,
              example_inputs=tuple(example_inputs) if example_inputs is not None else None, seed=seed,
              finetune=ft_inputs, finetune_config=ft_config)
    config = AutoConfig(objective=objective, max_drop=float(max_drop), metric=metric, threads=n, seed=seed, poly_degree=int(poly_degree))
    trials = RayTrials(workers=workers, address=ray_address) if (ray or ray_address) else SerialTrials()
    try:
        result = search(job, config, trials, on_stage=on_stage, on_step=on_step)
    finally:
        trials.close()
    record = result.to_dict()
    files: dict[str, bytes] = {}
    png = None
    try:
        with tempfile.TemporaryDirectory(prefix="graphpress-pareto-") as tmp:
            plot_png(record, Path(tmp) / PNG)
            png = (Path(tmp) / PNG).read_bytes()
        files[PNG] = png
    except ImportError:
        record["plot"] = "matplotlib is not installed: pip install 'graphpress[auto]' for pareto.png"
    files[JSON] = json.dumps(record, indent=1, default=str).encode()
    files[HTML] = page_html(record, png).encode()
    chosen = result.chosen
    summary = {"objective": objective, "metric": metric, "max_drop": max_drop, "chosen": chosen.candidate.label(),
               "choices": chosen.candidate.to_dict(), "quality": {k: v for k, v in chosen.quality.items() if k in ("drop", "value", "kl", "agreement", "accuracy", "sqnr_db")},
               "latency_ms": chosen.latency_ms, "speedup_vs_float": record.get("speedup"), "candidates": len(record["candidates"]),
               "pareto": record["pareto"], "trials": record["trials"], "files": sorted(files)}
    passes = chosen.candidate.recipe()
    # the measured candidate, rebuilt the way its trial built it (one thread: the same weights)
    report = build_report(job, chosen.candidate)
    graph = report.graph if report is not None else result.base
    extra: dict[str, Any] = {"auto": summary}
    if job.finetune is not None and report is not None:
        graph = graph.clone()
        tuned = finetuned(job, graph)
        if tuned is not None:
            extra["finetune"] = tuned
    he = backend == "he"
    # The search priced the HE linear layers (debugging kernels at poly_degree); the artifact runs the
    # secure two-party protocol, whose noise flooding picks its own ring degree per layer.
    written = export(graph, out, backend=backend, backend_options=None, original=result.base,
                     report=report, recipe={"name": "auto", "passes": passes}, overwrite=overwrite,
                     bench=(bench or require_speedup is not None) and not he,  # encrypted inference: seconds; 'compress bench' times it
                     on_stage=on_stage, on_step=on_step, threads=n, extra=extra, extra_files=files,
                     check_inputs=[tuple(t[:1 if he else 8] for t in evaluation)])
    check_speedup(written, require_speedup)
    return written


#: The search record ``compress auto`` writes into its artifact.
AUTO_RECORD = "auto.json"


def auto_frontier(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pareto frontier rows of an ``auto.json`` record (:func:`graphpress.auto.pareto.frontier_rows`)."""
    from graphpress.auto.pareto import frontier_rows

    return frontier_rows(record)


#: ``stream="auto"`` streams a decoder LLM whose float32 weights exceed this many bytes (1 GB,
#: ~270M parameters): the whole-graph path needed ~20 bytes per parameter at 336M.
STREAM_AUTO_BYTES = 1 << 30


def stream_choice(source: Any, stream: str = "auto") -> str | None:
    """Why ``source`` is compressed by streaming (a line for the user), or None for the
    whole-graph path.

    Parameters
    ----------
    source : Any
        What :func:`compress` would load.
    stream : {"auto", "on", "off"}
        ``on``: stream, or fail in one line saying why the source cannot be; ``auto``: stream a
        Llama/Qwen2/Mistral/Phi-3 folder whose float32 weights exceed :data:`STREAM_AUTO_BYTES`.
    """
    from graphpress.errors import GraphpressError as _Err

    if stream not in ("auto", "on", "off"):
        raise _Err(f"--stream {stream!r}: use auto, on or off")
    if stream == "off":
        return None
    from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout

    is_folder = isinstance(source, (str, Path)) and Path(source).is_dir() and (Path(source) / "config.json").is_file()
    if not is_folder:
        if stream == "on":
            raise _Err(f"--stream on: {source} is not a Hugging Face folder (config.json + safetensors); streaming takes decoder-LLM folders only")
        return None
    try:
        layout = decoder_layout(ShardedCheckpoint(source))
    except _Err as err:
        if stream == "on":
            raise
        del err  # auto: not streamable, the whole-graph path takes it
        return None
    fp32 = sum(layout.checkpoint.numel(n) for n in layout.checkpoint.names()) * 4
    if stream == "on":
        return f"--stream on: {layout.family}, {layout.num_layers} blocks, {fp32 / 2**30:.2f} GB of float32 weights"
    if fp32 > STREAM_AUTO_BYTES:
        return f"--stream auto: {layout.family} with {fp32 / 2**30:.2f} GB of float32 weights (over {STREAM_AUTO_BYTES / 2**30:.0f} GB): streamed block by block"
    return None


def compress_stream(
    source: str | Path,
    *,
    out: str | Path,
    recipe: str | Path | Recipe | dict = "default",
    overwrite: bool = False,
    calibration: Any = None,
    options: Any = None,
    on_unit: Callable[[int, int, Any], None] | None = None,
) -> Any:
    """Compress a decoder-LLM folder block by block into an ONNX artifact (issue 17's streaming
    mode; see :func:`graphpress.stream.compress_stream` and ``docs/big-models.md``).

    ``calibration``: token ids ``(sequences, seq)``, or a file :func:`graphpress.train.load_inputs`
    reads; ``options``: a :class:`graphpress.stream.StreamOptions` or a dict of its fields.
    """
    from graphpress.config import config_from_dict as _from_dict
    from graphpress.stream import StreamOptions
    from graphpress.stream import compress_stream as _stream

    out = check_out_dir(out, overwrite)
    if isinstance(calibration, (str, Path)):
        from graphpress.train import load_inputs

        calibration = load_inputs(calibration, label="--calibration")
    if isinstance(calibration, (tuple, list)):
        calibration = calibration[0]
    if isinstance(options, dict):
        options = _from_dict(StreamOptions, options, owner="stream options")
    return _stream(source, recipe, out, options=options or StreamOptions(), calibration=calibration, overwrite=overwrite, on_unit=on_unit)


def resolve_backend(backend: Any = None, options: dict[str, Any] | None = None, *, recipe: Recipe | None = None) -> Any:
    """The configured backend for a run: name, options and the recipe's ``backend`` section.

    Parameters
    ----------
    backend : str or Backend, optional
        A backend name or an already configured backend instance; default: the recipe's
        backend, else ``"onnxruntime"``.
    options : dict, optional
        Option name -> value (``--backend-option key=value``); they override the recipe's
        options key by key.
    recipe : Recipe, optional
        Its ``backend`` section supplies the name and options when ``backend`` names the same
        backend (or none).

    Returns
    -------
    Backend
        Constructed with validated options (its ``options`` attribute holds them).

    Raises
    ------
    BackendError
        An unknown backend or option, a value of the wrong type or one the backend refuses
        (one line naming the backend, the option and, for a misspelling, the closest option);
        options for a backend given as an instance; recipe options for another backend than
        the one chosen.
    """
    from graphpress.backends import backend_options, get_backend
    from graphpress.errors import BackendError

    merged: dict[str, Any] = {}
    if recipe is not None and recipe.backend is not None:
        chosen = backend if isinstance(backend, str) else getattr(backend, "name", None)
        if chosen is not None and chosen != recipe.backend:
            if recipe.backend_options:
                raise BackendError(
                    f"{recipe.origin}: the recipe's backend section configures '{recipe.backend}' "
                    f"({', '.join(sorted(recipe.backend_options))}) but the backend is '{chosen}'; "
                    f"drop the backend choice or the recipe's backend options"
                )
        else:
            try:
                backend_options(recipe.backend, recipe.backend_options)
            except BackendError as err:
                raise BackendError(f"{recipe.origin}: backend: {err}") from None
            backend = backend if backend is not None else recipe.backend
            merged.update(recipe.backend_options)
    if backend is None:
        backend = "onnxruntime"
    merged.update(options or {})
    return get_backend(backend, **merged)  # checks the options (backend_options) before constructing


def as_batches(data: Any, batch_size: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """A tensor or a tuple of per-input tensors (rows = samples) as a list of input tuples."""
    cols = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    n = cols[0].shape[0]
    return [tuple(c[i : i + batch_size] for c in cols) for i in range(0, n, batch_size)]


def export(
    graph: Graph,
    out: str | Path,
    *,
    backend: Any = "onnxruntime",
    backend_options: dict[str, Any] | None = None,
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
    extra_files: dict[str, bytes] | None = None,
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

    ``extra_files``: more files for the artifact by name (e.g. ``compress auto``'s Pareto
    report), hashed in the manifest like the model files.

    ``backend`` is a name or a configured backend, ``backend_options`` its options (see
    :func:`resolve_backend`); the options in force are written to ``manifest["backend_options"]``.
    """
    from graphpress.config import config_to_dict
    from graphpress.runtime import make_manifest, write_artifact
    from graphpress.runtime.artifact import claim_scratch

    stage = on_stage or (lambda _s: None)
    out = check_out_dir(out, overwrite)
    original = original or graph
    be = resolve_backend(backend, backend_options)
    check_inputs = check_inputs or [graph.example_inputs]
    with tempfile.TemporaryDirectory(prefix="graphpress-lower-") as tmp:
        claim_scratch(tmp)  # records this pid, so the next run removes the folder if this one is killed
        stage("lower")
        lowered = be.lower(graph, Path(tmp))
        files: dict[str, Any] = {name: Path(tmp) / name for name in lowered.files}
        for name, data in (extra_files or {}).items():
            if name in files:
                raise ArtifactError(f"extra file {name!r} would replace a model file of the artifact")
            files[name] = data
        runner = be.runner(Path(tmp) / lowered.model_file)
        metrics: dict[str, Any] = {
            "params_before": original.parameter_count(),
            "params_after": graph.parameter_count(),
            "param_bytes_before": original.parameter_bytes(),
            "param_bytes_after": graph.parameter_bytes(),
            "model_file_bytes": sum((Path(tmp) / name).stat().st_size for name in lowered.files),
            "backend_check": lowered.check,
        }
        stage("verify")
        # caches stored as codes (quantize-kv-cache, ONNX): the artifact is compared on the graph's interface
        as_graph = _storage(graph, lowered).wrap(runner, graph.input_names, graph.output_names)
        metrics["vs_original"] = _vs_original(original, as_graph, check_inputs, graph.output_names, on_step)
        metrics["check_batches"] = [int(x[0].shape[0]) if x and x[0].dim() else 1 for x in check_inputs]
        manifest = make_manifest(
            graph, lowered, recipe=recipe, passes=report.to_dict()["passes"] if report else [], metrics=metrics
        )
        manifest.update(extra or {})
        if getattr(be, "options", None) is not None:  # absent from artifacts written before backend options
            manifest["backend_options"] = config_to_dict(be.options)
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
    thread count and the machine's load (see :func:`graphpress.runtime.bench.latency_warnings`).

    The speed-up guard: with a baseline, ``speedup`` records the ratio over the original on the
    backend and whether it lies beyond the measured spread, and (ONNX Runtime) each layer's
    profiled time before and after goes to ``layer_latency_us`` -- the layers that cost time
    are named when the artifact is not faster (:func:`speedup_verdict`)."""
    from graphpress.runtime.bench import compare_latency, machine_load

    n = int(threads or torch.get_num_threads())
    x1 = batch_one(graph)
    variants: dict[str, Callable[[], Any]] = {"torch eager (original)": _torch_call(original, x1)}
    load_before = machine_load()
    from graphpress.runtime.artifact import claim_scratch

    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="graphpress-baseline-") as tmp_base:
        claim_scratch(tmp_base)  # a killed run's baseline folder is removed by the next run
        base = None
        if baseline and original is not graph:
            base = be.lower(original, Path(tmp_base), check=False)
            variants[f"{lowered.backend} (original)"] = _runner_call(be.runner(Path(tmp_base) / base.model_file, threads=n), x1)
        storage = _storage(graph, lowered)
        # caches stored as codes: the prefill's empty caches are encoded once, not inside the timed call
        x1c = tuple(storage.encode(graph.input_names, x1)) if storage.bits else x1
        variants[f"{lowered.backend} (compressed)"] = _runner_call(be.runner(tmp / lowered.model_file, threads=n), x1c)
        with torch_threads(n):  # torch eager gets the threads the backend's session gets
            timing = compare_latency(variants, on_round=(lambda r, total: on_step(r, total, "rounds")) if on_step else None)
        if base is not None and lowered.node_layers and original.parameter_bytes() <= _PROFILE_MAX_BYTES:
            profiles = _layer_profiles(original, be, tmp_base, tmp / lowered.model_file, lowered.node_layers, x1, x1c, n)
    load_after = machine_load()
    out = {
        "latency_ms": {name: round(r.median_ms, 4) for name, r in timing.results.items()},
        "latency_spread_ms": {name: [round(r.p10_ms, 4), round(r.p90_ms, 4)] for name, r in timing.results.items()},
        "latency_batch": int(x1[0].shape[0]) if x1 and x1[0].dim() else 1,
        "latency_threads": n,
        "latency_load": {
            "cpus": load_before["cpus"],
            "loadavg_1m": max(load_before["loadavg_1m"], load_after["loadavg_1m"]),
        },
    }
    orig, comp = f"{lowered.backend} (original)", f"{lowered.backend} (compressed)"
    if orig in timing.results:
        o, c = timing.results[orig], timing.results[comp]
        out["speedup"] = {
            "vs": orig,
            "ratio": round(o.median_ms / c.median_ms, 4),
            # beyond the measured spread: the compressed median is below the original's 10th percentile
            "faster": bool(c.median_ms < o.p10_ms),
            "slower": bool(c.median_ms > o.p90_ms),
        }
    if profiles:
        po, pc = profiles["original"]["layers_us"], profiles["compressed"]["layers_us"]
        out["layer_latency_us"] = {k: [po.get(k, 0.0), pc.get(k, 0.0)] for k in sorted(set(po) | set(pc))}
    return out


#: The guard profiles layers of models up to this many parameter bytes (a second lowering of the original).
_PROFILE_MAX_BYTES = 512 << 20


def _layer_profiles(original: Graph, be: Any, tmp_base: str, model: Path, node_layers: dict[str, str], x1, x1c, n: int) -> dict[str, Any]:
    """Per-layer profiled time of the original and the compressed model (ONNX Runtime).

    The original is profiled with its batch norms folded (exact): ONNX Runtime folds them too,
    but names the folded conv after the norm, and the layers must carry one name on both sides.
    """
    from graphpress.backends.onnxruntime.profile import profile_layers

    folded = Pipeline.from_recipe({"name": "profile", "passes": ["fold-batchnorm"]}).run(original).graph
    ref = be.lower(folded, Path(tmp_base) / "folded", check=False)
    return {"original": profile_layers(Path(tmp_base) / "folded" / ref.model_file, x1, ref.node_layers, threads=n),
            "compressed": profile_layers(model, x1c, node_layers, threads=n)}


def _slower_layers(metrics: dict[str, Any], top: int = 3) -> str:
    """``"; layers that cost time: a (+7.0 us), ..."``: the layers whose profiled time grew most, or ``""``."""
    layers = metrics.get("layer_latency_us") or {}
    worse = sorted(((c - o, k) for k, (o, c) in layers.items() if c > o), reverse=True)[:top]
    return ("; layers that cost time: " + ", ".join(f"{k} (+{d:.1f} us)" for d, k in worse)) if worse else ""


def speedup_verdict(metrics: dict[str, Any]) -> str | None:
    """One sentence when the compressed artifact is not measurably faster than the original on
    its backend (``None`` when it is, or when no baseline was timed), naming the layers whose
    profiled time grew most."""
    sp = metrics.get("speedup")
    if not sp or sp.get("faster"):
        return None
    who = _slower_layers(metrics)
    where = sp["vs"].split(" (")[0]
    if sp.get("slower"):
        return f"the compressed artifact is slower than the original on {where} ({sp['ratio']:.2f}x, beyond the measured spread){who}"
    return f"the compressed artifact is not measurably faster than the original on {where} ({sp['ratio']:.2f}x, within the measured spread){who}"


def check_speedup(result: "CompressResult", require: float | None) -> None:
    """``--require-speedup R``: a one-line error when the measured speed-up over the original on
    the backend is below ``R`` (the artifact stays on disk for inspection)."""
    if require is None:
        return
    sp = result.metrics.get("speedup")
    if not sp:
        why = result.metrics.get("latency_error") or "no baseline was timed (latency or the baseline is off)"
        raise GraphpressError(f"--require-speedup {require:g}: no speed-up measured: {why}")
    if sp["ratio"] < require:
        who = _slower_layers(result.metrics)
        raise GraphpressError(f"--require-speedup {require:g}: measured {sp['ratio']:.2f}x vs {sp['vs']}{who}; "
                              f"artifact kept at {result.folder} for inspection")


def _storage(graph: Graph, lowered: Any) -> CacheStorage:
    """How the lowered model stores the graph's caches: as codes where the lowering changed the
    model file's interface (ONNX Runtime), as the graph's float tensors otherwise (torch)."""
    return storage_of(graph) if getattr(lowered, "io", None) else CacheStorage({})


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
        verdict = speedup_verdict(m)
        if verdict:
            lines += ["", f"**Speed-up guard:** {verdict}."]
    if m.get("latency_error"):
        lines += ["", f"Latency not measured: {m['latency_error']}"]
    lines += ["", "## Lost (artifact vs original model)", "", "| output | max abs error | SQNR dB |", "|---|---|---|"]
    lines += [f"| {d['name']} | {d['max_abs']:.3g} | {_fmt_db(d['sqnr_db'])} |" for d in m.get("vs_original", [])]
    au = manifest.get("auto")
    if au:
        q = au.get("quality", {})
        lines += ["", "## compress auto", "",
                  f"- objective {au['objective']}, budget --max-drop {au['max_drop']:g} ({au['metric']}); chosen: {au['chosen']}",
                  f"- measured drop {q.get('drop')}, latency {au.get('latency_ms')} ms, speed-up vs float {au.get('speedup_vs_float')}",
                  f"- {au['candidates']} candidates measured end to end; Pareto report: [pareto.html](pareto.html), "
                  f"[pareto.png](pareto.png), search record: [auto.json](auto.json)"]
    passes = manifest.get("passes", [])
    if passes:
        lines += ["", "## Passes", "", "| pass | exact | changed | time s | stats |", "|---|---|---|---|---|"]
        for p in passes:
            lines.append(f"| {p['name']} | {p['exact']} | {p['changed']} | {p['time_s']:.3f} | `{p['stats']}` |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- for the command line
# The CLI imports only this module (and graphpress.errors): everything it needs from the layers
# below is reached through the functions here, so the CLI never changes when a backend is added.


def available_backends() -> list[str]:
    """Names of the registered backends (``--backend``)."""
    from graphpress.backends import available_backends as names

    return names()


def backend_options(backend: str, options: dict[str, Any] | None = None) -> Any:
    """Backend ``backend``'s frozen options dataclass built from ``options``.

    Parameters
    ----------
    backend : str
        A registered backend name.
    options : dict, optional
        Option name -> value; missing options take their defaults.

    Returns
    -------
    frozen dataclass
        E.g. ``HEOptions(version=1, encoding='coeff-dense', ...)``.

    Raises
    ------
    BackendError
        An unknown backend, an unknown option (with the closest valid name) or a value of the
        wrong type, in one line.
    """
    from graphpress.backends import backend_options as build

    return build(backend, options)


def finetune_trainable_modes() -> tuple[str, ...]:
    """What ``finetune={"trainable": ...}`` accepts: ``("auto", "annotated", "all")``."""
    from graphpress.train.distill import TRAINABLE

    return tuple(TRAINABLE)


def check_recipe(recipe: str | Path | Recipe | dict) -> Recipe:
    """Load and validate ``recipe`` (file, built-in name, pass names and options) without a model.

    Returns
    -------
    Recipe

    Raises
    ------
    PassError
        One line naming the recipe file and what to change.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    Pipeline.from_recipe(recipe)
    return recipe


def list_passes(include_test: bool = False) -> list[dict[str, Any]]:
    """The registered passes, for ``compress passes``.

    Parameters
    ----------
    include_test : bool
        Also list passes whose name starts with ``test-`` (registered by the test suite).

    Returns
    -------
    list of dict
        ``{"name", "exact", "defaults" (the default config as a dict), "summary"}`` per pass,
        sorted by name.
    """
    from graphpress.passes import config_to_dict, describe, registered

    return [
        {"name": name, "exact": bool(cls.exact), "defaults": config_to_dict(cls.Config()), "summary": describe(cls)}
        for name, cls in registered().items()
        if include_test or not name.startswith("test-")
    ]


def supported_onnx_ops() -> list[str]:
    """The ONNX op types the ONNX importer (``graphpress.frontends.onnx_import``) translates."""
    from graphpress.frontends.onnx_import import supported_ops

    return list(supported_ops())


def load_model(source: Any, *, arch: str | None = None, input_shape: Sequence[int] | str | None = None) -> Graph:
    """Capture ``source`` as a :class:`~graphpress.ir.graph.Graph` (:func:`graphpress.frontends.load`).

    Parameters
    ----------
    source : nn.Module, str or Path
        A checkpoint, safetensors, ONNX, llama2.c or Hugging Face file/folder, or
        ``package.module:factory``.
    arch : str, optional
        ``package.module:factory`` for weight-only files.
    input_shape : str or sequence of int, optional
        Example input shape, e.g. ``"1x3x32x32"``.

    Returns
    -------
    Graph
    """
    from graphpress.frontends import load
    from graphpress.frontends.torch_module import parse_shape

    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    return load(source, arch=arch, input_shape=input_shape)


def load_artifact(folder: str | Path, **options: Any) -> Any:
    """Open an artifact folder for inference (:func:`graphpress.runtime.load`).

    Parameters
    ----------
    folder : path
        Written by :func:`compress` / :func:`export`.
    **options
        Runtime options, e.g. ``threads``.

    Returns
    -------
    LoadedModel
        Callable on numpy arrays; ``.manifest`` and ``.runner`` attributes.
    """
    from graphpress.runtime import load

    return load(folder, **options)


def artifact_tokenizer(model: Any) -> Any | None:
    """The tokenizer of a decoder artifact: its own ``tokenizer.json`` (KV-cache decoder artifacts
    carry one) or that of the Hugging Face folder it was compressed from
    (``manifest["source"]["path"]``), through ``tokenizers``; None when there is none.

    Raises
    ------
    ArtifactError
        One line when the tokenizer's vocabulary is larger than the model's logits.
    """
    from graphpress.errors import ArtifactError
    from graphpress.runtime.generate import decoder_io

    src = (model.manifest.get("source") or {}).get("path")
    own = Path(model.folder) / "tokenizer.json"  # copied into KV-cache decoder artifacts
    path = own if own.is_file() else (Path(src) / "tokenizer.json" if src else None)
    if path is None or not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tok = Tokenizer.from_file(str(path))
    vocab = model.outputs[decoder_io(model).logits].shape[-1]
    if isinstance(vocab, int) and tok.get_vocab_size() > vocab:
        raise ArtifactError(f"{path}: the tokenizer has {tok.get_vocab_size()} tokens, the model's logits {vocab}: not this model's tokenizer")
    return tok


def benchmark(fn: Callable[[], Any], repeat: int = 50) -> Any:
    """Median / p10 / p90 latency of ``fn()`` over ``repeat`` timed calls
    (:func:`graphpress.runtime.bench.benchmark`); returns a ``BenchResult``."""
    from graphpress.runtime import benchmark as run_benchmark

    return run_benchmark(fn, repeat=repeat)


def latency_warnings(metrics: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Why latency ratios in ``metrics`` should not be trusted, and which rows to withhold
    (:func:`graphpress.runtime.bench.latency_warnings`)."""
    from graphpress.runtime.bench import latency_warnings as warnings_for

    return warnings_for(metrics)


def he_cost_report(program: Any, run: Any, *, label: str) -> dict[str, Any]:
    """Per-layer predicted HE costs and the counts measured in ``run`` (an encrypted run of an
    HE artifact's runner), as written to ``he_cost.json``."""
    from graphpress.backends.he.lower import cost_report

    return cost_report(program, run, label=label)


def he_cached_costs(*, secure: bool = False) -> tuple[dict[str, dict[str, Any]], Path]:
    """This machine's cached per-operation HE costs and the cache file they come from.

    Parameters
    ----------
    secure : bool
        The secure protocol's costs (``compress he-calibrate --secure``) instead of the kernels'.

    Returns
    -------
    (dict, Path)
        Entries by parameter set (empty when nothing was measured here), and the cache path
        (``$GRAPHPRESS_HE_COSTS`` or ``~/.cache/graphpress/he_op_costs.json``).
    """
    costs = _he_op_costs()
    entries = costs.secure_section().get("he", {}) if secure else costs.machine_entries()
    return entries, Path(costs.cache_path())


def secure_setup(path: str | Path | None = None) -> tuple[Path, Path]:
    """Create (or complete) the environment the secure HE protocol's two parties run in.

    SPU 0.9.5, the 2PC engine, pins ``numpy<2`` and ``jax<=0.4.34``; the parties run it in their
    own venv with tenseal 0.3.16 and zstandard (``compress secure-setup``).

    Parameters
    ----------
    path : path, optional
        The venv folder (default ``$GRAPHPRESS_CACHE/spu-venv``, ``~/.cache/graphpress/spu-venv``).

    Returns
    -------
    (Path, Path)
        The venv folder and its python.

    Raises
    ------
    BackendError
        When pip cannot install the requirements or SPU does not import afterwards.
    """
    from graphpress.backends.he.secure.launch import cache_dir, setup_venv

    target = Path(path) if path else cache_dir() / "spu-venv"
    return target, setup_venv(target)


def secure_cost_prediction(folder: str | Path, *, measure: bool = False) -> dict[str, Any]:
    """The secure protocol's cost model for an artifact: per encrypted layer and SPU segment,
    predicted seconds and bytes of one sample (:func:`graphpress.backends.he.secure.costmodel.predict`).

    Parameters
    ----------
    folder : path
        A secure HE artifact folder (``secure_program.json``).
    measure : bool
        Measure the per-operation HE costs this machine lacks (seconds per parameter set);
        without, unpriced layers carry ``None``.
    """
    from graphpress.backends.he.secure.costmodel import predict
    from graphpress.backends.he.secure.program import SecureProgram

    return predict(SecureProgram.load(folder), measure=measure)


def he_calibrate(
    degrees: Sequence[int] | None = None, *, repeat: int = 15, on_entry: Callable[[int, int, dict[str, Any]], None] | None = None
) -> tuple[dict[str, dict[str, Any]], Path]:
    """Measure per-operation BFV costs on this machine and cache them for the HE cost model.

    Parameters
    ----------
    degrees : sequence of int, optional
        Ring degrees to measure (default 4096, 8192, 16384).
    repeat : int
        Timed repetitions per operation (medians).
    on_entry : callable, optional
        ``on_entry(done, total, entry)`` after each parameter set.

    Returns
    -------
    (dict, Path)
        The measured entries and the cache file they were written to.

    Raises
    ------
    BackendError
        When tenseal is not installed.
    """
    from graphpress.backends.he import require_tenseal

    require_tenseal()
    from graphpress.backends.he.costmodel import calibrate

    costs = _he_op_costs()
    entries = calibrate(tuple(degrees) if degrees else costs.DEFAULT_DEGREES, repeat=repeat, on_entry=on_entry)
    return entries, Path(costs.cache_path())


def he_calibrate_secure(
    degrees: Sequence[int] | None = None, *, on_entry: Callable[[int, int, Any], None] | None = None
) -> tuple[dict[str, dict[str, float]], Path]:
    """Measure the secure protocol's per-operation costs on this machine (through its real client
    and server steps, two data primes) and cache them for the ``he-secure`` cost model.

    Parameters
    ----------
    degrees : sequence of int, optional
        Ring degrees to measure (default 4096, 8192).
    on_entry : callable, optional
        ``on_entry(done, total, params)`` after each parameter set.

    Returns
    -------
    (dict, Path)
        Seconds per op (``input``, ``product``, ``output``, ``read``, ``read_bulk``) and bytes by
        parameter set, and the cache file (its ``secure`` section).
    """
    from graphpress.backends.he import require_tenseal

    require_tenseal()
    from graphpress.backends.he.secure import costmodel

    entries = costmodel.calibrate(tuple(degrees) if degrees else (4096, 8192), on_entry=on_entry)
    return entries, Path(_he_op_costs().cache_path())


def _he_op_costs() -> Any:
    from graphpress.lowering.he import op_costs as he_op_costs  # torch-, tenseal-free: the cache file and its format

    return he_op_costs


def tune_artifact(
    artifact: str | Path,
    trials: int,
    *,
    per_task: int | None = None,
    batch: int = 1,
    dims: dict[str, int] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    compare: bool = True,
) -> dict[str, Any]:
    """Tune a ``tvm`` artifact in place with MetaSchedule, then time untuned against tuned.

    Parameters
    ----------
    artifact : path
        A ``--backend tvm`` artifact folder.
    trials : int
        Measured candidates in all; 0 rebuilds from the stored database.
    per_task : int, optional
        At most this many trials per kernel.
    batch : int
        The batch tuned for.
    dims : dict, optional
        Other dynamic dims' tuning values, e.g. ``{"seq": 128}``.
    progress : callable, optional
        Receives the tuning worker's events (``{"event": "tasks" | "progress", ...}``).
    timeout_s : float, optional
        Stop the worker after this many seconds (the artifact stays as it was).
    compare : bool
        Time the untuned (``main``) and tuned (``main_static``) functions, 30 interleaved rounds.

    Returns
    -------
    dict
        The tuning summary (:func:`graphpress.runtime.tune.tune_artifact`) and, with
        ``compare``, ``"latency_ms": {"untuned": ms, "tuned": ms}``.
    """
    import json

    import numpy as np

    from graphpress.backends.tvm.runner import TVMRunner
    from graphpress.runtime.tune import tune_artifact as tune
    from graphpress.runtime.bench import compare_latency

    summary = dict(tune(artifact, trials, per_task=per_task, batch=batch, dims=dims, progress=progress, timeout_s=timeout_s))
    if not compare:
        return summary
    if progress is not None:
        progress({"event": "measuring"})
    runner = TVMRunner(Path(artifact) / "model.so")
    rng = np.random.default_rng(0)
    ranges = json.loads((Path(artifact) / "model.json").read_text()).get("input_int_ranges") or [None] * len(summary["shapes"])
    xs = [
        rng.integers(r[0], r[1] + 1, size=sh).astype("int64") if r else rng.standard_normal(sh).astype("float32")
        for sh, r in zip(summary["shapes"], ranges)
    ]
    cmp = compare_latency(
        {"untuned": lambda: runner.run_function("main", *xs), "tuned": lambda: runner.run_function("main_static", *xs)},
        (),
        rounds=30,
        min_time_s=0.2,
    )
    summary["latency_ms"] = {name: r.median_ms for name, r in cmp.results.items()}
    return summary


@dataclass
class DemoResult:
    """What :func:`digits_demo` produced: the compression result and test accuracies."""

    result: CompressResult
    accuracy_before: float
    accuracy_after: float
    test_images: int


def digits_demo(
    out: str | Path | None = None,
    *,
    recipe: str | Path | Recipe | dict = "fuse",
    overwrite: bool = False,
    on_stage: Stage | None = None,
    **hooks: Any,
) -> DemoResult:
    """Train a small CNN on scikit-learn's digits, compress it, and measure test accuracy.

    Parameters
    ----------
    out : path, optional
        Artifact folder (default: a new temporary folder).
    recipe : str, Path, Recipe or dict
        Checked before the training.
    overwrite : bool
        Replace an existing artifact folder.
    on_stage : callable, optional
        Stage names (``"train digits CNN ..."``, then ``"compress: <stage>"``).
    **hooks
        ``on_event``, ``on_epoch``, ``on_step`` for :func:`compress`.

    Returns
    -------
    DemoResult
        Accuracy of the torch model before and of the artifact after, on the held-out images.
    """
    from graphpress.zoo.digits import accuracy, digits_data, train_digits_cnn

    stage = on_stage or (lambda _s: None)
    recipe = check_recipe(recipe)  # a bad recipe name or option fails before the training
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="graphpress-demo-")) / "digits-cnn"
    check_out_dir(out, overwrite)
    stage("train digits CNN (scikit-learn load_digits)")
    model, acc_before = train_digits_cnn()
    x_train, _, x_test, y_test = digits_data()
    result = compress(
        model, out=out, recipe=recipe, example_inputs=(x_train[:2],), overwrite=overwrite, on_stage=lambda s: stage(f"compress: {s}"), **hooks
    )
    artifact = load_artifact(result.folder)
    acc_after = accuracy(lambda x: torch.from_numpy(artifact(x.numpy())[0]), x_test, y_test)
    return DemoResult(result, acc_before, acc_after, len(y_test))


def check_samples_request(kind: str, out: str | Path, *, overwrite: bool = False) -> Path:
    """Fail before any sampling or training if ``compress samples KIND -o OUT`` would be refused
    (an unknown kind, an existing file without ``overwrite``, an unsupported extension)."""
    from graphpress.zoo.samples import check_request

    return check_request(kind, out, overwrite=overwrite)


def write_samples(
    kind: str,
    out: str | Path,
    *,
    n: int | None = None,
    seed: int = 0,
    seq_len: int = 64,
    overwrite: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[Path, str, bool]:
    """Write real inputs (or a trained digits checkpoint) for the shipped models.

    Parameters
    ----------
    kind : str
        ``digits``, ``photos``, ``stories`` or ``digits-cnn`` (see ``docs/zoo.md``).
    out : path
        ``.pt``, ``.npy`` or ``.safetensors`` file.
    n, seed, seq_len : int
        Sample count (default per kind), seed, tokens per sequence (``stories``).
    overwrite : bool
        Replace an existing file.
    on_progress : callable, optional
        ``on_progress(done, total)`` while sampling tokens.

    Returns
    -------
    (Path, str, bool)
        The file written, a one-line description of its contents, and whether it holds model
        weights (rather than inputs).
    """
    from graphpress.zoo.samples import KINDS, describe
    from graphpress.zoo.samples import write_samples as write

    path, data = write(kind, out, n=n, seed=seed, seq_len=seq_len, overwrite=overwrite, on_progress=on_progress)
    return path, describe(kind, data), bool(KINDS[kind].weights)


__all__ = [
    "CompressResult",
    "DemoResult",
    "LatencyInterrupted",
    "available_backends",
    "backend_options",
    "benchmark",
    "check_out_dir",
    "check_recipe",
    "check_samples_request",
    "compress",
    "digits_demo",
    "export",
    "finetune_trainable_modes",
    "he_calibrate",
    "he_calibrate_secure",
    "he_cached_costs",
    "he_cost_report",
    "latency_warnings",
    "list_passes",
    "load_artifact",
    "load_model",
    "render_report",
    "resolve_backend",
    "secure_cost_prediction",
    "secure_setup",
    "supported_onnx_ops",
    "torch_threads",
    "tune_artifact",
    "write_samples",
]
