"""Circulant accuracy benchmark: the block-circulant issue's "done when" tables.

For each model the dense graph is captured, ``fold-batchnorm`` runs first (a batch-norm folded
*before* the projection ends up inside the circulant weight, so the converted layer stays
circulant), and ``graph.calibration`` is set. Then every variant starts from a clone of that
folded graph:

* ``uniform b=K (fisher)`` for K in {2, 4, 8}: ``block-circulant`` with ``block_size=K``,
  ``method="fisher"`` (a layer K does not fit stays dense);
* ``searched @ uniform:K (fisher)`` for K in {4, 8}: ``circulant-search`` with
  ``budget="uniform:K"``, ``cost_model="he-analytic"``, ``method="fisher"``,
  ``sensitivity="fisher"`` (candidates {1, 2, 4, 8, 16}): PrivCirNet's recipe, the assignment
  minimising the summed second-order loss estimate at no more HE cost than uniform b=K;
* ``uniform b=K (reconstruct)`` for K in {4, 8}: ``method="reconstruct"`` (compact weights
  fitted to each layer's outputs on the calibration inputs);
* ``searched @ uniform:K (output, reconstruct)``: the search with the measured output-noise
  sensitivity and the output-fitted projection.

Each variant is measured after the projection and again after distillation fine-tuning
(:func:`graphpress.train.distill.distill`: the dense folded graph is the teacher; only the
annotated tensors -- the compact circulant vectors and the biases of converted layers -- are
trained; one :class:`DistillConfig` per model, shared by all its variants). Reported per
variant: graph parameters (``graph.parameter_count()``: weights plus float buffers), compact vs
dense weights of the converted layers, the ``he-analytic`` cost of the assignment (the
searched variants' own cost; for uniform variants the search's ``uniform:K`` rule,
``sum_l cost_l(K if K fits l else 1)``), the per-layer block sizes, and the metric.

Models:

* **digits** -- ``train_digits_cnn()`` (scikit-learn digits, seeded). Metric: top-1 accuracy
  on the 450 held-out test images against the real labels. Calibration: the 1347 training
  images (batches of 64). Fine-tuning inputs: the same 1347 training images, unlabelled
  (distillation uses only the teacher's outputs).
* **resnet20** -- the pretrained CIFAR-10 checkpoint in ``../shared/models`` loaded with
  :func:`graphpress.frontends.load` (``arch graphpress.zoo.resnet20:resnet20``). Metric: top-1
  agreement with the original ``nn.Module`` (loaded independently with ``load_resnet20``) on
  natural-image inputs: random 32x32 crops, at native resolution, of scikit-learn's two sample
  photos (``china.jpg``, ``flower.jpg``, 427x640, which need Pillow), each horizontally flipped
  with probability 1/2, scaled to [0, 1] and normalised with the CIFAR-10 mean/std. Three
  independently seeded sets: calibration (seed 1), evaluation (seed 2), fine-tuning (seed 3).
  These are photos, not CIFAR images, so agreement with the original model is the metric, not
  accuracy. Skipped with a printed reason when the checkpoint (or Pillow) is absent.

Claim checked per model: "the searched assignment is at least as accurate as uniform at equal
cost" -- for K in {4, 8} and each projection method, ``searched @ uniform:K`` vs ``uniform b=K``
with the same method, after projection and after fine-tuning, plus
``cost(searched) <= cost(uniform)``.
PASS/FAIL is printed as measured.

Usage::

    python benchmarks/circulant_accuracy.py [--quick] [--models digits,resnet20]
                                            [--out benchmarks/results/circulant_accuracy.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress.zoo.photos import CIFAR_MEAN, CIFAR_STD, photo_crops, sample_photos

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "circulant_accuracy.json"
RESNET20_ARCH = "graphpress.zoo.resnet20:resnet20"
COST_MODEL = "he-analytic"
MODELS = ("digits", "resnet20")


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    pass_name: str
    config: dict[str, Any]
    blocks_label: str  # "2" / "4" / "8" / "searched"
    uniform_k: int  # K of the uniform rule / the uniform:K budget


VARIANTS = [
    Variant("uniform2-fisher", "uniform b=2 (fisher)", "block-circulant", {"block_size": 2, "method": "fisher"}, "2", 2),
    Variant("uniform4-fisher", "uniform b=4 (fisher)", "block-circulant", {"block_size": 4, "method": "fisher"}, "4", 4),
    Variant("uniform8-fisher", "uniform b=8 (fisher)", "block-circulant", {"block_size": 8, "method": "fisher"}, "8", 8),
    Variant(
        "search4",
        "searched @ uniform:4 (fisher)",
        "circulant-search",
        {"budget": "uniform:4", "cost_model": COST_MODEL, "method": "fisher", "sensitivity": "fisher"},
        "searched",
        4,
    ),
    Variant(
        "search8",
        "searched @ uniform:8 (fisher)",
        "circulant-search",
        {"budget": "uniform:8", "cost_model": COST_MODEL, "method": "fisher", "sensitivity": "fisher"},
        "searched",
        8,
    ),
    Variant("uniform4-reconstruct", "uniform b=4 (reconstruct)", "block-circulant", {"block_size": 4, "method": "reconstruct"}, "4", 4),
    Variant("uniform8-reconstruct", "uniform b=8 (reconstruct)", "block-circulant", {"block_size": 8, "method": "reconstruct"}, "8", 8),
    Variant(
        "search4-output",
        "searched @ uniform:4 (output, reconstruct)",
        "circulant-search",
        {"budget": "uniform:4", "cost_model": COST_MODEL, "method": "reconstruct", "sensitivity": "output"},
        "searched",
        4,
    ),
    Variant(
        "search8-output",
        "searched @ uniform:8 (output, reconstruct)",
        "circulant-search",
        {"budget": "uniform:8", "cost_model": COST_MODEL, "method": "reconstruct", "sensitivity": "output"},
        "searched",
        8,
    ),
]
# (searched, uniform) pairs of the claim: same projection method, same budget
CLAIMS = [
    ("search4", "uniform4-fisher"),
    ("search8", "uniform8-fisher"),
    ("search4-output", "uniform4-reconstruct"),
    ("search8-output", "uniform8-reconstruct"),
]


@dataclass
class ModelSettings:
    """Data sizes and the fine-tuning config of one model (shared by all its variants)."""

    fisher_micro_batch: int
    distill: dict[str, Any]
    n_calibration: int | None = None
    n_eval: int | None = None
    n_finetune: int | None = None


def settings_for(model: str, quick: bool) -> ModelSettings:
    """Shared settings: Adam lr 1e-3, batch 32, 20 % held out for early stopping (patience 3)."""
    distill = {"lr": 1e-3, "batch_size": 32, "val_fraction": 0.2, "patience": 3, "seed": 0}
    if model == "digits":
        return ModelSettings(fisher_micro_batch=1, distill={"epochs": 3 if quick else 20, **distill})
    return ModelSettings(
        fisher_micro_batch=1,
        distill={"epochs": 2 if quick else 10, **distill},
        n_calibration=64 if quick else 512,
        n_eval=256 if quick else 2048,
        n_finetune=256 if quick else 3072,
    )


@dataclass
class Prepared:
    """A model ready for the variants: the folded graph (with calibration) and how to score it."""

    name: str
    graph: Any  # graphpress Graph, BN folded, calibration set
    metric_name: str  # "accuracy" | "agreement"
    metric: Callable[[Any], tuple[float, torch.Tensor]]  # graph -> (metric, top-1 predictions)
    before: float  # metric of the original model
    finetune_inputs: torch.Tensor
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- models


def _batches(x: torch.Tensor, size: int = 64) -> list[tuple[torch.Tensor]]:
    return [(x[i : i + size],) for i in range(0, x.shape[0], size)]


def _fold(graph: Any) -> tuple[Any, dict[str, Any]]:
    from graphpress.passes import make_pass

    res = make_pass("fold-batchnorm", {})(graph)
    return res.graph, dict(res.stats)


def prepare_digits(settings: ModelSettings) -> Prepared:
    from graphpress.ir.graph import Graph
    from graphpress.zoo.digits import accuracy, digits_data, train_digits_cnn

    t0 = time.perf_counter()
    model, reported = train_digits_cnn()
    train_s = time.perf_counter() - t0
    x_tr, _y_tr, x_te, y_te = digits_data(seed=0)
    before = accuracy(model, x_te, y_te)
    graph = Graph.capture(model, example_inputs=(x_tr[:2],))
    graph, fold_stats = _fold(graph)
    graph.calibration = _batches(x_tr)

    def metric(g: Any) -> tuple[float, torch.Tensor]:
        preds = g.run(x_te)[0].argmax(-1)
        return float((preds == y_te).float().mean()), preds

    return Prepared(
        name="digits CNN",
        graph=graph,
        metric_name="accuracy",
        metric=metric,
        before=before,
        finetune_inputs=x_tr,
        data={
            "metric": f"top-1 accuracy against the real labels on the {x_te.shape[0]} held-out test images",
            "calibration": f"the {x_tr.shape[0]} training images in batches of 64",
            "finetune_inputs": f"the {x_tr.shape[0]} training images (labels unused: distillation against the dense folded graph)",
            "model": "graphpress.zoo.digits.train_digits_cnn() (seed 0)",
        },
        extra={
            "train_s": round(train_s, 3),
            "train_reported_test_accuracy": reported,
            "folded_graph_accuracy": metric(graph)[0],
            "fold_batchnorm": fold_stats,
            "n_test": int(x_te.shape[0]),
        },
    )


def prepare_resnet20(settings: ModelSettings) -> Prepared:
    from graphpress.frontends import load
    from graphpress.zoo import load_resnet20, resnet20_checkpoint_path

    path = resnet20_checkpoint_path()
    photos = sample_photos()
    calib = photo_crops(settings.n_calibration, 1, photos)
    evals = photo_crops(settings.n_eval, 2, photos)
    finetune = photo_crops(settings.n_finetune, 3, photos)

    original = load_resnet20(path).eval()
    with torch.inference_mode():
        ref_logits = torch.cat([original(evals[i : i + 256]) for i in range(0, evals.shape[0], 256)])
    ref = ref_logits.argmax(-1)

    graph = load(str(path), arch=RESNET20_ARCH)
    graph, fold_stats = _fold(graph)
    graph.calibration = _batches(calib)

    def metric(g: Any) -> tuple[float, torch.Tensor]:
        preds = torch.cat([g.run(evals[i : i + 256])[0] for i in range(0, evals.shape[0], 256)]).argmax(-1)
        return float((preds == ref).float().mean()), preds

    probs = ref_logits.softmax(-1)
    desc = "random 32x32 crops (native resolution) of scikit-learn's sample photos china.jpg + flower.jpg, flipped horizontally with p=1/2, CIFAR-10 mean/std normalisation"
    return Prepared(
        name="ResNet-20 CIFAR-10",
        graph=graph,
        metric_name="agreement",
        metric=metric,
        before=1.0,  # the original model agrees with itself; the folded graph's agreement is in extra
        finetune_inputs=finetune,
        data={
            "metric": f"top-1 agreement with the original nn.Module (load_resnet20) on {settings.n_eval} eval crops",
            "crops": desc,
            "calibration": f"{settings.n_calibration} crops, seed 1, batches of 64",
            "eval": f"{settings.n_eval} crops, seed 2",
            "finetune_inputs": f"{settings.n_finetune} crops, seed 3 (distillation against the dense folded graph)",
            "cifar_mean": CIFAR_MEAN,
            "cifar_std": CIFAR_STD,
            "checkpoint": str(path),
        },
        extra={
            "folded_graph_agreement": metric(graph)[0],
            "fold_batchnorm": fold_stats,
            "original_eval_class_histogram": np.bincount(ref.numpy(), minlength=ref_logits.shape[-1]).tolist(),
            "original_eval_mean_max_prob": float(probs.max(-1).values.mean()),
        },
    )


def resnet20_unavailable() -> str | None:
    from graphpress.zoo import resnet20_checkpoint_path
    from graphpress.zoo.paths import RESNET20_RELPATH, shared_models_dir

    if resnet20_checkpoint_path() is None:
        return f"{shared_models_dir() / RESNET20_RELPATH} is absent (../shared not available)"
    missing = [m for m in ("PIL", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (not installed) for the sample-photo crops"
    return None


# ----------------------------------------------------------------------------- measuring


def he_costs(graph: Any) -> tuple[list[Any], Callable[[Any, int], float]]:
    from graphpress.passes.circulant.cost import get_cost_model
    from graphpress.passes.circulant.layers import find_layers

    layers, _rejected = find_layers(graph)
    model = get_cost_model(COST_MODEL)
    return layers, lambda layer, b: model(layer, b)


def _top_class_share(preds: torch.Tensor) -> float:
    """Share of the inputs given the most frequent predicted class (1.0: a constant prediction)."""
    return float(torch.bincount(preds.flatten()).max()) / max(1, preds.numel())


def _norm_ratios(base: Any, student: Any, layers: list[Any]) -> dict[str, float]:
    """``||W_b||_F / ||W||_F`` per converted layer: the projected (expanded) weight vs the dense one."""
    from graphpress.ir.circulant import expand

    by_name = {layer.name: layer for layer in layers}
    out: dict[str, float] = {}
    for node in student.call_nodes():
        info = student.annotations(node).get("circulant")
        if not isinstance(info, dict) or info.get("layer") not in by_name:
            continue
        c = student.tensor_of(node.args[1])
        w = base.get_tensor(by_name[info["layer"]].weight_target)
        if c is not None:
            out[info["layer"]] = round(float(expand(c.detach().double()).norm() / w.detach().double().norm()), 4)
    return out


def run_variant(prep: Prepared, variant: Variant, settings: ModelSettings, layers: list[Any], cost: Callable[[Any, int], float], log: Callable[[str], None]) -> dict[str, Any]:
    from graphpress.passes import make_pass
    from graphpress.train.distill import DistillConfig, distill

    base = prep.graph
    rec: dict[str, Any] = {"key": variant.key, "variant": variant.label, "blocks_label": variant.blocks_label, "pass": variant.pass_name}
    cfg = {**variant.config, "fisher_micro_batch": settings.fisher_micro_batch}
    rec["config"] = cfg

    student = base.clone()
    student.calibration = base.calibration
    t0 = time.perf_counter()
    res = make_pass(variant.pass_name, cfg)(student)
    rec["projection_s"] = round(time.perf_counter() - t0, 3)
    student = res.graph
    stats = dict(res.stats)
    proj = stats["projection"] if variant.pass_name == "circulant-search" else stats
    blocks = {k: int(v) for k, v in proj["blocks"].items()}
    rec["blocks"] = blocks
    rec["converted_layers"] = proj["converted"]
    rec["converted_dense_weights"] = proj["params_before"]
    rec["converted_compact_weights"] = proj["params_after"]
    rec["projection_error"] = proj.get("projection_error")
    rec["bn_handling"] = proj.get("bn_handling")
    rec["params"] = student.parameter_count()
    rec["weight_norm_ratio"] = _norm_ratios(base, student, layers)
    ratios = list(rec["weight_norm_ratio"].values())
    rec["weight_norm_ratio_mean"] = float(np.mean(ratios)) if ratios else None

    by_name = {layer.name: layer for layer in layers}
    rec["he_cost"] = math.fsum(cost(by_name[n], b) for n, b in blocks.items() if n in by_name)
    k = variant.uniform_k
    rec["he_cost_uniform_rule"] = math.fsum(cost(layer, k if layer.fits(k) else 1) for layer in layers)
    if variant.pass_name == "circulant-search":
        rec["search"] = {
            key: stats.get(key)
            for key in ("budget", "cost", "uniform_cost", "dense_cost", "objective", "uniform_objective", "uniform_blocks", "converted", "solver", "time_s")
        }
        rec["search"]["layers"] = {
            name: {f: v for f, v in entry.items() if f in ("kind", "shape", "b", "cost", "sensitivity", "costs", "sensitivities")}
            for name, entry in stats.get("layers", {}).items()
        }
        if not math.isclose(rec["he_cost"], float(stats["cost"]), rel_tol=1e-9, abs_tol=1e-9):
            rec["he_cost_mismatch"] = f"recomputed {rec['he_cost']} != search's {stats['cost']}"

    t0 = time.perf_counter()
    rec["after_projection"], preds = prep.metric(student)
    rec["after_projection_top_class_share"] = _top_class_share(preds)
    rec["eval_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    result = distill(student, base, prep.finetune_inputs, DistillConfig(**settings.distill))
    rec["finetune_s"] = round(time.perf_counter() - t0, 3)
    rec["finetune"] = result.to_dict()
    rec["finetune"].pop("trained", None)  # tensor names: long, and the same as the converted layers
    rec["after_finetune"], preds = prep.metric(student)
    rec["after_finetune_top_class_share"] = _top_class_share(preds)
    rec["params_after_finetune"] = student.parameter_count()
    log(
        f"  {variant.label}: {prep.metric_name} {100 * rec['after_projection']:.2f}% -> {100 * rec['after_finetune']:.2f}% "
        f"(projection {rec['projection_s']:.1f} s, fine-tuning {rec['finetune_s']:.1f} s, "
        f"{len(result.history)} epoch(s), best {result.best_epoch}, {result.stop_reason}; initial distillation val loss "
        f"{result.initial_val_loss:.3g}; mean ||W_b||/||W|| {rec['weight_norm_ratio_mean'] or float('nan'):.2f}; most frequent class "
        f"{100 * rec['after_projection_top_class_share']:.0f}% -> {100 * rec['after_finetune_top_class_share']:.0f}% of predictions)"
    )
    return rec


def dense_record(prep: Prepared, layers: list[Any], cost: Callable[[Any, int], float]) -> dict[str, Any]:
    return {
        "key": "dense",
        "variant": "dense (BN folded)",
        "blocks_label": "1",
        "blocks": {layer.name: 1 for layer in layers},
        "params": prep.graph.parameter_count(),
        "he_cost": math.fsum(cost(layer, 1) for layer in layers),
        "converted_dense_weights": 0,
        "converted_compact_weights": 0,
        "after_projection": None,
        "after_finetune": None,
    }


def check_claims(variants: list[dict[str, Any]], n_eval: int) -> list[dict[str, Any]]:
    by_key = {v["key"]: v for v in variants}
    checks = []
    for searched, uniform in CLAIMS:
        if searched not in by_key or uniform not in by_key:
            continue
        s, u = by_key[searched], by_key[uniform]
        c = {
            "searched": searched,
            "uniform": uniform,
            "cost_searched": s["he_cost"],
            "cost_uniform": u["he_cost"],
            "cost_ok": s["he_cost"] <= u["he_cost"] + 1e-9,
            "same_assignment": s["blocks"] == u["blocks"],
        }
        for stage in ("after_projection", "after_finetune"):
            diff = s[stage] - u[stage]
            c[stage] = {
                "searched": s[stage],
                "uniform": u[stage],
                "difference": diff,
                "difference_inputs": round(diff * n_eval),
                "pass": s[stage] >= u[stage] - 1e-12,
            }
        c["pass"] = c["cost_ok"] and c["after_projection"]["pass"] and c["after_finetune"]["pass"]
        checks.append(c)
    return checks


def run_model(model: str, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    settings = settings_for(model, quick)
    t_model = time.perf_counter()
    prep = prepare_digits(settings) if model == "digits" else prepare_resnet20(settings)
    prep_s = time.perf_counter() - t_model
    log(f"{prep.name}: prepared in {prep_s:.1f} s; {prep.metric_name} before {100 * prep.before:.2f}%")
    layers, cost = he_costs(prep.graph)
    variants = [dense_record(prep, layers, cost)]
    for variant in VARIANTS:
        try:
            variants.append(run_variant(prep, variant, settings, layers, cost, log))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            traceback.print_exc()
            variants.append({"key": variant.key, "variant": variant.label, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    n_eval = prep.extra.get("n_test") or settings.n_eval
    ok = [v for v in variants if v.get("status") != "error"]
    return {
        "model": model,
        "name": prep.name,
        "status": "ok" if len(ok) == len(variants) else "error",
        "metric": prep.metric_name,
        "before": prep.before,
        "data": prep.data,
        "settings": asdict(settings),
        "layers": [
            {"name": l.name, "kind": l.kind, "shape": [l.out_features, l.in_features, *l.kernel], "out_positions": l.out_positions, "he_cost_dense": cost(l, 1)}
            for l in layers
        ],
        "variants": variants,
        "claims": check_claims(ok, n_eval),
        "prepare_s": round(prep_s, 3),
        "wall_s": round(time.perf_counter() - t_model, 3),
        **prep.extra,
    }


# ----------------------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    import scipy

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    for mod, key in (("sklearn", "scikit-learn"), ("PIL", "pillow")):
        try:
            info[key] = __import__(mod).__version__
        except ImportError:
            info[key] = None
    try:
        import graphpress

        info["graphpress"] = getattr(graphpress, "__version__", None)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_table(models: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    table = Table(
        title="graphpress block-circulant accuracy (digits: test accuracy, real labels; ResNet-20: top-1 agreement with the original on photo crops)",
        caption="params = graph.parameter_count() (weights + float buffers, BN folded); conv. weights = compact / dense weights of the converted layers; "
        "HE cost = he-analytic plaintext-ciphertext products (N = 8192) of the assignment (uniform: the search's uniform:K rule).",
    )
    for col, kw in [
        ("model", {}),
        ("variant", {}),
        ("blocks", {"justify": "right"}),
        ("params", {"justify": "right"}),
        ("conv. weights", {"justify": "right"}),
        ("HE cost", {"justify": "right"}),
        ("before", {"justify": "right"}),
        ("after projection", {"justify": "right"}),
        ("after fine-tuning", {"justify": "right"}),
    ]:
        table.add_column(col, **kw)
    for m in models:
        if m["status"] == "skipped":
            table.add_row(m["name"], "-", *["-"] * 6, f"skipped: {m['reason']}")
            table.add_section()
            continue
        if "variants" not in m:
            table.add_row(m["name"], "-", *["-"] * 6, f"error: {m.get('reason', '')}")
            table.add_section()
            continue
        name = f"{m['name']} ({m['metric']})"
        for v in m["variants"]:
            if v.get("status") == "error":
                table.add_row(name, v["variant"], *["-"] * 6, f"error: {v['reason']}")
                continue
            conv = "-" if not v["converted_dense_weights"] else f"{v['converted_compact_weights']:,} / {v['converted_dense_weights']:,}"
            table.add_row(
                name,
                v["variant"],
                v["blocks_label"],
                f"{v['params']:,}",
                conv,
                f"{v['he_cost']:g}",
                _pct(m["before"]),
                _pct(v["after_projection"]),
                _pct(v["after_finetune"]),
            )
            name = ""
        table.add_section()
    console.print(table)


def print_details(models: list[dict[str, Any]], console: Any) -> None:
    for m in models:
        if "variants" not in m:
            continue
        layer_names = [l["name"] for l in m["layers"]]
        for v in m["variants"]:
            if v.get("blocks_label") == "searched":
                blocks = " ".join(f"{n}={v['blocks'][n]}" for n in layer_names)
                console.print(f"{m['name']} {v['variant']} per-layer blocks: {blocks}")
        for c in m["claims"]:
            parts = []
            for stage in ("after_projection", "after_finetune"):
                s = c[stage]
                parts.append(
                    f"{stage.replace('_', ' ')} {100 * s['searched']:.2f}% vs {100 * s['uniform']:.2f}% "
                    f"({s['difference_inputs']:+d} inputs) {'PASS' if s['pass'] else 'FAIL'}"
                )
            verdict = "PASS" if c["pass"] else "FAIL"
            same = " (same assignment as uniform)" if c["same_assignment"] else ""
            console.print(
                f"claim ({m['name']}) searched >= uniform at equal cost, {c['searched']} vs {c['uniform']}: {verdict}{same} -- "
                f"HE cost {c['cost_searched']:g} <= {c['cost_uniform']:g} {'PASS' if c['cost_ok'] else 'FAIL'}; " + "; ".join(parts)
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few epochs and crops: a smoke run, not numbers to quote")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)} (default all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")

    from rich.console import Console
    from rich.markup import escape

    console = Console()
    if not console.is_terminal:
        console = Console(width=220)

    torch.set_num_threads(2)
    from graphpress.passes.circulant import projection, search  # noqa: F401 -- register block-circulant, circulant-search

    load_start = os.getloadavg()
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    for model in chosen:
        name = "digits CNN" if model == "digits" else "ResNet-20 CIFAR-10"
        reason = None
        if model == "digits" and importlib.util.find_spec("sklearn") is None:
            reason = "needs scikit-learn (not installed)"
        elif model == "resnet20":
            reason = resnet20_unavailable()
        if reason:
            console.print(f"[yellow]skip {name}: {escape(reason)}[/yellow]")
            records.append({"model": model, "name": name, "status": "skipped", "reason": reason})
            continue
        console.print(f"{name} ...")
        try:
            records.append(run_model(model, args.quick, console.print))
        except Exception as exc:  # noqa: BLE001 - report and go on with the other model
            traceback.print_exc()
            records.append({"model": model, "name": name, "status": "error", "reason": f"{type(exc).__name__}: {exc}"})
    total_s = time.perf_counter() - started

    print_table(records, console)
    print_details(records, console)
    failed = [r for r in records if r["status"] == "error"]
    console.print(f"total {total_s:.1f} s (load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end, {os.cpu_count()} CPUs)")

    payload = {
        "benchmark": "circulant_accuracy",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "variants": [asdict(v) for v in VARIANTS],
            "claims": [{"searched": s, "uniform": u} for s, u in CLAIMS],
            "cost_model": COST_MODEL,
            "poly_degree": 8192,
            "pipeline": "capture -> fold-batchnorm -> (clone) block-circulant / circulant-search -> distill (teacher: the dense folded graph)",
            "uniform_cost_rule": "sum over eligible layers of cost(layer, K if K fits the layer else 1)",
        },
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "total_s": round(total_s, 3),
        "models": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
