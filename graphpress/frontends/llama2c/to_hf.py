"""A llama2.c model as a ``transformers`` ``LlamaForCausalLM`` (same function, HF layout).

llama2.c and Hugging Face's Llama are the same network but rotate different pairs of a head's
channels: llama2.c rotates interleaved pairs ``(x[2i], x[2i+1])``, transformers the halves
``(x[i], x[i + hs/2])`` (``rotate_half``). Permuting the rows of ``wq`` and ``wk`` within each
head, ``new[i] = old[2i]`` and ``new[hs/2 + i] = old[2i + 1]``, makes the rotated query and key
the same vectors up to that permutation of channels, which the dot product ``q . k`` does not
see; ``wv``, ``wo``, the MLP, norms and embeddings map one to one. Grouped heads agree too: both
give query head ``h`` the key/value head ``h // (n_heads / n_kv_heads)``.

The HF model recomputes its rotary angles from ``rope_theta``; llama2.c files store theirs. The
two agree to float32 rounding (checked by the tests on stories260K: logits within 1e-4).
Why at all: transformers' cache code gives the llama2.c model a KV-cache graph
(:mod:`graphpress.frontends.hf_kv`) without a second attention implementation here.
"""

from __future__ import annotations

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.llama2c.model import Llama2c


def _halves(w: torch.Tensor, heads: int, head_size: int) -> torch.Tensor:
    """Rows of each head from interleaved-pair order to halves order (module docstring)."""
    d_in = w.shape[1]
    return w.reshape(heads, head_size // 2, 2, d_in).transpose(1, 2).reshape(heads * head_size, d_in)


def to_transformers(model: Llama2c):
    """``model`` as a ``transformers.LlamaForCausalLM`` in eval mode with eager attention.

    Raises
    ------
    FrontendError
        When transformers is not installed.
    """
    try:
        import transformers
    except ImportError:
        raise FrontendError("llama2.c --kv-cache needs transformers: pip install 'graphpress[hf]'") from None
    a = model.args
    cfg = transformers.LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.head_size, max_position_embeddings=a.seq_len,
        rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, tie_word_embeddings=a.shared_classifier, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    cfg._attn_implementation = "eager"
    with torch.device("cpu"):
        hf = transformers.LlamaForCausalLM(cfg)
    hs = a.head_size
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.tok_embeddings.weight)
        for src, dst in zip(model.layers, hf.model.layers):
            att, mlp = src.attention, src.feed_forward
            dst.input_layernorm.weight.copy_(src.attention_norm.weight)
            dst.self_attn.q_proj.weight.copy_(_halves(att.wq.weight, a.n_heads, hs))
            dst.self_attn.k_proj.weight.copy_(_halves(att.wk.weight, a.n_kv_heads, hs))
            dst.self_attn.v_proj.weight.copy_(att.wv.weight)
            dst.self_attn.o_proj.weight.copy_(att.wo.weight)
            dst.post_attention_layernorm.weight.copy_(src.ffn_norm.weight)
            dst.mlp.gate_proj.weight.copy_(mlp.w1.weight)
            dst.mlp.up_proj.weight.copy_(mlp.w3.weight)
            dst.mlp.down_proj.weight.copy_(mlp.w2.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        if not a.shared_classifier:
            hf.lm_head.weight.copy_(model.output.weight)
    if a.shared_classifier:
        hf.tie_weights()
    return hf.eval()


__all__ = ["to_transformers"]
