"""Decode speed, memory and quality of decoder artifacts: graphpress (float32, int8, int4 RTN /
GPTQ / AWQ / mixed 4-8, each with and without a k-bit KV cache), ONNX Runtime GenAI's model
builder (float32 and int4) and transformers in torch eager, on stories260K (real weights) and on
a 0.1B and a 1B Llama from config (issue 18).

Each model is one block of ``benchmarks/results/llm_decode.json``, measured in one run (its
variants interleaved); ``--models`` chooses the blocks to (re)measure, the others are kept.

Variants (``--variants`` filters by name):

``torch-fp32``
    transformers in float32 with its own KV cache (a prefill, then one token per call): the
    torch-eager baseline, and the reference of every KL.
``builder-fp32`` / ``builder-int4``
    ``python -m onnxruntime_genai.models.builder -p fp32|int4 -e cpu`` (GroupQueryAttention,
    rotary and skip-layer-norm contrib ops; int4 ``MatMulNBits`` groups of 32, int8 activation
    compute), run by ONNX Runtime GenAI (``og.Generator``).
``gp-<w>`` / ``gp-<w>-kv4``
    ``compress run SOURCE --kv-cache`` with weights ``<w>``, run by graphpress's runtime
    (``LoadedModel.generate``); ``-kv4`` adds ``quantize-kv-cache`` at an average of 4 bits (the
    searched per-layer 2/4/8 mix; ``gp-int4-kv4u``: uniform 4 bits). Weights:
    ``fp32`` (exact), ``int8`` (8-bit groups of 32), ``int4`` (``llm-int4``: RTN groups of 32),
    ``gptq`` (GPTQ with act-order), ``awq`` (``awq-scale`` then RTN), ``mixed`` (4 or 8 bits per
    layer by measured importance, 5 bits on average), ``lorc`` (``int4`` plus rank-16 low-rank
    compensation of each layer's error, ZeroQuant-V2). All int variants: int8 activation compute,
    q/k/v and gate/up fused, 8-bit embeddings.
``gp-<w>-genai``
    the same artifact run by ONNX Runtime GenAI through its ``genai_config.json``.
``gp-int4s`` / ``gp-int4s-genai``
    ``int4`` with symmetric groups: no zero points (``MatMulNBits``' faster path and the builder's
    layout), each group's scale the least-error one of a few (``graphpress.ir.quant``).
``gp-int4-nocache``
    ``llm-int4`` without ``--kv-cache``: each new token re-runs the sequence.
``gp-int4-stream``
    ``compress run SOURCE --stream on --kv-cache``: the same int4 weights compressed block by block
    from the shards (``docs/big-models.md``), the embedding kept in float16 (streaming writes it
    directly), ``min_sqnr_db: 0`` per block instead of the logits' KL budget (a block has no logits).

Every graphpress build runs in a child process: ``compress_s`` and ``compress_peak_mb`` (its
``VmHWM``) are that process's own.

Timing: a ``--prompt``-token prompt, greedy, ``--new`` new tokens; the prefill time and the median
time per step; some variants also at ``--batch`` rows (``-b8``); ``--rounds`` interleaved rounds
on ``--threads`` intra-op threads; medians over rounds with the spread.

Peak memory: the peak resident set of a fresh process that loads the variant and generates
``--new`` tokens from the prompt (``VmHWM``; the interpreter and libraries included), next to
that of a process that only imports the same libraries (``peak_idle_mb``).

KV bytes per token: what one token adds to all caches as the variant stores them (float32,
float16 or codes plus float16 grids), next to float16's.

Quality: ``--heldout`` continuations of ``--heldout-len`` tokens *sampled from the float32
model* (temperature 1, from 4-token random prompts; the calibration sequences of the searches
are sampled the same way with another seed), teacher-forced through each variant's own cache:
the first half prefilled, then one token per step, so a quantized cache is read as when
generating. KL(float32 || variant) and top-1 agreement of the next-token distributions over the
second half.

    python benchmarks/llm_decode.py                     # all three models (the 1B takes a while)
    python benchmarks/llm_decode.py --models 0.1b       # -> benchmarks/results/llm_decode.json
"""

from __future__ import annotations

