"""The units a streamed decoder LLM is compressed in: each decoder block and the head in
vocabulary slices, each a small ``nn.Module`` that the same IR captures (the embedding, a table
lookup no pass changes, is written to ONNX directly by the engine).

A block unit takes the residual stream ``hidden (batch, seq, hidden_size)`` and returns it after
the block: positions ``0..seq-1``, the rotary tables and the causal mask (with the family's
sliding window where the block has one) are computed inside, so every block has one input and
one output and the blocks chain. That is the full-sequence forward the whole-graph path
captures (``input_ids -> logits``, no KV cache), split where the residual stream is all that
crosses.

With a KV cache (``StreamOptions(kv_cache=True)``, ``compress run --stream on --kv-cache``) a
block is :class:`KVBlockUnit` instead: one generation step of the block, ``(hidden,
attention_mask, position_ids, past_key, past_value) -> (hidden_out, present_key, present_value)``,
with the attention the whole-graph KV capture uses (:mod:`graphpress.frontends.hf_kv`: one
``graphpress::gqa_cached`` op, the rotary tables inside it). The residual stream still chains
the blocks; each block's cache is its own pair of model inputs and outputs.

Modules are built from ``transformers``' own classes on the ``meta`` device (no memory) and
given one unit's weights at a time in float32 (:func:`load_unit_weights`); the checkpoint stays in
its dtype on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from graphpress.errors import FrontendError


def build_meta_model(folder: Any) -> nn.Module:
    """The folder's ``transformers`` model on the meta device (structure only, no weights), with
    the eager attention the whole-graph path captures too."""
    import transformers

    from graphpress.frontends.huggingface import read_hf_config

    config = read_hf_config(folder)
    config.use_cache = False
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def causal_mask(seq: int, dtype: torch.dtype, window: int | None, device: torch.device) -> torch.Tensor:
    """Additive ``(1, 1, seq, seq)`` mask: 0 where query ``i`` may see key ``j`` (``j <= i`` and,
    with a sliding ``window``, ``i - j < window``), the dtype's lowest value elsewhere."""
    i = torch.arange(seq, device=device)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    zero = torch.zeros((), dtype=dtype, device=device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, zero, low)[None, None]


class BlockUnit(nn.Module):
    """One decoder block as ``hidden -> hidden`` (module docstring).

    Parameters
    ----------
    layer : nn.Module
        The family's decoder layer (``LlamaDecoderLayer``, ``Qwen2DecoderLayer`` ...).
    rotary : nn.Module
        The family's rotary embedding (its ``inv_freq`` computed from the config, on CPU).
    window : int, optional
        The block's sliding attention window (Mistral, Qwen2 sliding layers); None: full causal.
    """

    def __init__(self, layer: nn.Module, rotary: nn.Module, window: int | None = None):
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.window = window

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq = hidden.shape[0], hidden.shape[1]
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(batch, seq)
        cos, sin = self.rotary(hidden, positions)
        mask = causal_mask(seq, hidden.dtype, self.window, hidden.device)
        out = self.layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out


class _PassThrough:
    """The cache a layer's attention sees under ``graphpress::gqa_cached``: ``update`` hands the
    step's keys and values through (the op appends them to the past itself)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        return key_states, value_states


class _Concat:
    """A one-layer cache for eager attention: ``update`` returns and keeps ``concat(past, new)``."""

    def __init__(self, past_key: torch.Tensor, past_value: torch.Tensor):
        self.present = (past_key, past_value)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.present = (torch.cat([self.present[0], key_states], 2), torch.cat([self.present[1], value_states], 2))
        return self.present


def cached_mask(attention_mask: torch.Tensor, past: int, seq: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(batch, 1, seq, past + seq)`` mask of a step over a cache: query ``i`` (at
    position ``past + i``) may see key ``j`` when ``j <= past + i`` and ``attention_mask[b, j]``
    is 1; the dtype's lowest value elsewhere (transformers' eager convention)."""
    total = attention_mask.shape[1]
    q_pos = torch.arange(seq, device=attention_mask.device)[:, None] + (total - seq)
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (k_pos <= q_pos)[None, None] & (attention_mask[:, None, None, :] != 0)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, low)


