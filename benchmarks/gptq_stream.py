"""Group-wise GPTQ against round-to-nearest on a streamed decoder LLM, and how much calibration it
needs; plus the generation speed of the round-to-nearest artifact (full recompute, no KV cache).

A Llama from config (random weights, ``benchmarks/llm_folder.py``, default 0.35B) is compressed
with ``compress run --stream on`` to int4 group-32 weights, one configuration after the other,
each in its own process on the same machine:

* ``nearest``: round to nearest, the default 256 calibration tokens;
* ``gptq``: ``group_rounding: gptq``, the default 256 tokens (fewer than the model is wide);
* ``gptq-3072``: the same with 48 x 64 calibration tokens (``--calibration``).

Each row gives the run's wall time, the worst block SQNR (measured on the check tokens, which
are calibration tokens) and the held-out KL / top-1 agreement against the uncompressed model on
the streamed run's own held-out sequences (the same for every row). Then ``nearest``'s artifact
generates 16 tokens greedily from an 8-token prompt, three times (median tokens/s).

Run: ``python benchmarks/gptq_stream.py [--size 0.35b] [--cache /tmp/gp-llm]``; prints a table
and writes ``benchmarks/results/gptq_stream.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "gptq_stream.json"
BASE = {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32, "min_sqnr_db": 0}
CONFIGS = [
    ("nearest", {}, None),
    ("gptq", {"group_rounding": "gptq"}, None),
    ("gptq-3072", {"group_rounding": "gptq"}, (48, 64)),
]


def _compress_bin() -> str:
    return str(Path(sys.executable).with_name("compress"))


def run_config(folder: Path, work: Path, name: str, extra: dict, calib: tuple[int, int] | None, vocab: int) -> dict:
    import torch
    import yaml

    recipe = work / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({"passes": [{"quantize-layerwise": {**BASE, **extra}}]}))
    out = work / name
    cmd = [_compress_bin(), "run", str(folder), "--recipe", str(recipe), "-o", str(out), "--stream", "on", "--no-bench"]
    if calib is not None:
        ids = work / f"{name}-calib.pt"
        torch.save(torch.randint(0, vocab, calib, generator=torch.Generator().manual_seed(7)), ids)
        cmd += ["--calibration", str(ids)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    s = json.loads((out / "manifest.json").read_text())["stream"]
    e = s["end_to_end"]
    return {"config": name, "recipe": {**BASE, **extra}, "calibration_tokens": s["calibration_tokens"], "wall_s": round(wall, 2),
            "worst_block_sqnr_db": s["worst_block_sqnr_db"], "heldout_tokens": e["heldout_tokens"], "heldout_kl": e["kl"],
            "top1_agreement": e["top1_agreement"], "artifact": str(out)}


def decode_speed(artifact: Path, repeats: int = 3) -> dict:
    import numpy as np

    from graphpress.runtime import load

    model = load(artifact)
    prompt = np.arange(3, 11, dtype=np.int64)[None]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, 16)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"prompt_tokens": 8, "new_tokens": 16, "repeats": repeats, "median_s": round(med, 3),
            "tokens_per_s": round(16 / med, 1), "spread_s": [round(min(times), 3), round(max(times), 3)],
            "note": "full recompute: each step runs the whole sequence (no KV cache)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.35b")
    ap.add_argument("--cache", default="/tmp/gp-llm", help="where llm_folder.py's folders are kept (default /tmp/gp-llm)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from common import machine_info

    folder = Path(args.cache) / args.size
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, str(HERE / "llm_folder.py"), "--size", args.size, "--out", str(folder), "--tokenizer"], check=True)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gp-gptq-") as tmp:
        work = Path(tmp)
        for name, extra, calib in CONFIGS:
            rows.append(run_config(folder, work, name, extra, calib, vocab))
            print(f"  {name}: {rows[-1]['wall_s']} s, held-out KL {rows[-1]['heldout_kl']:.4f}", flush=True)
        decode = decode_speed(Path(rows[0]["artifact"]))
        for r in rows:
            shutil.rmtree(r.pop("artifact"), ignore_errors=True)
    print(f"{'config':<11} {'calib':>6} {'wall s':>7} {'worst block dB':>15} {'held-out KL':>12} {'top-1':>6}")
    for r in rows:
        print(f"{r['config']:<11} {r['calibration_tokens']:>6} {r['wall_s']:>7} {r['worst_block_sqnr_db']:>15} {r['heldout_kl']:>12.4f} {r['top1_agreement']:>6.3f}")
    print(f"generate (nearest artifact): {decode['tokens_per_s']} tokens/s ({decode['note']})")
    result = {"benchmark": "gptq_stream", "issue": 18, "model": {"size": args.size, "folder": str(folder)}, "rows": rows,
              "decode": decode, "machine": machine_info()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
