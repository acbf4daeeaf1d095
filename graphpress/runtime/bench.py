"""Latency measurement that survives a noisy machine.

:func:`benchmark` times one callable (warm-up, then at least ``repeat`` calls and ``min_time_s``
seconds) and reports the median and the 10th/90th percentiles, never the mean: a single
descheduled call would dominate a mean.

:func:`compare_latency` times several variants *interleaved*, one call each in turn
(A B A B ...). The shared 2-core machines drift by up to 2x between blocks of runs; timing A
then B in two blocks measures that drift as often as the difference between A and B, while
interleaving exposes both variants to the same drift.

Torch callables run under ``torch.inference_mode()`` (entered once around the timing loop, and
only when torch is already imported, so timing an ONNX artifact never imports torch).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

_MAX_CALLS = 100_000


@dataclass(frozen=True)
class BenchResult:
    """Latency of one callable in milliseconds over ``n`` timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    min_ms: float = 0.0

    @classmethod
    def from_times(cls, times_s: Sequence[float]) -> "BenchResult":
        ms = np.asarray(times_s, dtype=np.float64) * 1e3
        p10, med, p90 = np.percentile(ms, [10, 50, 90])
        return cls(float(med), float(p10), float(p90), int(ms.size), float(ms.min()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.n})"


def _inference_mode() -> contextlib.AbstractContextManager:
    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def _sync() -> Callable[[], None]:
    """A function that waits for queued CUDA work (torch on GPU is asynchronous), or a no-op."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def benchmark(
    fn: Callable[..., Any],
    inputs: Sequence[Any] = (),
    *,
    warmup: int = 5,
    repeat: int = 30,
    min_time_s: float = 0.2,
) -> BenchResult:
    """Time ``fn(*inputs)``.

    Parameters
    ----------
    fn : callable
        A torch module/function, a :class:`~graphpress.runtime.load.LoadedModel`, an ORT runner...
    inputs : sequence
        Positional arguments passed on every call.
    warmup : int
        Untimed calls first (allocations, kernel selection, lazy initialisation).
    repeat : int
        Minimum number of timed calls.
    min_time_s : float
        Keep calling until the timed calls add up to at least this long (fast models get more
        samples), capped at 100,000 calls.

    Returns
    -------
    BenchResult
        ``median_ms``, ``p10_ms``, ``p90_ms``, ``n`` (timed calls), ``min_ms``.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    inputs = tuple(inputs)
    sync = _sync()
    times: list[float] = []
    total = 0.0
    with _inference_mode():
        for _ in range(warmup):
            fn(*inputs)
        sync()
        while len(times) < repeat or (total < min_time_s and len(times) < _MAX_CALLS):
            t0 = time.perf_counter()
            fn(*inputs)
            sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            total += dt
    return BenchResult.from_times(times)


