"""compress auto against every single-technique recipe and the peers' quantizers, in one run.

Cases (``--cases``):

* ``resnet20``: the real ResNet-20 (``../shared``), calibration on 512 natural-photo crops, every
  candidate measured on 2048 other crops, ``--max-drop 1%`` top-1 agreement, objective latency on
  ONNX Runtime (batch 1, 2 threads). Beside ``auto``'s choice, one interleaved timing run holds:
  the float model, every single-technique recipe (``auto``'s uniform candidates: int8 everywhere,
  channel pruning at 25/50%, both), and the peers -- ORT ``quantize_static`` QDQ U8S8 and S8S8,
  ORT ``quantize_dynamic``.
* ``stories260k``: the real stories260K (llama2.c), objective size, ``--max-drop`` 0.05 nats KL on
  held-out sequences sampled from the model itself.
* ``digits-he``: the digits CNN trained on scikit-learn's digits, objective he-latency on the HE
  backend (block-circulant block sizes per layer), ``--max-drop 1%`` test accuracy (real labels),
  against every uniform block size; the measured latency is one encrypted inference.

The search runs twice, serially and then on a local 2-worker Ray, sharing one cost cache (the
first run measures the table, the second reads it, as on any machine after the first search):
the two must measure the same candidates with the same numbers; the wall-time ratio of the
trial stages (sensitivity + search) is reported beside the totals.

Writes ``benchmarks/results/auto.json`` and prints a table per case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_info  # noqa: E402
from quant_peers import ort_quantize_dynamic, ort_quantize_static  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    """What must agree between the serial and the Ray search: everything but wall times and timing."""
    out = {k: v for k, v in record.items() if k not in ("timings_s", "trials", "profile", "speedup", "chosen", "pareto")}
    out["candidates"] = [{k: v for k, v in c.items() if k not in ("latency_ms", "latency_spread_ms")} for c in record["candidates"]]
    out["cost_table"] = {k: v for k, v in record["cost_table"].items() if k != "cached"}
    return out


def run_auto(model: Any, work: Path, mode: str, **kw: Any) -> tuple[dict[str, Any], Any, float]:
    from graphpress.api import auto

    # one cost cache for both runs: the first measures the table, the second reads it (measured
    # once per machine is the design), so both search on the same costs
    os.environ["GRAPHPRESS_CACHE"] = str(work / "cache")
    t0 = time.perf_counter()
    res = auto(model, out=work / f"art-{mode}", ray=(mode == "ray"), workers=2, bench=False,
               on_stage=lambda s: log(f"  [{mode}] {s} ({time.perf_counter() - t0:.0f} s)"), **kw)
    wall = time.perf_counter() - t0
    record = json.loads((work / f"art-{mode}" / "auto.json").read_text())
    return record, res, wall


def _ray_ratio(runs: dict[str, Any], targets: dict[str, Any]) -> None:
    """Serial / Ray wall time of the trial stages (sensitivity + search), and of the whole command."""
    if len(runs) != 2:
        return
    trial = {m: sum(v[0]["timings_s"].get(k, 0.0) for k in ("sensitivity", "search")) for m, v in runs.items()}
    targets["Ray (2 workers) trial stages wall vs serial"] = round(trial["serial"] / trial["ray"], 3)
    targets["Ray whole command wall vs serial (Ray reads the cost table the serial run measured)"] = round(runs["serial"][2] / runs["ray"][2], 3)


def agreement(ref: np.ndarray, out: np.ndarray) -> float:
    return float((ref.reshape(-1, ref.shape[-1]).argmax(-1) == out.reshape(-1, out.shape[-1]).argmax(-1)).mean())


def resnet_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from graphpress.auto.space import Candidate, Choice
    from graphpress.auto.trials import Job, build
    from graphpress.backends import get_backend
    from graphpress.runtime.bench import compare_latency
    from graphpress.zoo import load_resnet20
    from graphpress.zoo.photos import photo_crops, sample_photos

    photos = sample_photos()
    calib = photo_crops(args.calib, 1, photos)
    evals = photo_crops(args.eval, 2, photos)
    model = load_resnet20()
    kw = dict(calibration=calib, eval_data=evals, max_drop=args.max_drop, metric="agreement", threads=args.threads,
              example_inputs=(calib[:2],))
    runs: dict[str, Any] = {}
    for mode in args.modes:
        log(f"ResNet-20: auto ({mode})")
        runs[mode] = run_auto(model, work, mode, **kw)
    record, res, _wall = runs[args.modes[0]]
    agree = None
    if len(runs) == 2:
        agree = _strip(runs["serial"][0]) == _strip(runs["ray"][0])
    chosen = record["candidates"][record["chosen"]]

    # one interleaved timing run: float, auto's choice, the single-technique recipes, the peers
    log("ResNet-20: peers and the final timing run")
    be = get_backend("onnxruntime")
    job = Job(model, [(calib,)], (evals,), example_inputs=(calib[:2],))
    paths: dict[str, Path] = {}
    quality: dict[str, dict[str, Any]] = {}
    float_dir = work / "float"
    lowered = be.lower(build(job, Candidate()), float_dir, check=False)
    paths["float (ORT fp32)"] = float_dir / lowered.model_file
    paths["graphpress auto"] = res.folder / "model.onnx"
    quality["graphpress auto"] = {"drop": chosen["quality"]["drop"], "choices": chosen["label"]}
    for c in record["candidates"]:
        if c["origin"].startswith("uniform:"):
            name = f"single: {c['origin'].split(':', 1)[1]} everywhere"
            cand = Candidate.of({n: Choice.parse(v) for n, v in c["choices"].items()})
            d = work / name.replace(" ", "_").replace(":", "")
            lo = be.lower(build(job, cand), d, check=False)
            paths[name] = d / lo.model_file
            quality[name] = {"drop": c["quality"]["drop"], "choices": c["label"]}
    chunks = [calib[i:i + 32].numpy() for i in range(0, calib.shape[0], 32)]
    fp32 = paths["float (ORT fp32)"]
    peers = {
        "peer: ORT quantize_static QDQ U8S8": ort_quantize_static(fp32, work / "u8s8.onnx", chunks, activations="uint8"),
        "peer: ORT quantize_static QDQ S8S8": ort_quantize_static(fp32, work / "s8s8.onnx", chunks, activations="int8"),
        "peer: ORT quantize_dynamic": ort_quantize_dynamic(fp32, work / "dyn.onnx", per_channel=True),
    }
    paths.update(peers)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    # no spinning: a spinning pool after a slow variant (quantize_dynamic, 20x) taxes the next one
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    xe = evals.numpy()

    def run_all(s: Any) -> np.ndarray:
        name = s.get_inputs()[0].name
        return np.concatenate([s.run(None, {name: xe[i:i + 256]})[0] for i in range(0, len(xe), 256)])

    ref = run_all(sessions["float (ORT fp32)"])
    for k in peers:
        quality[k] = {"drop": 1.0 - agreement(ref, run_all(sessions[k])), "choices": "every conv/linear, the peer's defaults"}
    quality["float (ORT fp32)"] = {"drop": 0.0, "choices": "-"}
    x1 = xe[:1]
    fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x1})) for k, s in sessions.items()}
    timing = compare_latency(fns, rounds=args.rounds, min_time_s=args.min_time)
    base = timing.results["float (ORT fp32)"].median_ms
    rows = []
    for k, r in timing.results.items():
        q = quality[k]
        rows.append({"variant": k, "choices": q["choices"], "drop": round(q["drop"], 5), "within_budget": q["drop"] <= args.max_drop + 1e-12,
                     "median_ms": round(r.median_ms, 4), "p10_ms": round(r.p10_ms, 4), "p90_ms": round(r.p90_ms, 4),
                     "speedup": round(base / r.median_ms, 3), "model_bytes": paths[k].stat().st_size})
    auto_row = next(r for r in rows if r["variant"] == "graphpress auto")
    others = [r for r in rows if r["variant"] not in ("graphpress auto", "float (ORT fp32)") and r["within_budget"]]
    targets = {
        "auto within --max-drop": auto_row["within_budget"],
        "auto faster than every single recipe and peer within the drop": all(auto_row["median_ms"] < r["median_ms"] for r in others),
        "others within the drop": [r["variant"] for r in others],
        "serial and Ray measure the same candidates": agree,
    }
    walls = {m: round(v[2], 1) for m, v in runs.items()}
    _ray_ratio(runs, targets)
    return {"case": "resnet20", "quality": f"top-1 agreement with the float model on {args.eval} photo crops (calibration: {args.calib} others)",
            "max_drop": args.max_drop, "objective": "latency (ORT, batch 1)", "rows": rows, "targets": targets, "search_wall_s": walls,
            "stage_s": {m: v[0]["timings_s"] for m, v in runs.items()}, "trials": {m: v[0]["trials"] for m, v in runs.items()},
            "chosen": chosen["choices"], "candidates": len(record["candidates"]),
            "per_layer_predicted_vs_measured_us": record["profile"]}


def stories_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """stories260K, objective size under --max-drop KL: auto against every single-technique recipe."""
    from graphpress.zoo.paths import stories260k_path
    from graphpress.zoo.samples import make_samples

    path = stories260k_path()
    if path is None:
        raise SystemExit("stories260k needs ../shared/models/stories260k/stories260K.bin")
    tokens = make_samples("stories", 96, seed=3, seq_len=64)
    kw = dict(calibration=tokens[:32], eval_data=tokens[32:], max_drop=args.max_kl, metric="kl", objective="size",
              threads=args.threads)
    runs: dict[str, Any] = {}
    for mode in args.modes:
        log(f"stories260K: auto ({mode})")
        runs[mode] = run_auto(str(path), work, mode, **kw)
    record = runs[args.modes[0]][0]
    agree = _strip(runs["serial"][0]) == _strip(runs["ray"][0]) if len(runs) == 2 else None
    rows = []
    float_bytes = record["candidates"][0]["quality"]["model_bytes"]
    for i, c in enumerate(record["candidates"]):
        if c["origin"] in ("float",) or c["origin"].startswith("uniform:") or i == record["chosen"]:
            q = c["quality"]
            if "error" in q:
                continue
            name = "graphpress auto" if i == record["chosen"] else ("float" if c["origin"] == "float" else f"single: {c['origin'].split(':', 1)[1]} everywhere")
            rows.append({"variant": name, "choices": c["label"], "drop": round(q["drop"], 5), "within_budget": c["feasible"],
                         "model_bytes": q["model_bytes"], "size_vs_float": round(q["model_bytes"] / float_bytes, 4),
                         "agreement": q.get("agreement")})
    auto_row = next(r for r in rows if r["variant"] == "graphpress auto")
    others = [r for r in rows if r["variant"] not in ("graphpress auto", "float") and r["within_budget"]]
    targets = {"auto within --max-drop": auto_row["within_budget"],
               "auto smaller than every single recipe within the KL": all(auto_row["model_bytes"] < r["model_bytes"] for r in others),
               "others within the KL": [r["variant"] for r in others],
               "serial and Ray measure the same candidates": agree}
    walls = {m: round(v[2], 1) for m, v in runs.items()}
    _ray_ratio(runs, targets)
    return {"case": "stories260k", "quality": f"KL (nats) to the float model over {int(tokens[32:].numel())} held-out token positions",
            "max_drop": args.max_kl, "objective": "size (artifact bytes)", "rows": rows, "targets": targets, "search_wall_s": walls,
            "stage_s": {m: v[0]["timings_s"] for m, v in runs.items()}, "trials": {m: v[0]["trials"] for m, v in runs.items()},
            "chosen": record["candidates"][record["chosen"]]["choices"], "candidates": len(record["candidates"])}


def he_case(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """digits CNN, objective he-latency on the HE backend, --max-drop 1% test accuracy."""
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    model, acc = train_digits_cnn()
    x_tr, _y_tr, x_te, y_te = digits_data(seed=0)
    kw = dict(calibration=x_tr[:256], eval_data=x_te, labels=y_te, metric="accuracy", max_drop=args.max_drop,
              objective="he-latency", backend="he", threads=args.threads, example_inputs=(x_tr[:2],))
    runs: dict[str, Any] = {}
    for mode in args.modes:
        log(f"digits HE: auto ({mode})")
        runs[mode] = run_auto(model, work, mode, **kw)
    record = runs[args.modes[0]][0]
    agree = _strip(runs["serial"][0]) == _strip(runs["ray"][0]) if len(runs) == 2 else None
    rows = []
    float_ms = record["candidates"][0]["latency_ms"]
    for i, c in enumerate(record["candidates"]):
        if c["latency_ms"] is None or "error" in c["quality"]:
            continue
        name = ("graphpress auto" if i == record["chosen"] else "float (dense)" if c["origin"] == "float"
                else f"single: {c['origin'].split(':', 1)[1]} everywhere" if c["origin"].startswith("uniform:") else f"candidate ({c['origin']})")
        rows.append({"variant": name, "choices": c["label"], "drop": round(c["quality"]["drop"], 5), "within_budget": c["feasible"],
                     "predicted_ms": round(c["predicted"], 3), "median_ms": c["latency_ms"], "min_max_ms": c["latency_spread_ms"],
                     "speedup": round(float_ms / c["latency_ms"], 3)})
    auto_row = next(r for r in rows if r["variant"] == "graphpress auto")
    singles = [r for r in rows if r["variant"].startswith("single") and r["within_budget"]]
    targets = {"auto within --max-drop": auto_row["within_budget"],
               "auto lower HE latency than every uniform block size within the drop": all(auto_row["median_ms"] < r["median_ms"] for r in singles),
               "uniform block sizes within the drop": [r["variant"] for r in singles],
               "serial and Ray measure the same candidates": agree,
               "predicted vs measured HE ms (chosen)": [record["profile"].get("predicted_total_ms"), record["profile"].get("measured_total_ms")]}
    _ray_ratio(runs, targets)
    return {"case": "digits-he", "quality": f"test accuracy on {len(y_te)} digits images (float model {acc:.4f}); HE: one encrypted inference, interactive protocol, N={record['cost_table'].get('poly_degree')}",
            "max_drop": args.max_drop, "objective": "he-latency (HE backend, coeff-circulant)", "rows": rows, "targets": targets,
            "search_wall_s": {m: round(v[2], 1) for m, v in runs.items()}, "stage_s": {m: v[0]["timings_s"] for m, v in runs.items()},
            "trials": {m: v[0]["trials"] for m, v in runs.items()}, "chosen": record["candidates"][record["chosen"]]["choices"],
            "candidates": len(record["candidates"]), "cost_table_ms": record["cost_table"]["cost"]}


def print_case(case: dict[str, Any]) -> None:
    log(f"\n== {case['case']}: {case['quality']}, objective {case['objective']}, --max-drop {case['max_drop']}")
    if case["case"] == "digits-he":
        log(f"{'variant':42s} {'drop':>8s} {'ok':>3s} {'pred ms':>8s} {'HE ms':>8s} {'x dense':>8s}")
        for r in case["rows"]:
            log(f"{r['variant'][:42]:42s} {r['drop']:8.4f} {'y' if r['within_budget'] else 'n':>3s} {r['predicted_ms']:8.2f} {r['median_ms']:8.2f} {r['speedup']:8.3f}")
        log(f"targets: {case['targets']}")
        return
    if case["case"] == "stories260k":
        log(f"{'variant':42s} {'KL':>8s} {'ok':>3s} {'KB':>8s} {'x float':>8s}")
        for r in case["rows"]:
            log(f"{r['variant'][:42]:42s} {r['drop']:8.4f} {'y' if r['within_budget'] else 'n':>3s} {r['model_bytes'] / 1024:8.1f} {r['size_vs_float']:8.3f}")
        log(f"targets: {case['targets']}")
        log(f"search wall s: {case['search_wall_s']}")
        return
    log(f"{'variant':42s} {'drop':>8s} {'ok':>3s} {'b1 ms':>8s} {'p10-p90':>15s} {'x float':>8s} {'KB':>8s}")
    for r in case["rows"]:
        log(f"{r['variant'][:42]:42s} {r['drop']:8.4f} {'y' if r['within_budget'] else 'n':>3s} {r['median_ms']:8.4f} "
            f"{r['p10_ms']:7.3f}-{r['p90_ms']:<7.3f} {r['speedup']:8.3f} {r['model_bytes'] / 1024:8.1f}")
    log(f"targets: {case['targets']}")
    log(f"search wall s: {case['search_wall_s']}; chosen: {case['chosen']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet20,stories260k,digits-he")
    ap.add_argument("--modes", default="serial,ray", help="serial, ray or both (the Ray run checks equality and the wall ratio)")
    ap.add_argument("--max-drop", type=float, default=0.01, help="ResNet-20: agreement drop")
    ap.add_argument("--max-kl", type=float, default=0.05, help="stories260K: KL budget (nats)")
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--eval", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "auto.json"))
    ap.add_argument("--merge", action="store_true", help="keep the other cases already in --out")
    args = ap.parse_args()
    args.modes = args.modes.split(",")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory(prefix="graphpress-bench-auto-") as tmp:
        for name in args.cases.split(","):
            work = Path(tmp) / name
            work.mkdir()
            case = {"resnet20": resnet_case, "stories260k": stories_case, "digits-he": he_case}[name](args, work)
            print_case(case)
            cases.append(case)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "auto", "commit": commit, "machine": machine_info(threads=args.threads), "wall_s": round(time.perf_counter() - t0, 1),
              "cases": cases}
    if args.merge and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        kept = [c | {"commit": c.get("commit", old.get("commit"))} for c in old.get("cases", []) if c["case"] not in {c2["case"] for c2 in cases}]
        result["cases"] = kept + [c | {"commit": commit} for c in cases]
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
