"""Peak memory and overhead of a three-pass pipeline on a ~100M-parameter Llama, today's tree
next to an older one (issue 16, step 4).

A Llama built from a transformers config (random weights, vocab 32000, GQA) is saved as a Hugging
Face folder once; then each tree runs, in its own fresh process and interleaved (old, new, old,
new ...), the same job:

1. load the folder through the Hugging Face frontend (``load_hf_folder``),
2. run ``fold-constants -> quantize-layerwise (int8 weight-only) -> eliminate-dead-code`` through
   ``Pipeline.run`` with the default verification,
3. report

   * ``peak_over_weights``: 1 + (peak RSS during ``Pipeline.run`` - RSS with the model loaded) /
     the model's weight bytes: the model counts 1.0, the rest is what the pipeline adds (the
     loader's own leftovers, ~220 MB here, are not the pipeline's and are left out; they are in
     ``process_peak_over_weights``, measured from the process before the model existed);
   * ``overhead_fraction``: (wall time of ``Pipeline.run`` - the passes' own ``__call__`` time -
     one verification run per pass) / wall time, where a verification run is one forward of the
     check input sets stacked along the batch (the example inputs and the seeded random ones,
     as the pipeline runs them), timed on the input graph for the first pass and on the result
     for the others (median of three). ``overhead_fraction_compare_as_verification`` also counts
     the output comparisons (SQNR / allclose per output and input set, KL) as part of that
     verification, and ``overhead_fraction_whole_check_as_verification`` the structure checks
     (``Graph.verify``) as well; ``overhead_fraction_in_situ`` credits instead the verification
     forwards as the pipeline itself ran them (``run_sets`` timed inside ``Pipeline.run``, at most
     one per pass; the old tree has no ``run_sets``: None); the target is judged on the first
     and on the in-situ figure, both;
   * ``left_for_gc_mb``: memory the process still held after the report was dropped and freed
     only by ``gc.collect()`` (copies kept alive by reference cycles).

The peak is the kernel's VmHWM after it was reset through ``/proc/self/clear_refs`` just before
``Pipeline.run``. Targets: ``peak_over_weights <= 1.5`` and ``overhead_fraction <= 0.20``.

Run: ``python benchmarks/pipeline_memory.py [--old REV] [--repeats 2] [--layers 8]``; prints a
table and writes ``benchmarks/results/pipeline_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "pipeline_memory.json"
RECIPE = [
    ("fold-constants", {}),
    ("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none"}),
    ("eliminate-dead-code", {}),
]
TARGETS = {"peak_over_weights": 1.5, "overhead_fraction": 0.20, "overhead_fraction_in_situ": 0.20}


def _status(key: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in bytes (the old tree measured beside this
    one has no ``graphpress.ir.memory.rss_bytes``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def make_folder(folder: Path, layers: int) -> dict:
    """A Llama from config with seeded random weights, saved as safetensors."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    return {"layers": layers, "params": sum(p.numel() for p in model.parameters())}


class _Timed:
    """Forwards everything to a pass but times its ``__call__`` (the pass's own work)."""

    def __init__(self, inner, spent: list):
        self.__dict__["_inner"], self.__dict__["_spent"] = inner, spent

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, graph):
        t0 = time.perf_counter()
        try:
            return self._inner(graph)
        finally:
            self._spent.append(time.perf_counter() - t0)


def worker(folder: str, threads: int) -> dict:
    import gc

    import torch

    torch.set_num_threads(threads)
    import graphpress
    from graphpress.frontends.huggingface import load_hf_folder
    from graphpress.passes.pipeline import Pipeline

    rss_start = _status("VmRSS")
    graph = load_hf_folder(folder)
    gc.collect()
    rss_model = _status("VmRSS")
    weights = graph.parameter_bytes()
    # one verification run = one forward of every check input set stacked along the batch (how
    # the pipeline now verifies), timed on the input graph here and on the result below
    pipe = Pipeline(RECIPE)
    stacked = tuple(torch.cat(xs) for xs in zip(*pipe.check_inputs(graph)))
    t_in = _median_time(lambda: graph.run(*stacked))

    spent: list[float] = []
    pipe.passes = [_Timed(p, spent) for p in pipe.passes]
    # the output comparisons (SQNR / allclose per output and set, KL), timed in both trees
    import graphpress.passes.pipeline as pl

    compared: list[float] = []
    for fn in ("compare_outputs", "_logits_kl"):
        setattr(pl, fn, _timed_fn(getattr(pl, fn), compared))
    # the structure checks (Graph.verify: lint, attributes, fake-tensor propagation)
    from graphpress.ir.graph import Graph

    checked: list[float] = []
    Graph.verify = _timed_fn(Graph.verify, checked)
    # the verification forwards as the pipeline itself runs them (this tree: ``run_sets``, one
    # forward of the stacked input sets; the old tree ran each set through ``Graph.run``)
    forwards: list[float] = []
    if hasattr(pl, "run_sets"):
        pl.run_sets = _timed_fn(pl.run_sets, forwards)
    gc.collect()
    reset = _reset_peak()
    t0 = time.perf_counter()
    report = pipe.run(graph)
    wall = time.perf_counter() - t0
    peak = _status("VmHWM")
    steps = [{"name": s.name, "changed": s.changed, "time_s": round(s.time_s, 3), "verified_by": getattr(s, "verified_by", "run"),
              "peak_so_far_mb": (getattr(s, "memory", None) or {}).get("process_peak_mb")} for s in report.steps]
    t_out = _median_time(lambda: report.graph.run(*stacked))
    # what only the garbage collector frees once the caller has dropped the result
    del report
    rss_dropped = _status("VmRSS")
    gc.collect()
    rss_collected = _status("VmRSS")
    work = sum(spent)
    allowance = t_in + (len(RECIPE) - 1) * t_out  # pass 1 verifies a float graph, the others the result's kind
    overhead = wall - work - allowance
    compare = sum(compared)
    structure = sum(checked)
    # in situ: the forwards the pipeline really ran (the reference run of the input graph is
    # the first pass's "before"), at most one per pass credited; None where the tree has no
    # run_sets to time
    in_situ = sum(sorted(forwards, reverse=True)[:len(RECIPE)]) if forwards else None
    return {
        "graphpress": str(Path(graphpress.__file__).parent),
        "weight_bytes": weights,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_model_mb": round(rss_model / 2**20, 1),
        "peak_mb": round(peak / 2**20, 1),
        "peak_reset": reset,
        "peak_over_weights": round(1 + (peak - rss_model) / weights, 3),
        "process_peak_over_weights": round((peak - rss_start) / weights, 3),
        "wall_s": round(wall, 3),
        "pass_work_s": round(work, 3),
        "verification_run_s": round(t_in, 4),
        "verification_run_result_s": round(t_out, 4),
        "overhead_s": round(overhead, 3),
        "overhead_fraction": round(overhead / wall, 3),
        "compare_s": round(compare, 3),
        "overhead_fraction_compare_as_verification": round((overhead - compare) / wall, 3),
        "structure_check_s": round(structure, 3),
        "overhead_fraction_whole_check_as_verification": round((overhead - compare - structure) / wall, 3),
        "verification_forwards_in_pipeline": len(forwards),
        "verification_in_pipeline_s": None if in_situ is None else round(in_situ, 4),
        "overhead_fraction_in_situ": None if in_situ is None else round((wall - work - in_situ) / wall, 3),
        "left_for_gc_mb": round(max(rss_dropped - rss_collected, 0) / 2**20, 1),
        "steps": steps,
    }


