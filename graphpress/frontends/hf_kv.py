"""Frontend: a Hugging Face decoder captured *with its KV cache* -> :class:`Graph`.

The graph is one step of generation, which serves the prompt (prefill) and every new token
(decode) alike::

    input_ids       (batch, seq)            int64   the new tokens
    attention_mask  (batch, total)          int64   1 for every real token, past and new
    position_ids    (batch, seq)            int64   their positions (past .. past + seq - 1)
    past_key_values.{i}.key / .value  (batch, kv_heads, past, head_dim)   layer i's cache
      -> logits     (batch, seq, vocab)
         present.{i}.key / .value     (batch, kv_heads, past + seq, head_dim)

with ``total = past + seq``; a prefill passes caches of length 0. Names and layout are those of
ONNX Runtime GenAI's decoder models, so an ONNX artifact of this graph is what its runtime feeds.

How: :class:`HFKVDecoder` builds ``transformers``' own ``DynamicCache`` from the past tensors
inside ``forward``, so rotary offsets, positions and the projections are the model's own code;
``torch.export`` traces the cache away. The graph's dims are per input (``Graph.input_dims``):
``batch`` (dim 0 of all), ``seq``, ``past`` and ``total`` (export relates the last to the other two).

Attention (``attention=``):

* ``"gqa"`` (default): the model's attention function is replaced, through transformers'
  ``AttentionInterface``, by one ``graphpress::gqa_cached`` op per layer that takes the step's
  queries, keys and values and the layer's cache and returns the output and the presents
  (:mod:`graphpress.ir.ops_attention`; the cache's ``update`` hands the new keys and values
  through instead of concatenating). ONNX Runtime runs it as one ``GroupQueryAttention`` node.
  For rope types that depend on the position alone, the rotary embedding moves into the op too
  (constant cos/sin tables; the model's ``apply_rotary_pos_emb`` is stood in for by the identity
  during the traced call). Heads whose size is not a multiple of 16 (ONNX Runtime's kernel
  refuses them) fall back to ``"eager"``;
* ``"eager"``: the model's own eager attention over ``DynamicCache``'s concatenation (~15 ONNX
  nodes per layer, the cache copied once per grouped head): the reference the first is tested
  against.

Example inputs are a prefill: two random 16-token prompts with empty caches (what calibration
and the pipeline's checks run). The graph is traced on real cached inputs instead (a 4-token
prefix run through the model for the past keys and values and 12 new tokens after it: sizes
distinct and >= 2, which export specializes none of; ``Graph.trace_inputs``). ONNX Runtime's check
of the artifact adds a decode step: the example prefill's caches fed back with one new token.

Models with a sliding-window cache (a Mistral with ``sliding_window`` set, a Qwen2 with
``use_sliding_window``) are refused in one line: their cache drops old entries, which a graph
with ``present = concat(past, new)`` does not. So are rope types whose angles change with the
sequence length at run time (``dynamic``, ``longrope``).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graphpress.errors import FrontendError
from graphpress.ir.graph import Graph

#: Tokens of the prefix whose cache the traced inputs carry, and new tokens after it.
EXAMPLE_PAST, EXAMPLE_SEQ = 4, 12
#: Prompt length of the example (prefill) inputs.
EXAMPLE_PROMPT = 16


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    """``(past input names, present output names)`` of a ``layers``-layer decoder, in the
    order the graph takes and returns them (key then value, layer by layer)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def cache_geometry(config: Any) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config; one-line error when absent."""
    try:
        layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
    except (AttributeError, TypeError):
        raise FrontendError(f"{type(config).__name__}: no num_hidden_layers / num_attention_heads: not a decoder with a KV cache") from None
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return layers, kv_heads, head_dim


def sliding_window(config: Any) -> int | None:
    """The sliding attention window of a config (None: full attention), as its cache uses it."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return int(window)


