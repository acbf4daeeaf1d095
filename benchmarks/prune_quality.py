"""Weight pruning quality and artifact size: magnitude vs Wanda vs SparseGPT vs iCBS, and the peer users pick.

Three parts, one run (``benchmarks/results/prune_quality.json``):

* **digits CNN** (trained here on scikit-learn's digits; calibration: 256 training images): test
  accuracy after ``prune-weights`` at 30 / 50 / 70 % unstructured, per method, without fine-tuning;
  peer: ``torch.nn.utils.prune.l1_unstructured`` on every conv / linear at the same amount.
* **stories260K** (``../shared/models``; 16 calibration and 64 evaluation sequences of 64 tokens
  sampled from the model): KL(fp32 || pruned) and next-token top-1 agreement for 50 % unstructured
  and 2:4, per method; peer: ``torch.nn.utils.prune`` L1 50 % on every ``nn.Linear`` (the tied
  classifier included, as a user would run it).
* **storage**: ONNX file of the 50 % pruned model with ``store-sparse`` vs the dense file, the
  same pruned weights stored dense (the peer's situation), and ONNX Runtime latency of each
  (interleaved medians): unstructured zeros give no speed on ORT.

Usage::

    python benchmarks/prune_quality.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.utils.prune as tprune
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, ort_session
from quant_stories import metrics, twin_classes

import graphpress.passes.prune  # noqa: F401 -- registers prune-weights / store-sparse
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "prune_quality.json"
THREADS = 2
METHODS = ("magnitude", "wanda", "sparsegpt", "icbs")
DIGITS_SPARSITY = (0.3, 0.5, 0.7)
N_CALIB, SEQ = 16, 64


def torch_prune_l1(model: nn.Module, amount: float, kinds: tuple[type, ...]) -> nn.Module:
    """The peer: ``torch.nn.utils.prune.l1_unstructured`` on every module of ``kinds``, made permanent."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, kinds):
            tprune.l1_unstructured(mod, "weight", amount=amount)
            tprune.remove(mod, "weight")
    return m


# ---------------------------------------------------------------------------- digits
def digits(quick: bool, log) -> dict[str, Any]:
    from graphpress.zoo import accuracy, digits_data, train_digits_cnn

    model, acc = train_digits_cnn(epochs=6)
    x_tr, _y_tr, x_te, y_te = digits_data()
    g = Graph.capture(model.eval(), (x_te[:8],), name="digits")
    g.calibration = [(x_tr[:256],)]
    g = Pipeline(["fold-batchnorm"]).run(g).graph
    rows = [{"method": "dense", "sparsity": 0.0, "accuracy": acc}]
    for s in DIGITS_SPARSITY[:1] if quick else DIGITS_SPARSITY:
        for method in METHODS:
            t0 = time.perf_counter()
            r = make_pass("prune-weights", {"method": method, "sparsity": s})(g.clone())
            a = accuracy(lambda x, gr=r.graph: gr.run(x)[0], x_te, y_te)
            rows.append({"method": method, "sparsity": s, "accuracy": a, "achieved": r.stats["sparsity_pruned_layers"],
                         "kept_dense": r.stats["kept_dense"], "pass_s": round(time.perf_counter() - t0, 2)})
            log(f"  digits {method:9s} {s:.0%}: accuracy {a:.4f}")
        peer = torch_prune_l1(model.eval(), s, (nn.Conv2d, nn.Linear))
        a = accuracy(peer, x_te, y_te)
        rows.append({"method": "peer: torch.nn.utils.prune L1", "sparsity": s, "accuracy": a})
        log(f"  digits torch prune {s:.0%}: accuracy {a:.4f}")
    return {"case": "digits", "test_images": int(x_te.shape[0]), "rows": rows}


