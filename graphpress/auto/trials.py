"""Trials of ``compress auto``: what is measured, and where it runs (this process, or Ray tasks).

Every trial is a top-level function of a picklable :class:`Job` (the model's source and the
data) and a few small arguments, so it runs the same in this process and in a Ray worker. A
worker loads and cleans the model once per job (:func:`base_of`, memoized per process) and then
serves any number of trials. Trials run with one intra-op thread wherever they run: the numbers
(and therefore the search's choices) do not depend on how many trials share the machine, and the
serial and the Ray paths give identical results for the same seed.

What a trial does NOT do is time anything: latency is measured by the driver, with nothing else
running (:mod:`graphpress.auto.costs`), which is how "a timing task reserves the whole node" is
kept on one machine.

:class:`SerialTrials` runs trials in order here; :class:`RayTrials` fans them out as Ray tasks
(a local Ray started and stopped by graphpress, or an existing cluster at ``address``), each
retried when its worker dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphpress.auto.space import Candidate
from graphpress.errors import GraphpressError
from graphpress.ir.compare import kl_divergence, sqnr_db, top1_agreement
from graphpress.ir.graph import Graph

METRICS = ("agreement", "accuracy", "kl", "sqnr")
_BASE: dict[str, tuple[Graph, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}


@dataclass
class Job:
    """The model and data every trial of one search shares (picklable).

    ``source`` is anything :func:`graphpress.frontends.load` accepts (a path, or an ``nn.Module``
    pickled to the workers); ``calibration`` the batches that calibrate quantization and
    measure per-layer sensitivity; ``evaluation`` the held-out inputs (and ``labels``) the
    end-to-end quality is measured on. ``finetune`` (unlabelled inputs) makes every measured
    candidate distilled from the float model first (``finetune_config``: a
    :class:`~graphpress.train.DistillConfig` as a dict), so the search sees recovered quality.
    """

    source: Any
    calibration: list[tuple[torch.Tensor, ...]]
    evaluation: tuple[torch.Tensor, ...]
    metric: str = "agreement"
    labels: torch.Tensor | None = None
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    example_inputs: tuple[torch.Tensor, ...] | None = None
    seed: int = 0
    finetune: tuple[torch.Tensor, ...] | None = None
    finetune_config: dict[str, Any] | None = None
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            h = hashlib.sha256()
            h.update(repr((self.source if isinstance(self.source, (str, Path)) else id(self.source), self.arch, self.input_shape,
                           self.metric, self.seed, self.finetune is not None, sorted((self.finetune_config or {}).items()))).encode())
            for batch in [*self.calibration, self.evaluation]:
                for t in batch:
                    h.update(t.detach().contiguous().numpy().tobytes()[:1 << 20])
            self.key = h.hexdigest()[:16]


@contextlib.contextmanager
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def base_of(job: Job) -> tuple[Graph, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The captured, exactly cleaned model of ``job`` (fold constants and batch norms, drop dead
    code) with its reference outputs on the calibration and the evaluation inputs; memoized."""
    hit = _BASE.get(job.key)
    if hit is not None:
        return hit
    from graphpress.frontends import load
    from graphpress.passes.pipeline import Pipeline

    with _one_thread():
        graph = load(job.source, arch=job.arch, input_shape=job.input_shape, example_inputs=job.example_inputs)
        graph.calibration = list(job.calibration)
        base = Pipeline.from_recipe("default").run(graph).graph
        base.calibration = list(job.calibration)
        ref_cal = run_batches(base, job.calibration)
        ref_eval = run_batches(base, [job.evaluation])
    _BASE.clear()  # one job per worker at a time: keep one model in memory
    _BASE[job.key] = (base, ref_cal, ref_eval)
    return _BASE[job.key]


