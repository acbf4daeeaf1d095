"""Decode speed and quality of int4 decoder artifacts: graphpress with a KV cache, graphpress
without one, and ONNX Runtime GenAI's model builder, on one Llama from config (issue 18).

One folder (``benchmarks/llm_folder.py``'s shapes, random N(0, 0.02) weights, a WordLevel
tokenizer) is compressed three ways, all int4 with groups of 32 and int8 activation compute
(``MatMulNBits`` ``accuracy_level=4``, what the builder writes for CPU):

``gp-kv``
    ``compress run FOLDER --kv-cache -r llm-int4`` (``quantize-layerwise`` at 4 bits, then
    ``fuse-parallel-linears``; attention as one ``GroupQueryAttention`` per layer): one graph for
    prefill and decode, ``past_key_values.*`` in, ``present.*`` out; run by graphpress's runtime
    (``LoadedModel.generate``: an ONNX Runtime session, caches fed back by numpy).
``gp-kv-genai``
    the same artifact run by ONNX Runtime GenAI (``og.Generator``) through its
    ``genai_config.json``.
``gp-full``
    the same recipe without ``--kv-cache``: ``input_ids -> logits``, each new token re-runs the
    whole sequence (what graphpress had before).
``builder-genai``
    ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` (fused GroupQueryAttention,
    rotary and skip-layer-norm contrib ops), run by ``og.Generator``.
``gp-fp32-kv`` / ``gp-fp32-kv-genai``
    ``compress run FOLDER --kv-cache`` with the exact default recipe (float32), in graphpress's
    runtime and in GenAI's.
``torch-fp32-kv``
    transformers itself in float32 with its own KV cache (a prefill, then one token per call):
    the torch-eager baseline of the fp32 rows, and the KL reference.

Timing: batch 1, a ``--prompt``-token prompt (random ids), greedy, ``--new`` new tokens; per
variant the prefill time and the median time per decoded token (per step); the int4 KV variants
and the builder also at ``--batch`` rows (``-b8``: tokens/s counts every row); variants interleaved in
``--rounds`` rounds (A B C D, A B C D ...) on ``--threads`` intra-op threads each, medians over
rounds with the spread.

Quality: KL(float || artifact) and top-1 agreement of the next-token distributions on
``--heldout`` random sequences of ``--heldout-len`` tokens, teacher-forced (one prefill each),
against transformers in float32; the builder's model is run by plain ONNX Runtime with empty
caches for this (its outputs are its GenAI logits).

    python benchmarks/llm_decode.py --size 0.1b      # -> benchmarks/results/llm_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "llm_decode.json"
# The built-in recipe (int4 groups of 32, int8 activation compute, q/k/v and gate/up fused).
RECIPE = "llm-int4"


def _folder(size: str, where: Path) -> Path:
    out = where / f"llama-{size}"
    subprocess.run([sys.executable, str(HERE / "llm_folder.py"), "--size", size, "--out", str(out), "--tokenizer"], check=True,
                   capture_output=True)
    return out


def _compress(folder: Path, out: Path, kv: bool, recipe: Any = RECIPE) -> dict[str, Any]:
    from graphpress.api import compress

    t0 = time.perf_counter()
    res = compress(folder, out=out, recipe=recipe, kv_cache=kv, bench=False)
    return {"folder": str(res.folder), "compress_s": round(time.perf_counter() - t0, 1),
            "model_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx")) / 2**20, 1)}


def _builder(folder: Path, out: Path, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", "int4", "-e", "cpu",
                    "-c", str(work / "builder-cache")], check=True, capture_output=True)
    return {"folder": str(out), "compress_s": round(time.perf_counter() - t0, 1),
            "model_mb": round(sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx")) / 2**20, 1)}


def _genai_model(folder: str, threads: int):
    """An ``og.Model`` whose session uses ``threads`` intra-op threads (an overlay on its
    ``genai_config.json``; the artifact's files stay as written, their hashes hold)."""
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


# ---------------------------------------------------------------------------- timing
def _time_torch(model, prompt: np.ndarray, new: int) -> tuple[float, list[float], list[int]]:
    """transformers in float32 with its own KV cache: a prefill, then one token per call."""
    import torch

    ids = torch.as_tensor(prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        stamps = [time.perf_counter()]
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        for _ in range(new - 1):
            kwargs = {"cache" if "cache" in out else "past_key_values": cache}
            out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **kwargs)
            cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            tokens.append(int(out.logits[0, -1].argmax()))
            stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], tokens


def _time_graphpress(art, prompt: np.ndarray, new: int) -> tuple[float, list[float], list[int]]:
    """Prefill seconds, per-token seconds and the tokens, through ``LoadedModel.generate``."""
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = art.generate(prompt, new, on_token=lambda step, tok: stamps.append(time.perf_counter()))
    prefill = stamps[0] - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return prefill, steps, out[0, prompt.shape[1]:].tolist()