import argparse
import gc
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
STORIES = ROOT.parent / "shared" / "models" / "stories260k" / "stories260K.bin"

_Q = {"group_size": 32, "activations": "int8-block", "min_sqnr_db": None}
WEIGHTS: dict[str, list[Any]] = {
    "fp32": [],
    "int8": [{"quantize-layerwise": {"bits": [8], "target_bits": 8, **_Q}}],
    "int4": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, **_Q}}],
    # symmetric groups (no zero points: MatMulNBits' faster path, the builder's layout), least-error scale per group
    "int4s": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "symmetric": True, **_Q}}],
    "gptq": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "group_rounding": "gptq", "act_order": True, **_Q}}],
    "awq": [{"awq-scale": {"bits": 4, "group_size": 32}}, {"quantize-layerwise": {"bits": [4], "target_bits": 4, **_Q}}],
    "mixed": [{"quantize-layerwise": {"bits": [4, 8], "target_bits": 5, **_Q}}],
    # ZeroQuant-V2's low-rank compensation of the int4 error, rank 16, where it gains 0.5 dB
    "lorc": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "lorc_rank": 16, **_Q}}],
}


def recipe(weights: str, kv: str | None, kv_bits: dict[str, int] | None = None, max_kl: float | None = 0.25) -> dict[str, Any]:
    """The recipe of ``gp-<weights>[-kv4|-kv4u]``: the weights, fusion and embeddings, then
    KV-cache quantization last (as in ``llm-int4-kv4``: a pass after it would compare rounded
    caches), searched or replaying a search's widths (``kv_bits``)."""
    passes: list[Any] = []
    for p in WEIGHTS[weights]:
        name, opts = next(iter(p.items()))
        passes.append({name: {**opts, "max_kl": max_kl}} if name == "quantize-layerwise" else p)
    if weights != "fp32":
        passes += ["fuse-parallel-linears", {"quantize-embeddings": {"bits": 8, "group_size": 32}}]
    if kv == "kv4":
        passes.append({"quantize-kv-cache": {"cache_bits": kv_bits, "max_kl": None} if kv_bits else {"avg_bits": 4, "max_rows": 4, "max_kl": None}})
    elif kv == "kv4u":
        passes.append({"quantize-kv-cache": {"bits": 4, "max_kl": None}})
    passes.append("eliminate-dead-code")
    return {"name": f"{weights}-{kv or 'kv'}", "passes": passes}


# ---------------------------------------------------------------------------- the models
def hf_folder(model: str, where: Path) -> Path:
    """A Hugging Face folder (with a WordLevel tokenizer) for ``model``: written from config, or
    stories260K's transformers twin."""
    out = where / f"hf-{model}"
    if model == "stories260k":
        import torch

        from graphpress.frontends.llama2c.model import load_llama2c
        from graphpress.frontends.llama2c.to_hf import to_transformers

        sys.path.insert(0, str(HERE))
        from llm_folder import write_tokenizer

        hf = to_transformers(load_llama2c(STORIES))
        hf.to(torch.float32).save_pretrained(out)
        write_tokenizer(out, hf.config.vocab_size, hf.config.max_position_embeddings)
        return out
    subprocess.run([sys.executable, str(HERE / "llm_folder.py"), "--size", model, "--out", str(out), "--tokenizer"], check=True,
                   capture_output=True)
    return out


def sampled(model, vocab: int, rows: int, length: int, seed: int, bos: int | None) -> np.ndarray:
    """``rows`` sequences of ``length`` tokens sampled from ``model`` (temperature 1) after
    4-token random prompts (``bos`` first when the model has one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (rows, 4), generator=g)
    if bos is not None:
        prompt[:, 0] = bos
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=length - 4, min_new_tokens=length - 4, pad_token_id=0)
    return out[:, :length].numpy()


# ---------------------------------------------------------------------------- building
def _mb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 2**20, 1)


_BUILD = r"""
import json, sys, time, torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[5]))
source, out, rec, calib = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]), torch.load(sys.argv[4], weights_only=True)
stream = sys.argv[6] == "stream"
t0 = time.perf_counter()
info = {}
if stream:
    from graphpress.stream import StreamOptions, compress_stream
    res = compress_stream(source, rec, out, calibration=calib, options=StreamOptions(kv_cache=True, calibration_sequences=len(calib),
                                                                                        calibration_seq_len=calib.shape[1]))
    e2e = res.manifest["stream"]["end_to_end"]
    info["stream"] = {"kl_heldout": e2e["kl"], "ort_check_max_abs": e2e["onnxruntime"]["max_abs"],
                      "decode_step_max_abs": e2e["onnxruntime"]["decode_step"]["max_abs"], "units": len(res.units)}
