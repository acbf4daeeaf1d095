"""Quantization speed benchmark: graphpress int8 / int4 ONNX Runtime models vs ONNX Runtime fp32.

Cases (each lowered by graphpress's ONNX Runtime backend, run with the CPU EP at 2 threads):

* **8 x Linear(1024) MLP** (ReLU between, seeded random weights): fp32; ``quantize-layerwise``
  with int8 static activations (QGemm, U8S8), int8 dynamic activations (DynamicQuantizeMatMul),
  8-bit groups with int8 block activations (MatMulNBits, ``accuracy_level=4``), 4-bit groups
  weight-only (MatMulNBits, fp32 compute) and with int8 block activations, and a 6-bit average
  mix (8/4 bits by measured importance); plus ONNX Runtime's own ``quantize_dynamic`` on the
  fp32 file as a reference row. Quality: output SQNR vs fp32 on 256 seeded random rows.
* **digits CNN** (:mod:`graphpress.zoo.digits`, trained, batch-norm folded): fp32, int8 static
  (QLinearConv + QGemm) and int8 convs with 4-bit linears. Quality: held-out accuracy and top-1
  agreement with fp32, all computed from the ONNX Runtime outputs.
* ``--resnet``: ResNet-20 (``../shared/models``) fp32 vs int8 static, top-1 agreement on seeded
  N(0, 1) images (calibration on other seeded images).

Latency: batch 1 and batch 64, every variant of a case timed *interleaved*
(:func:`graphpress.runtime.compare_latency`), medians; ratio = fp32 median / variant median
(> 1 is faster). Sessions run with intra-op spinning off: with eight sessions called in turn, the
previous session's spinning pool threads otherwise slow down the next one (measured: up to 2x on
the variant after a slow one). File sizes are those of ``model.onnx``. The ORT-optimized op counts show which
kernels really run (QGemm, QLinearConv, MatMulNBits ...).

Usage::

    python benchmarks/quant_speed.py [--quick] [--resnet] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as _dt
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import machine_info, ort_session
from quant_peers import (
    ort_quantize_dynamic,
    ort_quantize_static,
    torch_ao_dynamic,
    torch_runner,
)

import graphpress.passes.quant  # noqa: F401 -- registers quantize-layerwise / awq-scale
from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.runtime import compare_latency

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "quant_speed.json"
THREADS = 2

MLP_VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8 static (QGemm)": {"bits": [8], "target_bits": 8, "activations": "int8"},
    "int8 dynamic (DynamicQuantizeMatMul)": {"bits": [8], "target_bits": 8, "activations": "int8-dynamic"},
    "8-bit g32, int8 blocks (MatMulNBits)": {"bits": [8], "target_bits": 8, "activations": "int8-block"},
    "4-bit g32 weight-only (MatMulNBits)": {"bits": [4], "target_bits": 4, "activations": "none"},
    "4-bit g32, int8 blocks (MatMulNBits)": {"bits": [4], "target_bits": 4, "activations": "int8-block"},
    "6-bit avg 8/4 mix (measured)": {"bits": [8, 4], "target_bits": 6.0, "activations": "int8", "importance": "measured"},
}
RESNET_VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8 static (QLinearConv + QLinearAdd)": {"bits": [8], "target_bits": 8, "activations": "int8"},
    "int8 static, MSE ranges": {"bits": [8], "target_bits": 8, "activations": "int8", "act_calibration": "mse"},
    "int8 static, MSE ranges, float stem": {"bits": [8], "target_bits": 8, "activations": "int8", "act_calibration": "mse", "skip": ["conv1"]},
    "int8 static, float shortcuts (no QLinearAdd)": {"bits": [8], "target_bits": 8, "activations": "int8", "shortcuts": "float"},
}
RESNET_CALIB, RESNET_EVAL = 512, 2048
DIGITS_VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "int8 static (QLinearConv + QGemm)": {"bits": [8], "target_bits": 8, "activations": "int8"},
    "int8 convs + 4-bit linears": {"bits": [8, 4], "target_bits": 4.6, "activations": "int8", "importance": "measured"},
}


# ---------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _optimized_ops(path: Path) -> dict[str, int]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    out = path.with_name(path.stem + ".optimized.onnx")
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    out.unlink(missing_ok=True)
    keep = ("QGemm", "QLinearConv", "QLinearAdd", "Add", "QLinearMatMul", "MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger",
            "MatMulInteger", "Gemm", "FusedGemm", "MatMul", "Conv", "FusedConv", "QuantizeLinear", "DequantizeLinear")
    return {k: counts[k] for k in keep if counts.get(k)}


def _run(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def _ort_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    sess = ort_session(path, THREADS)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def add_onnx_peer(variants: dict[str, dict[str, Any]], name: str, path: Path, config: str) -> None:
    variants[name] = {"config": config, "path": path, "model_bytes": path.stat().st_size, "ort_ops": _optimized_ops(path)}


def add_torch_peer(variants: dict[str, dict[str, Any]], name: str, module: torch.nn.Module, config: str) -> None:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    variants[name] = {"config": config, "module": module, "model_bytes": buf.tell(), "ort_ops": {"(torch eager)": 1}}


def runners(variants: dict[str, dict[str, Any]]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {k: (torch_runner(v["module"]) if "module" in v else _ort_runner(v["path"])) for k, v in variants.items()}


def lower_variants(graph: Graph, variants: dict[str, dict[str, Any] | None], folder: Path, log) -> dict[str, dict[str, Any]]:
    """Quantize (through a verified Pipeline), lower and check each variant."""
    out: dict[str, dict[str, Any]] = {}
    for i, (name, cfg) in enumerate(variants.items()):
        sub = folder / f"v{i}"
        t0 = time.perf_counter()
        g, stats = graph, {}
        if cfg is not None:
            report = Pipeline([("quantize-layerwise", cfg)], random_inputs=0).run(graph)
            g, stats = report.graph, report.steps[0].stats
        t_pass = time.perf_counter() - t0
        with _quiet():
            info = lower_to_onnx(g, sub)
        check = check_onnx(g, sub / "model.onnx", seeds=())
        out[name] = {
            "config": cfg,
            "path": sub / "model.onnx",
            "graph": g,
            "model_bytes": info["model_bytes"],
            "pass_s": round(t_pass, 2),
            "average_bits": stats.get("average_bits"),
            "bits": stats.get("bits"),
            "ort_vs_eager_sqnr_db": check["worst"]["sqnr_db"] if check.get("worst") else None,
            "ort_ops": _optimized_ops(sub / "model.onnx"),
        }
        log(f"  {name}: {info['model_bytes'] / 1024:,.0f} KB, pass {t_pass:.1f} s")
    return out


def time_variants(fns: dict[str, Callable[[np.ndarray], np.ndarray]], x: np.ndarray, rounds: int, min_time_s: float) -> dict[str, dict[str, float]]:
    res = compare_latency({k: (lambda f=f: f(x)) for k, f in fns.items()}, rounds=rounds, min_time_s=min_time_s)
    base = res.results["fp32"].median_ms
    return {k: {**r.to_dict(), "speedup_vs_fp32": base / r.median_ms} for k, r in res.results.items()}


# ---------------------------------------------------------------------------- cases
def mlp_case(rounds: int, min_time_s: float, folder: Path, log) -> dict[str, Any]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(8):
        layers += [torch.nn.Linear(1024, 1024)] + ([torch.nn.ReLU()] if i < 7 else [])
    mlp = torch.nn.Sequential(*layers).eval()
    gen = torch.Generator().manual_seed(1)
    graph = Graph.capture(mlp, (torch.randn(2, 1024, generator=gen),), name="mlp8x1024")
    graph.calibration = [(torch.randn(256, 1024, generator=gen),)]
    x_eval = torch.randn(256, 1024, generator=gen).numpy()
    log("MLP 8 x Linear(1024): lowering")
    variants = lower_variants(graph, MLP_VARIANTS, folder / "mlp", log)
    fp32 = variants["fp32"]["path"]
    add_onnx_peer(variants, "peer: ORT quantize_dynamic (per-tensor)", ort_quantize_dynamic(fp32, fp32.with_name("dyn.onnx"), per_channel=False),
                  "onnxruntime.quantization.quantize_dynamic(weight_type=QInt8)")
    add_torch_peer(variants, "peer: torch.ao quantize_dynamic (torch eager)", torch_ao_dynamic(mlp), "torch.ao.quantization.quantize_dynamic(qint8)")
    fns = runners(variants)
    ref = _run(fns["fp32"], x_eval)
    rows = []
    for k, v in variants.items():
        got = _run(fns[k], x_eval)
        rows.append({"variant": k, "sqnr_db": sqnr_db(torch.from_numpy(ref), torch.from_numpy(got)), **_common(v, variants["fp32"])})
    log("MLP: timing batch 1 and 64 (interleaved)")
    lat = {b: time_variants(fns, x_eval[:b].copy(), rounds, min_time_s) for b in (1, 64)}
    for r in rows:
        r["latency"] = {str(b): lat[b][r["variant"]] for b in lat}
    return {"case": "mlp8x1024", "quality": "output SQNR vs fp32 (dB), 256 seeded N(0,1) rows", "rows": rows}


def digits_case(rounds: int, min_time_s: float, folder: Path, log) -> dict[str, Any]:
    from graphpress.zoo import digits_data, train_digits_cnn

    log("digits CNN: training")
    model, acc = train_digits_cnn()
    x_tr, _y_tr, x_te, y_te = digits_data()
    graph = Graph.capture(model, (x_te[:8],), name="digits")
    graph.calibration = [(x_tr[:256],)]
    graph = Pipeline(["fold-batchnorm"]).run(graph).graph
    log("digits CNN: lowering")
    variants = lower_variants(graph, DIGITS_VARIANTS, folder / "digits", log)
    fp32 = variants["fp32"]["path"]
    calib = [x_tr[i : i + 32].numpy() for i in range(0, 256, 32)]
    add_onnx_peer(variants, "peer: ORT quantize_static QDQ U8S8", ort_quantize_static(fp32, fp32.with_name("u8s8.onnx"), calib, activations="uint8"),
                  "quantize_static(QDQ, per_channel, QUInt8 activations)")
    fns = runners(variants)
    xe, ye = x_te.numpy(), y_te.numpy()
    ref = _run(fns["fp32"], xe).argmax(-1)
    rows = []
    for k, v in variants.items():
        pred = _run(fns[k], xe).argmax(-1)
        rows.append({"variant": k, "accuracy": float((pred == ye).mean()), "agreement": float((pred == ref).mean()), **_common(v, variants["fp32"])})
    log("digits CNN: timing batch 1 and 64 (interleaved)")
    lat = {b: time_variants(fns, xe[:b].copy(), rounds, min_time_s) for b in (1, 64)}
    for r in rows:
        r["latency"] = {str(b): lat[b][r["variant"]] for b in lat}
    return {"case": "digits", "quality": f"test accuracy (torch fp32 {acc:.4f}) and top-1 agreement with ORT fp32, 450 images", "rows": rows}


def resnet_case(rounds: int, min_time_s: float, folder: Path, log) -> dict[str, Any] | None:
    from graphpress.zoo import load_resnet20
    from graphpress.zoo.photos import photo_crops, sample_photos

    try:
        model = load_resnet20()
        photos = sample_photos()
    except Exception as err:  # noqa: BLE001 -- the checkpoint and Pillow are optional
        log(f"ResNet-20 skipped: {err}")
        return None
    calib = photo_crops(RESNET_CALIB, 1, photos)
    xe = photo_crops(RESNET_EVAL, 2, photos).numpy()
    graph = Graph.capture(model, (calib[:2],), name="resnet20")
    graph.calibration = [(calib[i : i + 128],) for i in range(0, calib.shape[0], 128)]
    graph = Pipeline(["fold-batchnorm"]).run(graph).graph
    log("ResNet-20: lowering")
    variants = lower_variants(graph, RESNET_VARIANTS, folder / "resnet", log)
    fp32 = variants["fp32"]["path"]
    chunks = [calib[i : i + 32].numpy() for i in range(0, calib.shape[0], 32)]
    log("ResNet-20: peers")
    add_onnx_peer(variants, "peer: ORT quantize_static QDQ S8S8 (default)", ort_quantize_static(fp32, fp32.with_name("s8s8.onnx"), chunks, activations="int8"),
                  "quantize_static(QDQ, per_channel, QInt8 activations)")
    add_onnx_peer(variants, "peer: ORT quantize_static QDQ U8S8", ort_quantize_static(fp32, fp32.with_name("u8s8.onnx"), chunks, activations="uint8"),
                  "quantize_static(QDQ, per_channel, QUInt8 activations)")
    add_onnx_peer(variants, "peer: ORT quantize_dynamic", ort_quantize_dynamic(fp32, fp32.with_name("dyn.onnx"), per_channel=True),
                  "quantize_dynamic(QInt8, per_channel)")
    add_torch_peer(variants, "peer: torch.ao quantize_dynamic (torch eager)", torch_ao_dynamic(load_resnet20()), "torch.ao.quantization.quantize_dynamic(qint8)")
    add_torch_peer(variants, "reference: torch eager fp32", load_resnet20().eval(), "torch eager, unquantized")
    fns = runners(variants)
    ref = _run(fns["fp32"], xe).argmax(-1)
    rows = []
    for k, v in variants.items():
        pred = _run(fns[k], xe).argmax(-1)
        rows.append({"variant": k, "agreement": float((pred == ref).mean()), **_common(v, variants["fp32"])})
    log("ResNet-20: timing batch 1 and 64 (interleaved)")
    lat = {b: time_variants(fns, xe[:b].copy(), rounds, min_time_s) for b in (1, 64)}
    for r in rows:
        r["latency"] = {str(b): lat[b][r["variant"]] for b in lat}
    return {"case": "resnet20", "quality": f"top-1 agreement with ORT fp32 on {RESNET_EVAL} crops of scikit-learn's sample photos "
            f"(calibration: {RESNET_CALIB} other crops)", "rows": rows}


def _common(v: dict[str, Any], fp32: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": v.get("config"),
        "model_bytes": v["model_bytes"],
        "size_vs_fp32": v["model_bytes"] / fp32["model_bytes"],
        "average_bits": v.get("average_bits"),
        "bits": v.get("bits"),
        "ort_vs_eager_sqnr_db": v.get("ort_vs_eager_sqnr_db"),
        "ort_ops": v.get("ort_ops"),
        "pass_s": v.get("pass_s"),
    }


# ---------------------------------------------------------------------------- report
def print_case(case: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"{case['case']}: ONNX Runtime CPU EP, {THREADS} threads, interleaved medians", caption=f"quality: {case['quality']}")
    quality_cols = [c for c in ("sqnr_db", "accuracy", "agreement") if c in case["rows"][0]]
    for col in ("variant", "avg bits", "file KB", "x fp32 size", *quality_cols, "b1 ms", "b1 speedup", "b64 ms", "b64 speedup", "kernels after ORT optimization"):
        t.add_column(col, justify="left" if col in ("variant", "kernels after ORT optimization") else "right")
    for r in case["rows"]:
        q = []
        for c in quality_cols:
            v = r[c]
            q.append(f"{v:.1f}" if c == "sqnr_db" and np.isfinite(v) else ("inf" if c == "sqnr_db" else f"{100 * v:.2f}%"))
        lat = r["latency"]
        ops = ", ".join(f"{k} {n}" for k, n in (r.get("ort_ops") or {}).items() if k not in ("QuantizeLinear", "DequantizeLinear"))
        t.add_row(
            r["variant"],
            "" if r.get("average_bits") is None else f"{r['average_bits']:.2f}",
            f"{r['model_bytes'] / 1024:,.0f}",
            f"{r['size_vs_fp32']:.3f}",
            *q,
            f"{lat['1']['median_ms']:.3f}",
            f"{lat['1']['speedup_vs_fp32']:.2f}x",
            f"{lat['64']['median_ms']:.3f}",
            f"{lat['64']['speedup_vs_fp32']:.2f}x",
            ops,
        )
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run, not numbers to quote")
    parser.add_argument("--resnet", action="store_true", help="add ResNet-20 (needs ../shared/models)")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per latency comparison (default 60)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console(width=200)
    torch.set_num_threads(THREADS)
    rounds, min_time = (5, 0.0) if args.quick else (args.rounds, 1.0)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")
    t0 = time.perf_counter()
    started = machine_info(onnxruntime_threads=THREADS)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cases.append(mlp_case(rounds, min_time, folder, log))
        cases.append(digits_case(rounds, min_time, folder, log))
        if args.resnet:
            r = resnet_case(rounds, min_time, folder, log)
            if r is not None:
                cases.append(r)
    for case in cases:
        print_case(case, console)
    result = {
        "benchmark": "quant_speed",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "rounds": rounds,
        "machine": started,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t0, 1),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=lambda o: str(o)))
    console.print(f"wrote {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
