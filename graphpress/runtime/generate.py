"""Token generation from a decoder artifact: greedy or sampled, numpy only.

Two kinds of decoder artifact generate:

* **with a KV cache** (captured with ``--kv-cache``: inputs ``input_ids``, ``attention_mask``,
  ``position_ids``, ``past_key_values.{i}.key/.value``; outputs ``logits`` and
  ``present.{i}.key/.value``; see :mod:`graphpress.frontends.hf_kv`): the prompt runs once with
  empty caches (prefill), then each new token runs alone with the caches the step before
  returned, so a step costs one token's forward plus attention over the cache;
* **without** (``input_ids (batch, seq)`` int64 -> ``logits (batch, seq, vocab)``): each new token
  is appended and the whole sequence runs again, so a step costs a full forward of the sequence
  so far.

Choosing a token from logits ``z`` (one row per sequence):

* ``temperature == 0``: ``argmax z`` (greedy; ``top_k`` / ``top_p`` change nothing);
* otherwise ``p = softmax(z / temperature)`` restricted to the ``top_k`` largest entries and then
  to the smallest set of most likely entries whose mass reaches ``top_p`` (nucleus), renormalised,
  and sampled with a ``numpy`` generator seeded by ``seed`` (the same seed gives the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from graphpress.errors import ArtifactError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (module docstring).

    Parameters
    ----------
    temperature : float
        0 for greedy decoding, else the softmax temperature (> 0).
    top_k : int, optional
        Keep only the ``top_k`` most likely tokens (>= 1).
    top_p : float, optional
        Keep the most likely tokens up to this probability mass (0 < top_p <= 1).
    seed : int, optional
        Seed of the sampler; None draws a fresh one.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and np.isfinite(self.temperature) and self.temperature >= 0):
            raise ArtifactError(f"sampling: temperature must be a number >= 0 (0: greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1):
            raise ArtifactError(f"sampling: top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ArtifactError(f"sampling: top_p must be in (0, 1], got {self.top_p!r}")


def next_tokens(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of ``logits (batch, vocab)`` (module docstring)."""
    z = np.asarray(logits, dtype=np.float64)
    if sampling.temperature == 0:
        return z.argmax(-1)
    z = z / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        # keep a token while the mass before it is below top_p: the most likely one always stays
        keep_sorted = (np.cumsum(sorted_p, -1) - sorted_p) < sampling.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


@dataclass(frozen=True)
class DecoderIO:
    """Where a decoder artifact's inputs and outputs are (positions in manifest order).

    ``past`` / ``present`` are empty for an artifact without a KV cache; otherwise they pair up
    (``present[j]`` is fed back as ``past[j]`` at the next step) and ``cache_shape`` is
    ``(kv_heads, head_dim)`` with ``cache_dtype`` the caches' numpy dtype name. ``codes`` is
    true when the caches are stored as k-bit codes plus ``*_scales`` (``quantize-kv-cache``)."""

    ids: int
    logits: int
    mask: int | None = None
    positions: int | None = None
    past: tuple[int, ...] = ()
    present: tuple[int, ...] = ()
    cache_shape: tuple[int, int] | None = None
    cache_dtype: str = "float32"
    codes: bool = False

    @property
    def cached(self) -> bool:
        return bool(self.past)


def decoder_io(model: Any) -> DecoderIO:
    """The :class:`DecoderIO` of a decoder artifact; one-line :class:`ArtifactError` for anything
    else."""
    ins, outs = model.inputs, model.outputs
    by_name = {s.name: i for i, s in enumerate(ins)}
    out_by_name = {s.name: i for i, s in enumerate(outs)}
    got = ", ".join(f"{s.name}{s.shape_str()}:{s.dtype}" for s in ins)
    if "past_key_values.0.key" in by_name:
        past_names = [s.name for s in ins if s.name.startswith("past_key_values.")]
        present_names = [n.replace("past_key_values.", "present.", 1) for n in past_names]
        missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in by_name]
        missing += [n for n in ["logits", *present_names] if n not in out_by_name]
        if missing:
            raise ArtifactError(f"{model.folder}: a KV-cache decoder artifact needs {', '.join(missing)}; it takes {got}")
        for name in past_names:
            spec = ins[by_name[name]]
            if len(spec.shape) != 4 or not all(isinstance(d, int) for d in (spec.shape[1], spec.shape[3])):
                raise ArtifactError(f"{model.folder}: {name} must be (batch, kv_heads, past, head_dim), got {spec.shape_str()}")
        spec = ins[by_name["past_key_values.0.key"]]
        return DecoderIO(by_name["input_ids"], out_by_name["logits"], by_name["attention_mask"], by_name["position_ids"],
                         tuple(by_name[n] for n in past_names), tuple(out_by_name[n] for n in present_names),
                         (int(spec.shape[1]), int(spec.shape[3])), spec.dtype, codes=spec.dtype == "uint8")
    ids = [i for i, s in enumerate(ins) if s.dtype == "int64" and len(s.shape) == 2]
    logits = [i for i, s in enumerate(outs) if s.dtype.startswith("float") and len(s.shape) == 3]
    if len(ins) != 1 or not ids or not logits:
        raise ArtifactError(f"{model.folder}: not a decoder artifact: generation needs one input_ids (batch, seq) int64 input and "
                            f"(batch, seq, vocab) logits, or the inputs of a KV-cache decoder; it takes {got}")
    return DecoderIO(ids[0], logits[0])


