"""``compress auto``: one search across compression families under one quality budget.

The steps (``docs/auto.md``):

1. **Sensitivity** of every (layer, choice): the model with only that layer changed, run on the
   calibration inputs; its KL to the float model's outputs (the output noise power, for outputs
   that are not logits). One trial each, fanned out (:mod:`graphpress.auto.trials`).
2. **Costs** of every (layer, choice) on the target, measured here in context
   (:mod:`graphpress.auto.costs`).
3. **The frontier**: the multiple-choice knapsack of :func:`graphpress.passes.ilp.allocate`
   minimises the summed cost subject to ``sum sensitivity <= S``, for ``S`` on a geometric grid
   from "everything allowed" down to zero: one candidate per distinct answer, ordered from the
   fastest to the most faithful.
4. **Measured search**: sensitivities add up only approximately (errors compound), so the
   candidates are built, lowered and measured end to end, in a k-ary search (``k`` = the
   workers) for the fastest one whose measured drop stays within ``--max-drop``.
5. **Accuracy-aware revert** (NNCF's accuracy control): from the fastest candidate that missed
   the budget, the layers that hurt most are put back to float, several alternatives measured at
   once, until it holds or it is no cheaper than the one already found.
6. **Timing**: every measured candidate, the single-technique recipes and the float model are
   lowered and timed interleaved in one run; the fastest feasible one by measured median wins
   (the smallest file, for ``size``), and its per-layer times are profiled beside the predicted
   ones.

Everything but the timing is deterministic for a seed, so the serial and the Ray runs evaluate
the same candidates with the same numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphpress.auto.costs import measure_table, predicted, profile_graph
from graphpress.auto.space import Candidate, Choice, LayerInfo, layer_choices, search_layers, uniform
from graphpress.auto.trials import Job, SerialTrials, base_of, build, evaluate, sensitivity
from graphpress.errors import GraphpressError
from graphpress.passes.ilp import allocate

Stage = Callable[[str], None]
Step = Callable[[int, int, str], None]


@dataclass(frozen=True)
class AutoConfig:
    """Options of :func:`search` (``compress auto``'s flags).

    Attributes
    ----------
    objective : "latency" or "size"
        What is minimised: measured batch-1 latency on ONNX Runtime, or the artifact's bytes.
    max_drop : float
        The quality budget, in the metric's unit: agreement / accuracy as a fraction (0.01 = 1%),
        KL in nats, or for ``sqnr`` the lowest SQNR in dB the output may keep.
    metric : "agreement", "accuracy", "kl" or "sqnr"
    grid : int
        Budget points of the frontier (step 3).
    reverts : int
        Rounds of the accuracy-aware revert (step 5).
    threads : int
        Intra-op threads of the cost table and the timing (the deployment's).
    seed : int
    timing_rounds : int
        Interleaved rounds of the final timing.
    fanout : int
        Candidates measured per round of the k-ary search and of the revert: fixed, not the
        number of workers, so a serial and a Ray run measure the same candidates.
    poly_degree, he_repeat : int
        ``he-latency``: the ring degree the costs are predicted and the candidates run at, and the
        encrypted inferences timed per candidate (interleaved rounds).
    peers : bool
        Measure the peers' own quantizers (:mod:`graphpress.auto.peers`) as reference points.
    """

    version: int = 1
    objective: str = "latency"
    max_drop: float = 0.01
    metric: str = "agreement"
    grid: int = 18
    reverts: int = 4
    threads: int = 1
    seed: int = 0
    timing_rounds: int = 40
    fanout: int = 2
    poly_degree: int = 4096
    he_repeat: int = 3
    peers: bool = True

    def feasible(self, q: dict[str, Any]) -> bool:
        if "error" in q:
            return False
        if self.metric == "sqnr":
            return q["value"] >= self.max_drop
        return q["drop"] <= self.max_drop + 1e-12


@dataclass
class Evaluated:
    """One measured candidate."""

    candidate: Candidate
    origin: str  # "frontier" | "revert" | "uniform:<choice>" | "float"
    predicted: float
    quality: dict[str, Any]
    feasible: bool
    latency_ms: float | None = None
    latency_spread_ms: tuple[float, float] | None = None
    onnx: bytes | None = field(default=None, repr=False)
    label: str | None = None  # a peer's name (its candidate is empty: it is never chosen)

    def to_dict(self) -> dict[str, Any]:
        q = {k: v for k, v in self.quality.items() if k != "onnx"}
        return {"origin": self.origin, "label": self.label or self.candidate.label(), "choices": self.candidate.to_dict(),
                "predicted": None if math.isnan(self.predicted) else round(self.predicted, 2), "quality": q, "feasible": self.feasible,
                "latency_ms": self.latency_ms, "latency_spread_ms": list(self.latency_spread_ms) if self.latency_spread_ms else None}


@dataclass
class AutoResult:
    """What :func:`search` found: the chosen candidate, its graph, and the whole search record."""

    chosen: Evaluated
    graph: Any
    base: Any
    evaluated: list[Evaluated]
    layers: list[LayerInfo]
    sensitivities: dict[str, dict[str, Any]]
    table: dict[str, Any]
    config: AutoConfig
    timings: dict[str, float]
    trials: dict[str, Any]
    profile: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from graphpress.config import config_to_dict

        base = next((e for e in self.evaluated if e.origin == "float"), None)
        return {
            "config": config_to_dict(self.config),
            "chosen": self.evaluated.index(self.chosen),
            "speedup": (round(base.latency_ms / self.chosen.latency_ms, 4)
                        if base and base.latency_ms and self.chosen.latency_ms else None),
            "candidates": [e.to_dict() for e in self.evaluated],
            "pareto": pareto_indices(self.evaluated, self.config.objective),
            "layers": [{"name": lay.name, "kind": lay.kind, "params": lay.params, "prunable": lay.prunable} for lay in self.layers],
            "sensitivity": self.sensitivities,
            "cost_table": {k: v for k, v in self.table.items() if k != "uniform"},
            "profile": self.profile,
            "timings_s": self.timings,
            "trials": self.trials,
        }


def pareto_indices(evaluated: Sequence[Evaluated], objective: str) -> list[int]:
    """Indices of the candidates no other beats on both quality (drop) and cost (measured
    latency, or file bytes for ``size``)."""
    pts = []
    for i, e in enumerate(evaluated):
        if "error" in e.quality:
            continue
        cost = e.latency_ms if objective == "latency" else e.quality.get("model_bytes")
        if cost is None:
            continue
        pts.append((i, float(e.quality["drop"]), float(cost)))
    keep = []
    for i, d, c in pts:
        if not any((d2 <= d and c2 <= c) and (d2 < d or c2 < c) for _j, d2, c2 in pts):
            keep.append(i)
    return keep


def _sens_value(r: dict[str, Any]) -> float:
    v = r.get("kl", r.get("noise"))
    return max(float(v), 0.0) if v is not None and math.isfinite(float(v)) else math.inf


def frontier(layers: Sequence[LayerInfo], table: dict[str, Any], sens: dict[str, dict[str, float]], grid: int) -> list[Candidate]:
    """Candidates of the cost/sensitivity frontier, fastest first (step 3)."""
    items, names = [], []
    for lay in layers:
        opts = []
        for c in layer_choices(lay, table.get("objective", "latency")):
            s = 0.0 if c.leaves else sens.get(lay.name, {}).get(c.label, math.inf)
            if math.isfinite(s):
                opts.append((c, float(table["cost"][lay.name][c.label]), s))
        items.append(opts)
        names.append(lay.name)
    s_max = sum(max(v for _c, _k, v in opts) for opts in items)
    out: list[Candidate] = []
    budgets = [s_max * 0.5 ** k for k in range(grid)] + [0.0]
    for budget in budgets:
        alloc = allocate(items, budget, what="sensitivity budget")
        cand = Candidate.of(dict(zip(names, alloc.choice)))
        if not out or out[-1] != cand:
            out.append(cand)
    return out


def search(job: Job, config: AutoConfig, trials: Any = None, *, on_stage: Stage | None = None, on_step: Step | None = None) -> AutoResult:
    """Run the search of the module docstring.

    Parameters
    ----------
    job : Job
        The model and its calibration / evaluation data.
    config : AutoConfig
    trials : SerialTrials or RayTrials, optional
        Where trials run (default: serially here).
    on_stage, on_step : callable, optional
        Progress hooks (stage names; ``(done, total, what)`` inside a stage).

    Raises
    ------
    GraphpressError
        One line when no compressed candidate meets ``max_drop`` (naming the closest), when the
        metric cannot be computed, or when a trial fails.
    """
    stage = on_stage or (lambda _s: None)
    step = on_step or (lambda _d, _t, _w: None)
    trials = trials or SerialTrials()
    timings: dict[str, float] = {}
    counts = {"sensitivity": 0, "evaluate": 0, "backend": trials.name, "workers": trials.workers}

    t0 = time.perf_counter()
    stage("capture")
    base, _ref_cal, _ref_eval = base_of(job)
    layers = search_layers(base)
    if not layers:
        raise GraphpressError(f"auto: {base.name!r} has no conv or linear layer to compress")
    timings["capture"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage("sensitivity")
    pairs = [(lay.name, c) for lay in layers for c in layer_choices(lay, config.objective) if not c.leaves]
    results = trials.map(sensitivity, job, [Candidate.of({n: c}) for n, c in pairs],
                         on_done=lambda d, t: step(d, t, "layer choices"))
    counts["sensitivity"] = len(pairs)
    sens: dict[str, dict[str, Any]] = {}
    sens_value: dict[str, dict[str, float]] = {}
    for (name, c), r in zip(pairs, results):
        sens.setdefault(name, {})[c.label] = r
        sens_value.setdefault(name, {})[c.label] = _sens_value(r) if "error" not in r else math.inf
    timings["sensitivity"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage("costs")
    table = measure_table(job, layers, config.objective, threads=config.threads, poly_degree=config.poly_degree, on_step=step)
    table["objective"] = config.objective
    timings["costs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage("search")
    # the all-float end of the frontier is the "float" reference below, not a candidate
    fr = [c for c in frontier(layers, table, sens_value, config.grid) if c.choices]
    evaluated: list[Evaluated] = []
    seen: dict[Candidate, Evaluated] = {}

    def total(c: Candidate) -> float:
        return sum(predicted(table, c.as_dict(), layers).values())

    def measure(cands: Sequence[Candidate], origins: Sequence[str]) -> list[Evaluated]:
        todo = [c for c in dict.fromkeys(cands) if c not in seen]
        if todo:
            qs = trials.map(evaluate, job, todo, on_done=lambda d, t: step(d, t, "candidates"))
            counts["evaluate"] += len(todo)
            for c, q in zip(todo, qs):
                origin = origins[list(cands).index(c)]
                e = Evaluated(c, origin, total(c), {k: v for k, v in q.items() if k != "onnx"}, config.feasible(q), onnx=q.get("onnx"))
                seen[c] = e
                evaluated.append(e)
        return [seen[c] for c in cands]

    # the float model and the single-technique recipes: the reference points of the report
    singles = sorted({c for lay in layers for c in layer_choices(lay, config.objective) if not c.leaves})
    measure([Candidate(), *[uniform(layers, c, config.objective) for c in singles]],
            ["float", *[f"uniform:{c.label}" for c in singles]])

    # k-ary search over the frontier for the fastest feasible candidate
    lo, hi = -1, len(fr) - 1  # fr[lo] infeasible (sentinel), fr[hi] assumed feasible (checked first)
    if fr and not measure([fr[hi]], ["frontier"])[0].feasible:
        hi = len(fr)  # even the most faithful compressed candidate misses: nothing on the frontier holds
    k = max(1, int(config.fanout))
    while hi - lo > 1:
        span = hi - lo
        idx = sorted({lo + max(1, round(span * (j + 1) / (k + 1))) for j in range(k)} - {hi})
        idx = [i for i in idx if lo < i < hi] or [lo + 1]
        got = measure([fr[i] for i in idx], ["frontier"] * len(idx))
        ok = [i for i, e in zip(idx, got) if e.feasible]
        bad = [i for i, e in zip(idx, got) if not e.feasible]
        if ok:
            hi = min(ok)
        lo = max([lo, *[i for i in bad if i < hi]])

    # accuracy-aware revert from the fastest candidate that missed
    best = min((e for e in evaluated if e.feasible and e.candidate.choices), key=lambda e: e.predicted, default=None)
    if 0 <= lo < len(fr):
        current = seen[fr[lo]]
        for _round in range(config.reverts):
            d = current.candidate.as_dict()
            harm = sorted(d, key=lambda n: (-sens_value[n][d[n].label], n))
            tries = []
            for n in harm[:k]:
                nd = dict(d)
                nd.pop(n)
                tries.append(Candidate.of(nd))
            tries = [c for c in tries if c.choices and (best is None or total(c) < best.predicted)]
            if not tries:
                break
            got = measure(tries, ["revert"] * len(tries))
            ok = [e for e in got if e.feasible]
            if ok:
                best = min(ok, key=lambda e: e.predicted)
                break
            current = min(got, key=lambda e: e.quality.get("drop", math.inf))
    timings["search"] = time.perf_counter() - t0

    peers_failed: dict[str, str] = {}
    if config.objective in ("latency", "size") and config.peers and len(job.evaluation) == 1:
        peers_failed = _measure_peers(job, config, evaluated)
    counts["peers_failed"] = peers_failed

    feasible = [e for e in evaluated if e.feasible and e.candidate.choices and not e.origin.startswith("peer:")]
    if not feasible:
        tried = [e for e in evaluated if e.candidate.choices and "error" not in e.quality]
        closest = min(tried, key=lambda e: e.quality["drop"], default=None)
        what = (f"the closest candidate ({closest.candidate.label()}) reached {_fmt_quality(config, closest.quality)}"
                if closest else "every candidate failed to build")
        raise GraphpressError(f"--max-drop {config.max_drop:g} ({config.metric}): no compressed candidate stays within it; {what}; nothing written")

    t0 = time.perf_counter()
    stage("timing")
    if config.objective == "latency":
        _time_all(job, evaluated, config, step)
        chosen = _fastest(feasible)
    elif config.objective == "he-latency":
        _time_he(job, [e for e in evaluated if e.feasible or e.origin in ("float",) or e.origin.startswith("uniform:")], config, step)
        chosen = _fastest(feasible)
    else:
        chosen = min(feasible, key=lambda e: (e.quality.get("model_bytes", math.inf), e.quality["drop"]))
    timings["timing"] = time.perf_counter() - t0

    graph = build(job, chosen.candidate)
    profile = {}
    if config.objective == "latency":
        profile = _per_layer(job, graph, chosen, table, layers, config.threads)
    elif config.objective == "he-latency":
        pred = predicted(table, chosen.candidate.as_dict(), layers)
        profile = {"predicted_ms": {k: round(v, 4) for k, v in pred.items()}, "predicted_total_ms": round(sum(pred.values()), 3),
                   "measured_total_ms": chosen.latency_ms}
    return AutoResult(chosen, graph, base, evaluated, layers, sens, table, config, timings, counts, profile)


def _measure_peers(job: Job, config: AutoConfig, evaluated: list[Evaluated]) -> dict[str, str]:
    """Quality and size of ONNX Runtime's own quantizers on the float model (the report's
    reference points; timed with the candidates); returns the peers that failed, with why."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    import torch

    from graphpress.auto.peers import make_peers
    from graphpress.auto.trials import quality
    from graphpress.backends import get_backend

    base, _rc, ref_eval = base_of(job)
    with tempfile.TemporaryDirectory(prefix="graphpress-auto-peers-") as tmp:
        lowered = get_backend("onnxruntime").lower(base, Path(tmp), check=False)
        paths, failed = make_peers(Path(tmp) / lowered.model_file, Path(tmp), job.calibration[0])
        for name, path in paths.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = sess.get_inputs()[0].name
            x = job.evaluation[0]
            out = torch.cat([torch.from_numpy(sess.run(None, {feed: x[i:i + 256].numpy()})[0]).float() for i in range(0, int(x.shape[0]), 256)])
            q = quality(job.metric, ref_eval[0], out, job.labels)
            q["model_bytes"] = path.stat().st_size
            evaluated.append(Evaluated(Candidate(), f"peer:{name}", math.nan, q, config.feasible(q), onnx=path.read_bytes(), label=name))
    return failed


def _fastest(feasible: Sequence[Evaluated]) -> Evaluated:
    """The fastest by measured median; candidates whose median lies within the fastest one's
    p10-p90 spread are a tie, broken by the predicted cost (deterministic), so that noise alone
    does not decide between equals."""
    timed = [e for e in feasible if e.latency_ms is not None]
    if not timed:
        return min(feasible, key=lambda e: e.predicted)
    best = min(timed, key=lambda e: e.latency_ms)
    hi = best.latency_spread_ms[1] if best.latency_spread_ms else best.latency_ms
    tied = [e for e in timed if e.latency_ms <= hi]
    return min(tied, key=lambda e: (e.predicted, e.latency_ms))


def _fmt_quality(config: AutoConfig, q: dict[str, Any]) -> str:
    if config.metric == "sqnr":
        return f"{q['value']:.1f} dB"
    if config.metric == "kl":
        return f"KL {q['drop']:.4g}"
    return f"a drop of {100 * q['drop']:.2f}%"


def _lowered(job: Job, e: Evaluated, folder: Any) -> Any:
    """A session file for ``e``: the bytes its trial returned, else lowered again here."""
    from pathlib import Path

    from graphpress.backends import get_backend

    path = Path(folder) / "model.onnx"
    if e.onnx is not None:
        path.write_bytes(e.onnx)
        return path
    be = get_backend("onnxruntime")
    lowered = be.lower(build(job, e.candidate), Path(folder), check=False)
    return Path(folder) / lowered.model_file


def _time_all(job: Job, evaluated: Sequence[Evaluated], config: AutoConfig, step: Step) -> None:
    """Batch-1 latency of every measured candidate, interleaved in one run (nothing else runs)."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    from graphpress.runtime.bench import compare_latency

    x1 = [t[:1].numpy() for t in job.evaluation]
    ok = [e for e in evaluated if "error" not in e.quality]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(config.threads)
    # no spinning: a pool left spinning after a slow variant (a peer's ConvInteger, 20x) would tax the next one
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory(prefix="graphpress-auto-time-") as tmp:
        runners = {}
        for i, e in enumerate(ok):
            step(i, len(ok), "lowering for timing")
            folder = Path(tmp) / f"c{i}"
            folder.mkdir()
            sess = ort.InferenceSession(str(_lowered(job, e, folder)), opts, providers=["CPUExecutionProvider"])
            feed = {inp.name: x for inp, x in zip(sess.get_inputs(), x1)}
            runners[str(i)] = (lambda s=sess, f=feed: s.run(None, f))
        variants = dict(runners)
        timing = compare_latency(variants, rounds=config.timing_rounds, on_round=lambda d, t: step(d, t, "timing rounds"))
        for i, e in enumerate(ok):
            r = timing.results[str(i)]
            e.latency_ms = round(r.median_ms, 4)
            e.latency_spread_ms = (round(r.p10_ms, 4), round(r.p90_ms, 4))
        del runners, variants


def _time_he(job: Job, evaluated: Sequence[Evaluated], config: AutoConfig, step: Step) -> None:
    """Wall time of one encrypted inference (the interactive protocol, client and server in this
    process) of each candidate on the HE backend, ``he_repeat`` interleaved rounds, medians."""
    import statistics
    import tempfile
    from pathlib import Path

    from graphpress.backends import get_backend

    be = get_backend("he", protocol="interactive", encoding="coeff-circulant", poly_degree=config.poly_degree, check_seeds=())
    x1 = job.evaluation[0][:1].numpy()
    ok = [e for e in evaluated if "error" not in e.quality]
    times: dict[int, list[float]] = {i: [] for i in range(len(ok))}
    with tempfile.TemporaryDirectory(prefix="graphpress-auto-he-") as tmp:
        runners = {}
        for i, e in enumerate(ok):
            step(i, len(ok), "lowering to HE")
            folder = Path(tmp) / f"c{i}"
            lowered = be.lower(build(job, e.candidate), folder, check=False)
            runners[i] = be.runner(folder / lowered.model_file)
            runners[i](x1)  # warm-up: keys, encoders, the first NTT tables
        for r in range(config.he_repeat):
            order = list(range(len(ok))) if r % 2 == 0 else list(reversed(range(len(ok))))  # A B .. B A: no fixed neighbour
            for j, i in enumerate(order):
                step(r * len(ok) + j, config.he_repeat * len(ok), "encrypted inferences")
                t0 = time.perf_counter()
                runners[i](x1)
                times[i].append(1e3 * (time.perf_counter() - t0))
    for i, e in enumerate(ok):
        e.latency_ms = round(statistics.median(times[i]), 3)
        e.latency_spread_ms = (round(min(times[i]), 3), round(max(times[i]), 3))


def _per_layer(job: Job, graph: Any, chosen: Evaluated, table: dict[str, Any], layers: Sequence[LayerInfo], threads: int) -> dict[str, Any]:
    """The chosen candidate's per-layer predicted cost beside its profiled time (us)."""
    prof = profile_graph(graph, job, threads)
    pred = predicted(table, chosen.candidate.as_dict(), layers)
    rows = {lay.name: {"choice": chosen.candidate.as_dict().get(lay.name, Choice()).label, "predicted_us": round(pred[lay.name], 2),
                       "measured_us": prof["layers_us"].get(lay.name, 0.0)} for lay in layers}
    return {"layers": rows, "profiled_total_us": prof["total_us"],
            "other_us": round(sum(v for k, v in prof["layers_us"].items() if k not in rows), 2)}


__all__ = ["AutoConfig", "AutoResult", "Evaluated", "frontier", "pareto_indices", "search"]
