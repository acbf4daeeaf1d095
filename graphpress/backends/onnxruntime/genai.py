"""``genai_config.json`` for a KV-cache decoder artifact, so that ONNX Runtime GenAI runs it.

A graph captured with a KV cache (:mod:`graphpress.frontends.hf_kv`) already has GenAI's input
and output names (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.%d.key`` ... -> ``logits``, ``present.%d.key`` ...); what GenAI also needs is
the model's sizes, special tokens and context length, which the frontend recorded in
``graph.source["kv_cache"]``. Written beside ``model.onnx``, with the source folder's tokenizer
files copied in when it has them (GenAI's tokenizer, and ``compress generate --prompt``, read them
from the artifact).

Caches: the graph's attention is one ``GroupQueryAttention`` per layer
(:mod:`graphpress.lowering.onnx.attention`), which appends the step's keys and values to the past
it is given, or, when the past is a buffer of the full context length, writes them into it in
place. The config sets ``past_present_share_buffer: true``, so GenAI allocates each layer's cache
once at the context length and binds the present to it. On a 0.1B Llama that made a decode step
3.4 ms instead of 4.0 ms, with the same tokens. graphpress's own runtime
(:mod:`graphpress.runtime.generate`) feeds the presents back instead, and gets the same tokens
(``tests/runtime/test_generate.py``). A graph with attention as plain ops (``attention="eager"``)
can only append, so it gets ``false``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graphpress.ir.graph import Graph
from graphpress.lowering.onnx.kv_cache import storage_of

GENAI_CONFIG = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# GenAI's "type" for the families the KV frontend captures (its decoder-only model types).
_GENAI_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2"}


def genai_config(graph: Graph, model_file: str) -> dict[str, Any] | None:
    """The GenAI config of a KV-cache decoder graph, or None for any other graph and for caches
    stored as codes (``quantize-kv-cache``: GenAI knows only float caches)."""
    facts = graph.source.get("kv_cache")
    if not facts or "hidden_size" not in facts or storage_of(graph).bits:
        return None
    return genai_config_for(facts, model_file)


def genai_config_for(facts: dict[str, Any], model_file: str) -> dict[str, Any]:
    """The GenAI config of a decoder with float caches described by ``facts`` (the
    ``source["kv_cache"]`` of a KV-cache capture or of a streamed KV artifact)."""
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    share = facts.get("attention", "gqa") == "gqa"
    eos = facts.get("eos_token_id")
    pad = facts.get("pad_token_id")
    context = int(facts.get("context_length") or 2048)
    return {
        "model": {
            "bos_token_id": facts.get("bos_token_id") if facts.get("bos_token_id") is not None else 1,
            "eos_token_id": eos if eos is not None else 2,
            "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "graphpress", "provider_options": []},
                "filename": model_file,
                "head_size": int(facts["head_dim"]),
                "hidden_size": int(facts["hidden_size"]),
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": int(facts["num_attention_heads"]),
                "num_hidden_layers": int(facts["layers"]),
                "num_key_value_heads": int(facts["kv_heads"]),
            },
            "type": _GENAI_TYPES.get(facts.get("model_type", ""), "llama"),
            "vocab_size": int(facts["vocab_size"]),
        },
        "search": {
            "do_sample": False, "early_stopping": True, "max_length": context, "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": share, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
        },
    }


def write_genai_files(graph: Graph, folder: Path, model_file: str) -> list[str]:
    """Write ``genai_config.json`` and copy the source's tokenizer files for a KV-cache decoder
    graph (the tokenizer alone when its caches are stored as codes, which GenAI does not read);
    returns the names written (none for any other graph)."""
    facts = graph.source.get("kv_cache")
    if not facts:
        return []
    config = genai_config(graph, model_file)
    written = []
    if config is not None:
        (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        written.append(GENAI_CONFIG)
    src = graph.source.get("path")
    if src and Path(src).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, folder / name)
                written.append(name)
    return written


__all__ = ["GENAI_CONFIG", "TOKENIZER_FILES", "genai_config", "genai_config_for", "write_genai_files"]
