"""The units a streamed decoder LLM is compressed in: each decoder block and the head in
vocabulary slices, each a small ``nn.Module`` that the same IR captures (the embedding, a table
lookup no pass changes, is written to ONNX directly by the engine).

A block unit takes the residual stream ``hidden (batch, seq, hidden_size)`` and returns it after
the block: positions ``0..seq-1``, the rotary tables and the causal mask (with the family's
sliding window where the block has one) are computed inside, so every block has one input and
one output and the blocks chain. That is the full-sequence forward the whole-graph path
captures (``input_ids -> logits``, no KV cache), split where the residual stream is all that
crosses.

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
    "HeadUnit",
    "block_window",
    "build_meta_model",
    "causal_mask",
    "head_slices",
    "materialize",
    "rotary_for",
]
