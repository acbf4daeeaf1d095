"""Write a Llama-shaped Hugging Face folder with random bf16 weights, tensor by tensor (issue 17).

The streaming benchmarks need decoder checkpoints from 0.1B to an 8B shape on a machine whose
memory would not hold the 8B model, so the folder is written without building the model: the
tensor list comes from the config (the names and shapes ``LlamaForCausalLM`` uses), tensors are
assigned to shards of about ``--shard-gb`` GB, each shard's safetensors header is written first
(all byte ranges are known from the shapes), then every tensor is generated in row chunks of at
most 8M values and written straight after it. Peak RSS is the interpreter and torch plus one
chunk, whatever the size.

Values: each tensor has its own generator, seeded by ``--seed`` and the tensor's name (the same
folder whatever the order or sharding); projections and embeddings are N(0, 0.02) like
``transformers``' init, norms are ones.

``--tokenizer`` also writes a ``tokenizers`` WordLevel tokenizer with one token per id
(``tokenizer.json``, ``tokenizer_config.json``): ONNX Runtime GenAI's model builder wants one.
``--read FOLDER`` instead walks an existing folder unit by unit through
:class:`graphpress.frontends.shards.ShardedCheckpoint`, once with owned copies and once with
safetensors' mapped views (each in a fresh process), and reports time and RSS.
``--check`` loads the folder with ``AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16)``
and runs a forward (only sensible for the small sizes).

    python benchmarks/llm_folder.py --size 0.1b --out /tmp/llama-0.1b --tokenizer --check

Sizes (untied head, GQA, vocab 32000 except the 8B shape's 128256)::

    tiny   hidden 64,   2 layers,  MLP 128,   4 heads / 2 KV   (tests)
    0.1b   hidden 768,  12 layers, MLP 2048,  12 heads / 4 KV  ~0.12B
    0.35b  hidden 1024, 24 layers, MLP 2816,  16 heads / 4 KV  ~0.34B
    1b     hidden 2048, 16 layers, MLP 8192,  32 heads / 8 KV  ~1.10B
    8b     hidden 4096, 32 layers, MLP 14336, 32 heads / 8 KV  ~8.03B (Llama-3-8B's shape, ~16 GB)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "0.1b": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
    "0.35b": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}

# Values generated per chunk: 8M fp32 values = 32 MB plus its 16 MB bf16 copy.
CHUNK_VALUES = 8 * 1024 * 1024
BOS, EOS, UNK = 1, 2, 0


def llama_config(hidden_size: int, num_hidden_layers: int, intermediate_size: int, num_attention_heads: int,
                 num_key_value_heads: int, vocab_size: int, *, max_position_embeddings: int = 4096,
                 rope_theta: float = 500000.0) -> dict[str, Any]:
    """A complete ``config.json`` for ``LlamaForCausalLM`` (untied head, no biases, bf16)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        # transformers >= 5 reads rope_parameters; older readers (and some builders) rope_theta
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "use_cache": True,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }


def tensor_specs(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every tensor ``LlamaForCausalLM`` saves for ``config``, in its order."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        specs.append(("lm_head.weight", (v, h)))
    return specs


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split ``specs`` in order into shards of at most ``shard_bytes`` (bf16); a bigger tensor gets its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        size = math.prod(shape) * 2
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def _fill(fh, name: str, shape: tuple[int, ...], seed: int) -> None:
    """Generate ``name`` chunk by chunk and write its bf16 bytes at the file's position."""
    if name.endswith("norm.weight"):
        fh.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.int16).numpy())
        return
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = torch.randn(n, cols, generator=gen).mul_(0.02).to(torch.bfloat16)
        fh.write(chunk.view(torch.int16).numpy())


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-aligned
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in tensors:
            _fill(fh, name, shape, seed)
    return offset