else:
    from graphpress.api import compress
    res = compress(source, out=out, recipe=rec, kv_cache=sys.argv[6] == "kv", bench=False, calibration=calib)
    kvp = next((p for p in res.report.to_dict()["passes"] if p["name"] == "quantize-kv-cache"), None) if res.report else None
    if kvp:
        st = kvp["stats"]
        info["kv_search"] = {k: st.get(k) for k in ("bits", "kl", "uniform_kl", "predicted_kl", "kept", "ratio_vs_fp16", "search_s")}
info["compress_s"] = round(time.perf_counter() - t0, 1)
info["compress_peak_mb"] = next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("BUILD " + json.dumps(info))
"""


def build_gp(source: Path, out: Path, rec: Any, mode: str, calibration: Path, threads: int) -> dict[str, Any]:
    """Compress in a child process (``mode``: ``kv``, ``nocache`` or ``stream``): its wall time
    and peak resident set are the build's own."""
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(source), str(out), json.dumps(rec), str(calibration), str(threads), mode],
                          capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BUILD ")]
    if proc.returncode or not lines:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["the build failed"])[-1])
    return {"folder": str(out), **json.loads(lines[-1][len("BUILD "):]), "model_mb": _mb(out)}


def stream_recipe(max_kl: float | None) -> dict[str, Any]:
    """``gp-int4-stream``: ``int4``'s weights per block (a block has no logits for a KL budget,
    so the floor is the block's output SQNR, 0 dB: report only)."""
    q = {**WEIGHTS["int4"][0]["quantize-layerwise"], "min_sqnr_db": 0}
    return {"name": "int4-stream", "passes": [{"quantize-layerwise": q}, "fuse-parallel-linears", "eliminate-dead-code"]}


def build_builder(folder: Path, out: Path, precision: str, work: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision,
                           "-e", "cpu", "-c", str(work / f"builder-cache-{precision}")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the builder failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return {"folder": str(out), "compress_s": round(time.perf_counter() - t0, 1), "model_mb": _mb(out)}


def genai_model(folder: str, threads: int):
    """An ``og.Model`` whose session uses ``threads`` intra-op threads (an overlay on its
    ``genai_config.json``; the artifact's files stay as written)."""
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


# ---------------------------------------------------------------------------- timing
def time_torch(model, prompt: np.ndarray, new: int) -> tuple[float, list[float]]:
    """transformers in float32 with its own KV cache: a prefill, then one token per call."""
    import torch

    ids = torch.as_tensor(prompt)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        stamps = [time.perf_counter()]
        cache = out.past_key_values
        for _ in range(new - 1):
            out = model(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def time_graphpress(art, prompt: np.ndarray, new: int) -> tuple[float, list[float]]:
    stamps: list[float] = []
    t0 = time.perf_counter()
    art.generate(prompt, new, on_token=lambda step, tok: stamps.append(time.perf_counter()))
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def time_genai(model, prompt: np.ndarray, new: int) -> tuple[float, list[float]]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, do_sample=False, batch_size=prompt.shape[0])
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt.astype(np.int32))
    gen.generate_next_token()
    stamps = [time.perf_counter()]
    while not gen.is_done():
        gen.generate_next_token()
        stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


