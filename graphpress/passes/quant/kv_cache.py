"""``quantize-kv-cache``: a decoder's KV cache stored in 2, 4 or 8 bits per layer, the mix
chosen from measured sensitivity under a memory budget (KVTuner).

A KV-cache decoder (captured with ``--kv-cache``) returns ``present.{i}.key/.value`` that the
next step reads back as ``past_key_values.{i}.key/.value``. The pass puts
``graphpress::kv_quant_write(past, present, b)`` (:mod:`graphpress.ir.ops_kvcache`) on each of
those outputs: the step's new rows are rounded to ``b`` bits, asymmetric per (token, head) row
of ``head_dim`` values with a float16 step and minimum, and the ONNX artifact stores the codes
packed (:mod:`graphpress.lowering.onnx.kv_cache`). One token then costs, per cache,
``kv_heads * (head_dim * b / 8 + 4)`` bytes instead of float16's ``kv_heads * head_dim * 2``.

Which ``b`` each cache gets (keys and values of every layer are separate items)::

    minimise    sum_c KL_c(b_c)                        over b_c in choices
    subject to  sum_c bytes_c(b_c) <= sum_c bytes_c(avg_bits)

``KL_c(b)`` is *measured*: the mean KL (nats) of the next-token distribution against the float
cache when cache ``c`` alone is stored in ``b`` bits, on the calibration sequences decoded in
chunks (the first part prefilled, the rest fed ``chunks`` pieces at a time, so every scored
position reads earlier positions through the rounded cache as it would when generating). The
multiple-choice knapsack is :func:`graphpress.passes.ilp.allocate`. The sum of single-cache KLs
only predicts the joint one, so the chosen mix is measured jointly, and so is the uniform
assignment at ``avg_bits`` (when ``avg_bits`` is a choice): the uniform one is kept if it
measured lower (reported as ``"kept": "uniform"``). ``bits=b`` skips the search: every cache
gets ``b``.

Lossy (``exact = False``). The pipeline's own check runs the graph's examples, prefills with
empty caches, which never read a cache: their logits are unchanged. The pass therefore measures
its cost itself, the decode KL above, reports it (``kl``) and holds it to ``max_kl``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from graphpress.errors import PassError
from graphpress.ir.compare import kl_divergence
from graphpress.ir.graph import Graph
from graphpress.ir.ops_kvcache import FLOAT_BITS, KV_BITS, kv_bytes_per_token, qdq_rows
from graphpress.ir.rewrite import insert_call
from graphpress.passes.base import PassResult, register
from graphpress.passes.ilp import allocate

NAME = "quantize-kv-cache"
KV_QUANT_WRITE = torch.ops.graphpress.kv_quant_write.default
_PRESENT = re.compile(r"present\.(\d+)\.(key|value)")


@dataclass(frozen=True)
class QuantizeKVCacheConfig:
    """Options of ``quantize-kv-cache`` (see ``docs/passes/quantize-kv-cache.md``).

    Attributes
    ----------
    avg_bits : float
        The memory budget: the KV bytes per token of every cache at this width (2..8).
    choices : tuple of int
        Widths a cache may get (from 2, 4, 8).
    bits : int, optional
        Every cache at this width, no search.
    cache_bits : dict of str to int
        Fixed widths of named caches (``"3.key"``, ``"0.value"``): a search's result replayed, or
        layers kept fine by hand. Caches not named get ``bits``, or are searched under what is
        left of the budget.
    chunks : int
        Decode chunks of the scored second half of each calibration sequence (more: closer to
        one token per step, slower).
    max_rows : int
        Calibration sequences used at most.
    max_kl : float, optional
        Budget on the measured decode KL (nats).
    min_sqnr_db : None
        Not used (the prefill outputs the pipeline compares do not read the cache).
    """

    version: int = 1
    avg_bits: float = 4.0
    choices: tuple[int, ...] = KV_BITS
    bits: int | None = None
    cache_bits: dict[str, int] = field(default_factory=dict)
    chunks: int = 4
    max_rows: int = 8
    max_kl: float | None = 0.25
    min_sqnr_db: float | None = None

    def __hash__(self) -> int:
        return hash((self.version, self.avg_bits, self.choices, self.bits, tuple(sorted(self.cache_bits.items())), self.chunks,
                     self.max_rows, self.max_kl, self.min_sqnr_db))

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> PassError:
            return PassError(f"pass '{NAME}': option '{option}' {why}")

        if not self.choices or any(b not in KV_BITS for b in self.choices) or len(set(self.choices)) != len(self.choices):
            raise bad("choices", f"must be distinct widths from {list(KV_BITS)}, got {list(self.choices)!r}")
        if self.bits is not None and self.bits not in KV_BITS:
            raise bad("bits", f"must be one of {list(KV_BITS)}, got {self.bits!r}")
        if not (isinstance(self.avg_bits, (int, float)) and min(self.choices) <= self.avg_bits <= 8):
            raise bad("avg_bits", f"must be between the smallest choice ({min(self.choices)}) and 8, got {self.avg_bits!r}")
        for k, v in dict(self.cache_bits).items():
            if not re.fullmatch(r"\d+\.(key|value)", str(k)) or v not in KV_BITS:
                raise bad("cache_bits", f"entry {k!r}: {v!r} must map a cache name like '3.key' to one of {list(KV_BITS)}")
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise bad("chunks", f"must be an integer >= 1, got {self.chunks!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise bad("max_rows", f"must be an integer >= 1, got {self.max_rows!r}")
        if self.max_kl is not None and not (isinstance(self.max_kl, (int, float)) and self.max_kl > 0):
            raise bad("max_kl", f"must be a number > 0 or null, got {self.max_kl!r}")


@dataclass
class _Cache:
    name: str  # "3.key"
    node: torch.fx.Node  # the kv_quant_write
    kv_heads: int
    head_dim: int


class _Decoder:
    """Runs the graph over calibration sequences in chunks, scoring the second half.

    The prefix is run once, with float caches: what it returns differs between widths only by
    the rounding of its presents, which :meth:`__call__` applies to the stored float presents
    instead of running the prefix again (half of the tokens)."""

    def __init__(self, graph: Graph, chunks: int, max_rows: int, names: list[str]):
        self.graph = graph
        inputs = list(graph.input_names)
        self.slot = {n: inputs.index(n) for n in ("input_ids", "attention_mask", "position_ids")}
        self.pasts = [i for i, n in enumerate(inputs) if n.startswith("past_key_values.")]
        self.cache_names = [inputs[i].removeprefix("past_key_values.") for i in self.pasts]
        unknown = set(self.cache_names) - set(names)
        if unknown:
            raise PassError(f"pass '{NAME}': cache input(s) {sorted(unknown)} return no present output")
        self.presents = [graph.output_names.index("present." + n) for n in self.cache_names]
        self.logits = graph.output_names.index("logits")
        self.batches = []
        rows = 0
        for batch in graph.calibration_batches():
            if rows >= max_rows:
                break
            take = min(max_rows - rows, batch[0].shape[0])
            ids, mask, pos = (batch[self.slot[k]][:take] for k in ("input_ids", "attention_mask", "position_ids"))
            s = ids.shape[1]
            if s < 2:
                continue
            chunk = max(1, (s // 2) // chunks)
            prefix = s - chunk * min(chunks, s - 1)
            bounds = [prefix, *range(prefix + chunk, s + 1, chunk)]
            outs = self._run(ids, mask, pos, 0, prefix, [batch[i][:take] for i in self.pasts])
            self.batches.append((ids, mask, pos, bounds, [outs[j] for j in self.presents]))
            rows += take
        if not self.batches:
            raise PassError(f"pass '{NAME}': needs calibration sequences of at least 2 tokens (give --calibration token ids)")

    def _run(self, ids, mask, pos, a: int, b: int, caches: list[torch.Tensor]):
        feed: list[Any] = [None] * len(self.graph.input_names)
        feed[self.slot["input_ids"]] = ids[:, a:b]
        feed[self.slot["attention_mask"]] = mask[:, :b]
        feed[self.slot["position_ids"]] = pos[:, a:b]
        for i, c in zip(self.pasts, caches):
            feed[i] = c
        with torch.no_grad():
            return self.graph.gm(*feed)

    def __call__(self, bits: dict[str, int]) -> torch.Tensor:
        """Logits of the scored positions (those past each sequence's prefix, mask 1), stacked,
        with the graph's widths set to ``bits``."""
        scored = []
        for ids, mask, pos, bounds, prefix_caches in self.batches:
            caches = [qdq_rows(c, bits[n]) for n, c in zip(self.cache_names, prefix_caches)]
            for a, b in zip(bounds, bounds[1:]):
                outs = self._run(ids, mask, pos, a, b, caches)
                caches = [outs[j] for j in self.presents]
                scored.append(outs[self.logits][mask[:, a:b].bool()])
        return torch.cat(scored)


def _caches(graph: Graph) -> list[_Cache]:
    """Put a ``kv_quant_write(past, present, 16)`` on every ``present.{i}.key/.value`` output."""
    out_node = next(n for n in graph.gm.graph.nodes if n.op == "output")
    placeholders = {n.name: n for n in graph.gm.graph.nodes if n.op == "placeholder"}
    by_input = dict(zip(graph.input_names, placeholders.values()))
    outs = list(out_node.args[0])
    caches = []
    for k, name in enumerate(graph.output_names):
        m = _PRESENT.fullmatch(name)
        if m is None:
            continue
        past = by_input.get(f"past_key_values.{m[1]}.{m[2]}")
        producer = outs[k]
        if past is None or not isinstance(producer, torch.fx.Node):
            continue
        if producer.op == "call_function" and producer.target is KV_QUANT_WRITE:
            raise PassError(f"pass '{NAME}': cache {name!r} is already quantized (the pass ran before)")
        val = past.meta.get("val")
        node = insert_call(graph, KV_QUANT_WRITE, (past, producer, FLOAT_BITS), before=out_node, like=producer)
        outs[k] = node
        caches.append(_Cache(f"{m[1]}.{m[2]}", node, int(val.shape[1]), int(val.shape[3])))
    out_node.args = (tuple(outs) if isinstance(out_node.args[0], tuple) else outs,)
    graph.gm.recompile()
    return caches


@register(NAME)
class QuantizeKVCache:
    """Caches of a KV decoder stored in k bits per layer (module docstring)."""

    exact = False
    Config = QuantizeKVCacheConfig

    def __init__(self, config: QuantizeKVCacheConfig = QuantizeKVCacheConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        if not graph.source.get("kv_cache"):
            raise PassError(f"pass '{NAME}': {graph.name!r} has no KV cache; capture it with --kv-cache (kv_cache=True)")
        caches = _caches(graph)
        if not caches:
            raise PassError(f"pass '{NAME}': {graph.name!r} returns no present.{{i}}.key/.value fed by past_key_values inputs")
        for c in caches:
            if c.head_dim % 4:
                raise PassError(f"pass '{NAME}': cache {c.name} has head_dim {c.head_dim}; packing 2-bit codes needs a multiple of 4")
        t0 = time.perf_counter()

        def assign(bits: dict[str, int]) -> None:
            for c in caches:
                c.node.args = (c.node.args[0], c.node.args[1], bits[c.name])
            graph.gm.recompile()

        floats = {c.name: FLOAT_BITS for c in caches}
        decode = _Decoder(graph, cfg.chunks, cfg.max_rows, list(floats))
        ref = decode(floats)

        def kl_of(bits: dict[str, int]) -> float:
            assign(bits)
            kl = kl_divergence(ref, decode(bits))
            return kl if math.isnan(kl) else max(0.0, kl)  # a NaN must reach the check below, not become 0

        def nbytes(bits: dict[str, int]) -> float:
            return sum(kv_bytes_per_token(c.kv_heads, c.head_dim, bits[c.name]) for c in caches)

        stats: dict[str, Any] = {"caches": len(caches), "scored_positions": int(ref.shape[0])}
        fp16 = nbytes({c.name: FLOAT_BITS for c in caches})
        fixed = dict(cfg.cache_bits)
        if unknown := sorted(set(fixed) - set(floats)):
            raise PassError(f"pass '{NAME}': option 'cache_bits' names {unknown}, which the graph does not return "
                            f"(its caches: {', '.join(floats)})")
        if cfg.bits is not None:
            fixed = {c.name: cfg.bits for c in caches} | fixed
        free = [c for c in caches if c.name not in fixed]
        if not free:
            chosen = {c.name: fixed[c.name] for c in caches}
            kl = kl_of(chosen)
            stats["kept"] = "given"
        else:
            sens = {c.name: {b: kl_of({**floats, c.name: b}) for b in cfg.choices} for c in free}
            items = [[(b, sens[c.name][b], kv_bytes_per_token(c.kv_heads, c.head_dim, b)) for b in cfg.choices] for c in free]
            budget = sum(kv_bytes_per_token(c.kv_heads, c.head_dim, cfg.avg_bits) for c in caches)
            budget -= sum(kv_bytes_per_token(c.kv_heads, c.head_dim, fixed[c.name]) for c in caches if c.name in fixed)
            alloc = allocate(items, budget, what=f"option 'avg_bits' of pass '{NAME}'")
            picked = {c.name: int(b) for c, b in zip(free, alloc.choice)}
            chosen = {c.name: fixed[c.name] if c.name in fixed else picked[c.name] for c in caches}
            kl = kl_of(chosen)
            stats.update({"sensitivity_kl": {k: {str(b): round(v, 6) for b, v in d.items()} for k, d in sens.items()},
                          "predicted_kl": round(alloc.value, 6), "kept": "searched"})
            uniform_bits = int(cfg.avg_bits) if float(cfg.avg_bits).is_integer() and int(cfg.avg_bits) in cfg.choices else None
            if uniform_bits is not None and not fixed:
                uniform = {c.name: uniform_bits for c in caches}
                uniform_kl = kl_of(uniform)
                stats["uniform_kl"] = round(uniform_kl, 6)
                stats["uniform_bytes_per_token"] = nbytes(uniform)
                if uniform_kl < kl:
                    chosen, kl, stats["kept"] = uniform, uniform_kl, "uniform"
        assign(chosen)
        graph.recompile()
        stats.update({
            "bits": chosen, "kl": round(kl, 6), "avg_bits": round(sum(chosen.values()) / len(chosen), 3),
            "bytes_per_token": nbytes(chosen), "fp16_bytes_per_token": fp16, "ratio_vs_fp16": round(nbytes(chosen) / fp16, 4),
            "search_s": round(time.perf_counter() - t0, 2),
        })
        if math.isnan(kl):
            raise PassError(f"pass '{NAME}': decode KL is NaN with the chosen widths {chosen}")
        if cfg.max_kl is not None and kl > cfg.max_kl:
            raise PassError(f"pass '{NAME}': decode KL {kl:.4g} nats exceeds max_kl={cfg.max_kl} at avg_bits={cfg.avg_bits}; "
                            f"raise avg_bits (or bits) or max_kl")
        return PassResult(graph, changed=True, stats=stats)


__all__ = ["QuantizeKVCache", "QuantizeKVCacheConfig"]
