"""stories260K layer-wise quantization study: does importance order tolerate more low-bit layers?

Model: the pretrained llama2.c stories260K (``../shared/models``; dim 64, 5 blocks, 36 linears
including the classifier tied to the embedding). Data: sequences sampled from the model itself
(temperature 1, 64 tokens after BOS): 16 for calibration, ``--eval`` (default 64) others for
evaluation. Metrics against the fp32 model on the evaluation sequences, over every position:

* ``KL`` -- mean KL(p_fp32 || p_quant) of the next-token distributions, nats;
* ``top-1`` -- share of positions whose argmax agrees;
* ``top-1 (twins merged)`` -- the same, counting tokens with indistinguishable classifier rows as
  one class. stories260K has 169 tokens (the byte-fallback tokens the tiny corpus never uses)
  whose embedding rows are identical to 1e-3; at the ~3% of positions where the fp32 argmax is
  one of them, *which* twin wins is decided by ~1e-4 logit differences, so any perturbation flips
  it. Plain top-1 counts those flips as errors; this column does not.

Part A -- the paper's claim (torch execution of the quantized graph; weight-only group-wise RTN,
g = 32, bits {8, 4}): for average bits {8, 6, 5, 4.5, 4} and allocation orders
``importance`` (LIM, ZD and measured output noise), ``random`` (three seeds) and ``reverse``
(LIM, measured), plus the ILP allocator on measured sensitivities. A claim row per target says
whether importance order beats random and random beats reverse.

Part B -- deployment vs the tools users pick instead (ONNX Runtime, batch 1 x 64 tokens, two
threads, interleaved medians): fp32; graphpress int8 weight-only groups (MatMulNBits), int8 with
int8 block activations (MatMulNBits ``accuracy_level=4``), int8 dynamic activations with and
without SmoothQuant scaling (DynamicQuantizeMatMul), a 6-bit mix; ORT ``quantize_dynamic``
(per-tensor and per-channel), ORT ``quantize_static`` QDQ U8S8, torch.ao ``quantize_dynamic``.
Quality is computed from each runtime's own outputs, one sequence per call as deployed (dynamic
activation ranges depend on the batch).

Usage::

    python benchmarks/quant_stories.py [--quick] [--eval N] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from quant_peers import ort_quantize_dynamic, ort_quantize_static, quiet, torch_ao_dynamic
from quant_speed import THREADS, add_onnx_peer, add_torch_peer, lower_variants, machine_info, runners, time_variants

import graphpress.passes.quant  # noqa: F401 -- registers quantize-layerwise / awq-scale
from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quant_stories.json"
TARGETS = (8.0, 6.0, 5.0, 4.5, 4.0)
SEQ = 64
N_CALIB = 16
TWIN_DIST = 1e-2
STUDY_BASE = {"bits": [8, 4], "activations": "none", "group_size": 32}
ORDERS: dict[str, dict[str, Any]] = {
    "importance (LIM)": {"order": "importance", "importance": "lim"},
    "importance (ZD)": {"order": "importance", "importance": "zd"},
    "importance (measured)": {"order": "importance", "importance": "measured"},
    "random (seed 0)": {"order": "random", "seed": 0},
    "random (seed 1)": {"order": "random", "seed": 1},
    "random (seed 2)": {"order": "random", "seed": 2},
    "reverse (LIM)": {"order": "reverse", "importance": "lim"},
    "reverse (measured)": {"order": "reverse", "importance": "measured"},
    "ILP (measured)": {"allocation": "ilp", "importance": "measured"},
}
DEPLOY: dict[str, list[tuple[str, dict[str, Any]]] | None] = {
    "fp32": None,
    "8-bit g16 weight-only (MatMulNBits)": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none", "group_size": 16})],
    "8-bit g16, int8 blocks (MatMulNBits acc. 4)": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8-block", "group_size": 16})],
    "int8 dynamic (DynamicQuantizeMatMul)": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8-dynamic"})],
    "SmoothQuant + int8 dynamic": [("awq-scale", {"activations": "int8-dynamic"}),
                                   ("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8-dynamic"})],
    "8-bit g16 weight-only, dequantized at load": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none", "group_size": 16}),
                                                   ("dequantize-at-load", {})],
    "8-bit g16 at load + 8-bit embeddings": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none", "group_size": 16}),
                                             ("dequantize-at-load", {}), ("quantize-embeddings", {"bits": 8, "group_size": 16})],
    "8-bit g32 at load + 8-bit embeddings": [("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none", "group_size": 32}),
                                             ("dequantize-at-load", {}), ("quantize-embeddings", {"bits": 8, "group_size": 32})],
    "6-bit avg 8/4 g16 weight-only (measured)": [("quantize-layerwise", {"bits": [8, 4], "target_bits": 6, "activations": "none",
                                                                          "group_size": 16, "importance": "measured"})],
}


# ---------------------------------------------------------------------------- data and metrics
def twin_classes(model: torch.nn.Module) -> torch.Tensor:
    """Class id per token: tokens whose classifier rows lie within ``TWIN_DIST`` share the id of
    the first of them."""
    w = model.output.weight.detach().float() if hasattr(model, "output") else model.tok_embeddings.weight.detach().float()
    near = torch.cdist(w, w) < TWIN_DIST
    return near.float().argmax(1)  # first index within the distance (each token is near itself)


def metrics(ref_logits: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
    lp, lq = F.log_softmax(ref_logits.double(), -1), F.log_softmax(logits.double(), -1)
    a, b = ref_logits.argmax(-1), logits.argmax(-1)
    return {
        "kl": float((lp.exp() * (lp - lq)).sum(-1).mean()),
        "top1": float((a == b).double().mean()),
        "top1_twins_merged": float((classes[a] == classes[b]).double().mean()),
    }


def prepare(n_eval: int) -> dict[str, Any]:
    from graphpress.zoo import load_llama2c, sample

    model = load_llama2c().eval()
    seqs = sample(model, N_CALIB + n_eval, SEQ + 1, temperature=1.0, seed=0)[:, :SEQ]
    calib, evals = seqs[:N_CALIB], seqs[N_CALIB:]
    graph = Graph.capture(model, (calib[:2],), name="stories260k")
    graph.calibration = [(calib,)]
    with torch.inference_mode():
        ref = model(evals).float()
    classes = twin_classes(model)
    return {"model": model, "graph": graph, "calib": calib, "evals": evals, "ref": ref, "classes": classes,
            "twins": int((torch.bincount(classes) > 1).sum()), "twin_tokens": int((torch.bincount(classes)[classes] > 1).sum()),
            "positions_with_twin_argmax": float((torch.bincount(classes, minlength=classes.numel())[classes[ref.argmax(-1)]] > 1).double().mean())}


# ---------------------------------------------------------------------------- part A
def study(data: dict[str, Any], log) -> list[dict[str, Any]]:
    from graphpress.passes.layers import find_layers

    rows = []
    g, ev = data["graph"], data["evals"]
    params = {layer.name: layer.params for layer in find_layers(g)[0]}
    for target in TARGETS:
        for name, opts in ORDERS.items():
            cfg = {**STUDY_BASE, **opts, "target_bits": target}
            t0 = time.perf_counter()
            # the pass alone, no pipeline budget: the study measures every allocation, however lossy
            res = make_pass("quantize-layerwise", cfg)(g.clone())
            with torch.inference_mode():
                out = res.graph.gm(ev).float()
            st = res.stats
            bits = st["bits"]
            n_low = sum(1 for b in bits.values() if b == 4)
            low_w, all_w = sum(params[k] for k, b in bits.items() if b == 4), sum(params[k] for k in bits)
            row = {"target_bits": target, "order": name, "config": cfg, "average_bits": st["average_bits"], "layers": len(bits),
                   "layers_at_4": n_low, "weights_at_4": low_w / all_w,
                   "bits": bits, **metrics(data["ref"], out, data["classes"]), "pass_s": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            log(f"  {target:>4} {name:24s} avg {row['average_bits']:.2f}  4-bit layers {n_low:2d}/{len(bits)}  KL {row['kl']:.4f}  top-1 {row['top1']:.3f}")
    return rows


def claims(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for target in TARGETS:
        at = {r["order"]: r for r in rows if r["target_bits"] == target}
        rand = float(np.mean([at[k]["kl"] for k in at if k.startswith("random")]))
        imp = {k: at[k]["kl"] for k in at if k.startswith("importance")}
        rev = {k: at[k]["kl"] for k in at if k.startswith("reverse")}
        best_imp = min(imp, key=imp.get)
        out.append({
            "target_bits": target,
            "kl_importance": imp, "kl_random_mean": rand, "kl_reverse": rev, "kl_ilp": at["ILP (measured)"]["kl"],
            "lim_beats_random": imp["importance (LIM)"] < rand, "measured_beats_random": imp["importance (measured)"] < rand,
            "random_beats_reverse": all(rand < v for v in rev.values()),
            "best_importance": best_imp,
            "identical_allocations": len({json.dumps(r["bits"], sort_keys=True) for r in at.values()}) == 1,
        })
    return out


# ---------------------------------------------------------------------------- part A2: the sweep
SWEEP_ORDERS = ("importance (LIM)", "importance (ZD)", "importance (measured)", "random (seed 0)", "random (seed 1)", "random (seed 2)",
                "reverse (LIM)", "reverse (measured)")
# "quality holds" while KL vs fp32 stays at most this many nats (all-8-bit: ~0.01; all-4-bit: ~2.0).
# 4-bit RTN is harsh on this 64-wide model (one 4-bit layer alone costs 0.01-0.1 nats), so one bar
# would say little; the curve is reported at three.
SWEEP_BARS = (0.1, 0.3, 0.5)


def layer_scores(graph: Graph) -> dict[str, dict[str, float]]:
    """Importance per layer by the three methods ``quantize-layerwise`` uses (higher = keep bits)."""
    from graphpress.ir.quant import fake_quant_groupwise
    from graphpress.passes.quant import importance as imp
    from graphpress.passes.layers import find_layers

    layers = find_layers(graph)[0]
    lim, _ = imp.lim_scores(graph, layers)
    zd = {layer.name: imp.zd_score(graph.get_tensor(layer.weight_target)) for layer in layers}
    noise, _kl = imp.measured_sensitivities(graph, layers, {layer.name: [4] for layer in layers},
                                            lambda layer, b: fake_quant_groupwise(graph.get_tensor(layer.weight_target).detach().float(), b, 32))
    return {"LIM": lim, "ZD": zd, "measured": {k: v[4] for k, v in noise.items()}}


def sweep_order(name: str, scores: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    """Demotion order: least important first (``importance``), most important first (``reverse``)."""
    import random

    if name.startswith("random"):
        order = list(names)
        random.Random(int(name.split("seed ")[1].rstrip(")"))).shuffle(order)
        return order
    method = name.split("(")[1].rstrip(")")
    ranked = sorted(names, key=lambda n: (scores[method][n], names.index(n)))
    return ranked if name.startswith("importance") else ranked[::-1]


def sweep(data: dict[str, Any], log, step: int) -> dict[str, Any]:
    """Demote the first k layers of each order to 4 bits (the rest 8), k = 0, step, ..., all."""
    g, ev = data["graph"], data["evals"]
    scores = layer_scores(g)
    names = list(scores["LIM"])
    ks = sorted(set(range(0, len(names) + 1, step)) | {len(names)})
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in SWEEP_ORDERS:
        order = sweep_order(name, scores, names)
        curve = []
        for k in ks:
            low = set(order[:k])
            cfg = {**STUDY_BASE, "target_bits": 8, "layer_bits": {n: (4 if n in low else 8) for n in names}}
            res = make_pass("quantize-layerwise", cfg)(g.clone())
            with torch.inference_mode():
                out = res.graph.gm(ev).float()
            curve.append({"layers_at_4": k, "average_bits": res.stats["average_bits"], **metrics(data["ref"], out, data["classes"])})
        holds = {}
        for bar in SWEEP_BARS:
            # the largest k before the curve first exceeds the bar (it may dip back under it by luck)
            first_bad = next((i for i, c in enumerate(curve) if c["kl"] > bar), None)
            holds[str(bar)] = len(names) if first_bad is None else ks[max(first_bad - 1, 0)]
        curves[name] = {"order": order, "curve": curve, "holds_until_layers": holds,
                        "mean_kl_over_k": float(np.mean([c["kl"] for c in curve]))}
        log(f"  {name:24s} holds until (KL bar: layers at 4 bits) {holds}, mean KL over k {curves[name]['mean_kl_over_k']:.3f}")
    return {"kl_bars": list(SWEEP_BARS), "layers": len(names), "step": step, "scores": scores, "orders": curves}


# ---------------------------------------------------------------------------- part B
def _eval_runner(fn, evals: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([fn(evals[i : i + 1]) for i in range(evals.shape[0])])).float()


def deploy(data: dict[str, Any], rounds: int, min_time_s: float, folder: Path, log) -> list[dict[str, Any]]:
    g = data["graph"]
    graphs: dict[str, Any] = {}
    # lower_variants takes one quantize-layerwise config per variant; multi-pass variants are
    # run here and handed over as already-quantized graphs
    variants: dict[str, dict[str, Any]] = {}
    for name, steps in DEPLOY.items():
        graph, stats = g, None
        for pass_name, cfg in steps or ():
            res = make_pass(pass_name, cfg)(graph.clone())
            graph, stats = res.graph, res.stats
        graphs[name] = (graph, stats)
    for i, (name, (graph, stats)) in enumerate(graphs.items()):
        lowered = lower_variants(graph, {name: None}, folder / f"d{i}", log)[name]
        lowered["average_bits"] = stats.get("average_bits") if stats else None
        lowered["config"] = DEPLOY[name]
        variants[name] = lowered
    fp32 = variants["fp32"]["path"]
    calib = [data["calib"][i : i + 1].numpy() for i in range(N_CALIB)]
    log("peers: ORT quantize_dynamic (per-tensor, per-channel), quantize_static U8S8, torch.ao dynamic")
    add_onnx_peer(variants, "peer: ORT quantize_dynamic (per-tensor)", ort_quantize_dynamic(fp32, fp32.with_name("dyn_pt.onnx"), per_channel=False),
                  "quantize_dynamic(QInt8)")
    add_onnx_peer(variants, "peer: ORT quantize_dynamic (per-channel)", ort_quantize_dynamic(fp32, fp32.with_name("dyn_pc.onnx"), per_channel=True),
                  "quantize_dynamic(QInt8, per_channel)")
    add_onnx_peer(variants, "peer: ORT quantize_static QDQ U8S8", ort_quantize_static(fp32, fp32.with_name("u8s8.onnx"), calib, activations="uint8"),
                  "quantize_static(QDQ, per_channel, QUInt8 activations)")
    from graphpress.zoo import load_llama2c

    add_torch_peer(variants, "peer: torch.ao quantize_dynamic (torch eager)", torch_ao_dynamic(load_llama2c().eval()), "torch.ao quantize_dynamic(qint8)")
    fns = runners(variants)
    evals = data["evals"].numpy()
    ref = _eval_runner(fns["fp32"], evals)
    torch_vs_ort = metrics(data["ref"], ref, data["classes"])
    rows = []
    for name, v in variants.items():
        with quiet():
            out = _eval_runner(fns[name], evals)
        rows.append({"variant": name, "config": v.get("config"), "average_bits": v.get("average_bits"), "model_bytes": v["model_bytes"],
                     "size_vs_fp32": v["model_bytes"] / variants["fp32"]["model_bytes"], "ort_ops": v.get("ort_ops"),
                     **metrics(ref, out, data["classes"])})
    log("timing batch 1 x 64 tokens (interleaved)")
    lat = time_variants(fns, evals[:1].copy(), rounds, min_time_s)
    for r in rows:
        r["latency"] = lat[r["variant"]]
    rows[0]["ort_fp32_vs_torch_fp32"] = torch_vs_ort
    return rows


# ---------------------------------------------------------------------------- report
def print_tables(result: dict[str, Any], console) -> None:
    if result["study"]:
        print_study(result, console)
    if result.get("sweep"):
        print_sweep(result["sweep"], console)
    print_deploy(result, console)


def print_sweep(sw: dict[str, Any], console) -> None:
    from rich.table import Table

    n = sw["layers"]
    marks = sorted({c["layers_at_4"] for o in sw["orders"].values() for c in o["curve"]} & {0, n // 4 // sw["step"] * sw["step"], n // 2, 3 * n // 4 // sw["step"] * sw["step"], n})
    t = Table(title=f"stories260K: KL (nats) after demoting the first k of {n} layers to 4 bits (rest 8), per order; "
                    "'KL <= x until' = share of layers at 4 bits before KL first exceeds x")
    t.add_column("order")
    for k in marks:
        t.add_column(f"k={k} ({100 * k / n:.0f}%)", justify="right")
    for bar in sw["kl_bars"]:
        t.add_column(f"KL <= {bar} until", justify="right")
    t.add_column("mean KL", justify="right")
    for name, o in sw["orders"].items():
        by_k = {c["layers_at_4"]: c for c in o["curve"]}
        t.add_row(name, *(f"{by_k[k]['kl']:.3f}" for k in marks),
                  *(f"{100 * o['holds_until_layers'][str(bar)] / n:.0f}%" for bar in sw["kl_bars"]), f"{o['mean_kl_over_k']:.3f}")
    console.print(t)


def print_study(result: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title="stories260K, weight-only g32 bits {8, 4}: KL (nats) / top-1 agreement by target average bits and allocation order")
    t.add_column("order")
    for target in TARGETS:
        t.add_column(f"{target:g} bits", justify="right")
    for name in ORDERS:
        cells = []
        for target in TARGETS:
            r = next(r for r in result["study"] if r["order"] == name and r["target_bits"] == target)  # noqa: B023
            cells.append(f"{r['kl']:.4f} / {100 * r['top1']:.1f}%  ({r['layers_at_4']}/{r['layers']} @4)")
        t.add_row(name, *cells)
    console.print(t)
    c = Table(title="claim: importance order tolerates more low-bit layers (KL: importance < random mean < reverse)")
    for col in ("target", "LIM", "measured", "random mean", "reverse LIM", "reverse measured", "ILP", "LIM < random", "measured < random", "random < reverse"):
        c.add_column(col, justify="right")
    for cl in result["claims"]:
        c.add_row(f"{cl['target_bits']:g}", f"{cl['kl_importance']['importance (LIM)']:.4f}", f"{cl['kl_importance']['importance (measured)']:.4f}",
                  f"{cl['kl_random_mean']:.4f}", f"{cl['kl_reverse']['reverse (LIM)']:.4f}", f"{cl['kl_reverse']['reverse (measured)']:.4f}",
                  f"{cl['kl_ilp']:.4f}", *("n/a (same allocation)" if cl["identical_allocations"] else ("yes" if cl[k] else "NO")
                                           for k in ("lim_beats_random", "measured_beats_random", "random_beats_reverse")))
    console.print(c)


def print_deploy(result: dict[str, Any], console) -> None:
    from rich.table import Table

    d = Table(title=f"stories260K deployment: ONNX Runtime CPU EP, {THREADS} threads, batch 1 x {SEQ} tokens, interleaved medians",
              caption="quality vs ORT fp32, each sequence run alone; twins merged = byte-fallback tokens with identical embeddings count as one class")
    for col in ("variant", "avg bits", "file KB", "x fp32 size", "KL", "top-1", "top-1 twins merged", "ms", "speedup", "kernels"):
        d.add_column(col, justify="left" if col in ("variant", "kernels") else "right")
    for r in result["deploy"]:
        ops = ", ".join(f"{k} {n}" for k, n in (r.get("ort_ops") or {}).items() if k not in ("QuantizeLinear", "DequantizeLinear"))
        d.add_row(r["variant"], "" if r["average_bits"] is None else f"{r['average_bits']:.2f}", f"{r['model_bytes'] / 1024:,.0f}",
                  f"{r['size_vs_fp32']:.3f}", f"{r['kl']:.4f}", f"{100 * r['top1']:.2f}%", f"{100 * r['top1_twins_merged']:.2f}%",
                  f"{r['latency']['median_ms']:.3f}", f"{r['latency']['speedup_vs_fp32']:.2f}x", ops)
    console.print(d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 evaluation sequences, few latency rounds: a smoke run")
    parser.add_argument("--eval", type=int, default=64, help="evaluation sequences (default 64)")
    parser.add_argument("--rounds", type=int, default=100, help="interleaved latency rounds (default 100)")
    parser.add_argument("--skip-study", action="store_true", help="only part B")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    from rich.console import Console

    from graphpress.zoo import stories260k_path

    console = Console(width=220)
    if stories260k_path() is None:
        console.print("stories260K not found (../shared/models/stories260k/stories260K.bin): nothing to measure")
        return 0
    torch.set_num_threads(THREADS)
    n_eval, (rounds, min_time) = (16, (5, 0.0)) if args.quick else (args.eval, (args.rounds, 1.0))
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    t0 = time.perf_counter()
    started = machine_info()
    data = prepare(n_eval)
    log(f"{N_CALIB} calibration + {n_eval} evaluation sequences of {SEQ} tokens; {data['twin_tokens']} tokens in {data['twins']} twin group(s); "
        f"{100 * data['positions_with_twin_argmax']:.1f}% of positions have a twin argmax")
    result: dict[str, Any] = {
        "benchmark": "quant_stories", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "machine": started, "n_calibration": N_CALIB, "n_eval": n_eval, "seq_len": SEQ,
        "twins": {"groups": data["twins"], "tokens": data["twin_tokens"], "positions_with_twin_argmax": data["positions_with_twin_argmax"],
                  "distance": TWIN_DIST},
        "study": [], "claims": [], "sweep": None,
    }
    if not args.skip_study:
        log("part A: allocation orders at target average bits")
        result["study"] = study(data, log)
        result["claims"] = claims(result["study"])
        log(f"part A2: demote k layers to 4 bits in each order (step {2 if not args.quick else 6})")
        result["sweep"] = sweep(data, log, 2 if not args.quick else 6)
    log("part B: deployment on ONNX Runtime vs peers")
    with tempfile.TemporaryDirectory() as tmp:
        result["deploy"] = deploy(data, rounds, min_time, Path(tmp), log)
    result["load_average_end"] = machine_info().get("load_average")
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print_tables(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
