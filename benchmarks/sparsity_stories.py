"""Activation sparsity benchmark: quality on stories260K and decode-step speed on a Llama from config.

Part A -- stories260K (``../shared/models``; real pretrained weights). ``sparsify-activations``
with ``teal``, ``chess`` and ``wina`` side by side at target sparsity 25 / 40 / 50 / 65%
(greedy allocation, layer metric; also uniform for reference), calibrated on 16 sequences of 64
tokens sampled from the model and evaluated on 64 others: KL(p_dense ‖ p_sparse) over all
positions, next-token top-1 agreement (plain, and with stories260K's 169 indistinguishable
byte-fallback tokens merged, see ``quant_stories.py``), achieved sparsity on calibration and on the
held-out sequences, activated-parameter fraction, number of sparsified layers.

Part B -- decode-step latency: a ``transformers`` LlamaForCausalLM built from a config with
4096-wide MLPs (hidden 2048, intermediate 4096, 2 layers, random weights: only speed is measured),
captured by graphpress; one decode step = one token, batch 1, no KV cache (at short contexts the
step is the weight reads of the linears). Dense graph vs ``sparsify-activations`` (teal, uniform 50%,
classifier dense) in torch eager with the sparse kernel, 2 threads, interleaved medians
(``compare_latency`` shuffles the order every round).

Usage::

    python benchmarks/sparsity_stories.py [--quick] [--skip-decode] [--skip-stories] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from quant_stories import metrics, twin_classes  # the same KL / top-1 / twin-merged metrics

import graphpress.passes.sparsity  # noqa: F401 -- registers sparsify-activations
from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass
from graphpress.passes.sparsity.sparsify import measure_sparsity

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparsity_stories.json"
THREADS = 2
TARGETS = (0.25, 0.40, 0.50, 0.65)
METHODS = ("teal", "chess", "wina")
SEQ, N_CALIB = 64, 16


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": THREADS}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------- part A
def stories(n_eval: int, allocations: tuple[str, ...], log) -> dict[str, Any]:
    from graphpress.zoo import load_llama2c, sample

    model = load_llama2c().eval()
    seqs = sample(model, N_CALIB + n_eval, SEQ + 1, temperature=1.0, seed=0)[:, :SEQ]
    calib, evals = seqs[:N_CALIB], seqs[N_CALIB:]
    g = Graph.capture(model, (calib[:2],), name="stories260k")
    g.calibration = [(calib,)]
    classes = twin_classes(model)
    with torch.inference_mode():
        ref = model(evals).float()
    rows = []
    for allocation in allocations:
        for target in TARGETS:
            for method in METHODS:
                t0 = time.perf_counter()
                cfg = {"method": method, "target_sparsity": target, "allocation": allocation}
                res = make_pass("sparsify-activations", cfg)(g.clone())
                with torch.inference_mode():
                    out = res.graph.gm(evals).float()
                held = measure_sparsity(res.graph, [(evals,)])
                layers = res.stats["layers"]
                weights = {k: v["weights"] for k, v in layers.items()}
                held_weighted = sum(held[k] * weights[k] for k in layers) / max(sum(weights.values()), 1)
                row = {"allocation": allocation, "target": target, "method": method, "config": cfg, **metrics(ref, out, classes),
                       "calibration_sparsity": res.stats["achieved_sparsity"], "held_out_sparsity": held_weighted,
                       "activated_parameter_fraction": res.stats["activated_parameter_fraction"], "layers": len(layers),
                       "per_layer": {k: {"target": v["target"], "calibration": v["calibration_sparsity"], "held_out": held[k], "role": v["role"]}
                                     for k, v in layers.items()},
                       "skipped": res.stats["skipped"], "pass_s": round(time.perf_counter() - t0, 2)}
                rows.append(row)
                log(f"  {allocation:7s} {target:.2f} {method:5s} KL {row['kl']:.4f} top-1 {row['top1']:.3f} held-out {held_weighted:.3f} "
                    f"active params {row['activated_parameter_fraction']:.3f} ({len(layers)} layers)")
    return {"n_eval": n_eval, "rows": rows}


# ---------------------------------------------------------------------------- part B
def decode(rounds: int, log) -> dict[str, Any]:
    import transformers

    from graphpress.ir import sparse_kernel
    from graphpress.runtime import compare_latency
    from graphpress.zoo import wrap_hf_model

    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                                   num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = transformers.LlamaForCausalLM(cfg)
    model = wrap_hf_model(hf.eval(), "eager")
    gen = torch.Generator().manual_seed(0)
    step = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen)
    g = Graph.capture(model, (torch.randint(0, cfg.vocab_size, (2, 1), generator=gen),), name="llama-4096-mlp")
    g.calibration = [(torch.randint(0, cfg.vocab_size, (256, 1), generator=gen),)]  # the step is one token: seq dim 1
    log("decode: sparsifying (teal, uniform 50%)")
    res = make_pass("sparsify-activations", {"method": "teal", "target_sparsity": 0.5, "allocation": "uniform"})(g.clone())
    sparse = res.graph
    with torch.inference_mode():
        dense_out, sparse_out = g.gm(step), sparse.gm(step)
    rel = float((sparse_out - dense_out).pow(2).sum() / dense_out.pow(2).sum())
    log("decode: timing batch 1 x 1 token (interleaved)")
    cmp = compare_latency({"dense (torch eager)": lambda: g.gm(step), "sparse 50% (kernel)": lambda: sparse.gm(step)}, rounds=rounds, min_time_s=2.0)
    base = cmp.results["dense (torch eager)"].median_ms
    return {
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "kernel_available": sparse_kernel.kernel_available(),
        "sparsified_layers": res.stats["sparsified_layers"], "skipped": res.stats["skipped"],
        "activated_parameter_fraction": res.stats["activated_parameter_fraction"],
        "held_out_step_sparsity": measure_sparsity(sparse, [(step,)]),
        "relative_output_noise": rel,
        "latency": {k: {**r.to_dict(), "speedup_vs_dense": base / r.median_ms} for k, r in cmp.results.items()},
    }


# ---------------------------------------------------------------------------- report
def print_tables(result: dict[str, Any], console) -> None:
    from rich.table import Table

    if result.get("stories"):
        for allocation in sorted({r["allocation"] for r in result["stories"]["rows"]}):
            t = Table(title=f"stories260K, {allocation} allocation: KL (nats) / top-1 agreement vs dense / held-out sparsity "
                            f"({result['stories']['n_eval']} sequences of {SEQ} tokens)")
            t.add_column("target")
            for m in METHODS:
                t.add_column(m, justify="right")
            t.add_column("active params (teal / chess / wina)", justify="right")
            for target in TARGETS:
                rows = {r["method"]: r for r in result["stories"]["rows"] if r["allocation"] == allocation and r["target"] == target}
                t.add_row(f"{100 * target:.0f}%", *(f"{rows[m]['kl']:.3f} / {100 * rows[m]['top1']:.1f}% / {100 * rows[m]['held_out_sparsity']:.0f}%" for m in METHODS),
                          " / ".join(f"{rows[m]['activated_parameter_fraction']:.2f}" for m in METHODS))
            console.print(t)
    if result.get("decode"):
        d = result["decode"]
        t = Table(title=f"decode step (batch 1, 1 token), Llama hidden {d['config']['hidden_size']} / MLP {d['config']['intermediate_size']}, "
                        f"{THREADS} threads; kernel built: {d['kernel_available']}")
        for col in ("variant", "median ms", "p10", "p90", "speedup"):
            t.add_column(col, justify="left" if col == "variant" else "right")
        for k, r in d["latency"].items():
            t.add_row(k, f"{r['median_ms']:.2f}", f"{r['p10_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['speedup_vs_dense']:.2f}x")
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 evaluation sequences, greedy only, few rounds")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-stories", action="store_true")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from rich.console import Console

    from graphpress.zoo import stories260k_path

    console = Console(width=200)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "sparsity_stories", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "quick": args.quick, "machine": machine_info()}
    if not args.skip_stories:
        if stories260k_path() is None:
            log("stories260K not found (../shared/models/stories260k/stories260K.bin): part A skipped")
        else:
            log("part A: stories260K")
            result["stories"] = stories(16 if args.quick else 64, ("greedy",) if args.quick else ("greedy", "uniform"), log)
    elif args.out.exists():  # keep the stored part A when only the decode step is re-measured
        result["stories"] = json.loads(args.out.read_text()).get("stories")
    if not args.skip_decode:
        result["decode"] = decode(5 if args.quick else args.rounds, log)
    result["load_average_end"] = machine_info().get("load_average")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_tables(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