ATTENTIONS = ("gqa", "eager")
#: ONNX Runtime's GroupQueryAttention (CPU) takes head sizes that are multiples of this; smaller
#: or odd heads keep transformers' eager attention.
GQA_HEAD_MULTIPLE = 16
# transformers' name for graphpress's attention function (AttentionInterface / mask interface)
_ATTN_NAME = "graphpress_gqa"
_STEP: contextvars.ContextVar = contextvars.ContextVar("graphpress_kv_step", default=None)


class AttentionStep:
    """What one ``HFKVDecoder.forward`` (or one ``KVBlockUnit``) hands its attention calls: each layer's past, the mask,
    the rotary tables (None: the queries and keys come rotated), and the presents they return."""

    def __init__(self, past: Sequence[torch.Tensor], mask: torch.Tensor, layers: int, tables: tuple | None = None, first: int = 0):
        self.past, self.mask, self.tables, self.first = past, mask, tables, first  # first: the index of past[0:2]'s layer
        self.present: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * layers


# rope types whose angles depend on the position only (one table serves every length)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    """transformers' rotary-embedding modules (they carry ``rope_type`` and ``inv_freq``)."""
    return [m for m in model.modules() if hasattr(m, "rope_type") and hasattr(m, "inv_freq")]


def rotary_tables(model: nn.Module, head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(cos, sin)`` half tables ``(positions, head_dim/2)`` of the model's rotary module, or why
    there are none (several rotary modules, a length-dependent rope type, partial rotary)."""
    rotaries = _rotary_modules(model)
    if len(rotaries) != 1:
        return f"{len(rotaries)} rotary modules"
    return tables_of(rotaries[0], head_dim, positions)


def tables_of(rot: nn.Module, head_dim: int, positions: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """``(cos, sin)`` half tables of one rotary module, or why there are none (see
    :func:`rotary_tables`)."""
    if rot.rope_type not in _STATIC_ROPE:
        return f"rope type {rot.rope_type!r} depends on the sequence length"
    if not positions:
        return "no max_position_embeddings"
    with torch.no_grad():
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
    cos, sin = cos[0].float(), sin[0].float()
    half = head_dim // 2
    if cos.shape[-1] != head_dim or not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        return "partial or interleaved rotary"
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()


def _unrotated(q, k, *args, **kwargs):
    """Stands in for a model's ``apply_rotary_pos_emb`` while ``gqa_cached`` rotates itself."""
    return q, k


def _gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``graphpress::gqa_cached`` over the layer's cache
    (``key`` / ``value`` are the step's new ones: see :func:`_pass_through_update`; the op is
    registered by ``graphpress.ir``)."""
    step = _STEP.get()
    idx = module.layer_idx - step.first
    scale = float(scaling) if scaling is not None else float(query.shape[-1]) ** -0.5
    tables = step.tables or (None, None)
    out, present_k, present_v = torch.ops.graphpress.gqa_cached(query, key, value, step.past[2 * idx], step.past[2 * idx + 1], step.mask,
                                                                scale, *tables)
    step.present[idx] = (present_k, present_v)
    return out, None


@contextlib.contextmanager
def gqa_call(config: Any, step: AttentionStep, home: Any = None):
    """For the calls inside: the attention of every layer built on ``config`` is
    ``graphpress::gqa_cached`` over ``step``'s caches and, with ``home`` (the family's modeling
    module), its ``apply_rotary_pos_emb`` is the identity (the op rotates). Both are restored
    after, so the caller's model keeps its own attention and rotary."""
    _register_attention()
    token, saved = _STEP.set(step), config._attn_implementation
    rotate = home.apply_rotary_pos_emb if home is not None else None
    try:
        config._attn_implementation = _ATTN_NAME
        if home is not None:
            home.apply_rotary_pos_emb = _unrotated
        yield step
    finally:
        config._attn_implementation = saved
        if home is not None:
            home.apply_rotary_pos_emb = rotate
        _STEP.reset(token)