def _timed_fn(fn, into: list):
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)
    return timed


def _median_time(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tree(rev: str, where: Path) -> Path:
    """The source of ``rev`` exported into ``where`` (no checkout of the working tree)."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "graphpress"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def _run(tree: Path, folder: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder), "--threads", str(threads)],
        env=env, capture_output=True, text=True, cwd=str(tree),
    )
    if out.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="c9d59e5", help="git revision measured as 'before' (default: the tree before issue 16 step 4)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (8 -> ~100M parameters)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads)))
        return

    sys.path.insert(0, str(HERE))
    from common import machine_info

    with tempfile.TemporaryDirectory(prefix="gp-pipemem-") as tmp:
        tmp = Path(tmp)
        model = make_folder(tmp / "llama", args.layers)
        trees = {"before": _tree(args.old, tmp / "old"), "now": ROOT}
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():  # interleaved: before, now, before, now
                runs[name].append(_run(tree, tmp / "llama", args.threads))

    def med(name: str, key: str) -> float | None:
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    rows = {}
    for name in trees:
        rows[name] = {k: med(name, k) for k in ("peak_over_weights", "process_peak_over_weights", "peak_mb", "rss_model_mb", "rss_start_mb",
                                                  "wall_s", "pass_work_s", "verification_run_s", "verification_run_result_s", "overhead_s",
                                                  "overhead_fraction", "compare_s", "overhead_fraction_compare_as_verification",
                                                  "structure_check_s", "overhead_fraction_whole_check_as_verification",
                                                  "verification_in_pipeline_s", "overhead_fraction_in_situ", "left_for_gc_mb")}
        rows[name]["spread_wall_s"] = [min(r["wall_s"] for r in runs[name]), max(r["wall_s"] for r in runs[name])]
        rows[name]["spread_overhead_fraction"] = [min(r["overhead_fraction"] for r in runs[name]), max(r["overhead_fraction"] for r in runs[name])]
    weights = runs["now"][0]["weight_bytes"]
    met = {k: rows["now"][k] <= v for k, v in TARGETS.items()}
    result = {
        "benchmark": "pipeline_memory",
        "model": {**model, "weight_bytes": weights, "weight_mb": round(weights / 2**20, 1)},
        "recipe": [{n: c} for n, c in RECIPE],
        "old_revision": args.old,
        "repeats": args.repeats,
        "targets": TARGETS,
        "targets_met": met,
        "median": rows,
        "runs": runs,
        "machine": machine_info(threads=args.threads),
    }
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Llama {model['params'] / 1e6:.1f}M params, {weights / 2**20:.0f} MB weights; medians of {args.repeats} interleaved runs")
    print(f"{'':34s}{'before':>12s}{'now':>12s}{'target':>10s}")
    for key, label in [("peak_over_weights", "1 + added peak / weights"), ("process_peak_over_weights", "process peak / weights"),
                       ("overhead_fraction", "overhead / wall"),
                       ("overhead_fraction_compare_as_verification", "  same, comparisons counted"),
                       ("overhead_fraction_whole_check_as_verification", "  same, + structure checks"),
                       ("overhead_fraction_in_situ", "overhead / wall, in-situ forwards"),
                       ("peak_mb", "peak RSS (MB)"), ("wall_s", "pipeline wall (s)"), ("pass_work_s", "passes' own work (s)"),
                       ("overhead_s", "overhead (s)"), ("compare_s", "  of which comparisons (s)"),
                       ("structure_check_s", "  of which structure checks (s)"),
                       ("left_for_gc_mb", "freed only by gc (MB)")]:
        target = f"{TARGETS[key]:.2f}" if key in TARGETS else ""
        cells = "".join("{:>12s}".format("-" if rows[n][key] is None else f"{rows[n][key]:.3f}") for n in ("before", "now"))
        print(f"{label:34s}{cells}{target:>10s}")
    print(f"targets met: {met}; wrote {RESULT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