@dataclass
class LatencyComparison:
    """Result of :func:`compare_latency`.

    Attributes
    ----------
    results : dict of str to BenchResult
        Per variant, in the order given.
    baseline : str
        The first variant.
    ratios : dict of str to float
        ``median(variant) / median(baseline)``: below 1 is faster than the baseline.
    """

    results: dict[str, BenchResult]
    baseline: str
    ratios: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "results": {k: v.to_dict() for k, v in self.results.items()},
            "ratios": dict(self.ratios),
        }

    def table(self) -> str:
        """Plain-text table: variant, median, p10, p90, ratio to the baseline."""
        width = max(len(k) for k in self.results)
        lines = [f"{'variant':<{width}}  median ms    p10 ms    p90 ms   x {self.baseline}"]
        for name, r in self.results.items():
            lines.append(f"{name:<{width}}  {r.median_ms:9.3f} {r.p10_ms:9.3f} {r.p90_ms:9.3f}   {self.ratios[name]:6.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def compare_latency(
    variants: Mapping[str, Callable[..., Any]],
    inputs: Sequence[Any] | Mapping[str, Sequence[Any]] = (),
    *,
    rounds: int = 30,
    warmup: int = 3,
    min_time_s: float = 0.0,
    on_round: Callable[[int, int], None] | None = None,
) -> LatencyComparison:
    """Time several variants interleaved (A B A B ...) and compare medians with the first.

    Every round calls each variant once, in a freshly shuffled (seeded) order, so that no
    variant always runs right after the same neighbour.

    Parameters
    ----------
    variants : mapping of str to callable
        Name -> callable; the first is the baseline of the ratios.
    inputs : sequence, or mapping of str to sequence
        Positional arguments shared by all variants, or per variant (e.g. torch tensors for a
        torch module and numpy arrays for an ORT runner).
    rounds : int
        Minimum rounds; each round calls every variant once, in a seeded random order.
    warmup : int
        Untimed rounds first (also interleaved).
    min_time_s : float
        Keep adding rounds until the slowest variant has at least this much timed time.
    on_round : callable, optional
        ``on_round(done, rounds)`` after every timed round (progress; ``done`` may exceed
        ``rounds`` while ``min_time_s`` adds rounds).

    Returns
    -------
    LatencyComparison
    """
    if not variants:
        raise ValueError("compare_latency needs at least one variant")
    names = list(variants)
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(f"no inputs for variants {missing}")
        args = {n: tuple(inputs[n]) for n in names}
    else:
        shared = tuple(inputs)
        args = {n: shared for n in names}
    sync = _sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    with _inference_mode():
        for _ in range(warmup):
            for n in names:
                variants[n](*args[n])
        sync()
        r = 0
        # a fresh seeded order every round: a variant that leaves threads spinning or caches cold
        # (a torch eager call before an ORT session, say) must not always hit the same neighbour
        shuffle = random.Random(0).shuffle
        order = list(names)
        while r < rounds or (min(sum(t) for t in times.values()) < min_time_s and r < _MAX_CALLS):
            shuffle(order)
            for n in order:
                fn, a = variants[n], args[n]
                t0 = time.perf_counter()
                fn(*a)
                sync()
                times[n].append(time.perf_counter() - t0)
            r += 1
            if on_round is not None:
                on_round(r, max(rounds, r))
    results = {n: BenchResult.from_times(times[n]) for n in names}
    base = results[names[0]].median_ms
    ratios = {n: (results[n].median_ms / base if base > 0 else float("nan")) for n in names}
    return LatencyComparison(results=results, baseline=names[0], ratios=ratios)


# ---------------------------------------------------------------------------- trusting a figure
WIDE_SPREAD = 1.5  # p90 / p10 above this: the figure moved too much to compare with another


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_load() -> dict[str, Any]:
    """``{"cpus": usable CPUs, "loadavg_1m": 1-minute load average}`` (0.0 where the OS has none)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return {"cpus": usable_cpus(), "loadavg_1m": round(float(load), 2)}


def is_busy(loadavg_1m: float, cpus: int, threads: int) -> bool:
    """Whether other work shared the CPUs while timing: the load average exceeds what the
    timed calls themselves put there (``threads``) by more than half the CPUs."""
    return loadavg_1m > threads + 0.5 * cpus


def latency_warnings(metrics: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """Why ratios between the latency figures of ``metrics`` should not be trusted.

    Returns ``(reasons, rows)``: one sentence per reason (a busy machine; a runtime whose
    p90/p10 exceeds :data:`WIDE_SPREAD`) and the runtimes whose ratio must not be printed (all
    of them when the machine was busy or the first row, the reference, is wide). Metrics from
    before spreads were recorded give no reasons.
    """
    lat = metrics.get("latency_ms") or {}
    spread = metrics.get("latency_spread_ms") or {}
    reasons: list[str] = []
    rows: set[str] = set()
    load = metrics.get("latency_load") or {}
    threads = int(metrics.get("latency_threads") or 1)
    if load and is_busy(float(load.get("loadavg_1m", 0.0)), int(load.get("cpus", 1)), threads):
        reasons.append(
            f"the machine was busy (load average {load['loadavg_1m']:.1f} on {load['cpus']} CPUs, {threads} used for timing)"
        )
        rows |= set(lat)
    wide = {}
    for name, pair in spread.items():
        p10, p90 = float(pair[0]), float(pair[1])
        if p10 > 0 and p90 / p10 > WIDE_SPREAD:
            wide[name] = p90 / p10
    if wide:
        reasons.append(
            "wide spread (p90/p10 > " + f"{WIDE_SPREAD:g}): " + ", ".join(f"{k} {v:.1f}x" for k, v in wide.items())
        )
        first = next(iter(lat), None)
        rows |= set(lat) if first in wide else set(wide)
    return reasons, rows


__all__ = [
    "BenchResult",
    "LatencyComparison",
    "WIDE_SPREAD",
    "benchmark",
    "compare_latency",
    "is_busy",
    "latency_warnings",
    "machine_load",
    "usable_cpus",
]
