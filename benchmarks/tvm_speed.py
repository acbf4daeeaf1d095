"""TVM backend: correctness and batch-1 latency, untuned and MetaSchedule-tuned, vs torch and ONNX Runtime.

For each model (an MLP, the digits CNN, ResNet-20 with its CIFAR-10 weights when ``../shared`` has
them, transformers BERT and Llama built from config):

1. capture, fold batch norms, lower with ``--backend tvm`` (the lowering checks the library against
   the graph: the max abs error is reported); the same graph with ``fuse-blocks`` regions is
   lowered too, for the kernel counts (TVM default fusion vs one kernel per region) and its
   untuned latency;
2. tune a copy of the untuned folder with :func:`graphpress.backends.tvm.tune.tune_folder`
   (MetaSchedule in a torch-free subprocess, ``--trials`` per model), reporting trials, tasks and
   tuning time; the tuned library is checked against the untuned one;
3. time batch 1 interleaved in one run (seeded shuffled order per round, medians): torch eager,
   ONNX Runtime (fp32, ``lower_to_onnx``), TVM untuned, TVM untuned with regions, TVM tuned. All
   with 2 threads.

Usage::

    python benchmarks/tvm_speed.py [--quick] [--models mlp,resnet20] [--trials resnet20=512] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # read once, when the TVM thread pool starts

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine_info, ort_session  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch import nn  # noqa: E402

import graphpress.passes.fusion  # noqa: E402,F401 -- registers fold-batchnorm, fuse-blocks
from graphpress.backends.onnxruntime.lower import lower_to_onnx  # noqa: E402
from graphpress.backends.tvm.lower import TVMBackend  # noqa: E402
from graphpress.backends.tvm.runner import TVMRunner  # noqa: E402
from graphpress.backends.tvm.tune import tune_folder  # noqa: E402
from graphpress.ir.graph import Graph  # noqa: E402
from graphpress.passes.base import make_pass  # noqa: E402
from graphpress.runtime.bench import compare_latency  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tvm_speed.json"
TRIALS = {"mlp": 96, "digits": 160, "resnet20": 640, "bert": 0, "llama": 0}
QUICK_TRIALS = {"mlp": 16, "digits": 0, "resnet20": 0, "bert": 0, "llama": 0}


def _models(names: list[str]) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], dict[int, str], str]]:
    torch.manual_seed(0)
    out: dict[str, Any] = {}
    for name in names:
        if name == "mlp":
            m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
            out[name] = (m, (torch.randn(2, 256),), {0: "batch"}, "random init 256-512-512-10")
        elif name == "digits":
            from graphpress.zoo.digits import digits_cnn

            out[name] = (digits_cnn(), (torch.randn(2, 1, 8, 8),), {0: "batch"}, "random init")
        elif name == "resnet20":
            from graphpress.zoo.paths import resnet20_checkpoint_path
            from graphpress.zoo.resnet20 import load_resnet20, resnet20

            real = resnet20_checkpoint_path() is not None
            out[name] = (load_resnet20() if real else resnet20(), (torch.randn(2, 3, 32, 32),), {0: "batch"},
                         "CIFAR-10 weights" if real else "random init (../shared absent)")
        elif name in ("bert", "llama"):
            from graphpress.zoo.hf_tiny import tiny_bert, tiny_llama

            out[name] = ((tiny_bert if name == "bert" else tiny_llama)(), (torch.randint(0, 100, (2, 16)),), {0: "batch"}, "from config")
        else:
            raise SystemExit(f"unknown model {name!r}; known: mlp, digits, resnet20, bert, llama")
    return out


def run(models: list[str], trials: dict[str, int], rounds: int, work: Path) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    results: dict[str, Any] = {}
    console = Console()
    for name, (model, example, dims, weights) in _models(models).items():
        g = Graph.capture(model.eval(), example, name=name, dynamic_dims=dims)
        g = make_pass("fold-batchnorm", {})(g).graph
        row: dict[str, Any] = {"weights": weights}
        t0 = time.perf_counter()
        low = TVMBackend().lower(g, work / f"{name}-untuned")
        row["lower_s"] = round(time.perf_counter() - t0, 1)
        row["max_abs_vs_graph"] = low.check["worst"]["max_abs"]
        row["fixups"] = low.info.get("fixups", [])
        gr = make_pass("fuse-blocks", {})(g)
        low_r = TVMBackend().lower(gr.graph, work / f"{name}-regions")
        row["regions"] = {"pass": {k: gr.stats[k] for k in ("regions", "by_kind", "kernels_before", "kernels_after")},
                          "tvm_kernels": low_r.info.get("kernels"), "max_abs_vs_graph": low_r.check["worst"]["max_abs"]}
        n = trials.get(name, 0)
        tuned_dir = None
        if n > 0:
            tuned_dir = work / f"{name}-tuned"
            shutil.copytree(work / f"{name}-untuned", tuned_dir)
            console.print(f"[bold]{name}[/bold]: tuning {n} trials ...")
            last = {"t": 0.0}

            def progress(ev: dict[str, Any]) -> None:
                if ev["event"] == "tasks":
                    console.print(f"  {len(ev['tasks'])} tasks")
                elif time.perf_counter() - last["t"] > 30:
                    last["t"] = time.perf_counter()
                    console.print(f"  {ev['done']}/{ev['total']} trials")

            row["tuning"] = tune_folder(tuned_dir, n, progress=progress)
        lower_to_onnx(g, work / f"{name}-onnx")
        sess = ort_session(work / f"{name}-onnx" / "model.onnx", THREADS)
        in_names = [i.name for i in sess.get_inputs()]
        x = tuple(t[:1].clone() for t in example)  # batch 1
        xn = [t.numpy() for t in x]
        ref = model(*x)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach().numpy()
        untuned, regions = TVMRunner(work / f"{name}-untuned" / "model.so"), TVMRunner(work / f"{name}-regions" / "model.so")
        variants: dict[str, Any] = {
            "onnxruntime": lambda: sess.run(None, dict(zip(in_names, xn))),
            "torch eager": lambda: model(*x),
            "tvm untuned": lambda: untuned(*xn),
            "tvm untuned + regions": lambda: regions(*xn),
        }
        if tuned_dir is not None:
            tuned = TVMRunner(tuned_dir / "model.so")
            row["tuned_max_abs_vs_torch_b1"] = float(np.max(np.abs(tuned(*xn)[0] - ref)))
            variants["tvm tuned"] = lambda: tuned(*xn)
        row["untuned_max_abs_vs_torch_b1"] = float(np.max(np.abs(untuned(*xn)[0] - ref)))
        with torch.inference_mode():
            cmp = compare_latency(variants, (), rounds=rounds, warmup=3, min_time_s=0.3)
        row["latency"] = cmp.to_dict()
        results[name] = row
        console.print(f"[bold]{name}[/bold] (batch 1, ms, x ONNX Runtime)\n{cmp.table()}")
    return results


def _table(results: dict[str, Any]) -> Table:
    t = Table(title="TVM batch-1 latency (median ms; x = ratio to ONNX Runtime; 2 threads)")
    for col in ("model", "max abs vs graph", "torch eager", "onnxruntime", "tvm untuned", "tvm tuned", "trials / tasks / tuning s", "kernels (tvm default -> regions)"):
        t.add_column(col)
    for name, r in results.items():
        res, ratios = r["latency"]["results"], r["latency"]["ratios"]

        def cell(k: str) -> str:
            return f"{res[k]['median_ms']:.3f} ({ratios[k]:.2f}x)" if k in res else "not tuned"

        tun = r.get("tuning")
        kern = r["regions"]["tvm_kernels"] or {}
        t.add_row(name, f"{r['max_abs_vs_graph']:.2g}", cell("torch eager"), cell("onnxruntime"), cell("tvm untuned"), cell("tvm tuned"),
                  f"{tun['trials_measured']} / {len(tun['tasks'])} / {tun['tuning_s']:.0f}" if tun else "-",
                  f"{kern.get('default')} -> {kern.get('regions')}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MLP only tuned, 16 trials; few rounds")
    ap.add_argument("--models", default="mlp,digits,resnet20,bert,llama")
    ap.add_argument("--trials", action="append", default=[], help="model=N (repeatable)")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    trials = dict(QUICK_TRIALS if args.quick else TRIALS)
    for item in args.trials:
        k, _, v = item.partition("=")
        trials[k] = int(v)
    models = [m for m in args.models.split(",") if m]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gp-tvm-bench-") as tmp:
        results = run(models, trials, 10 if args.quick else args.rounds, Path(tmp))
    Console(width=170).print(_table(results))
    import tvm

    payload = {"benchmark": "tvm_speed", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(threads=THREADS, tvm=tvm.__version__), "trials": trials, "wall_s": round(time.perf_counter() - t0, 1),
               "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
