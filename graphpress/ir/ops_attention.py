"""``graphpress::gqa_cached``: one decoder step of grouped-query attention over a KV cache.

``gqa_cached(q, k, v, past_k, past_v, mask, scale, cos=None, sin=None) -> (out, present_k, present_v)`` with

* ``q`` ``(b, H, s, d)``: the step's queries;
* ``k``, ``v`` ``(b, Hkv, s, d)``: the step's new keys and values; ``H`` a multiple of ``Hkv``;
* ``past_k``, ``past_v`` ``(b, Hkv, P, d)``: the cache (``P`` may be 0);
* ``mask`` ``(b, P + s)`` int64: 1 for real tokens (padding only at the right end of a row);

* ``cos``, ``sin`` ``(max_positions, d/2)``, optional: rotary tables. Given, ``q`` and ``k`` come
  unrotated and are rotated here at positions ``P .. P + s - 1`` (halves convention, transformers'
  ``rotate_half``: ``x * [cos, cos] + [-x2, x1] * [sin, sin]``); absent, they come rotated;

computes ``present = concat(past, new)`` along the sequence and, for query ``i`` of the step at
absolute position ``t_i = P + i``,

    out[b, i, h] = sum_j softmax_j( scale * q[b, h, i] . present_k[b, h // (H/Hkv), j] ) present_v[b, h // (H/Hkv), j]

over the keys ``j <= t_i`` whose ``mask[b, j]`` is 1 (causal, grouped heads as transformers'
``repeat_kv``). ``out`` is ``(b, s, H, d)``: what a transformers attention function returns.

Positions are ``P + i`` for every row: a row's padding may only be at its right end (the
positions ONNX Runtime's kernel derives from ``mask`` agree then).

Exactness: this is transformers' eager attention (``repeat_kv``, ``matmul``, causal mask,
``softmax``, ``matmul``) with the cache update folded in; the eager kernel below computes it
with the same ops, so a KV graph captured with this op gives transformers' logits within float32
rounding (``tests/frontends/test_hf_kv.py``). ONNX Runtime runs it as one
``com.microsoft.GroupQueryAttention`` node (``graphpress.lowering.onnx.attention``): no copies of
the cache for the grouped heads, no score tensor written out, one kernel instead of ~15 nodes
per layer.
"""

from __future__ import annotations

import torch

from graphpress.ir.fakes import shape_function


def _check(q, k, v, past_k, past_v, mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or past_k.dim() != 4 or past_v.dim() != 4:
        raise RuntimeError("graphpress::gqa_cached: q, k, v, past_k, past_v must be 4-D (batch, heads, seq, head_dim)")
    if q.shape[1] % k.shape[1]:
        raise RuntimeError(f"graphpress::gqa_cached: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    if k.shape != v.shape or past_k.shape != past_v.shape or k.shape[1] != past_k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise RuntimeError(f"graphpress::gqa_cached: k {tuple(k.shape)}, v {tuple(v.shape)}, past {tuple(past_k.shape)} / "
                           f"{tuple(past_v.shape)} and q {tuple(q.shape)} disagree")
    if mask.dim() != 2:
        raise RuntimeError(f"graphpress::gqa_cached: mask must be (batch, past + seq), got {tuple(mask.shape)}")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` ``(b, n, s, d)`` rotated at positions ``start .. start + s - 1`` by the half tables
    ``cos`` / ``sin`` ``(max_positions, d/2)``, halves convention."""
    s = x.shape[2]
    c = cos[start:start + s].to(x.dtype)
    n = sin[start:start + s].to(x.dtype)
    c, n = torch.cat([c, c], -1), torch.cat([n, n], -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rotated * n


@torch.library.custom_op("graphpress::gqa_cached", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, Tensor mask, float scale, "
                                "Tensor? cos=None, Tensor? sin=None) -> (Tensor, Tensor, Tensor)")
def gqa_cached(q, k, v, past_k, past_v, mask, scale, cos=None, sin=None):
    """Grouped-query attention over ``concat(past, new)`` (module docstring)."""
    _check(q, k, v, past_k, past_v, mask)
    _check_tables(q, cos, sin)
    if cos is not None:
        q, k = rotate(q, cos, sin, past_k.shape[2]), rotate(k, cos, sin, past_k.shape[2])
    present_k = torch.cat([past_k, k], dim=2)
    present_v = torch.cat([past_v, v], dim=2)
    heads, kv_heads, s, total = q.shape[1], k.shape[1], q.shape[2], present_k.shape[2]
    rep = heads // kv_heads
    keys = present_k.repeat_interleave(rep, dim=1) if rep > 1 else present_k
    values = present_v.repeat_interleave(rep, dim=1) if rep > 1 else present_v
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    q_pos = torch.arange(total - s, total, device=q.device)[:, None]
    k_pos = torch.arange(total, device=q.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (mask[:, None, None, :] != 0)
    # the dtype's lowest value, as transformers masks: a row with no allowed key stays finite
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, values).transpose(1, 2).contiguous()
    return out, present_k, present_v


def _check_tables(q, cos, sin) -> None:
    if (cos is None) != (sin is None):
        raise RuntimeError("graphpress::gqa_cached: give both rotary tables cos and sin, or neither")
    if cos is not None and (cos.dim() != 2 or cos.shape != sin.shape or 2 * cos.shape[1] != q.shape[-1]):
        raise RuntimeError(f"graphpress::gqa_cached: rotary tables must be (max_positions, {q.shape[-1] // 2}), got {tuple(cos.shape)} "
                           f"and {tuple(sin.shape)}")


@shape_function(gqa_cached)
def _gqa_cached_fake(q, k, v, past_k, past_v, mask, scale, cos=None, sin=None):
    _check(q, k, v, past_k, past_v, mask)
    _check_tables(q, cos, sin)
    b, heads, s, d = q.shape
    total = past_k.shape[2] + k.shape[2]
    present = past_k.new_empty((b, k.shape[1], total, d))
    return q.new_empty((b, s, heads, d)), present, torch.empty_like(present)


__all__ = ["gqa_cached", "rotate"]