def run_batches(graph: Graph, batches: Sequence[tuple[torch.Tensor, ...]], chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """The graph's first output on every batch (in chunks), concatenated."""
    outs = []
    with torch.inference_mode():
        for batch in batches:
            n = int(batch[0].shape[0])
            for i in range(0, n, chunk):
                outs.append(graph.run(*(t[i:i + chunk] for t in batch))[0].float())
    return (torch.cat(outs),)


def _sig(x: float, digits: int = 9) -> float:
    """``x`` to ``digits`` significant digits: two processes sum the same floats in a different
    order in the last bit (seen: KL 8.556765766619137e-05 here, ...138e-05 in a Ray worker), and
    the search must not take a different branch for it."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def quality(metric: str, ref: torch.Tensor, test: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
    """Quality of ``test`` against the float model's ``ref`` outputs.

    Returns ``{"value": v, "drop": d, "kl": ..., "agreement": ...}`` where ``drop`` is what
    ``--max-drop`` bounds: 1 - agreement, the accuracy lost (fraction), the KL in nats, or for
    ``sqnr`` the negated SQNR in dB (so ``--max-drop -20`` reads "at least 20 dB"; the CLI takes
    the positive floor and negates it).
    """
    out: dict[str, float] = {}
    if ref.dim() >= 2 and ref.shape[-1] > 1:
        r2, t2 = ref.reshape(-1, ref.shape[-1]), test.reshape(-1, test.shape[-1])
        out["kl"] = float(kl_divergence(r2, t2))
        out["agreement"] = float(top1_agreement(r2, t2))
    out["sqnr_db"] = float(sqnr_db(ref, test))
    if metric == "agreement":
        out["value"], out["drop"] = out["agreement"], 1.0 - out["agreement"]
    elif metric == "kl":
        out["value"] = out["drop"] = out["kl"]
    elif metric == "accuracy":
        if labels is None:
            raise GraphpressError("metric 'accuracy' needs labels")
        acc_ref = float((ref.argmax(-1) == labels).float().mean())
        acc = float((test.argmax(-1) == labels).float().mean())
        out["accuracy"], out["accuracy_ref"] = acc, acc_ref
        out["value"], out["drop"] = acc, acc_ref - acc
    elif metric == "sqnr":
        s = out["sqnr_db"]
        out["value"], out["drop"] = s, (-s if math.isfinite(s) else -1e9)
    else:
        raise GraphpressError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return {k: _sig(v) for k, v in out.items()}


def build_report(job: Job, candidate: Candidate) -> Any:
    """The pipeline report of ``candidate``'s passes on the cleaned model (None when it changes
    nothing). One thread, one verification set: the same weights wherever it runs."""
    from graphpress.passes.pipeline import Pipeline

    base, _rc, _re = base_of(job)
    passes = candidate.recipe()
    if not passes:
        return None
    with _one_thread():
        return Pipeline.from_recipe({"name": "auto", "passes": passes, "verify": {"random_inputs": 1, "seed": job.seed}}).run(base)


def build(job: Job, candidate: Candidate) -> Graph:
    """The cleaned model with ``candidate``'s passes applied (verified by the pipeline)."""
    report = build_report(job, candidate)
    return report.graph if report is not None else base_of(job)[0]


def finetuned(job: Job, graph: Graph) -> dict[str, Any] | None:
    """With ``job.finetune``: distill ``graph`` (in place) from the float model on those inputs,
    one thread (the same weights in every process); a summary, or ``{"error": ...}`` when the
    candidate has nothing to train (int8 codes are integers)."""
    if job.finetune is None:
        return None
    from graphpress.train import DistillConfig, distill

    base = base_of(job)[0]
    if graph is base:
        return None
    try:
        with _one_thread():
            res = distill(graph, base, job.finetune, DistillConfig(**(job.finetune_config or {})))
    except GraphpressError as err:
        return {"error": str(err).splitlines()[0][:300]}
    d = res.to_dict()
    return {k: d[k] for k in ("best_epoch", "params_trained", "stopped_early") if k in d} | {"epochs_run": len(d.get("history", []))}


def sensitivity(job: Job, candidate: Candidate) -> dict[str, Any]:
    """Trial: the error ``candidate`` (usually one layer's choice) causes on the calibration
    inputs, in torch: ``{"kl", "noise", "agreement", ...}``, or ``{"error": ...}`` when a pass
    refuses it."""
    try:
        graph = build(job, candidate)
    except GraphpressError as err:
        return {"error": str(err).splitlines()[0][:300]}
    _base, ref_cal, _re = base_of(job)
    with _one_thread():
        out = run_batches(graph, job.calibration)[0]
    ref = ref_cal[0]
    result = quality("kl" if ref.dim() >= 2 and ref.shape[-1] > 1 else "sqnr", ref, out)
    signal = float(ref.double().pow(2).sum())
    result["noise"] = _sig(float((out.double() - ref.double()).pow(2).sum()) / max(signal, 1e-30))
    return result