def _time_genai(model, prompt: np.ndarray, new: int) -> tuple[float, list[float], list[int]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False, batch_size=prompt.shape[0])
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))  # runs the prompt and picks the first new token
    gen.generate_next_token()
    stamps = [time.perf_counter()]
    while not gen.is_done():
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    seq = [int(t) for t in gen.get_sequence(0)]
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])], seq[prompt.shape[1]:]


# ---------------------------------------------------------------------------- quality
def _reference_logits(folder: Path, seqs: np.ndarray) -> np.ndarray:
    import torch

    from graphpress.frontends.huggingface import build_hf_model

    model = build_hf_model(folder).float()
    with torch.no_grad():
        return np.stack([model(torch.as_tensor(s[None]), use_cache=False).logits[0].numpy() for s in seqs])


def _kv_prefill_logits(session_run: Callable, names: list[str], seqs: np.ndarray, kv_heads: int, head_dim: int, layers: int,
                       positions: bool) -> np.ndarray:
    outs = []
    for s in seqs:
        n = len(s)
        feeds = {"input_ids": s[None].astype(np.int64), "attention_mask": np.ones((1, n), np.int64)}
        if positions:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for i in range(layers):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
        outs.append(session_run({k: v for k, v in feeds.items() if k in names})[0][0])
    return np.stack(outs)