# ---------------------------------------------------------------------------- peak memory
_PEAK = r"""
import json, sys, numpy as np
kind, folder, threads, prompt_len, new, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
prompt = np.random.default_rng(0).integers(3, vocab, (1, prompt_len))
if kind == "idle-gp":
    import graphpress.runtime, graphpress.runtime.generate
elif kind == "idle-genai":
    import onnxruntime_genai
elif kind == "idle-torch":
    import torch, transformers, graphpress.frontends.huggingface
elif kind == "gp":
    from graphpress.runtime import load
    load(folder, threads=threads).generate(prompt, new)
elif kind == "genai":
    import onnxruntime_genai as og
    config = og.Config(folder)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
elif kind == "gp-nocache":
    from graphpress.runtime import load
    load(folder, threads=threads).generate(prompt, 2)
else:
    import torch
    torch.set_num_threads(threads)
    from graphpress.frontends.huggingface import build_hf_model
    m = build_hf_model(folder).float()
    with torch.no_grad():
        m.generate(torch.as_tensor(prompt), attention_mask=torch.ones(1, prompt_len, dtype=torch.long), max_new_tokens=new,
                   min_new_tokens=new, do_sample=False, pad_token_id=0)
# VmHWM, not ru_maxrss: Linux keeps the parent's ru_maxrss across exec
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak_mb(kind: str, folder: str, threads: int, prompt_len: int, new: int, vocab: int) -> float | None:
    proc = subprocess.run([sys.executable, "-c", _PEAK, kind, folder, str(threads), str(prompt_len), str(new), str(vocab)],
                          capture_output=True, text=True, cwd=str(ROOT))
    if proc.returncode:
        return None
    return round(int(proc.stdout.strip().splitlines()[-1]) / 1024, 1)


# ---------------------------------------------------------------------------- quality
def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_top1(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    p, q = _log_softmax(ref), _log_softmax(test)
    return float((np.exp(p) * (p - q)).sum(-1).mean()), float((ref.argmax(-1) == test.argmax(-1)).mean())


def decode_logits(call: Callable[[dict], dict], specs: list[tuple[str, tuple, str]], seq: np.ndarray, half: int) -> np.ndarray:
    """Logits at positions ``half - 1 .. len - 2`` (predicting ``half .. len - 1``) of ``seq``
    teacher-forced through a KV decoder: ``seq[:half]`` prefilled with empty caches, then one
    token per step, each step's presents fed back as the next past (float or codes alike)."""
    n = len(seq)
    names = [s[0] for s in specs]
    caches = {name: np.zeros((1, int(shape[1]), 0, int(shape[3])), dtype=dtype) for name, shape, dtype in specs
              if name.startswith("past_key_values.")}
    logits = []
    for a, b in [(0, half), *((t, t + 1) for t in range(half, n - 1))]:
        feeds = {"input_ids": seq[None, a:b].astype(np.int64), "attention_mask": np.ones((1, b), np.int64),
                 "position_ids": np.arange(a, b, dtype=np.int64)[None], **caches}
        out = call({k: v for k, v in feeds.items() if k in names})
        logits.append(out["logits"][0, -1])
        caches = {k: out["present." + k.removeprefix("past_key_values.")] for k in caches}
    return np.stack(logits)


def gp_call(art) -> tuple[Callable[[dict], dict], list]:
    ins, outs = [s.name for s in art.inputs], [s.name for s in art.outputs]
    return (lambda feeds: dict(zip(outs, art(*[feeds[n] for n in ins])))), [(s.name, s.shape, s.dtype) for s in art.inputs]


def ort_call(path: Path, threads: int) -> tuple[Callable[[dict], dict], list]:
    sys.path.insert(0, str(HERE))
    from common import ort_session

    sess = ort_session(path, threads)
    outs = [o.name for o in sess.get_outputs()]
    types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}
    return (lambda feeds: dict(zip(outs, sess.run(None, feeds)))), [(i.name, tuple(i.shape), types.get(i.type, "float32"))
                                                                      for i in sess.get_inputs()]


def kv_bytes(specs: list[tuple[str, tuple, str]]) -> int:
    """Bytes one token adds to all caches, from the past inputs' row widths and dtypes."""
    size = {"float32": 4, "float16": 2, "uint8": 1}
    return sum(int(shape[1]) * int(shape[3]) * size[dtype] for name, shape, dtype in specs if name.startswith("past_key_values."))


