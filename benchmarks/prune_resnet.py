"""ResNet-20 structured channel pruning: a valid smaller model, ONNX Runtime latency, agreement before and after distillation.

One run (``benchmarks/results/prune_resnet.json``), ratios vs ONNX Runtime fp32 of the unpruned
model, batch-1 (and batch-64) medians interleaved in one run (seeded shuffled order per round):

* graphpress ``prune-channels`` at 50 % over **all** channel groups (residual streams with their
  option-A shortcuts included), top-1 agreement with the unpruned model on 2048 photo crops,
  before and after distillation fine-tuning (:func:`graphpress.train.distill`, teacher = the
  unpruned model, on other crops);
* the peer Torch-Pruning (installed with ``pip install --no-deps torch-pruning``): 50 % over all
  groups (as a user would run it first) and block-internal channels only, each before and after
  the same distillation;
* torch eager fp32 for reference.

Usage::

    python benchmarks/prune_resnet.py [--quick] [--epochs N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from common import machine_info, ort_session

import graphpress.passes.prune  # noqa: F401 -- registers prune-channels
from graphpress.backends.onnxruntime.lower import lower_to_onnx
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.runtime.bench import compare_latency
from graphpress.train.distill import DistillConfig, distill

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "prune_resnet.json"
THREADS = 2
SPARSITY = 0.5
N_TRAIN, N_EVAL = 8192, 2048


def _predict(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([torch.as_tensor(np.asarray(fn(x[i : i + batch]))) for i in range(0, x.shape[0], batch)]).argmax(-1)


def _ort_fn(sess: ort.InferenceSession):
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy() if isinstance(x, torch.Tensor) else x})[0]


def torch_pruning_peer(block_internal_only: bool, log) -> tuple[torch.nn.Module | None, str]:
    """Torch-Pruning's MagnitudePruner (L1) at 50 %: all groups, or only the first conv of each block."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None, "torch-pruning not installed (pip install --no-deps torch-pruning)"
    from graphpress.zoo import load_resnet20

    model = load_resnet20().eval()
    ignored = [model.linear]
    if block_internal_only:
        ignored += [model.conv1] + [b.conv2 for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    try:
        pruner = tp.pruner.MagnitudePruner(model, torch.randn(1, 3, 32, 32), importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=SPARSITY, ignored_layers=ignored)
        pruner.step()
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    except Exception as err:  # noqa: BLE001 -- the failure is the result
        msg = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        log(f"  Torch-Pruning ({'block-internal' if block_internal_only else 'all groups'}) failed: {msg}")
        return None, msg
    return model, f"torch_pruning {tp.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, few rounds: a smoke run")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from graphpress.zoo import load_resnet20
    from graphpress.zoo.photos import photo_crops, sample_photos

    console = Console(width=180)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    started = machine_info(threads=THREADS)
    photos = sample_photos()
    calib = photo_crops(512, 1, photos)
    train = photo_crops(N_TRAIN if not args.quick else 512, 3, photos)
    xe = photo_crops(N_EVAL, 2, photos)
    dense = Graph.capture(load_resnet20(), (calib[:2],), name="resnet20")
    dense.calibration = [(calib[i : i + 128],) for i in range(0, 512, 128)]
    dense = Pipeline(["fold-batchnorm"]).run(dense).graph

    log("prune-channels 50% over all groups")
    t0 = time.perf_counter()
    res = make_pass("prune-channels", {"sparsity": SPARSITY})(dense.clone())
    pruned = res.graph
    prune_s = time.perf_counter() - t0
    tuned = pruned.clone()
    log(f"distillation fine-tuning ({1 if args.quick else args.epochs} epochs on {train.shape[0]} crops)")
    t0 = time.perf_counter()
    distill_config = DistillConfig(epochs=1 if args.quick else args.epochs, lr=1e-3, batch_size=64, trainable="all", patience=5)
    dres = distill(tuned, dense, train, distill_config)
    distill_s = time.perf_counter() - t0

    variants: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, g in (("fp32 (unpruned)", dense), ("graphpress prune-channels 50%, no fine-tuning", pruned),
                        ("graphpress prune-channels 50% + distillation", tuned)):
            folder = Path(tmp) / f"v{len(variants)}"
            info = lower_to_onnx(g, folder)
            variants[name] = {"path": folder / "model.onnx", "model_bytes": info["model_bytes"], "params": g.parameter_count()}
        peer_errors = {}
        for label, internal in (("peer: Torch-Pruning 50% all groups", False), ("peer: Torch-Pruning 50% block-internal only", True)):
            model, note = torch_pruning_peer(internal, log)
            if model is None:
                peer_errors[label] = note
                continue
            g = Graph.capture(model, (calib[:2],), name="tp")
            g = Pipeline(["fold-batchnorm"]).run(g).graph
            peer_tuned = g.clone()
            distill(peer_tuned, dense, train, distill_config)
            for suffix, graph in (("", g), (" + distillation", peer_tuned)):
                folder = Path(tmp) / f"v{len(variants)}"
                info = lower_to_onnx(graph, folder)
                variants[label + suffix] = {"path": folder / "model.onnx", "model_bytes": info["model_bytes"], "params": graph.parameter_count(),
                                            "config": note}
        sessions = {k: ort_session(v["path"], THREADS) for k, v in variants.items()}
        fns = {k: _ort_fn(s) for k, s in sessions.items()}
        ref = _predict(fns["fp32 (unpruned)"], xe)
        for k, v in variants.items():
            v["agreement"] = float((_predict(fns[k], xe) == ref).float().mean())
        lat = {}
        for b in (1, 64):
            x = xe[:b].numpy().copy()
            r = compare_latency({k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, rounds=5 if args.quick else 60, min_time_s=0.0 if args.quick else 1.0)
            base = r.results["fp32 (unpruned)"].median_ms
            lat[b] = {k: {"median_ms": v.median_ms, "speedup": base / v.median_ms} for k, v in r.results.items()}
    rows = []
    for k, v in variants.items():
        rows.append({"variant": k, "params": v["params"], "model_bytes": v["model_bytes"], "agreement": v["agreement"],
                     "latency": {str(b): lat[b][k] for b in lat}, **({"config": v["config"]} if "config" in v else {})})
    result = {
        "benchmark": "prune_resnet",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": started,
        "quality": f"top-1 agreement with the unpruned ResNet-20 (ORT) on {N_EVAL} photo crops; fine-tuning on {train.shape[0]} other crops",
        "prune_stats": {k: v for k, v in res.stats.items() if k != "groups"},
        "prune_s": round(prune_s, 2),
        "distill": {"epochs_run": len(dres.history) if hasattr(dres, "history") else None, "seconds": round(distill_s, 1)},
        "peer_failures": peer_errors,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    t = Table(title="ResNet-20, 50% channel pruning: ONNX Runtime CPU EP, 2 threads, interleaved medians")
    for c in ("variant", "params", "file KB", "agreement", "b1 ms", "b1 speedup", "b64 ms", "b64 speedup"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for r in rows:
        t.add_row(r["variant"], f"{r['params']:,}", f"{r['model_bytes'] / 1024:,.0f}", f"{r['agreement']:.2%}",
                  f"{r['latency']['1']['median_ms']:.3f}", f"{r['latency']['1']['speedup']:.2f}x",
                  f"{r['latency']['64']['median_ms']:.2f}", f"{r['latency']['64']['speedup']:.2f}x")
    for k, msg in peer_errors.items():
        t.add_row(k, "", "", "failed", msg[:60], "", "", "")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    console.print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