def _kl_top1(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p, q = log_softmax(ref), log_softmax(test)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == test.argmax(-1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="0.1b")
    ap.add_argument("--folder", type=Path, help="use this Hugging Face folder (with a tokenizer) instead of writing one")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--full-new", type=int, default=8, help="new tokens of the no-cache variant (a full forward each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="the batched rows' batch size (ms per step; tokens/s counts every row)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--heldout-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    from common import machine_info, ort_session

    from graphpress.runtime import load

    with tempfile.TemporaryDirectory(prefix="gp-decode-") as tmp:
        tmp = Path(tmp)
        folder = args.folder or _folder(args.size, tmp)
        cfg = json.loads((folder / "config.json").read_text())
        builds = {
            "gp-kv": _compress(folder, tmp / "gp-kv", kv=True),
            "gp-full": _compress(folder, tmp / "gp-full", kv=False),
            "builder-genai": _builder(folder, tmp / "builder", tmp),
        }
        builds["gp-kv-genai"] = dict(builds["gp-kv"])
        builds["gp-fp32-kv"] = _compress(folder, tmp / "gp-fp32", kv=True, recipe="default")
        builds["gp-fp32-kv-genai"] = dict(builds["gp-fp32-kv"])
        from graphpress.frontends.huggingface import build_hf_model

        torch_model = build_hf_model(folder).float()
        builds["torch-fp32-kv"] = {"compress_s": 0.0, "model_mb": round(sum(p.numel() * 4 for p in torch_model.parameters()) / 2**20, 1)}
        arts = {name: load(builds[name]["folder"], threads=args.threads) for name in ("gp-kv", "gp-full", "gp-fp32-kv")}
        genai = {"gp-kv-genai": _genai_model(builds["gp-kv"]["folder"], args.threads),
                 "builder-genai": _genai_model(builds["builder-genai"]["folder"], args.threads),
                 "gp-fp32-kv-genai": _genai_model(builds["gp-fp32-kv"]["folder"], args.threads)}

        rng = np.random.default_rng(0)
        prompt = rng.integers(3, cfg["vocab_size"], (1, args.prompt))
        prompts = {1: prompt, args.batch: rng.integers(3, cfg["vocab_size"], (args.batch, args.prompt))}
        batched = ("gp-kv", "gp-kv-genai", "builder-genai")  # also timed at --batch rows (the name gets "-b8")
        runs: dict[str, list[dict]] = {k: [] for k in ("gp-kv", "gp-kv-genai", "builder-genai", "gp-full", "gp-fp32-kv", "gp-fp32-kv-genai",
                                                       "torch-fp32-kv", *(f"{b}-b{args.batch}" for b in batched))}
        for _ in range(args.rounds):  # interleaved: every variant once per round
            for name in runs:
                base, _, tail = name.partition(f"-b{args.batch}")
                rows_in = args.batch if name != base and not tail else 1
                x = prompts[rows_in]
                if name == "torch-fp32-kv":
                    prefill, steps, tokens = _time_torch(torch_model, x, args.new)
                elif base in arts:
                    new = args.full_new if base == "gp-full" else args.new
                    prefill, steps, tokens = _time_graphpress(arts[base], x, new)
                else:
                    prefill, steps, tokens = _time_genai(genai[base], x, args.new)
                runs[name].append({"prefill_s": prefill, "ms_per_token": 1e3 * statistics.median(steps), "tokens": tokens, "batch": rows_in})

        # the same tokens from graphpress's runtime and GenAI on the one artifact
        same_tokens = runs["gp-kv"][0]["tokens"] == runs["gp-kv-genai"][0]["tokens"]

        seqs = rng.integers(3, cfg["vocab_size"], (args.heldout, args.heldout_len))
        ref = _reference_logits(folder, seqs)
        layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        quality = {}
        kv_art = arts["gp-kv"]
        quality["gp-kv"] = _kl_top1(ref, _kv_prefill_logits(lambda f: kv_art(*[f.get(s.name) for s in kv_art.inputs]),
                                                            [s.name for s in kv_art.inputs], seqs, kv_heads, head_dim, layers, True))
        quality["gp-full"] = _kl_top1(ref, np.stack([arts["gp-full"](s[None].astype(np.int64))[0][0] for s in seqs]))
        sess = ort_session(Path(builds["builder-genai"]["folder"]) / "model.onnx", args.threads)
        names = [i.name for i in sess.get_inputs()]
        quality["builder-genai"] = _kl_top1(ref, _kv_prefill_logits(lambda f: sess.run(["logits"], f), names, seqs, kv_heads, head_dim,
                                                                    layers, "position_ids" in names))
        quality["gp-kv-genai"] = quality["gp-kv"]
        fp_art = arts["gp-fp32-kv"]
        quality["gp-fp32-kv"] = _kl_top1(ref, _kv_prefill_logits(lambda f: fp_art(*[f.get(s.name) for s in fp_art.inputs]),
                                                                 [s.name for s in fp_art.inputs], seqs, kv_heads, head_dim, layers, True))
        quality["gp-fp32-kv-genai"] = quality["gp-fp32-kv"]
        quality["torch-fp32-kv"] = (0.0, 1.0)  # the reference itself

    rows = {}
    for name, rs in runs.items():
        ms = [r["ms_per_token"] for r in rs]
        pre = [r["prefill_s"] for r in rs]
        base = name.partition(f"-b{args.batch}")[0]
        batch = rs[0]["batch"]
        kl, top1 = quality[base]
        rows[name] = {
            "batch": batch,
            "ms_per_token": round(statistics.median(ms), 2), "ms_per_token_spread": [round(min(ms), 2), round(max(ms), 2)],
            "tokens_per_s": round(batch * 1e3 / statistics.median(ms), 1),
            "prefill_ms": round(1e3 * statistics.median(pre), 1), "prefill_ms_spread": [round(1e3 * min(pre), 1), round(1e3 * max(pre), 1)],
            "kl": round(kl, 5), "top1_agreement": round(top1, 4),
            **{k: v for k, v in builds[base].items() if k != "folder"},
        }
    for name, row in rows.items():
        ref = rows[f"builder-genai-b{args.batch}" if row["batch"] != 1 else "builder-genai"]["ms_per_token"]
        row["time_per_token_vs_builder"] = round(row["ms_per_token"] / ref, 2)
    eager = rows["torch-fp32-kv"]["ms_per_token"]
    for name in ("gp-fp32-kv", "gp-fp32-kv-genai"):
        rows[name]["speedup_vs_torch_fp32_kv"] = round(eager / rows[name]["ms_per_token"], 2)
    result = {
        "benchmark": "llm_decode",
        "model": {"size": args.size if not args.folder else str(args.folder), **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers",
                                                                                               "num_attention_heads", "num_key_value_heads",
                                                                                               "vocab_size")}},
        "recipe": RECIPE, "prompt_tokens": args.prompt, "new_tokens": args.new, "full_new_tokens": args.full_new,
        "rounds": args.rounds, "heldout": [args.heldout, args.heldout_len],
        "same_tokens_graphpress_and_genai_runtime": same_tokens,
        "variants": rows,
        "machine": machine_info(threads=args.threads),
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"Llama {args.size}: prompt {args.prompt}, {args.new} new tokens, batch 1, {args.threads} threads, {args.rounds} interleaved rounds")
    print("ms/token is per step: at batch > 1 a step makes a token for every row")
    print(f"{'variant':16s}{'ms/token':>10s}{'spread':>16s}{'tok/s':>8s}{'prefill ms':>12s}{'vs builder':>12s}{'KL':>10s}{'top-1':>8s}{'MB':>8s}")
    for name, r in rows.items():
        spread = f"{r['ms_per_token_spread'][0]}-{r['ms_per_token_spread'][1]}"
        print(f"{name:16s}{r['ms_per_token']:10.2f}{spread:>16s}{r['tokens_per_s']:8.1f}{r['prefill_ms']:12.1f}"
              f"{r['time_per_token_vs_builder']:12.2f}{r['kl']:10.4f}{r['top1_agreement']:8.3f}{r['model_mb']:8.1f}")
    print(f"fp32 with a KV cache, graphpress vs torch eager: {rows['gp-fp32-kv']['speedup_vs_torch_fp32_kv']}x (graphpress runtime), "
          f"{rows['gp-fp32-kv-genai']['speedup_vs_torch_fp32_kv']}x (GenAI runtime)")
    print(f"same tokens from graphpress's runtime and GenAI on the KV artifact: {same_tokens}; wrote {args.out}")


if __name__ == "__main__":
    main()
