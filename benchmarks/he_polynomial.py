"""HE polynomial protocol on the digits CNN: accuracy of the polynomial model, plaintext and encrypted.

The issue's "polynomial mode reports its own accuracy". Steps, all seeded:

1. ``train_digits_cnn()`` (scikit-learn digits; conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU,
   maxpool 2, fc(512->64)-ReLU, fc(64->10) on 1x8x8), captured as a graph;
   ``graph.calibration`` = the 1347 training images in batches of 64.
2. ``fold-batchnorm`` then ``polynomial-activations`` (degree 2: every ReLU a fitted quadratic,
   the max-pool an average-pool), through the verified :class:`Pipeline`.
3. Recovery: :func:`graphpress.train.distill.distill` with ``trainable="all"`` -- the polynomial
   graph (student) against the folded original (teacher) on the 1347 training images, unlabelled.
   For comparison also ``trainable="annotated"`` (only the 3 x 3 polynomial coefficients).
4. Plaintext test accuracy (the 450 held-out images, real labels) of: original, polynomial
   before fine-tuning, polynomial fine-tuned (all / coefficients only); and the same for degree 3
   (whose depth needs ring degree 32768 -- the reason degree 2 is the default).
5. Encrypted: :class:`PolynomialSession` on the fine-tuned degree-2 graph, test images in order,
   in chunks of 10 until ``--seconds`` (default 300) of encrypted evaluation are spent: encrypted
   accuracy, argmax agreement and max |logit error| against the plaintext polynomial graph on the
   same images, the plaintext accuracy on those images, per-image latency (median, min, max),
   per-stage median time and exact op counts, setup time, bytes on the wire.
6. tenseal's own ``CKKSVector.mm`` vs this executor's diagonal/BSGS product on each of the
   program's four matrices (conv1 64->1024, conv2 1024->2048, pool+fc1 2048->64, fc2 64->10),
   each as a one-layer graph at the same ring degree and modulus chain, interleaved (A B A B,
   medians of ``--reps``): why the executor has its own matrix product.

Usage::

    python benchmarks/he_polynomial.py [--seconds 300] [--reps 3] [--quick] [--out benchmarks/results/he_polynomial.json]

``--quick``: 20 s of encrypted images, 1 rep, fewer fine-tuning epochs -- a smoke test, not numbers to quote.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "he_polynomial.json"


def _accuracy(graph, x: torch.Tensor, y: torch.Tensor) -> float:
    from graphpress.zoo.digits import accuracy

    return accuracy(lambda b: graph.run(b)[0], x, y)


def _polynomial(folded, degree: int):
    from graphpress.passes import Pipeline

    report = Pipeline([("polynomial-activations", {"degree": degree})]).run(folded)
    return report.graph, report.steps[0]


def _finetune(student, teacher, x_train, trainable: str, epochs: int) -> dict[str, Any]:
    from graphpress.train.distill import DistillConfig, distill

    cfg = DistillConfig(trainable=trainable, epochs=epochs, lr=1e-3 if trainable == "all" else 1e-2, patience=5, seed=0)
    t0 = time.perf_counter()
    res = distill(student, teacher, x_train, cfg)
    return {"trainable": trainable, "epochs_run": len(res.history), "best_epoch": res.best_epoch, "params_trained": res.params_trained,
            "initial_val_loss": res.initial_val_loss, "best_val_loss": res.best_val_loss, "seconds": time.perf_counter() - t0}


def _tenseal_vs_bsgs(program, poly_degree: int, x_test: torch.Tensor, reps: int) -> list[dict[str, Any]]:
    """Per matrix of the digits program: tenseal ``CKKSVector.mm`` vs this executor, same parameters, interleaved.

    Each stage's matrix becomes a one-layer graph (``Linear`` with that weight, no bias), run by a
    :class:`PolynomialSession` at ring degree ``poly_degree`` (depth 1: chain ``[60, 40, 60]``);
    tenseal gets a context with the same ring degree and chain. Both start from a fresh ciphertext.
    """
    import tenseal as ts
    from torch import nn

    from graphpress.backends.he.polynomial import PolynomialSession
    from graphpress.ir.graph import Graph

    rows = []
    gen = torch.Generator().manual_seed(3)
    for stage in program.stages:
        if stage.kind != "affine" or len(stage.terms) != 1:
            continue
        (_src, matrix), = stage.terms.items()
        layer = nn.Linear(matrix.shape[1], matrix.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(matrix))
        graph = Graph.capture(layer.eval(), (torch.randn(2, matrix.shape[1], generator=gen),), name=f"{stage.module}_matrix")
        session = PolynomialSession(graph, poly_degree=poly_degree)
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_degree, coeff_mod_bit_sizes=list(session.params.coeff_bits))
        ctx.global_scale = 2.0**session.params.scale_bits
        ctx.generate_galois_keys()
        weights = matrix.T.tolist()  # tenseal multiplies a row vector by an (n_in, n_out) matrix
        ours, theirs, err, rotations = [], [], [], 0
        for _ in range(reps):
            x = torch.randn(1, matrix.shape[1], generator=gen, dtype=torch.float64)
            enc = ts.ckks_vector(ctx, x[0].tolist())
            t0 = time.perf_counter()
            out = enc.mm(weights)
            theirs.append(time.perf_counter() - t0)
            err.append(float(np.abs(np.array(out.decrypt()) - matrix @ x[0].numpy()).max()))
            _, rep = session.run(x.float(), report=False)
            ours.append(rep["stages"][1]["seconds"])
            rotations = rep["stages"][1].get("rotations", 0)
            if theirs[0] > 20.0:
                break  # tenseal's product of a 2048-wide matrix takes most of a minute: one rep says enough
        rows.append({
            "layer": f"{stage.module or stage.node}: {matrix.shape[1]} -> {matrix.shape[0]}",
            "coeff_modulus_bits": list(session.params.coeff_bits),
            "tenseal_mm_s_median": statistics.median(theirs),
            "bsgs_s_median": statistics.median(ours),
            "speedup": statistics.median(theirs) / statistics.median(ours),
            "tenseal_max_abs_error": max(err),
            "tenseal_rotations": f"{matrix.shape[1]} (one per input element, tenseal's diagonal method)",
            "bsgs_rotations": rotations,
            "bsgs_diagonals": rep["stages"][1].get("diagonals"),
            "reps": len(theirs),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="budget for encrypted test images")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of the tenseal comparison")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.reps = 20.0, 1
    epochs = 5 if args.quick else 30

    torch.set_num_threads(2)
    from rich.console import Console
    from rich.table import Table

    from graphpress.backends.he.polynomial import (
        PolynomialSession,
        choose_params,
        compile_polynomial,
    )
    from graphpress.ir.graph import Graph
    from graphpress.passes import Pipeline
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    console = Console(width=150)
    t_all = time.perf_counter()
    model, _ = train_digits_cnn()
    x_tr, _y_tr, x_te, y_te = digits_data()
    graph = Graph.capture(model, (x_te[:4],), name="digits_cnn")
    graph.calibration = [(x_tr[i : i + 64],) for i in range(0, x_tr.shape[0], 64)]
    folded = Pipeline(["fold-batchnorm"]).run(graph).graph

    rows: list[dict[str, Any]] = [{"variant": "original (ReLU, max-pool)", "test_accuracy": _accuracy(graph, x_te, y_te)}]
    result: dict[str, Any] = {"variants": rows}
    final = None
    for degree in (2, 3):
        poly, step = _polynomial(folded, degree)
        prog = compile_polynomial(poly)
        params = choose_params(prog)
        he = {"depth": prog.depth, "poly_modulus_degree": params.poly_modulus_degree, "coeff_modulus_bits": sum(params.coeff_bits)}
        rows.append({"variant": f"degree {degree}, fitted", "test_accuracy": _accuracy(poly, x_te, y_te), "step_sqnr_db": step.worst_step_sqnr_db,
                     "pass_stats": step.stats, **he})
        coef_only = poly.clone()
        ft = _finetune(coef_only, folded, x_tr, "annotated", epochs)
        rows.append({"variant": f"degree {degree}, fine-tuned coefficients only", "test_accuracy": _accuracy(coef_only, x_te, y_te),
                     "finetune": ft, **he})
        ft = _finetune(poly, folded, x_tr, "all", epochs)
        rows.append({"variant": f"degree {degree}, fine-tuned all", "test_accuracy": _accuracy(poly, x_te, y_te), "finetune": ft, **he})
        if degree == 2:
            final = poly

    # ---------------------------------------------------------------- encrypted
    session = PolynomialSession(final)
    outs, labels, reports, spent = [], [], [], 0.0
    i = 0
    while i < x_te.shape[0] and spent < args.seconds:
        chunk = x_te[i : i + 10]
        t0 = time.perf_counter()
        out, rep = session.run(chunk)
        spent += time.perf_counter() - t0
        outs.append(out)
        labels.append(y_te[i : i + 10])
        reports.append(rep)
        i += chunk.shape[0]
    enc = np.concatenate(outs)
    y = torch.cat(labels).numpy()
    plain = final.run(x_te[: len(y)])[0].double().numpy()
    latencies = [t for r in reports for t in r["latency_s"]["per_sample"]]
    stages = []
    for k, st in enumerate(reports[0]["stages"]):
        row = {key: v for key, v in st.items() if key != "seconds"}
        row["seconds_median"] = statistics.median(r["stages"][k]["seconds"] for r in reports)
        stages.append(row)
    first = reports[0]
    result["encrypted"] = {
        "images": len(y),
        "of_test_images": int(x_te.shape[0]),
        "budget_s": args.seconds,
        "evaluation_s": spent,
        "encrypted_accuracy": float((enc.argmax(1) == y).mean()),
        "plaintext_polynomial_accuracy_same_images": float((plain.argmax(1) == y).mean()),
        "argmax_agreement_with_plaintext": float((enc.argmax(1) == plain.argmax(1)).mean()),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "latency_s": {"median": statistics.median(latencies), "min": min(latencies), "max": max(latencies)},
        "encrypt_s_median": statistics.median(r["encrypt_s"] for r in reports),
        "decrypt_s_median": statistics.median(r["decrypt_s"] for r in reports),
        "setup": {**first["setup"], "compile_s": first["compile_s"]},
        "params": {k: first[k] for k in ("poly_modulus_degree", "coeff_modulus_bits", "total_coeff_bits", "max_coeff_bits_128",
                                         "scale_bits", "slots", "security_bits", "depth", "completed_squares")},
        "rotation_keys": len(first["rotation_steps"]),
        "ops_per_image": first["ops_per_sample"],
        "op_counts": first["op_counts"],
        "communication_per_image": first["communication_per_sample"],
        "max_abs_value_vs_headroom": [max(r["max_abs_value"] for r in reports), first["headroom_abs_value"]],
        "stages": stages,
    }
    result["tenseal_mm_vs_bsgs"] = _tenseal_vs_bsgs(session.program, session.params.poly_modulus_degree, x_te, args.reps)

    import tenseal

    import graphpress

    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "load_average_at_end": list(os.getloadavg()), "torch": torch.__version__, "tenseal": tenseal.__version__,
                         "graphpress": getattr(graphpress, "__version__", None)}
    result["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    result["quick"] = args.quick
    result["wall_s"] = time.perf_counter() - t_all

    # ---------------------------------------------------------------- tables
    t = Table(title="digits CNN: polynomial activations (plaintext test accuracy, 450 images)")
    for col in ("variant", "accuracy", "HE depth", "ring N", "fine-tune"):
        t.add_column(col)
    for r in rows:
        ft = r.get("finetune")
        t.add_row(r["variant"], f"{100 * r['test_accuracy']:.2f}%", str(r.get("depth", "-")), str(r.get("poly_modulus_degree", "-")),
                  f"{ft['params_trained']:,} params, {ft['epochs_run']} ep" if ft else "-")
    console.print(t)
    e = result["encrypted"]
    console.print(
        f"encrypted (CKKS N={e['params']['poly_modulus_degree']}, {e['params']['total_coeff_bits']} bits, depth {e['params']['depth']}): "
        f"{e['images']} of {e['of_test_images']} test images in {e['evaluation_s']:.0f} s: accuracy {100 * e['encrypted_accuracy']:.2f}% "
        f"(plaintext polynomial on the same images {100 * e['plaintext_polynomial_accuracy_same_images']:.2f}%), "
        f"argmax agreement {100 * e['argmax_agreement_with_plaintext']:.2f}%, max |logit error| {e['max_abs_logit_error']:.2e}; "
        f"latency median {e['latency_s']['median']:.2f} s/image; setup {e['setup']['context_and_keys_s'] + e['setup']['encode_plaintexts_s']:.1f} s"
    )
    t = Table(title="encrypted stages (median s per image, exact op counts)")
    for col in ("stage", "kind", "ops", "size", "level", "s", "rotations", "plain mults", "ct mults", "diagonals"):
        t.add_column(col)
    for s in stages:
        t.add_row(f"{s['node']} {s['module']}".strip(), s["kind"], ",".join(o.removeprefix("aten.") for o in s["ops"]), str(s["size"]),
                  str(s["level"]), f"{s['seconds_median']:.3f}", str(s.get("rotations", 0)), str(s.get("plain_mults", 0)),
                  str(s.get("ct_mults", 0)), str(s.get("diagonals", "-")))
    console.print(t)
    t = Table(title="matrix-vector product: tenseal CKKSVector.mm vs diagonal/BSGS (same N and chain, medians, interleaved)")
    for col in ("layer", "tenseal s", "BSGS s", "speedup", "tenseal rotations", "BSGS rotations", "diagonals"):
        t.add_column(col)
    for c in result["tenseal_mm_vs_bsgs"]:
        t.add_row(c["layer"], f"{c['tenseal_mm_s_median']:.3f}", f"{c['bsgs_s_median']:.3f}", f"{c['speedup']:.1f}x",
                  c["tenseal_rotations"].split()[0], str(c["bsgs_rotations"]), str(c["bsgs_diagonals"]))
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    console.print(f"wrote {args.out}  ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
