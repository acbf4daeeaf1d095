"""Latency measurement: sane statistics, interleaving, inference mode."""

from __future__ import annotations

import time

import pytest
import torch

from graphpress.runtime import BenchResult, benchmark, compare_latency


def _spin(seconds: float) -> None:
    # Busy-wait rather than sleep: sleep granularity would dominate sub-millisecond targets.
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_benchmark_statistics_are_sane():
    res = benchmark(lambda: _spin(0.001), warmup=2, repeat=20, min_time_s=0.0)
    assert isinstance(res, BenchResult)
    assert res.n == 20
    assert 0 < res.min_ms <= res.p10_ms <= res.median_ms <= res.p90_ms
    assert res.median_ms >= 1.0  # each call spins at least 1 ms
    assert res.median_ms < 50.0


def test_benchmark_counts_calls_and_honours_min_time():
    calls = []
    res = benchmark(lambda x: calls.append(x), (7,), warmup=3, repeat=5, min_time_s=0.0)
    assert res.n == 5 and len(calls) == 8 and set(calls) == {7}
    res = benchmark(lambda: _spin(0.0005), warmup=0, repeat=3, min_time_s=0.05)
    # Kept going until 50 ms of timed calls: more than `repeat`, at most 50 ms / 0.5 ms (+1).
    assert 3 < res.n <= 101
    with pytest.raises(ValueError):
        benchmark(lambda: None, repeat=0)


def test_torch_callables_run_in_inference_mode():
    seen = []
    benchmark(lambda: seen.append(torch.is_inference_mode_enabled()), warmup=1, repeat=2, min_time_s=0.0)
    assert seen and all(seen)
    assert not torch.is_inference_mode_enabled()


def test_compare_latency_interleaves():
    order = []

    def make(name):
        return lambda *args: order.append(name)

    res = compare_latency({"a": make("a"), "b": make("b"), "c": make("c")}, (), rounds=6, warmup=2)
    assert order[:6] == ["a", "b", "c"] * 2  # warmup in the given order
    rounds = [order[i : i + 3] for i in range(6, len(order), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)  # never a block of one variant
    # shuffled per round: "a" does not always follow the same neighbour
    before_a = {r[r.index("a") - 1] if r.index("a") else prev[-1] for prev, r in zip(rounds, rounds[1:])}
    assert len(before_a) > 1
    assert list(res.results) == ["a", "b", "c"] and res.baseline == "a"
    assert all(r.n == 6 for r in res.results.values())
    assert res.ratios["a"] == 1.0


def test_compare_latency_ratios_and_per_variant_inputs():
    got = {}

    def fast(x):
        got["fast"] = x
        _spin(0.0005)

    def slow(x):
        got["slow"] = x
        _spin(0.003)

    res = compare_latency({"fast": fast, "slow": slow}, {"fast": (1,), "slow": (2,)}, rounds=10, warmup=1)
    assert got == {"fast": 1, "slow": 2}
    assert res.results["slow"].median_ms > res.results["fast"].median_ms
    assert res.ratios["slow"] > 2.0  # 3 ms vs 0.5 ms of spinning
    assert "slow" in res.table() and res.to_dict()["baseline"] == "fast"
    with pytest.raises(ValueError, match="no inputs for variants"):
        compare_latency({"fast": fast, "slow": slow}, {"fast": (1,)})


def test_compare_latency_reports_every_round():
    from graphpress.runtime.bench import compare_latency as cmp

    seen = []
    res = cmp({"a": lambda: None, "b": lambda: None}, rounds=4, warmup=1, on_round=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert all(r.n == 4 for r in res.results.values())


def test_machine_load_counts_usable_cpus():
    import os

    from graphpress.runtime.bench import machine_load, usable_cpus

    load = machine_load()
    assert load["cpus"] == usable_cpus() == len(os.sched_getaffinity(0))
    assert 0 <= load["loadavg_1m"] and abs(load["loadavg_1m"] - os.getloadavg()[0]) < 1.0