# ---------------------------------------------------------------------------- one model
def variants_of(model: str) -> list[str]:
    if model == "stories260k":  # GenAI's builder reads no llama2.c file, and its attention takes no heads of 8
        return ["torch-fp32", "gp-fp32", "gp-fp32-kv4", "gp-int8", "gp-int8-kv4", "gp-int4", "gp-int4-kv4", "gp-int4-kv4u", "gp-gptq",
                "gp-gptq-kv4", "gp-awq", "gp-awq-kv4", "gp-mixed", "gp-mixed-kv4", "gp-lorc"]
    if model == "1b":
        return ["torch-fp32", "builder-fp32", "builder-int4", "gp-fp32", "gp-fp32-genai", "gp-int8", "gp-int4", "gp-int4-genai",
                "gp-int4-kv4", "gp-int4-kv4u", "gp-gptq", "gp-awq", "gp-mixed", "gp-int4-stream",
                # the other weights' -kv4 rows replay gp-int4-kv4's widths (--kv-bits-from when measured apart)
                "gp-fp32-kv4", "gp-int8-kv4", "gp-gptq-kv4", "gp-awq-kv4", "gp-mixed-kv4"]
    return ["torch-fp32", "builder-fp32", "builder-int4", "gp-fp32", "gp-fp32-genai", "gp-fp32-kv4", "gp-int8", "gp-int8-kv4", "gp-int4",
            "gp-int4-genai", "gp-int4-kv4", "gp-int4-kv4u", "gp-gptq", "gp-gptq-kv4", "gp-awq", "gp-awq-kv4", "gp-mixed", "gp-mixed-kv4",
            "gp-lorc", "gp-int4-nocache", "gp-int4-stream", "gp-int4s", "gp-int4s-genai"]


BATCHED = ("builder-int4", "gp-int4", "gp-int4-genai", "gp-int4-kv4", "gp-int4s", "gp-int4s-genai")


