"""Tiny Hugging Face ``transformers`` models built from a config (no download).

``tiny_bert()``, ``tiny_gpt2()`` and ``tiny_llama()`` give randomly initialised, seeded
models (hidden 64, 2 layers, 4 heads, vocab 1000, intermediate 128) wrapped in
:class:`HFLogits`, which turns the ``ModelOutput`` into a plain logits tensor so the
module exports with :func:`torch.export.export` (dynamic batch included).

:class:`HFLogits` and :func:`wrap_hf_model` (the same wrapper for any loaded model) live in
the Hugging Face folder frontend, :mod:`graphpress.frontends.huggingface`, and are re-exported here. :func:`save_tiny_hf` writes a model folder (``config.json`` +
``model.safetensors``) for that frontend's tests.

Attention implementation: with transformers 5.23 and torch 2.13 both ``"sdpa"`` and
``"eager"`` export with a dynamic batch (and a dynamic sequence length, with or without
an attention mask) for all three architectures. The tiny models use ``"eager"`` so the
exported graph holds plain matmul/softmax ops rather than one fused
``scaled_dot_product_attention`` node, which compression passes and backends handle
more uniformly; outputs are the same up to float rounding.

``transformers`` is an optional dependency (``graphpress[hf]``): it is imported only
when a function here needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

# The wrapper is frontend code (the Hugging Face folder frontend captures through it); the zoo
# sits above the frontends and re-exports it for its tiny models and for existing callers.
from graphpress.frontends.huggingface import HFLogits, wrap_hf_model

__all__ = [
    "HFLogits",
    "wrap_hf_model",
    "tiny_bert",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_hf_config",
    "save_tiny_hf",
    "TINY_HF_MODELS",
]

#: Sizes shared by the three tiny models.
HIDDEN, LAYERS, HEADS, VOCAB, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 1000, 128, 128


def tiny_hf_config(name: str) -> Any:
    """The ``transformers`` config of a tiny model.

    Parameters
    ----------
    name : str
        ``"tiny-bert"``, ``"tiny-gpt2"`` or ``"tiny-llama"`` (the ``tiny-`` prefix is optional).

    Returns
    -------
    transformers.PretrainedConfig
    """
    import transformers

    key = _canonical(name)
    # Special token ids inside the 1000-token vocabulary: GPT-2's default 50256 would
    # be out of range (transformers warns about it).
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if key == "tiny-bert":
        return transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=INTERMEDIATE,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
        )
    if key == "tiny-gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            **special,
        )
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,  # exercise grouped-query attention
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        **special,
    )


TINY_HF_MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")


def _canonical(name: str) -> str:
    key = name if name.startswith("tiny-") else f"tiny-{name}"
    if key not in TINY_HF_MODELS:
        raise ValueError(f"unknown tiny HF model {name!r}; choose one of {', '.join(TINY_HF_MODELS)}")
    return key


def _build(name: str, seed: int, attn_implementation: str) -> nn.Module:
    import transformers

    key = _canonical(name)
    auto = transformers.AutoModelForMaskedLM if key == "tiny-bert" else transformers.AutoModelForCausalLM
    # fork_rng: seeded, reproducible init without disturbing the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(tiny_hf_config(key), attn_implementation=attn_implementation)
    return model.eval()


def tiny_bert(seed: int = 0, attn_implementation: str = "eager") -> HFLogits:
    """Tiny ``BertForMaskedLM``; ``forward(input_ids[, attention_mask])`` gives MLM logits ``[B, T, 1000]``.

    Parameters
    ----------
    seed : int
        Initialisation seed.
    attn_implementation : str
        ``"eager"`` (plain ops, default) or ``"sdpa"``.

    Returns
    -------
    HFLogits
    """
    return wrap_hf_model(_build("tiny-bert", seed, attn_implementation))


def tiny_gpt2(seed: int = 0, attn_implementation: str = "eager") -> HFLogits:
    """Tiny ``GPT2LMHeadModel``; ``forward(input_ids)`` gives causal-LM logits ``[B, T, 1000]``.

    Parameters
    ----------
    seed : int
        Initialisation seed.
    attn_implementation : str
        ``"eager"`` (plain ops, default) or ``"sdpa"``.

    Returns
    -------
    HFLogits
    """
    return wrap_hf_model(_build("tiny-gpt2", seed, attn_implementation))


def tiny_llama(seed: int = 0, attn_implementation: str = "eager") -> HFLogits:
    """Tiny ``LlamaForCausalLM`` (4 query heads, 2 kv heads); ``forward(input_ids)`` gives logits ``[B, T, 1000]``.

    Parameters
    ----------
    seed : int
        Initialisation seed.
    attn_implementation : str
        ``"eager"`` (plain ops, default) or ``"sdpa"``.

    Returns
    -------
    HFLogits
    """
    return wrap_hf_model(_build("tiny-llama", seed, attn_implementation))


def save_tiny_hf(model_name: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny model as a Hugging Face folder (``config.json`` + ``model.safetensors``).

    Parameters
    ----------
    model_name : str
        ``"tiny-bert"``, ``"tiny-gpt2"`` or ``"tiny-llama"`` (``tiny-`` optional).
    folder : str or Path
        Destination; created if needed.
    seed : int
        Initialisation seed (the same seed gives the same weights as the factory).

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _build(model_name, seed, "eager").save_pretrained(folder)
    return folder