# ---------------------------------------------------------------------------- stories260K
def stories(quick: bool, log) -> dict[str, Any] | None:
    from graphpress.zoo import load_llama2c, sample

    try:
        model = load_llama2c().eval()
    except Exception as err:  # noqa: BLE001 -- ../shared is optional
        log(f"stories260K skipped: {err}")
        return None
    n_eval = 16 if quick else 64
    seqs = sample(model, N_CALIB + n_eval, SEQ + 1, temperature=1.0, seed=0)[:, :SEQ]
    calib, evals = seqs[:N_CALIB], seqs[N_CALIB:]
    g = Graph.capture(model, (calib[:2],), name="stories260k")
    g.calibration = [(calib,)]
    classes = twin_classes(model)
    with torch.inference_mode():
        ref = model(evals).float()
    rows = []
    for pattern in ("unstructured", "2:4"):
        for method in METHODS:
            t0 = time.perf_counter()
            r = make_pass("prune-weights", {"method": method, "sparsity": 0.5, "pattern": pattern})(g.clone())
            with torch.inference_mode():
                out = r.graph.gm(evals)
            out = (out[0] if isinstance(out, (tuple, list)) else out).float()
            rows.append({"pattern": pattern, "method": method, **metrics(ref, out, classes), "achieved": r.stats["sparsity_pruned_layers"],
                         "pruned_layers": r.stats["pruned"], "kept_dense": r.stats["kept_dense"], "pass_s": round(time.perf_counter() - t0, 2)})
            log(f"  stories {pattern:12s} {method:9s}: KL {rows[-1]['kl']:.3f} top-1 {rows[-1]['top1']:.3f}")
    peer = torch_prune_l1(model, 0.5, (nn.Linear,))
    with torch.inference_mode():
        out = peer(evals).float()
    rows.append({"pattern": "unstructured", "method": "peer: torch.nn.utils.prune L1", **metrics(ref, out, classes), "achieved": 0.5})
    log(f"  stories torch prune: KL {rows[-1]['kl']:.3f} top-1 {rows[-1]['top1']:.3f}")
    return {"case": "stories260k", "eval_positions": int(evals.numel()), "rows": rows}


# ---------------------------------------------------------------------------- storage
def storage(quick: bool, log) -> dict[str, Any]:
    from graphpress.backends.onnxruntime.lower import lower_to_onnx
    from graphpress.runtime.bench import compare_latency

    torch.manual_seed(0)
    mlp = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(1024, 1024), nn.ReLU())]).eval()
    x = torch.randn(2, 1024)
    g = Graph.capture(mlp, (x,), name="mlp4x1024")
    g.calibration = [(torch.randn(512, 1024),)]
    pruned = make_pass("prune-weights", {"method": "wanda", "sparsity": 0.5})(g.clone()).graph
    pruned24 = make_pass("prune-weights", {"method": "wanda", "pattern": "2:4"})(g.clone()).graph
    variants = {"dense": g, "50% pruned, stored dense": pruned,
                "50% pruned + store-sparse": make_pass("store-sparse", {})(pruned.clone()).graph,
                "2:4 pruned + store-sparse": make_pass("store-sparse", {})(pruned24.clone()).graph}
    rows, sessions = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, graph) in enumerate(variants.items()):
            folder = Path(tmp) / f"v{i}"
            info = lower_to_onnx(graph, folder)
            t0 = time.perf_counter()
            sessions[name] = ort_session(folder / "model.onnx", THREADS)
            rows.append({"variant": name, "model_bytes": info["model_bytes"], "session_s": round(time.perf_counter() - t0, 3)})
        xb = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
        name0 = sessions["dense"].get_inputs()[0].name
        for r in rows:
            out = sessions[r["variant"]].run(None, {name0: xb})[0]
            r["max_abs_vs_eager"] = float(np.abs(out - variants[r["variant"]].run(torch.from_numpy(xb))[0].numpy()).max())
        lat = compare_latency({k: (lambda s=s: s.run(None, {name0: xb})) for k, s in sessions.items()}, rounds=5 if quick else 40,
                              min_time_s=0.0 if quick else 0.5)
        base = lat.results["dense"].median_ms
        dense_bytes = rows[0]["model_bytes"]
        for r in rows:
            r["size_vs_dense"] = r["model_bytes"] / dense_bytes
            r["median_ms_b1"] = lat.results[r["variant"]].median_ms
            r["speedup_b1"] = base / r["median_ms_b1"]
            log(f"  {r['variant']:28s} {r['model_bytes'] / 1024:8,.0f} KB ({r['size_vs_dense']:.3f}x)  {r['speedup_b1']:.2f}x")
    return {"case": "storage", "model": "4 x Linear(1024) + ReLU", "rows": rows, "real_models": real_model_sizes(log)}