def install_rotary(owner: nn.Module, tables: tuple[torch.Tensor, torch.Tensor] | str, home: Any, facts: dict[str, Any]) -> Any:
    """Give ``owner`` the rotary tables as buffers ``rope_cos`` / ``rope_sin`` when the op can
    rotate (tables exist and the model has an ``apply_rotary_pos_emb`` to stand in for).

    Returns the modeling module to patch (:func:`rotary_home`), or None when the model keeps its
    own rotary; ``facts["rotary"]`` says which and why. Shared by the whole-graph capture
    (:class:`HFKVDecoder`) and the streamed blocks (``stream.units.KVBlockUnit``).
    """
    if isinstance(tables, str) or home is None:
        facts["rotary"] = f"model ({tables if isinstance(tables, str) else 'no apply_rotary_pos_emb to stand in for'})"
        return None
    owner.register_buffer("rope_cos", tables[0], persistent=False)
    owner.register_buffer("rope_sin", tables[1], persistent=False)
    facts["rotary"] = "in attention"
    return home


def rotary_home(model: nn.Module) -> Any:
    """The modeling module of ``model``'s attention class when it has an ``apply_rotary_pos_emb``
    to stand in for (None otherwise)."""
    attn = next((m for m in model.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__), None)
    home = sys.modules.get(type(attn).__module__) if attn is not None else None
    return home if home is not None and hasattr(home, "apply_rotary_pos_emb") else None


def _register_attention() -> None:
    import transformers

    transformers.AttentionInterface.register(_ATTN_NAME, _gqa_attention)
    try:  # the mask it builds is not read (gqa_cached masks itself); eager's is the cheapest to trace
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, eager_mask)
    except ImportError:
        pass