class _Stepper:
    """Runs one generation step of a decoder artifact: the logits of the last position of each
    row, for the whole sequence so far (no cache) or the new tokens and the cache (KV).

    With a KV cache, when the artifact's attention writes into full-length caches in place
    (``GroupQueryAttention``: ``manifest["source"]["kv_cache"]["attention"] == "gqa"``) and its
    runner offers ``shared_cache_decoder`` (ONNX Runtime), each cache is allocated once at
    ``max_len`` and bound as both past and present; otherwise the presents are fed back as the
    next step's past."""

    def __init__(self, model: Any, io: DecoderIO, max_len: int = 0):
        self.model, self.io = model, io
        self.cache: list[np.ndarray] | None = None
        self.max_len = max_len
        self.shared: Any = None  # decided at the first cached step: a decoder, or False
        self.names = [s.name for s in model.inputs]

    def _shared(self, batch: int) -> Any:
        facts = (getattr(self.model, "manifest", {}).get("source") or {}).get("kv_cache") or {}
        make = getattr(getattr(self.model, "runner", None), "shared_cache_decoder", None)
        if facts.get("attention") != "gqa" or make is None or not self.max_len or self.io.codes:
            return False
        outs = [s.name for s in self.model.outputs]
        kv_heads, head_dim = self.io.cache_shape
        return make([self.names[i] for i in self.io.past], [outs[j] for j in self.io.present], (batch, kv_heads, self.max_len, head_dim),
                    self.io.cache_dtype, outs[self.io.logits], ids=self.names[self.io.ids])

    def __call__(self, ids: np.ndarray, new: int) -> np.ndarray:
        """``ids``: the whole sequence so far; ``new``: how many of its last tokens were not
        run yet (the prompt's length at the first step, then 1)."""
        io = self.io
        if not io.cached:
            return self.model(ids)[io.logits][:, -1, :]
        b, n = ids.shape
        # the step's tokens, the mask over everything so far, and their positions
        step = {io.ids: np.ascontiguousarray(ids[:, n - new:], dtype=np.int64), io.mask: np.ones((b, n), dtype=np.int64),
                io.positions: np.broadcast_to(np.arange(n - new, n, dtype=np.int64), (b, new)).copy()}
        if self.shared is None:
            self.shared = self._shared(b)
        if self.shared:
            return self.shared({self.names[i]: x for i, x in step.items()})[:, -1, :]
        if self.cache is None:
            specs = [self.model.inputs[i] for i in io.past]
            # empty caches, each of its own row width and dtype (codes and scales when stored in k bits)
            self.cache = [np.zeros((b, int(s.shape[1]), 0, int(s.shape[3])), dtype=s.dtype) for s in specs]
        feeds: list[Any] = [None] * len(self.model.inputs)
        for slot, x in step.items():
            feeds[slot] = x
        for slot, tensor in zip(io.past, self.cache):
            feeds[slot] = tensor
        outs = self.model(*feeds)
        self.cache = [outs[j] for j in io.present]
        return outs[io.logits][:, -1, :]


def generate(model: Any, prompt_ids: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int = 32, sampling: Sampling = Sampling(),
             *, eos_token_id: int | None = None, on_token: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Continue ``prompt_ids`` by ``max_new_tokens`` tokens with a decoder artifact.

    Parameters
    ----------
    model : LoadedModel
        From :func:`graphpress.runtime.load`; must take ``input_ids`` and return logits.
    prompt_ids : array-like ``(batch, seq)`` or ``(seq,)`` of int
    max_new_tokens : int
    sampling : Sampling
    eos_token_id : int, optional
        A row that produced it stops (it is padded with it); all rows done ends the loop.
    on_token : callable, optional
        ``on_token(step, tokens)`` after each step with the new token of every row (streaming).

    Returns
    -------
    np.ndarray int64 ``(batch, seq + new)`` (``(seq + new,)`` for a 1-D prompt)
    """
    io = decoder_io(model)
    ids = np.asarray(prompt_ids)
    flat = ids.ndim == 1
    ids = np.atleast_2d(ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ArtifactError(f"{model.folder}: prompt_ids must be a non-empty (batch, seq) array of token ids, got shape {ids.shape} {ids.dtype}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ArtifactError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab = model.outputs[io.logits].shape[-1]
    if isinstance(vocab, int) and (ids.min() < 0 or ids.max() >= vocab):
        raise ArtifactError(f"{model.folder}: prompt token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    context = getattr(model, "context_length", None)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise ArtifactError(f"{model.folder}: a {ids.shape[1]}-token prompt and {max_new_tokens} new tokens exceed the model's context of "
                            f"{context} tokens; shorten the prompt or ask for fewer tokens")
    ids = ids.astype(np.int64)
    rng = np.random.default_rng(sampling.seed)
    done = np.zeros(ids.shape[0], dtype=bool)
    step_fn = _Stepper(model, io, max_len=ids.shape[1] + max_new_tokens)
    for step in range(max_new_tokens):
        logits = step_fn(ids, ids.shape[1] if step == 0 else 1)
        new = next_tokens(logits, sampling, rng).astype(np.int64)
        if eos_token_id is not None:
            new = np.where(done, eos_token_id, new)
            done |= new == eos_token_id
        ids = np.concatenate([ids, new[:, None]], axis=1)
        if on_token is not None:
            on_token(step, new)
        if eos_token_id is not None and done.all():
            break
    return ids[0] if flat else ids


__all__ = ["DecoderIO", "Sampling", "decoder_io", "generate", "next_tokens"]
