"""HE backend on the digits CNN: encrypted inference on the whole test split, cost model vs measurement.

The HE issue's "done when" numbers for the ``interactive`` protocol (BFV): for each variant the
digits CNN is lowered with the ``he`` backend and *every one* of the 450 held-out test images is
classified under encryption (each linear/conv layer on encrypted fixed-point inputs, the client
running ReLU/pooling/flatten in plaintext between them). Reported per variant:

* top-1 agreement of the encrypted model with the plaintext float model (target >= 99%), and
  test accuracy against the real labels (plaintext float vs encrypted);
* exactness: every decrypted integer equals the plaintext fixed-point product (BFV is exact);
* per layer: measured wall time of the encrypted layer call (client encrypt + server products +
  serialization + decrypt) vs the cost model's prediction, op counts, bytes on the wire.

Variants (all after ``fold-batchnorm``; 8-bit activations, 8-bit per-channel weights):

* ``dense`` -- ``coeff-dense`` encoding (Cheetah-style coefficient encoding of dense weights);
* ``circulant b=2`` / ``circulant b=4`` -- ``block-circulant`` (Fisher-weighted projection, every
  layer the block size fits: conv2 and fc1; conv1 has one input channel, fc2 ten outputs) then
  distillation fine-tuning against the dense folded model (only the compact vectors and biases
  train), lowered with ``coeff-circulant`` (compact weights, ``b`` times fewer products);
* ``polynomial`` (when :mod:`graphpress.backends.he.polynomial` exists) -- the ``polynomial``
  protocol (CKKS, fully encrypted): ``polynomial-activations`` + distillation, plaintext
  accuracy on the whole split and encrypted accuracy on the first ``--poly-images`` test images
  (seconds per image: the whole split would take most of an hour).

How the cost model is checked (the shared 2-core machine drifts by up to 2x between minutes):
the test split runs in batches of ``--batch`` images (each layer call packs as many images per
ciphertext as its layout allows); before every batch the per-op costs of the parameter sets in
use are re-measured (``measure_entry``, ``--cal-repeat`` rounds) -- calibration and inference
interleaved A B A B. Per layer, ``predicted`` = analytic counts x the median per-op seconds over
all rounds, ``measured`` = the median over the batches of the layer's wall time;
``|predicted/measured - 1| <= 30%`` is the target. The prediction from costs measured once at the
start of the run (what ``compress he-calibrate`` caches) is reported too.

Usage::

    python benchmarks/he_digits.py [--batch 50] [--quick] [--poly-images 30] [--out benchmarks/results/he_digits.json]

``--quick``: 100 test images, fewer fine-tuning epochs, no polynomial encrypted run -- a smoke test.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "he_digits.json"
TARGET_AGREEMENT = 0.99
TARGET_RATIO = 0.30


def _batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor]]:
    return [(x[i : i + size],) for i in range(0, x.shape[0], size)]


def prepare(quick: bool) -> dict[str, Any]:
    from graphpress.ir.graph import Graph
    from graphpress.passes import make_pass
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    model, acc = train_digits_cnn()
    x_tr, _y_tr, x_te, y_te = digits_data(seed=0)
    graph = Graph.capture(model, (x_tr[:2],))
    graph = make_pass("fold-batchnorm", {})(graph).graph
    graph.calibration = _batches(x_tr, 64)
    n_test = 100 if quick else x_te.shape[0]
    return {"graph": graph, "x_train": x_tr, "x_test": x_te[:n_test], "y_test": y_te[:n_test], "float_acc_full": acc}


def circulant_variant(folded: Any, b: int, x_train: torch.Tensor, epochs: int) -> tuple[Any, dict[str, Any]]:
    from graphpress.passes import make_pass
    from graphpress.train.distill import DistillConfig, distill

    res = make_pass("block-circulant", {"block_size": b, "method": "fisher"})(folded.clone())  # passes rewrite in place
    graph = res.graph
    graph.calibration = folded.calibration
    ft = distill(graph, folded, x_train, DistillConfig(epochs=epochs, lr=1e-3, batch_size=32, val_fraction=0.2, patience=3, seed=0))
    return graph, {"projection": {k: v for k, v in res.stats.items() if isinstance(v, (int, float, str))}, "finetune_epochs": len(ft.history), "best_epoch": ft.best_epoch}


def run_interactive(name: str, graph: Any, encoding: str, data: dict[str, Any], batch: int, cal_repeat: int) -> dict[str, Any]:
    """Lower, then classify the test split encrypted in batches, interleaving per-op calibration."""
    from graphpress.backends.he.bfv import BFVParams
    from graphpress.backends.he.costmodel import measure_entry, predict_step
    from graphpress.backends.he.lower import HEBackend
    from graphpress.backends.he.runner import HERunner
    from graphpress.lowering.he import op_costs as he_op_costs

    folder = Path(tempfile.mkdtemp(prefix=f"he-digits-{name.replace(' ', '-').replace('=', '')}-"))
    t0 = time.perf_counter()
    lowered = HEBackend(protocol="interactive", encoding=encoding, check_seeds=()).lower(graph, folder)
    lower_s = time.perf_counter() - t0
    runner = HERunner(folder, verify=True)
    program = runner.program
    chains = {he_op_costs.entry_key(s.params["poly_degree"], s.params["coeff_modulus_bits"]): s for s in program.steps}
    x, y = data["x_test"], data["y_test"]
    per_op: dict[str, dict[str, list[float]]] = {k: {} for k in chains}
    layer_times: dict[int, list[float]] = {s.index: [] for s in program.steps}
    layer_rows: dict[int, list[int]] = {s.index: [] for s in program.steps}
    counts: dict[int, dict[str, int]] = {}
    outputs, wall = [], []
    for i in range(0, x.shape[0], batch):
        for key, step in chains.items():  # A: per-op calibration of every parameter set in use
            entry = measure_entry(BFVParams.from_dict(step.params), plain_bits=step.plain_bits, repeat=cal_repeat, seed=i)
            for op, sec in entry["seconds"].items():
                per_op[key].setdefault(op, []).append(sec)
        xb = x[i : i + batch].numpy()  # B: one encrypted batch (checked exact layer by layer)
        run = runner.run(xb, predict=False)
        outputs.append(run.outputs[0])
        wall.append(run.seconds)
        for row in run.layers:
            if xb.shape[0] == batch:  # full batches only, so every timing is of the same work
                layer_times[row["index"]].append(row["measured_s"])
                layer_rows[row["index"]].append(row["rows"])
            counts[row["index"]] = row["counts"]
    enc = np.concatenate(outputs)
    with torch.no_grad():
        ref = graph.run(x)[0].numpy()
    plain_int = np.concatenate([runner.simulate(x[i : i + batch].numpy())[0] for i in range(0, x.shape[0], batch)])
    # predictions from the interleaved calibration (median per op over all rounds)
    cache_path = folder / "interleaved_costs.json"
    entries = {}
    for key, step in chains.items():
        entries[key] = {
            "poly_degree": step.params["poly_degree"],
            "coeff_modulus_bits": step.params["coeff_modulus_bits"],
            "plain_modulus": step.params["plain_modulus"],
            "plain_bits": step.plain_bits,
            "batching": step.encoding == "slot-dense",
            "seconds": {op: statistics.median(v) for op, v in per_op[key].items()},
        }
    he_op_costs.write_entries(entries, cache_path)
    layers = []
    for s in program.steps:
        rows = layer_rows[s.index][0] if layer_rows[s.index] else batch
        pred = predict_step(s, rows, path=cache_path)
        meas = statistics.median(layer_times[s.index]) if layer_times[s.index] else float("nan")
        layers.append(
            {
                "name": s.name,
                "kind": s.kind,
                "shape": [s.out_features, s.in_features, *s.kernel_size],
                "b": s.b,
                "encoding": s.encoding,
                "poly_degree": s.params["poly_degree"],
                "coeff_modulus_bits": s.params["coeff_modulus_bits"],
                "plain_bits": s.plain_bits,
                "rows_per_call": rows,
                "measured_s": meas,
                "measured_runs": len(layer_times[s.index]),
                "predicted_s": pred["seconds"],
                "ratio": pred["seconds"] / meas,
                "within_30pct": abs(pred["seconds"] / meas - 1) <= TARGET_RATIO,
                "predicted_terms": {k: v["seconds"] for k, v in pred["terms"].items()},
                "counts": counts[s.index],
                "counts_match_analytic": {k: counts[s.index][k] for k in pred["counts"]} == pred["counts"],
            }
        )
    # prediction from the costs cached once (at lowering), at this batch size
    for row, s in zip(layers, program.steps):
        once = predict_step(s, row["rows_per_call"])
        row["predicted_once_s"] = once["seconds"] if once else None
        row["ratio_once"] = (once["seconds"] / row["measured_s"]) if once else None
    agree = float((enc.argmax(1) == ref.argmax(1)).mean())
    return {
        "variant": name,
        "encoding": encoding,
        "images": int(x.shape[0]),
        "batch": batch,
        "top1_agreement_vs_plaintext_float": agree,
        "accuracy_encrypted": float((enc.argmax(1) == y.numpy()).mean()),
        "accuracy_plaintext_float": float((ref.argmax(1) == y.numpy()).mean()),
        "exact_vs_fixed_point": bool(np.array_equal(enc, plain_int)),
        "max_abs_logit_error_vs_float": float(np.abs(enc - ref).max()),
        "encrypted_wall_s_per_batch_median": statistics.median(wall),
        "encrypted_wall_s_total": float(sum(wall)),
        "lower_s": lower_s,
        "key_setup_s": runner.setup_seconds,
        "weights_bytes": lowered.info["weight_bytes"],
        "parameters": [{"layer": s.name, **s.params, "acc_bound": s.acc_bound} for s in program.steps],
        "layers": layers,
        "all_layers_within_30pct": all(r["within_30pct"] for r in layers),
        "total_measured_s": sum(r["measured_s"] for r in layers),
        "total_predicted_s": sum(r["predicted_s"] for r in layers),
        "bytes_per_batch": {
            "sent": sum(int(c.get("bytes_sent", 0)) for c in counts.values()),
            "received": sum(int(c.get("bytes_received", 0)) for c in counts.values()),
        },
    }


def run_polynomial(data: dict[str, Any], n_images: int, epochs: int) -> dict[str, Any]:
    try:
        import graphpress.backends.he.polynomial  # noqa: F401
    except ImportError as err:
        return {"skipped": f"graphpress.backends.he.polynomial is missing ({err})"}
    from graphpress.backends.he.lower import HEBackend, PolynomialRunner
    from graphpress.passes import make_pass
    from graphpress.train.distill import DistillConfig, distill

    folded = data["graph"]
    poly = make_pass("polynomial-activations", {})(folded.clone()).graph
    poly.calibration = folded.calibration
    x, y = data["x_test"], data["y_test"]
    with torch.no_grad():
        acc_before = float((poly.run(x)[0].argmax(1) == y).double().mean())
    distill(poly, folded, data["x_train"], DistillConfig(epochs=epochs, lr=1e-3, batch_size=32, val_fraction=0.2, patience=3, seed=0, trainable="all"))
    with torch.no_grad():
        plain = poly.run(x)[0]
    out = {"plaintext_accuracy_before_finetune": acc_before, "plaintext_accuracy": float((plain.argmax(1) == y).double().mean()), "images_plaintext": int(x.shape[0])}
    if n_images <= 0:
        return out
    folder = Path(tempfile.mkdtemp(prefix="he-digits-poly-"))
    t0 = time.perf_counter()
    lowered = HEBackend(protocol="polynomial").lower(poly, folder, check=False)
    runner = PolynomialRunner(folder)
    setup = time.perf_counter() - t0
    xs = x[:n_images]
    t0 = time.perf_counter()
    enc = runner(xs.numpy())[0]
    elapsed = time.perf_counter() - t0
    out.update(
        {
            "images_encrypted": int(n_images),
            "accuracy_encrypted": float((enc.argmax(1) == y[:n_images].numpy()).mean()),
            "agreement_encrypted_vs_plaintext_polynomial": float((enc.argmax(1) == plain[:n_images].argmax(1).numpy()).mean()),
            "plaintext_accuracy_same_images": float((plain[:n_images].argmax(1) == y[:n_images]).double().mean()),
            "max_abs_logit_error_vs_plaintext_polynomial": float(np.abs(enc - plain[:n_images].numpy()).max()),
            "seconds_per_image": elapsed / n_images,
            "setup_s": setup,
            "params": lowered.info["params"],
            "depth": lowered.info["depth"],
        }
    )
    return out


def print_tables(results: list[dict[str, Any]], poly: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=160)
    t = Table(title="digits CNN, interactive HE (BFV): whole test split encrypted", title_justify="left")
    for col in ("variant", "encoding", "images", "agree vs float", "acc float", "acc enc", "exact", "enc s total", "pred/meas (all layers)"):
        t.add_column(col, justify="left" if col in ("variant", "encoding") else "right")
    for r in results:
        ratios = ", ".join(f"{l['name']} {l['ratio']:.2f}" for l in r["layers"])
        t.add_row(
            r["variant"], r["encoding"], str(r["images"]), f"{r['top1_agreement_vs_plaintext_float']:.2%}", f"{r['accuracy_plaintext_float']:.2%}",
            f"{r['accuracy_encrypted']:.2%}", "yes" if r["exact_vs_fixed_point"] else "NO", f"{r['encrypted_wall_s_total']:.1f}", ratios,
        )
    con.print(t)
    for r in results:
        lt = Table(title=f"{r['variant']}: per layer, batch of {r['batch']} images (median over batches)", title_justify="left")
        for col in ("layer", "shape", "b", "encoding", "N", "pred ms", "meas ms", "pred/meas", "cached-once pred/meas", "mults", "adds", "cts sent/recv", "KB sent/recv"):
            lt.add_column(col, justify="left" if col in ("layer", "shape", "encoding") else "right")
        for l in r["layers"]:
            c = l["counts"]
            lt.add_row(
                l["name"], "x".join(map(str, l["shape"])), str(l["b"]), l["encoding"], str(l["poly_degree"]), f"{1e3 * l['predicted_s']:.1f}",
                f"{1e3 * l['measured_s']:.1f}", f"{l['ratio']:.2f}", "-" if l["ratio_once"] is None else f"{l['ratio_once']:.2f}",
                str(c["plain_mults"]), str(c["ct_adds"]), f"{c['ciphertexts_sent']}/{c['ciphertexts_received']}",
                f"{c['bytes_sent'] / 1024:.0f}/{c['bytes_received'] / 1024:.0f}",
            )
        con.print(lt)
    if poly:
        con.print(f"polynomial protocol (CKKS): {json.dumps({k: v for k, v in poly.items() if k != 'params'})}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--cal-repeat", type=int, default=3)
    ap.add_argument("--poly-images", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import tempfile as _tf

    # the one-time cost cache of this run lives beside the results, not in ~/.cache
    os.environ.setdefault("GRAPHPRESS_HE_COSTS", str(Path(_tf.mkdtemp(prefix="he-digits-costs-")) / "he_op_costs.json"))
    t_start = time.perf_counter()
    data = prepare(args.quick)
    epochs = 3 if args.quick else 20
    variants: list[tuple[str, Any, str, dict[str, Any]]] = [("dense", data["graph"], "coeff-dense", {})]
    for b in (2, 4):
        g, info = circulant_variant(data["graph"], b, data["x_train"], epochs)
        variants.append((f"circulant b={b}", g, "coeff-circulant", info))
    results = []
    for name, graph, encoding, info in variants:
        t0 = time.perf_counter()
        r = run_interactive(name, graph, encoding, data, args.batch, args.cal_repeat)
        r["compression"] = info
        r["variant_s"] = time.perf_counter() - t0
        results.append(r)
        print(f"{name}: agreement {r['top1_agreement_vs_plaintext_float']:.2%}, ratios {[round(l['ratio'], 2) for l in r['layers']]}, {r['variant_s']:.0f} s", flush=True)
    poly = run_polynomial(data, 0 if args.quick else args.poly_images, epochs)
    print_tables(results, poly)
    ok = all(r["top1_agreement_vs_plaintext_float"] >= TARGET_AGREEMENT and r["exact_vs_fixed_point"] for r in results)
    within = all(r["all_layers_within_30pct"] for r in results)
    print(f"targets: agreement >= {TARGET_AGREEMENT:.0%} and exact: {'PASS' if ok else 'FAIL'}; every layer |pred/meas - 1| <= 30%: {'PASS' if within else 'FAIL'}")
    import tenseal

    out = {
        "benchmark": "he_digits",
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "quick": args.quick,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "tenseal": tenseal.__version__},
        "settings": {"batch": args.batch, "cal_repeat": args.cal_repeat, "act_bits": 8, "weight_bits": 8, "finetune_epochs": epochs},
        "float_model_test_accuracy": data["float_acc_full"],
        "interactive": results,
        "polynomial": poly,
        "targets": {"agreement": TARGET_AGREEMENT, "ratio_tolerance": TARGET_RATIO, "agreement_and_exact_pass": ok, "cost_model_pass": within},
        "total_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