def measure_model(model: str, args, only: set[str] | None) -> dict[str, Any]:
    import torch

    from graphpress.frontends.huggingface import build_hf_model
    from graphpress.runtime import load

    names = [v for v in variants_of(model) if only is None or v in only]
    block: dict[str, Any] = {"variants": {}, "skipped": {}}
    if model == "stories260k":
        block["skipped"] = {"builder-fp32": "GenAI's builder reads Hugging Face folders, and its GroupQueryAttention takes no head size 8",
                            "builder-int4": "as builder-fp32"}
    with tempfile.TemporaryDirectory(prefix="gp-decode-") as tmp:
        tmp = Path(tmp)
        folder = hf_folder(model, tmp)
        source = STORIES if model == "stories260k" else folder
        cfg = json.loads((folder / "config.json").read_text())
        vocab = cfg["vocab_size"]
        torch_model = build_hf_model(folder).float()
        bos = 1 if model == "stories260k" else None
        length = min(args.heldout_len, cfg.get("max_position_embeddings", 4096))
        # GPTQ needs more calibration rows than a layer has inputs (2048 for the 0.1B's down_proj); the
        # 1B runs no GPTQ, and every calibration row is a forward of the verification there
        rows = args.calib_rows or (4 if model == "1b" else 16)
        calib = torch.as_tensor(sampled(torch_model, vocab, rows, length, seed=1, bos=bos))
        calib_file = tmp / "calibration.pt"
        torch.save(calib, calib_file)
        heldout = sampled(torch_model, vocab, args.heldout, length, seed=2, bos=bos)
        prompt_len = min(args.prompt, cfg.get("max_position_embeddings", 4096) - args.new)
        # stories260K's int4 costs ~2 nats: its budget is lifted to measure it (llm-int4 refuses it)
        max_kl = None if model == "stories260k" else 0.25
        builds: dict[str, dict] = {}
        kv_bits = None
        if args.kv_bits_from:  # the widths a search in another run chose (its gp-int4-kv4 row)
            old = json.loads(args.out.read_text())["models"][args.kv_bits_from]["variants"]["gp-int4-kv4"]
            kv_bits = old["kv_search"]["bits"]
            block["kv_bits_from"] = args.kv_bits_from
        # the KV search runs once, on the int4 model (gp-int4-kv4); the other -kv4 variants replay its widths
        for name in sorted(names, key=lambda n: n != "gp-int4-kv4"):
            t0 = time.perf_counter()
            try:
                if name == "torch-fp32":
                    builds[name] = {"compress_s": 0.0, "model_mb": round(sum(p.numel() * 4 for p in torch_model.parameters()) / 2**20, 1)}
                elif name.startswith("builder-"):
                    builds[name] = build_builder(folder, tmp / name, name.split("-")[1], tmp)
                elif name.endswith("-genai"):
                    builds[name] = dict(builds[name.removesuffix("-genai")])
                elif name == "gp-int4-nocache":
                    builds[name] = build_gp(source, tmp / name, recipe("int4", None, max_kl=max_kl), "nocache", calib_file, args.threads)
                elif name == "gp-int4-stream":
                    builds[name] = build_gp(folder, tmp / name, stream_recipe(max_kl), "stream", calib_file, args.threads)
                else:
                    w, _, kv = name.removeprefix("gp-").partition("-")
                    builds[name] = build_gp(source, tmp / name, recipe(w, kv or None, kv_bits if kv == "kv4" else None, max_kl), "kv",
                                            calib_file, args.threads)
                    if kv == "kv4" and kv_bits is None:
                        kv_bits = builds[name]["kv_search"]["bits"]
            except Exception as err:  # noqa: BLE001 -- a variant that cannot be built is a row that says why
                block["skipped"][name] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(f"  built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        names = [n for n in names if n in builds]

        def kind_of(name: str) -> str:
            return "torch" if name == "torch-fp32" else "genai" if name.startswith("builder-") or name.endswith("-genai") else "gp"

        def open_variant(name: str) -> Any:
            kind = kind_of(name)
            if kind == "torch":
                return torch_model
            if kind == "genai":
                return genai_model(builds[name]["folder"], args.threads)
            return load(builds[name]["folder"], threads=args.threads)

        rng = np.random.default_rng(0)
        prompts = {1: rng.integers(3, vocab, (1, prompt_len)), args.batch: rng.integers(3, vocab, (args.batch, prompt_len))}
        timed = [(n, 1) for n in names] + [(n, args.batch) for n in names if n in BATCHED]
        runs: dict[tuple[str, int], list] = {k: [] for k in timed}
        for r in range(args.rounds):  # interleaved: every variant once per round
            for name, b in timed:
                # one session alive at a time, warmed up, after a pause: no idle session's (or torch's
                # OpenMP) spinning threads share the cores with the one measured
                kind, obj = kind_of(name), open_variant(name)
                fn = {"torch": time_torch, "gp": time_graphpress, "genai": time_genai}[kind]
                fn(obj, prompts[b][:, :8], 2)
                time.sleep(0.5)
                new = args.full_new if name == "gp-int4-nocache" else args.new
                prefill, steps = fn(obj, prompts[b], new)
                runs[name, b].append((prefill, statistics.median(steps)))
                del obj
                gc.collect()
            print(f"  round {r + 1}/{args.rounds} done", flush=True)

        # quality: teacher-forced through each variant's cache, against float32 transformers
        half = length // 2
        with torch.no_grad():
            ref = np.stack([torch_model(torch.as_tensor(s[None]), use_cache=False).logits[0, half - 1:-1].numpy() for s in heldout])
        quality, kvb = {}, {}
        for name in names:
            kind = kind_of(name)
            obj = open_variant(name) if kind == "gp" else None
            if name == "torch-fp32":
                quality[name] = (0.0, 1.0)
                kvb[name] = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 4
                continue
            if name == "gp-int4-nocache":
                quality[name] = kl_top1(ref, np.stack([obj(s[None].astype(np.int64))[0][0, half - 1:-1] for s in heldout]))
                continue
            if name.endswith("-genai"):
                continue
            call, specs = gp_call(obj) if kind == "gp" else ort_call(Path(builds[name]["folder"]) / "model.onnx", args.threads)
            # the builder names its caches' head dim symbolically ("kv_cache_dim")
            specs = [(n, (sh[0], cfg["num_key_value_heads"], sh[2], cfg["hidden_size"] // cfg["num_attention_heads"])
                      if n.startswith("past_key_values.") and not isinstance(sh[3], int) else sh, d) for n, sh, d in specs]
            quality[name] = kl_top1(ref, np.stack([decode_logits(call, specs, s, half) for s in heldout]))
            kvb[name] = kv_bytes(specs)
        for name in names:
            if name.endswith("-genai"):
                quality[name], kvb[name] = quality[name.removesuffix("-genai")], kvb[name.removesuffix("-genai")]

        idle = {k: peak_mb(f"idle-{k}", "", args.threads, prompt_len, args.new, vocab) for k in {kind_of(n) for n in names}}
        block["peak_idle_mb"] = idle
        for name in names:
            kind = kind_of(name)
            builds[name]["peak_idle_mb"] = idle[kind]
            peak_kind = "gp-nocache" if name == "gp-int4-nocache" else kind
            builds[name]["peak_mb"] = peak_mb(peak_kind, str(folder) if kind == "torch" else builds[name]["folder"], args.threads, prompt_len,
                                              args.new, vocab)

    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    fp16_kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
    for (name, b), rs in runs.items():
        ms = [1e3 * s for _, s in rs]
        pre = [1e3 * p for p, _ in rs]
        kl, top1 = quality[name]
        row = {
            "batch": b, "ms_per_step": round(statistics.median(ms), 2), "ms_per_step_spread": [round(min(ms), 2), round(max(ms), 2)],
            "tokens_per_s": round(b * 1e3 / statistics.median(ms), 1),
            "prefill_ms": round(statistics.median(pre), 1), "prefill_ms_spread": [round(min(pre), 1), round(max(pre), 1)],
            "kl": round(kl, 5), "top1_agreement": round(top1, 4),
            **{k: v for k, v in builds[name].items() if k != "folder"},
        }
        if name in kvb:
            row["kv_bytes_per_token"] = kvb[name]
            row["kv_vs_fp16"] = round(kvb[name] / fp16_kv, 3)
        block["variants"][name if b == 1 else f"{name}-b{b}"] = row
    block.update({
        "model": {"name": model, "source": str(STORIES.name) if model == "stories260k" else f"llm_folder.py --size {model}",
                  **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")}},
        "prompt_tokens": prompt_len, "new_tokens": args.new, "rounds": args.rounds, "threads": args.threads,
        "heldout": [args.heldout, length], "calibration": [rows, length], "fp16_kv_bytes_per_token": fp16_kv,
        "targets": targets(block["variants"]),
        "machine": _machine(args.threads),
    })
    return block


def _machine(threads: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from common import machine_info

    return machine_info(threads=threads)


def targets(v: dict[str, dict]) -> dict[str, Any]:
    """The issue's three targets, as ratios of this block's rows (absent rows leave them out)."""
    t: dict[str, Any] = {}
    if "gp-fp32" in v and "torch-fp32" in v:
        t["fp32_speedup_vs_torch_eager"] = round(v["torch-fp32"]["ms_per_step"] / v["gp-fp32"]["ms_per_step"], 2)
        if "gp-fp32-genai" in v:
            t["fp32_speedup_vs_torch_eager_genai_runtime"] = round(v["torch-fp32"]["ms_per_step"] / v["gp-fp32-genai"]["ms_per_step"], 2)
    if "gp-int4" in v and "builder-int4" in v:
        b = v["builder-int4"]
        for name in ("gp-int4", "gp-int4-genai", "gp-int4s", "gp-int4s-genai", "gp-gptq", "gp-awq"):
            if name in v:
                t[f"{name}_tokens_per_s_vs_builder"] = round(v[name]["tokens_per_s"] / b["tokens_per_s"], 3)
                t[f"{name}_size_vs_builder"] = round(v[name]["model_mb"] / b["model_mb"], 3)
                t[f"{name}_kl_minus_builder"] = round(v[name]["kl"] - b["kl"], 5)
        for name in ("gp-int4", "gp-int4-genai", "gp-int4-kv4", "gp-int4s", "gp-int4s-genai"):
            if f"{name}-b8" in v and "builder-int4-b8" in v:
                t[f"{name}_b8_tokens_per_s_vs_builder"] = round(v[f"{name}-b8"]["tokens_per_s"] / v["builder-int4-b8"]["tokens_per_s"], 3)
    if "gp-lorc" in v and "gp-int4" in v:
        t["lorc_vs_int4"] = {"kl": [v["gp-int4"]["kl"], v["gp-lorc"]["kl"]], "model_mb": [v["gp-int4"]["model_mb"], v["gp-lorc"]["model_mb"]],
                             "ms_per_step": [v["gp-int4"]["ms_per_step"], v["gp-lorc"]["ms_per_step"]]}
    for w in ("fp32", "int8", "int4", "gptq", "awq", "mixed"):
        base, kv = v.get(f"gp-{w}"), v.get(f"gp-{w}-kv4")
        if base and kv:
            t[f"kv4_{w}"] = {"kv_vs_fp16": kv["kv_vs_fp16"], "kl_increase": round(kv["kl"] - base["kl"], 5),
                             "ms_per_step_ratio": round(kv["ms_per_step"] / base["ms_per_step"], 3)}
    if "gp-int4-stream" in v and "gp-int4" in v:
        g, st = v["gp-int4"], v["gp-int4-stream"]
        t["stream_vs_whole_graph_int4"] = {"compress_peak_mb": [g.get("compress_peak_mb"), st.get("compress_peak_mb")],
                                           "compress_s": [g["compress_s"], st["compress_s"]], "ms_per_step": [g["ms_per_step"], st["ms_per_step"]],
                                           "kl": [g["kl"], st["kl"]], "model_mb": [g["model_mb"], st["model_mb"]]}
    if "gp-int4-kv4" in v and "gp-int4-kv4u" in v:
        s, u = v["gp-int4-kv4"], v["gp-int4-kv4u"]
        t["kv4_searched_vs_uniform"] = {"kl_searched": s["kl"], "kl_uniform": u["kl"], "kv_bytes_searched": s["kv_bytes_per_token"],
                                        "kv_bytes_uniform": u["kv_bytes_per_token"], "searched_wins": s["kl"] < u["kl"]}
    return t


def _print(model: str, block: dict[str, Any]) -> None:
    print(f"\n{model}: prompt {block['prompt_tokens']}, {block['new_tokens']} new tokens, {block['threads']} threads, "
          f"{block['rounds']} interleaved rounds; KL over {block['heldout'][0]} sampled continuations of {block['heldout'][1]}")
    print(f"{'variant':20s}{'ms/step':>9s}{'spread':>15s}{'tok/s':>8s}{'prefill':>9s}{'KL':>9s}{'top-1':>7s}{'MB':>8s}{'peak MB':>9s}"
          f"{'KV B/tok':>9s}{'vs fp16':>8s}")
    for name, r in block["variants"].items():
        spread = f"{r['ms_per_step_spread'][0]}-{r['ms_per_step_spread'][1]}"
        print(f"{name:20s}{r['ms_per_step']:9.2f}{spread:>15s}{r['tokens_per_s']:8.1f}{r['prefill_ms']:9.1f}{r['kl']:9.4f}"
              f"{r['top1_agreement']:7.3f}{r['model_mb']:8.1f}{str(r.get('peak_mb')):>9s}{str(r.get('kv_bytes_per_token', '')):>9s}"
              f"{str(r.get('kv_vs_fp16', '')):>8s}")
    for name, why in block["skipped"].items():
        print(f"{name:20s}skipped: {why}")
    print("targets:", json.dumps(block["targets"], indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260k,0.1b,1b")
    ap.add_argument("--variants", help="comma-separated variant names (default: all of each model)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--full-new", type=int, default=8, help="new tokens of the no-cache variant (a full forward each)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--heldout-len", type=int, default=128)
    ap.add_argument("--calib-rows", type=int, help="calibration sequences (default 16; 4 for the 1B)")
    ap.add_argument("--out", type=Path, default=RESULT)
    ap.add_argument("--kv-bits-from", help="replay the searched KV widths of this block of the JSON (no search: for -kv4 rows measured apart)")
    ap.add_argument("--block", help="store the (single) model's block under this name instead of the model's (keeps the model's own block)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    only = set(args.variants.split(",")) if args.variants else None
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    if result.get("benchmark") != "llm_decode" or "models" not in result:
        result = {"benchmark": "llm_decode", "models": {}}
    for model in args.models.split(","):
        if model == "stories260k" and not STORIES.exists():
            print(f"stories260k: skipped, {STORIES} is absent")
            continue
        print(f"{model}: building and measuring ...", flush=True)
        block = measure_model(model, args, only)
        result["models"][args.block or model] = block
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        _print(model, block)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
