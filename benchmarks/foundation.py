"""Foundation benchmark: the "done when" items of the foundation issue, side by side in one run.

For every case the model is compressed with :func:`graphpress.api.compress` (``bench=False``:
the timing is done here) into a temporary folder, and then

1. **accuracy** - the artifact (:func:`graphpress.runtime.load`, ONNX Runtime) and the
   *original* ``nn.Module`` (loaded independently from the zoo / ``transformers``, not the
   captured graph) run on the same inputs; the worst absolute error and the top-1 agreement
   (argmax over the last axis) are reported. Any case with max abs error >= 1e-4 makes the
   script exit non-zero;
2. **latency at batch 1** - torch eager of the original module (under
   ``torch.inference_mode()``) and the ONNX Runtime artifact, timed *interleaved*
   (A B A B ...) with :func:`graphpress.runtime.compare_latency`; medians and their ratio come
   from that one interleaved run only (the machine drifts up to 2x between blocks of runs);
3. **compress wall time** - capture + passes + verification + lowering + writing the artifact.

Cases (a, b, c, f need ``../shared/models``; they are skipped with a reason when it is absent):

a. ResNet-20 CIFAR-10 checkpoint, ``--arch graphpress.zoo.resnet20:resnet20``, recipe ``fold-batchnorm``
b. the same checkpoint, recipe ``default``
c. stories260K llama2.c ``.bin``, recipe ``default``
d. tiny BERT Hugging Face folder (``save_tiny_hf``), recipe ``default``
e. tiny GPT-2 Hugging Face folder (``save_tiny_hf``), recipe ``default``
f. ONNX round trip: ResNet-20 exported with ``torch.onnx.export(dynamo=True)``, recipe ``default``
g. digits CNN trained with ``train_digits_cnn()``, recipe ``fuse``, test accuracy before/after

Usage::

    python benchmarks/foundation.py [--quick] [--out benchmarks/results/foundation.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-4
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "foundation.json"
RESNET20_ARCH = "graphpress.zoo.resnet20:resnet20"
N_EVAL = 64


@dataclass
class Prepared:
    """What a case needs: the source to compress, the original module and its inputs."""

    source: Any
    original: nn.Module
    eval_inputs: torch.Tensor  # the accuracy batch
    eval_desc: str
    latency_input: torch.Tensor  # batch 1
    compress_kwargs: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None  # digits: test labels -> task accuracy before/after
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Case:
    key: str
    name: str
    recipe: str
    needs_shared: bool
    prepare: Callable[[Path], Prepared]
    requires: tuple[str, ...] = ()  # optional packages; missing ones skip the case


# ----------------------------------------------------------------------------- case builders


def _seeded_images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen)


def _resnet20_checkpoint(tmp: Path) -> Prepared:
    from graphpress.zoo import load_resnet20, resnet20_checkpoint_path

    path = resnet20_checkpoint_path()
    x = _seeded_images(N_EVAL, seed=1234)
    return Prepared(
        source=str(path),
        original=load_resnet20(path),
        eval_inputs=x,
        eval_desc=f"{N_EVAL} random N(0,1) images 3x32x32 (seed 1234)",
        latency_input=x[:1].clone(),
        compress_kwargs={"arch": RESNET20_ARCH},
    )


def _stories260k(tmp: Path) -> Prepared:
    from graphpress.zoo import load_llama2c, sample, stories260k_path

    path = stories260k_path()
    model = load_llama2c(path)
    with torch.inference_mode():
        tokens = sample(model, N_EVAL, 32, seed=1234)
    return Prepared(
        source=str(path),
        original=model,
        eval_inputs=tokens,
        eval_desc=f"{N_EVAL} sequences x 32 tokens sampled from the model (T=1, seed 1234)",
        latency_input=tokens[:1].clone(),
    )


def _tiny_hf(model_name: str) -> Callable[[Path], Prepared]:
    def prepare(tmp: Path) -> Prepared:
        import transformers

        from graphpress.zoo import save_tiny_hf, wrap_hf_model

        folder = save_tiny_hf(model_name, tmp / model_name, seed=0)
        config = json.loads((folder / "config.json").read_text())
        cls = getattr(transformers, config["architectures"][0])
        # Loaded by transformers itself (not graphpress's readers), with its default attention.
        hf = cls.from_pretrained(str(folder), local_files_only=True)
        attn = getattr(hf.config, "_attn_implementation", None)
        original = wrap_hf_model(hf)
        gen = torch.Generator().manual_seed(1234)
        ids = torch.randint(0, original.vocab_size, (N_EVAL, 16), generator=gen)
        return Prepared(
            source=str(folder),
            original=original,
            eval_inputs=ids,
            eval_desc=f"{N_EVAL} random input_ids x 16 tokens (seed 1234)",
            latency_input=ids[:1].clone(),
            extra={"torch_attn_implementation": attn, "loaded_with": f"transformers.{cls.__name__}.from_pretrained"},
        )

    return prepare


def _resnet20_onnx(tmp: Path) -> Prepared:
    from graphpress.zoo import load_resnet20, resnet20_checkpoint_path

    model = load_resnet20(resnet20_checkpoint_path())
    x2 = _seeded_images(2, seed=0)
    path = tmp / "resnet20.onnx"
    t0 = time.perf_counter()
    torch.onnx.export(
        model,
        (x2,),
        str(path),
        dynamo=True,
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    export_s = time.perf_counter() - t0
    x = _seeded_images(N_EVAL, seed=1234)
    return Prepared(
        source=str(path),
        original=load_resnet20(resnet20_checkpoint_path()),  # a fresh copy, untouched by the export
        eval_inputs=x,
        eval_desc=f"{N_EVAL} random N(0,1) images 3x32x32 (seed 1234)",
        latency_input=x[:1].clone(),
        extra={"onnx_export_s": round(export_s, 3), "onnx_file_bytes": path.stat().st_size},
    )


def _digits(tmp: Path) -> Prepared:
    from graphpress.zoo import digits_data, train_digits_cnn

    t0 = time.perf_counter()
    model, acc = train_digits_cnn()
    train_s = time.perf_counter() - t0
    x_tr, _, x_te, y_te = digits_data(seed=0)
    return Prepared(
        source=model,
        original=model,
        eval_inputs=x_te,
        eval_desc=f"the {x_te.shape[0]} held-out digits test images",
        latency_input=x_te[:1].clone(),
        compress_kwargs={"example_inputs": (x_tr[:2],)},
        labels=y_te,
        extra={"train_s": round(train_s, 3), "train_reported_test_accuracy": acc},
    )


CASES = [
    Case("a", "ResNet-20 .th", "fold-batchnorm", True, _resnet20_checkpoint),
    Case("b", "ResNet-20 .th", "default", True, _resnet20_checkpoint),
    Case("c", "stories260K .bin", "default", True, _stories260k),
    Case("d", "tiny BERT (HF)", "default", False, _tiny_hf("tiny-bert"), ("transformers",)),
    Case("e", "tiny GPT-2 (HF)", "default", False, _tiny_hf("tiny-gpt2"), ("transformers",)),
    Case("f", "ResNet-20 .onnx", "default", True, _resnet20_onnx, ("onnxscript",)),
    Case("g", "digits CNN", "fuse", False, _digits, ("sklearn",)),
]


# ----------------------------------------------------------------------------- measuring


def _eager(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return module(x).detach().float().numpy()


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def _shared_reason() -> str | None:
    from graphpress.zoo import resnet20_checkpoint_path, stories260k_path
    from graphpress.zoo.paths import shared_models_dir

    if resnet20_checkpoint_path() is None or stories260k_path() is None:
        return f"{shared_models_dir()} is absent (ResNet-20 / stories260K checkpoints not found)"
    return None


def run_case(case: Case, tmp: Path, rounds: int, min_time_s: float) -> dict[str, Any]:
    from graphpress.api import compress
    from graphpress.runtime import compare_latency, load

    rec: dict[str, Any] = {"case": case.key, "name": case.name, "recipe": case.recipe}
    prep = case.prepare(tmp)
    rec["eval_inputs"] = prep.eval_desc
    rec.update(prep.extra)
    original = prep.original.eval()
    x = prep.eval_inputs

    # Reference outputs first: a compress that mutated the module it was given would show up
    # as a difference between these and the outputs after compression.
    ref = _eager(original, x)

    t0 = time.perf_counter()
    result = compress(prep.source, out=tmp / f"artifact-{case.key}", recipe=case.recipe, bench=False, **prep.compress_kwargs)
    rec["compress_s"] = round(time.perf_counter() - t0, 3)

    m = result.manifest.get("metrics", result.metrics)
    rec["passes"] = [
        {k: p.get(k) for k in ("name", "changed", "exact", "time_s", "stats")} for p in result.manifest.get("passes", [])
    ]
    for k in ("params_before", "params_after", "param_bytes_before", "param_bytes_after", "model_file_bytes"):
        rec[k] = m.get(k)
    rec["compress_vs_original_graph"] = m.get("vs_original")
    # The module's own count, each shared tensor once. The graph counts (params_before/after,
    # from the manifest) include floating-point buffers (BN running stats, RoPE tables), so
    # those are added here too to make the columns comparable.
    rec["module_params"] = sum(p.numel() for p in original.parameters())
    rec["module_float_buffers"] = sum(b.numel() for b in original.buffers() if b.is_floating_point())

    ref_after = _eager(original, x)
    rec["original_unchanged_by_compress"] = bool(np.array_equal(ref, ref_after))

    art = load(result.folder)
    got = art(x.numpy())[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"artifact output shape {got.shape} != original {ref.shape}")
    rec["max_abs_error"] = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    rec["max_abs_reference"] = float(np.max(np.abs(ref)))
    rec["top1_agreement"] = _agreement(got, ref)
    rec["top1_agreement_over"] = "positions (batch x seq)" if ref.ndim == 3 else "inputs"
    if prep.labels is not None:
        y = prep.labels.numpy()
        rec["accuracy_before"] = float(np.mean(ref.argmax(-1) == y))
        rec["accuracy_after"] = float(np.mean(got.argmax(-1) == y))

    # Latency at batch 1, interleaved: eager original vs ONNX Runtime artifact.
    x1 = prep.latency_input
    x1_np = x1.numpy()

    def eager_call(inp: torch.Tensor) -> Any:
        with torch.inference_mode():
            return original(inp)

    names = ("torch eager (original)", "onnxruntime (artifact)")
    timing = compare_latency(
        {names[0]: eager_call, names[1]: art},
        {names[0]: (x1,), names[1]: (x1_np,)},
        rounds=rounds,
        warmup=max(3, rounds // 20),
        min_time_s=min_time_s,
    )
    rec["latency_batch_shape"] = list(x1.shape)
    rec["latency"] = timing.to_dict()
    rec["latency_ms"] = {k: r.median_ms for k, r in timing.results.items()}
    rec["latency_ratio_ort_over_eager"] = timing.ratios[names[1]]
    rec["speedup_eager_over_ort"] = 1.0 / timing.ratios[names[1]] if timing.ratios[names[1]] else float("nan")
    rec["status"] = "ok" if rec["max_abs_error"] < TOLERANCE and rec["original_unchanged_by_compress"] else "FAIL"
    if rec["max_abs_error"] >= TOLERANCE:
        rec["reason"] = f"max abs error {rec['max_abs_error']:.3g} >= {TOLERANCE:g}"
    elif not rec["original_unchanged_by_compress"]:
        rec["reason"] = "compress changed the outputs of the module it was given"
    del art, result
    gc.collect()
    return rec


def machine_info() -> dict[str, Any]:
    import onnxruntime

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_threads": "default",
        "numpy": np.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
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


# ----------------------------------------------------------------------------- output


def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(records: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    table = Table(
        title="graphpress foundation benchmark (batch-1 latency: medians of one interleaved run)",
        caption="ORT/eager = median(ORT) / median(torch eager) within one interleaved run (< 1: the artifact is faster). "
        "Graph params (from the manifest) include float buffers and count a tied weight once (by storage).",
    )
    for col, kw in [
        ("case", {}),
        ("model", {}),
        ("recipe", {}),
        ("module params+bufs", {"justify": "right"}),
        ("graph params before -> after", {"justify": "right"}),
        ("file KB", {"justify": "right"}),
        ("max abs err", {"justify": "right"}),
        ("top-1 agree", {"justify": "right"}),
        ("eager ms", {"justify": "right"}),
        ("ORT ms", {"justify": "right"}),
        ("ORT/eager", {"justify": "right"}),
        ("compress s", {"justify": "right"}),
        ("status", {}),
    ]:
        table.add_column(col, **kw)
    for r in records:
        if r["status"] in ("skipped", "error"):
            table.add_row(r["case"], r["name"], r["recipe"], *["-"] * 9, f"{r['status']}: {r.get('reason', '')}")
            continue
        lat = r["latency_ms"]
        status = r["status"]
        if "accuracy_before" in r:
            status += f" (acc {100 * r['accuracy_before']:.2f}% -> {100 * r['accuracy_after']:.2f}%)"
        if r.get("reason"):
            status += f": {r['reason']}"
        table.add_row(
            r["case"],
            r["name"],
            r["recipe"],
            f"{r['module_params'] + r['module_float_buffers']:,}",
            f"{r['params_before']:,} -> {r['params_after']:,}",
            f"{r['model_file_bytes'] / 1024:,.1f}",
            f"{r['max_abs_error']:.2e}",
            f"{100 * r['top1_agreement']:.2f}%",
            _fmt_ms(lat.get("torch eager (original)")),
            _fmt_ms(lat.get("onnxruntime (artifact)")),
            f"{r['latency_ratio_ort_over_eager']:.2f}",
            f"{r['compress_s']:.1f}",
            status,
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few latency rounds: a smoke run, not numbers to quote")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    parser.add_argument("--cases", default="abcdefg", help="subset of case letters to run (default all)")
    args = parser.parse_args(argv)

    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=240)

    torch.set_num_threads(2)
    try:  # transformers' progress bars would interleave with the output
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    rounds, min_time_s = (20, 0.0) if args.quick else (500, 2.0)
    shared_missing = _shared_reason()
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphpress-bench-") as tmpdir:
        for case in CASES:
            if case.key not in args.cases:
                continue
            base = {"case": case.key, "name": case.name, "recipe": case.recipe}
            if case.needs_shared and shared_missing:
                console.print(f"[yellow]skip ({case.key}) {case.name}: {shared_missing}[/yellow]")
                records.append({**base, "status": "skipped", "reason": shared_missing})
                continue
            missing = [m for m in case.requires if importlib.util.find_spec(m) is None]
            if missing:
                reason = f"needs {', '.join(missing)} (not installed)"
                console.print(f"[yellow]skip ({case.key}) {case.name}: {reason}[/yellow]")
                records.append({**base, "status": "skipped", "reason": reason})
                continue
            console.print(f"({case.key}) {case.name}, recipe {case.recipe} ...")
            tmp = Path(tmpdir) / case.key
            tmp.mkdir()
            t0 = time.perf_counter()
            try:
                rec = run_case(case, tmp, rounds, min_time_s)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other cases
                traceback.print_exc()
                rec = {**base, "status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            rec["case_wall_s"] = round(time.perf_counter() - t0, 3)
            records.append(rec)
    total_s = time.perf_counter() - started

    print_table(records, console)
    failed = [r for r in records if r["status"] not in ("ok", "skipped")]
    console.print(f"total {total_s:.1f} s; {len(failed)} case(s) failed" + (f": {', '.join(r['case'] for r in failed)}" if failed else ""))

    payload = {
        "benchmark": "foundation",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "settings": {
            "tolerance_max_abs": TOLERANCE,
            "latency": "batch 1; torch eager (inference_mode) vs onnxruntime artifact, interleaved A B A B "
            "by graphpress.runtime.compare_latency; medians; ratio = median(ORT) / median(eager)",
            "rounds": rounds,
            "min_time_s": min_time_s,
        },
        "machine": machine_info(),
        "total_s": round(total_s, 3),
        "cases": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    console.print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