class HFKVDecoder(nn.Module):
    """One generation step of a ``transformers`` causal LM with flat cache tensors (module
    docstring): ``forward(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        A causal LM (``...ForCausalLM``) with a ``past_key_values`` argument.
    attention : {"gqa", "eager"}
        One ``graphpress::gqa_cached`` op per layer, or the model's own eager attention (module
        docstring).
    rotary_in_attention : bool
        With ``gqa``, let the op apply the rotary embedding from constant tables (ONNX Runtime's
        kernel then rotates inside ``GroupQueryAttention``, 14 nodes per layer fewer): only for
        rope types whose angles depend on the position alone, else the model rotates as usual
        (``rotary`` in :attr:`facts` says which and why).
    """

    def __init__(self, hf_model: nn.Module, attention: str = "gqa", rotary_in_attention: bool = True):
        super().__init__()
        if attention not in ATTENTIONS:
            raise FrontendError(f"attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
        self.model = hf_model.eval()
        config = hf_model.config
        self.layers, self.kv_heads, self.head_dim = cache_geometry(config)
        self.attention_note = None
        if attention == "gqa" and self.head_dim % GQA_HEAD_MULTIPLE:
            # ONNX Runtime's GroupQueryAttention CPU kernel refuses such heads (stories260K: 8)
            attention = "eager"
            self.attention_note = f"eager (head_dim {self.head_dim}: GroupQueryAttention needs a multiple of {GQA_HEAD_MULTIPLE})"
        self.attention = attention
        if attention == "gqa":
            _register_attention()
        # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated)
        self._cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
        rope = next((m.rope_type for m in _rotary_modules(hf_model)), "default")
        if rope not in _STATIC_ROPE:
            raise FrontendError(
                f"{type(hf_model).__name__}: rope type {rope!r} changes its angles with the sequence length at run time; a KV-cache "
                f"export supports position-only rope types ({', '.join(_STATIC_ROPE)})"
            )
        self.facts: dict[str, Any] = {"rotary": "model"}
        self._rotary_module = None
        if attention == "gqa" and rotary_in_attention:
            tables = rotary_tables(hf_model, self.head_dim, int(getattr(config, "max_position_embeddings", 0) or 0))
            self._rotary_module = install_rotary(self, tables, rotary_home(hf_model), self.facts)
        window = sliding_window(config)
        if window is not None:
            raise FrontendError(
                f"{type(hf_model).__name__}: sliding-window attention ({window} tokens) drops old cache entries; a KV-cache export "
                f"supports full attention only (set sliding_window to null in config.json if the model is used within {window} tokens)"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        cache = _cache(self.model.config, past, self.layers, pass_through=self.attention == "gqa")
        if self.attention == "eager":
            out = self._call(input_ids, attention_mask, position_ids, cache)
            returned = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
            return (out.logits, *_cache_tensors(returned, self.layers))
        home = self._rotary_module
        step = AttentionStep(past, attention_mask, self.layers, (self.rope_cos, self.rope_sin) if home is not None else None)
        with gqa_call(self.model.config, step, home):
            out = self._call(input_ids, attention_mask, position_ids, cache)
        if any(p is None for p in step.present):
            missing = [i for i, p in enumerate(step.present) if p is None]
            raise FrontendError(f"{type(self.model).__name__}: layers {missing} did not call the attention function; use attention='eager'")
        return (out.logits, *(t for pair in step.present for t in pair))

    def _call(self, input_ids, attention_mask, position_ids, cache):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **{self._cache_arg: cache}, use_cache=True, return_dict=True)

    @torch.no_grad()
    def example_inputs(self, batch: int = 2, past: int = EXAMPLE_PAST, seq: int = EXAMPLE_SEQ, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Real example inputs: the cache of a random ``past``-token prefix and ``seq`` new
        random tokens after it (module docstring)."""
        vocab = int(getattr(self.model.config, "vocab_size", 100) or 100)
        gen = torch.Generator().manual_seed(seed)
        prefix = torch.randint(0, vocab, (batch, past), generator=gen)
        empty = self.empty_cache(batch)
        ones = torch.ones(batch, past, dtype=torch.long)
        cache = self(prefix, ones, torch.arange(past).expand(batch, past), *empty)[1:]
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        return (ids, mask, positions, *(t.contiguous() for t in cache))

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        """Caches of length 0 (a prefill's past)."""
        return _empty_cache(batch, self.layers, self.kv_heads, self.head_dim)

    def prefill_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's inputs for a prompt with no past: token ids ``(batch, seq)`` -> ids, a
        mask of ones, positions ``0 .. seq-1`` and empty caches (how calibration token
        sequences are fed to a KV graph)."""
        return prefill_feed(input_ids, self.layers, self.kv_heads, self.head_dim)


def _empty_cache(batch: int, layers: int, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    return [torch.zeros(batch, kv_heads, 0, head_dim) for _ in range(2 * layers)]


def prefill_feed(input_ids: Any, layers: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """A KV graph's inputs for prompts ``(batch, seq)`` (or ``(seq,)``) with no past: the ids,
    a mask of ones, positions ``0 .. seq-1`` and caches of length 0."""
    ids = torch.as_tensor(input_ids).long()
    if ids.dim() == 1:
        ids = ids[None]
    b, s = ids.shape
    return (ids, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(b, s).contiguous(), *_empty_cache(b, layers, kv_heads, head_dim))


def _cache(config: Any, past: Sequence[torch.Tensor], layers: int, *, pass_through: bool = False):
    """A ``DynamicCache`` holding ``past``; with ``pass_through`` its ``update`` returns the new
    keys and values as they are (``graphpress::gqa_cached`` appends them itself) while the cache
    still reports the past length to the model's position and mask code."""
    import transformers

    if len(past) != 2 * layers:
        raise FrontendError(f"expected {2 * layers} past tensors (key and value of {layers} layers), got {len(past)}")
    pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layers)]
    try:
        cache = transformers.DynamicCache(ddp_cache_data=pairs, config=config)
    except TypeError:  # transformers 4.x: the legacy tuple format
        cache = transformers.DynamicCache.from_legacy_cache(tuple(pairs))
    if pass_through:
        cache.update = _pass_through_update
    return cache


def _pass_through_update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
    return key_states, value_states


def _cache_tensors(cache: Any, layers: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for i in range(layers):
        if hasattr(cache, "layers"):
            out += [cache.layers[i].keys, cache.layers[i].values]
        else:  # transformers 4.x
            out += [cache.key_cache[i], cache.value_cache[i]]
    return out


def kv_input_dims(layers: int) -> list[dict[int, str]]:
    """Per-input dynamic dims of a KV decoder graph (module docstring)."""
    tokens = {0: "batch", 1: "seq"}
    return [tokens, {0: "batch", 1: "total"}, dict(tokens)] + [{0: "batch", 2: "past"} for _ in range(2 * layers)]


def capture_kv_decoder(hf_model: nn.Module, *, name: str, source: dict[str, Any] | None = None, attention: str = "gqa") -> Graph:
    """Capture a ``transformers`` causal LM as a one-step KV-cache decoder graph (``attention``:
    see :class:`HFKVDecoder`)."""
    wrapper = HFKVDecoder(hf_model, attention)
    traced = wrapper.example_inputs()
    vocab = int(getattr(hf_model.config, "vocab_size", 100) or 100)
    examples = wrapper.prefill_inputs(torch.randint(0, vocab, (2, EXAMPLE_PROMPT), generator=torch.Generator().manual_seed(1)))
    past, present = kv_names(wrapper.layers)
    graph = Graph.capture(
        wrapper,
        examples,
        trace_inputs=traced,
        name=name,
        input_names=["input_ids", "attention_mask", "position_ids", *past],
        output_names=["logits", *present],
        dynamic_dims={0: "batch"},
        input_dims=kv_input_dims(wrapper.layers),
        source={**(source or {}), "kv_cache": {"layers": wrapper.layers, "kv_heads": wrapper.kv_heads, "head_dim": wrapper.head_dim,
                                               "attention": wrapper.attention, **({"attention_note": wrapper.attention_note}
                                                                                   if wrapper.attention_note else {}),
                                               **wrapper.facts, **decoder_facts(hf_model.config)}},
    )
    return graph


def decoder_facts(config: Any) -> dict[str, Any]:
    """What a runtime needs besides the graph to drive generation (ONNX Runtime GenAI's
    ``genai_config.json``): family, sizes, context length and special token ids."""

    def token(name: str) -> int | None:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        return int(value) if isinstance(value, int) else None

    heads = int(config.num_attention_heads)
    return {
        "model_type": str(getattr(config, "model_type", "") or ""),
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": heads,
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "context_length": int(getattr(config, "max_position_embeddings", 0) or 0),
        "bos_token_id": token("bos_token_id"),
        "eos_token_id": token("eos_token_id"),
        "pad_token_id": token("pad_token_id"),
    }


def load_hf_kv_folder(folder: str | Path) -> Graph:
    """A Hugging Face causal-LM folder captured with its KV cache (module docstring)."""
    from graphpress.frontends.huggingface import open_hf_folder

    folder, hf = open_hf_folder(folder)
    if not hasattr(hf, "lm_head") and "ForCausalLM" not in type(hf).__name__:
        raise FrontendError(f"{folder}: {type(hf).__name__} is not a causal LM; --kv-cache needs a decoder with an LM head")
    return capture_kv_decoder(hf, name=folder.name,
                              source={"frontend": "huggingface", "path": str(folder), "architecture": type(hf).__name__})


def prefill_batches(graph: Graph, batches: Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches of token ids turned into a KV graph's prefill inputs; batches that
    already hold every input are kept as they are."""
    geometry = graph.source.get("kv_cache")
    if not geometry:
        return list(batches)
    n_in = len(graph.example_inputs)
    out = []
    for batch in batches:
        if len(batch) == n_in:
            out.append(tuple(batch))
            continue
        if len(batch) != 1 or batch[0].dtype not in (torch.int64, torch.int32):
            raise FrontendError(f"{graph.name}: calibration for a KV-cache decoder must be token ids (batch, seq), got {len(batch)} tensors")
        out.append(prefill_feed(batch[0], geometry["layers"], geometry["kv_heads"], geometry["head_dim"]))
    return out


__all__ = ["EXAMPLE_PAST", "EXAMPLE_PROMPT", "EXAMPLE_SEQ", "AttentionStep", "HFKVDecoder", "cache_geometry", "capture_kv_decoder",
           "decoder_facts", "gqa_call", "install_rotary", "kv_input_dims", "kv_names", "load_hf_kv_folder", "prefill_batches", "prefill_feed", "rotary_home",
           "sliding_window", "tables_of"]