class KVBlockUnit(nn.Module):
    """One decoder block for one generation step over its KV cache (module docstring).

    ``forward(hidden, attention_mask, position_ids, past_key, past_value) -> (hidden_out,
    present_key, present_value)`` with ``hidden (batch, seq, hidden_size)``, ``attention_mask
    (batch, past + seq)`` and caches ``(batch, kv_heads, past, head_dim)``: the layout of
    :mod:`graphpress.frontends.hf_kv`, one layer's share of it.

    Parameters
    ----------
    layer : nn.Module
        The family's decoder layer (its ``self_attn.layer_idx`` is the block's index).
    rotary : nn.Module
        The family's rotary embedding (built on CPU).
    config : transformers config
        The model's config (the layer's attention reads ``_attn_implementation`` from it).
    """

    def __init__(self, layer: nn.Module, rotary: nn.Module, config: Any):
        super().__init__()
        import inspect

        from graphpress.frontends.hf_kv import GQA_HEAD_MULTIPLE, cache_geometry, install_rotary, rotary_home, tables_of

        self.layer, self.rotary, self.config = layer, rotary, config
        self.index = int(layer.self_attn.layer_idx)
        _, self.kv_heads, self.head_dim = cache_geometry(config)
        self.attention = "gqa" if self.head_dim % GQA_HEAD_MULTIPLE == 0 else "eager"
        self.facts: dict[str, Any] = {"attention": self.attention, "rotary": "model"}
        if self.attention == "eager":
            self.facts["attention_note"] = f"eager (head_dim {self.head_dim}: GroupQueryAttention needs a multiple of {GQA_HEAD_MULTIPLE})"
        self.home = None
        if self.attention == "gqa":
            tables = tables_of(rotary, self.head_dim, int(getattr(config, "max_position_embeddings", 0) or 0))
            self.home = install_rotary(self, tables, rotary_home(layer), self.facts)
        self._cache_arg = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor):
        from graphpress.frontends.hf_kv import AttentionStep, gqa_call

        cos, sin = self.rotary(hidden, position_ids)
        kwargs = {"position_ids": position_ids, "position_embeddings": (cos, sin), "use_cache": True}
        if self.attention == "gqa":
            tables = (self.rope_cos, self.rope_sin) if self.home is not None else None
            step = AttentionStep([past_key, past_value], attention_mask, 1, tables, first=self.index)
            with gqa_call(self.config, step, self.home):
                out = self.layer(hidden, attention_mask=None, **{self._cache_arg: _PassThrough()}, **kwargs)
            present = step.present[0]
        else:
            cache = _Concat(past_key, past_value)
            mask = cached_mask(attention_mask, past_key.shape[2], hidden.shape[1], hidden.dtype)
            saved = self.config._attn_implementation
            try:
                self.config._attn_implementation = "eager"
                out = self.layer(hidden, attention_mask=mask, **{self._cache_arg: cache}, **kwargs)
            finally:
                self.config._attn_implementation = saved
            present = cache.present
        hidden_out = out[0] if isinstance(out, tuple) else out
        return hidden_out, present[0], present[1]


class HeadUnit(nn.Module):
    """``hidden -> logits[..., start:stop]``: the final norm and one slice of the head's rows."""

    def __init__(self, norm: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))


@dataclass(frozen=True)
class HeadSlice:
    """Rows ``start:stop`` of the head."""

    start: int
    stop: int


def head_slices(vocab: int, hidden: int, max_bytes: int) -> list[HeadSlice]:
    """Row ranges of the head such that each slice's float32 weight is at most ``max_bytes``
    (at least one row): the head of an 8B Llama (128256 x 4096, 2.1 GB in float32) is larger
    than any of its blocks (0.83 GB) and is compressed a slice at a time. Slices are of one
    size where a count of at most twice the fewest possible divides ``vocab``."""
    rows = max(1, max_bytes // (4 * hidden))
    count = -(-vocab // rows)
    # slices of one size share one ONNX export (the others re-bind it): up to twice as many
    # slices are worth it when that count divides the vocabulary (32000 -> 4 x 8000, not 3)
    count = next((c for c in range(count, min(2 * count, vocab) + 1) if vocab % c == 0), count)
    rows = -(-vocab // count)  # even slices
    return [HeadSlice(s, min(vocab, s + rows)) for s in range(0, vocab, rows)]


def block_window(config: Any, index: int) -> int | None:
    """The sliding attention window of block ``index``, or None for full causal attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return int(window) if types[index] == "sliding_attention" else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def rotary_for(model: nn.Module) -> nn.Module:
    """The family's rotary embedding built on CPU from the model's config (the meta model's
    copy has no ``inv_freq`` values)."""
    inner = model.model
    return type(inner.rotary_emb)(config=model.config).eval()


def materialize(module: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Give a meta module its weights (float32 copies of ``weights``, keyed by the module's
    parameter names); every parameter must be given exactly once."""
    names = {n for n, _ in module.named_parameters()}
    given = set(weights)
    if names != given:
        missing, extra = sorted(names - given), sorted(given - names)
        raise FrontendError(
            f"{type(module).__name__}: checkpoint tensors do not match the module: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    module.to_empty(device="cpu")
    module.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


__all__ = [
    "BlockUnit",
    "HeadSlice",
    "KVBlockUnit",
    "HeadUnit",
    "block_window",
    "build_meta_model",
    "cached_mask",
    "causal_mask",
    "head_slices",
    "materialize",
    "rotary_for",
]