def real_model_sizes(log) -> list[dict[str, Any]]:
    """ONNX file of the real models, dense vs 50 % magnitude-pruned + ``store-sparse`` (../shared)."""
    from graphpress.backends.onnxruntime.lower import lower_to_onnx
    from graphpress.zoo import load_llama2c, load_resnet20

    out = []
    cases = []
    try:
        resnet = Graph.capture(load_resnet20(), (torch.randn(2, 3, 32, 32),), name="resnet20")
        cases.append(("ResNet-20 (BN folded)", Pipeline(["fold-batchnorm"]).run(resnet).graph))
        cases.append(("stories260K (tied embedding stays dense)", Graph.capture(load_llama2c().eval(), (torch.randint(0, 512, (2, 32)),), name="stories")))
    except Exception as err:  # noqa: BLE001 -- ../shared is optional
        log(f"real-model sizes skipped: {err}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, g) in enumerate(cases):
            stored = make_pass("store-sparse", {})(make_pass("prune-weights", {"method": "magnitude", "sparsity": 0.5})(g.clone()).graph).graph
            dense_bytes = lower_to_onnx(g, Path(tmp) / f"d{i}")["model_bytes"]
            stored_bytes = lower_to_onnx(stored, Path(tmp) / f"s{i}")["model_bytes"]
            out.append({"model": name, "dense_bytes": dense_bytes, "stored_bytes": stored_bytes, "size_vs_dense": stored_bytes / dense_bytes})
            log(f"  {name}: {dense_bytes:,} -> {stored_bytes:,} B ({stored_bytes / dense_bytes:.3f}x)")
    return out


def print_tables(result: dict[str, Any], console) -> None:
    from rich.table import Table

    for case in result["cases"]:
        if case["case"] == "digits":
            t = Table(title=f"digits CNN: test accuracy ({case['test_images']} images), no fine-tuning")
            sp = sorted({r["sparsity"] for r in case["rows"] if r["sparsity"] > 0})
            t.add_column("method")
            for s in sp:
                t.add_column(f"{s:.0%}", justify="right")
            dense = next(r["accuracy"] for r in case["rows"] if r["method"] == "dense")
            methods = [m for m in dict.fromkeys(r["method"] for r in case["rows"]) if m != "dense"]
            for m in methods:
                t.add_row(m, *[f"{next((r['accuracy'] for r in case['rows'] if r['method'] == m and r['sparsity'] == s), float('nan')):.2%}" for s in sp])
            t.caption = f"dense {dense:.2%}"
        elif case["case"] == "stories260k":
            t = Table(title=f"stories260K: KL / top-1 agreement vs fp32 ({case['eval_positions']} positions), 50% of the linear weights")
            for c in ("pattern", "method", "KL", "top-1", "top-1 twins merged", "pruned layers"):
                t.add_column(c, justify="left" if c in ("pattern", "method") else "right")
            for r in case["rows"]:
                t.add_row(r["pattern"], r["method"], f"{r['kl']:.3f}", f"{r['top1']:.1%}", f"{r['top1_twins_merged']:.1%}", str(r.get("pruned_layers", "all")))
        else:
            t = Table(title=f"storage: ONNX file and ORT batch-1 latency, {case['model']}")
            for c in ("variant", "file KB", "x dense", "session s", "batch-1 ms", "speedup"):
                t.add_column(c, justify="left" if c == "variant" else "right")
            for r in case["rows"]:
                t.add_row(r["variant"], f"{r['model_bytes'] / 1024:,.0f}", f"{r['size_vs_dense']:.3f}", f"{r['session_s']:.3f}", f"{r['median_ms_b1']:.3f}",
                          f"{r['speedup_b1']:.2f}x")
            for r in case.get("real_models", []):
                t.add_row(f"{r['model']}: 50% magnitude + store-sparse", f"{r['stored_bytes'] / 1024:,.0f}", f"{r['size_vs_dense']:.3f}", "", "", "")
        console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one sparsity, fewer sequences and rounds: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(width=160)
    torch.set_num_threads(THREADS)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    t0 = time.perf_counter()
    started = machine_info(torch_threads=THREADS)
    cases = [digits(args.quick, log)]
    s = stories(args.quick, log)
    if s is not None:
        cases.append(s)
    cases.append(storage(args.quick, log))
    result = {"benchmark": "prune_quality", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
              "machine": started, "wall_s": round(time.perf_counter() - t0, 1), "cases": cases}
    print_tables(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