def write_tokenizer(folder: Path, vocab_size: int, model_max_length: int = 4096) -> None:
    """A WordLevel tokenizer with one token per id (``<unk>``, ``<s>``, ``</s>``, ``w3`` ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
    }, indent=2))


def write_folder(folder: str | Path, config: dict[str, Any], *, shard_bytes: int = 2 * 10**9, seed: int = 0,
                 tokenizer: bool = False) -> dict[str, Any]:
    """Write ``config``'s Llama as a sharded bf16 Hugging Face folder without building it.

    Parameters
    ----------
    folder : str or Path
        Created if absent; existing weight files of the same names are overwritten.
    config : dict
        A ``config.json`` dict (:func:`llama_config`).
    shard_bytes : int
        Target shard size; the index is written even for one shard.
    seed : int
        Values depend on it and on each tensor's name only.
    tokenizer : bool
        Also write a WordLevel tokenizer of the config's vocabulary size.

    Returns
    -------
    dict
        ``params``, ``bytes``, ``shards``, ``wall_s`` and ``peak_rss_mb`` (the process's, so far).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    specs = tensor_specs(config)
    plan = plan_shards(specs, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, tensors in enumerate(plan, 1):
        name = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        total += _write_shard(folder / name, tensors, seed)
        weight_map.update({t: name for t, _ in tensors})
    params = sum(math.prod(s) for _, s in specs)
    index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS, "eos_token_id": EOS}, indent=2))
    if tokenizer:
        write_tokenizer(folder, config["vocab_size"], config.get("max_position_embeddings", 4096))
    return {
        "params": params,
        "bytes": total,
        "shards": len(plan),
        "wall_s": round(time.perf_counter() - start, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def check_with_transformers(folder: str | Path) -> dict[str, Any]:
    """Load the folder with ``transformers`` in bf16 and run one forward; returns what it saw."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    out = {"dtype": str(next(model.parameters()).dtype), "logits_shape": list(logits.shape),
           "finite": bool(torch.isfinite(logits).all())}
    if (Path(folder) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        out["tokenizer_ids"] = tok("w5 w6 w7")["input_ids"]
    return out


def _rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def measure_read(folder: str | Path, mode: str) -> dict[str, Any]:
    """Walk the folder unit by unit (embed, blocks, norm, head) through ``ShardedCheckpoint``.

    ``mode`` is ``copy`` (``get``: owned tensors) or ``mmap`` (``get(mmap=True)``: views of
    safetensors' mapping). Each unit is read, every byte touched (an int16 sum), then dropped.
    Reports the time to open (headers only), the walk's time and throughput, and RSS above the
    opened checkpoint: the peak over the walk, what is left after it, and (mmap) after ``release()``.
    """
    from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout

    import transformers  # noqa: F401 -- imported first so open_s times the headers, not this import

    t0 = time.perf_counter()
    ck = ShardedCheckpoint(folder)
    opened = time.perf_counter() - t0
    lay = decoder_layout(ck)
    laid_out = time.perf_counter() - t0 - opened
    base = _rss_kb()
    peak, get_s, start = 0, 0.0, time.perf_counter()
    for _, names in lay.units():
        t1 = time.perf_counter()
        held = [ck.get(n, mmap=mode == "mmap") for n in names]
        get_s += time.perf_counter() - t1
        for tensor in held:  # touch every byte: a mapped view is read here, not in get()
            tensor.reshape(-1).view(torch.uint8).max()
        peak = max(peak, _rss_kb() - base)
        del held, tensor
    walk = time.perf_counter() - start
    out = {
        "mode": mode,
        "open_s": round(opened, 3),
        "layout_s": round(laid_out, 3),
        "get_s": round(get_s, 2),
        "walk_s": round(walk, 2),
        "walk_gb_per_s": round(ck.total_bytes() / walk / 1e9, 2),
        "total_mb": round(ck.total_bytes() / 2**20, 1),
        "largest_block_mb_stored": round(lay.largest_block_bytes(None) / 2**20, 1),
        "largest_block_mb_fp32": round(lay.largest_block_bytes() / 2**20, 1),
        "largest_unit_mb_stored": round(max(lay.unit_bytes(u) for u, _ in lay.units()) / 2**20, 1),
        "peak_rss_over_open_mb": round(peak / 1024, 1),
        "rss_after_walk_mb": round((_rss_kb() - base) / 1024, 1),
    }
    if mode == "mmap":
        ck.release()
        out["rss_after_release_mb"] = round((_rss_kb() - base) / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read", metavar="FOLDER", help="instead of writing: walk FOLDER unit by unit with ShardedCheckpoint "
                        "(copy and mmap, each in a fresh process) and report time and RSS")
    parser.add_argument("--mode", choices=["copy", "mmap"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES))
    parser.add_argument("--out", help="folder to write")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="target shard size in GB (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", action="store_true", help="also write a WordLevel tokenizer (ONNX Runtime GenAI's builder needs one)")
    parser.add_argument("--check", action="store_true", help="load with transformers and run a forward (small sizes only)")
    args = parser.parse_args(argv)
    if args.read:
        if args.mode:
            print(json.dumps(measure_read(args.read, args.mode)))
            return 0
        import subprocess

        results = []
        for mode in ("copy", "mmap"):
            run = subprocess.run([sys.executable, __file__, "--read", args.read, "--mode", mode], capture_output=True, text=True)
            if run.returncode:
                print(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"--read {mode} failed", file=sys.stderr)
                return 1
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
        print(json.dumps(results, indent=2))
        return 0
    if not args.size or not args.out:
        parser.error("--size and --out are required (or --read FOLDER)")
    if args.shard_gb <= 0:
        parser.error(f"--shard-gb must be positive, got {args.shard_gb}")
    config = llama_config(**SIZES[args.size], max_position_embeddings=128 if args.size == "tiny" else 4096)
    stats = write_folder(args.out, config, shard_bytes=int(args.shard_gb * 1e9), seed=args.seed, tokenizer=args.tokenizer)
    stats = {"size": args.size, "folder": str(args.out), **stats}
    if args.check:
        stats["transformers_check"] = check_with_transformers(args.out)
    print(json.dumps(stats, indent=2))
    print(f"{args.size}: {stats['params'] / 1e9:.3f}B parameters, {stats['bytes'] / 1e9:.2f} GB in {stats['shards']} shard(s), "
          f"{stats['wall_s']} s, peak RSS {stats['peak_rss_mb']} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
