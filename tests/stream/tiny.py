"""Tiny decoder-LLM folders (bf16 safetensors) for the streaming tests."""

import torch
import transformers

CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}


def write_llama(folder, *, layers=2, vocab=128, family="llama", max_shard_size=None, **extra):
    """Save a seeded random ``family`` model (hidden 64) as a bf16 folder; return it in float32
    with eager attention (the kernels the streamed units use)."""
    torch.manual_seed(0)
    extra = {"num_attention_heads": 4, "num_key_value_heads": 2, **extra}
    cfg = CONFIGS[family](vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          max_position_embeddings=64, tie_word_embeddings=False, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(torch.bfloat16).save_pretrained(folder, **kwargs)
    model.set_attn_implementation("eager")
    return model.float()