def evaluate(job: Job, candidate: Candidate) -> dict[str, Any]:
    """Trial: build ``candidate``, lower it to ONNX Runtime and measure its quality on the
    evaluation inputs there (what ships), plus its file size; ``{"error": ...}`` on refusal."""
    from graphpress.backends import get_backend

    try:
        graph = build(job, candidate)
        if job.finetune is not None and graph is not base_of(job)[0]:
            graph = graph.clone()  # distillation replaces tensors; the memoized base stays untouched
        tuned = finetuned(job, graph)
        be = get_backend("onnxruntime")
        with tempfile.TemporaryDirectory(prefix="graphpress-auto-") as tmp, _one_thread():
            lowered = be.lower(graph, Path(tmp), check=False)
            runner = be.runner(Path(tmp) / lowered.model_file, threads=1)
            size = sum((Path(tmp) / f).stat().st_size for f in lowered.files)
            # the driver times candidates from these bytes instead of lowering them again
            onnx = (Path(tmp) / lowered.model_file).read_bytes() if lowered.files == [lowered.model_file] and size < (64 << 20) else None
            outs = []
            x = job.evaluation
            for i in range(0, int(x[0].shape[0]), 256):
                outs.append(torch.from_numpy(runner(*[t[i:i + 256].numpy() for t in x])[0]).float())
            del runner
    except GraphpressError as err:
        return {"error": str(err).splitlines()[0][:300]}
    _base, _rc, ref_eval = base_of(job)
    result = quality(job.metric, ref_eval[0], torch.cat(outs), job.labels)
    result["model_bytes"] = size
    result["params"] = graph.parameter_count()
    result["param_bytes"] = graph.parameter_bytes()
    if tuned is not None:
        result["finetune"] = tuned
    result["onnx"] = onnx
    return result


class SerialTrials:
    """Runs trials one after another in this process."""

    workers = 1
    name = "serial"

    def map(self, fn: Callable[..., Any], job: Job, args: Sequence[Any], on_done: Callable[[int, int], None] | None = None) -> list[Any]:
        out = []
        for i, a in enumerate(args):
            out.append(fn(job, a))
            if on_done is not None:
                on_done(i + 1, len(args))
        return out

    def close(self) -> None:
        pass


class RayTrials:
    """Runs trials as Ray tasks: a local Ray with ``workers`` CPUs that this object starts and
    stops, or the cluster at ``address`` (left running). Tasks whose worker dies are retried
    (``max_retries``); the results come back in argument order."""

    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None, max_retries: int = 3):
        try:
            import ray
        except ImportError:
            raise GraphpressError("--ray needs the 'ray' package: pip install 'graphpress[auto]'") from None
        self._ray = ray
        self.max_retries = int(max_retries)
        self._started = False
        if ray.is_initialized():
            self.workers = int(ray.cluster_resources().get("CPU", workers))
            return
        import os

        # the workers import graphpress from where this process does (a checkout not installed too)
        root = str(Path(__file__).resolve().parents[2])
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}}
        try:
            if address:
                ray.init(address=address, runtime_env=env, log_to_driver=False, logging_level="ERROR")
            else:
                ray.init(num_cpus=int(workers), include_dashboard=False, log_to_driver=False, logging_level="ERROR", runtime_env=env)
        except Exception as err:  # noqa: BLE001 -- ConnectionError, RuntimeError, TimeoutError...
            where = f"--ray-address {address}" if address else "a local Ray"
            raise GraphpressError(f"{where}: could not start or reach Ray: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
        self._started = True
        self.workers = int(ray.cluster_resources().get("CPU", workers))

    def map(self, fn: Callable[..., Any], job: Job, args: Sequence[Any], on_done: Callable[[int, int], None] | None = None) -> list[Any]:
        ray = self._ray
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        job_ref = ray.put(job)
        refs = [remote.remote(job_ref, a) for a in args]
        pending, done = list(refs), 0
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done += len(ready)
            if on_done is not None:
                on_done(done, len(refs))
        return ray.get(refs)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


__all__ = ["Job", "METRICS", "RayTrials", "SerialTrials", "base_of", "build", "build_report", "evaluate", "finetuned", "quality", "run_batches",
           "sensitivity"]
