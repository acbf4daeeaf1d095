"""Layer importance for mixed-precision allocation: LIM, ZD, Fisher and measured output noise.

Four pluggable scores (higher = more important = keep more bits), after "Layer-Wise
Quantization" (LIM, ZD) and second-order / measured sensitivity:

* ``lim`` -- *layer input modification*: ``1 - mean_rows cos(x_in, x_out)`` of the layer's
  **block** on the calibration batches. The block is the module path up to its first numeric
  component (``layers.3.attention.wq`` -> ``layers.3``, ``layer1.0.conv1`` -> ``layer1.0``), so
  a transformer block's linears share its score, as in the paper where a "layer" is a block;
  a layer outside numbered blocks (``fc1``, a ``Sequential``'s ``0``) is its own block. The
  block's input is the value entering it from outside with the shape of its output, the output
  the last value leaving it. A block whose input and output shapes differ has no cosine: it gets
  the largest measured score (treated as important; ``stats["unmeasured"]`` lists it).
* ``zd`` -- *z-score distribution*: the share of the layer's weights with
  ``|W - mean| / std > cut`` (outlier-heavy layers are important).
* ``fisher`` -- ``sum F ⊙ (W - Q_b(W))^2`` with ``F`` the diagonal empirical Fisher
  (:func:`graphpress.passes.fisher.fisher_diagonal`): the second-order estimate of the loss
  increase of quantizing the layer to ``b`` bits.
* ``measured`` -- quantize that one layer alone (weights fake-quantized in place, restored
  afterwards) and measure the relative output noise power ``sum ||y_b - y||^2 / sum ||y||^2``
  over the calibration batches (plus the KL divergence of the first output when it looks like
  logits, reported alongside).

Per-bit sensitivities for the ILP allocator (:func:`sensitivities`): ``fisher`` and
``measured`` give one number per ``(layer, bits)`` directly; ``lim`` and ``zd`` are bit-free
scores, turned into ``score_l * ||W - Q_b W||^2 / ||W||^2`` (importance times relative weight
noise), which is additive over layers like the other two.

Results are cached per (method, options, graph code, weights, calibration batches) in a dict
keyed by a SHA-1 digest (:func:`cache_key`); ``COUNTERS["computed"]`` counts real computations.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.compare import kl_divergence, relative_noise
from graphpress.ir.graph import Graph
from graphpress.passes.base import progress_iter
from graphpress.passes.fisher import fisher_diagonal
from graphpress.passes.layers import QLayer, record

METHODS = ("lim", "zd", "fisher", "measured")
DEFAULT_ZD_CUT = 3.0

_CACHE: dict[str, Any] = {}
COUNTERS = {"computed": 0, "hits": 0}

#: ``quantizer(layer, bits) -> dense fake-quantized weight`` in the layer's own layout.
Quantizer = Callable[[QLayer, int], torch.Tensor]


def clear_cache() -> None:
    """Forget every cached score."""
    _CACHE.clear()


def _digest_tensor(h: hashlib._Hash, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu()
    h.update(str((tuple(t.shape), str(t.dtype))).encode())
    if t.numel():
        # the buffer itself, not a bytes copy: a copy of an LM head is the pass's peak
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def cache_key(graph: Graph, layers: Sequence[QLayer], tag: str) -> str:
    """Digest of ``tag`` (method and options), the graph's code, the layers' weights and the
    calibration batches."""
    h = hashlib.sha1(tag.encode())
    h.update(graph.gm.code.encode())
    for layer in layers:
        h.update(layer.name.encode())
        _digest_tensor(h, graph.get_tensor(layer.weight_target))
    for batch in graph.calibration_batches():
        for x in batch:
            _digest_tensor(h, x)
    return h.hexdigest()


def _cached(key: str, compute: Callable[[], Any]) -> Any:
    if key in _CACHE:
        COUNTERS["hits"] += 1
        return _CACHE[key]
    value = compute()
    COUNTERS["computed"] += 1
    _CACHE[key] = value
    return value


# ---------------------------------------------------------------------------- LIM
def block_of(module: str) -> str:
    """The block a module path belongs to: the prefix up to its first numeric component."""
    parts = module.split(".") if module else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return module


def _in_block(graph: Graph, node: fx.Node, block: str) -> bool:
    m = graph.source_module(node)
    return m == block or m.startswith(block + ".")


def block_io(graph: Graph, layer: QLayer) -> tuple[str, fx.Node, fx.Node]:
    """``(block, input node, output node)`` of ``layer``'s block (see module docstring)."""
    block = block_of(graph.source_module(layer.node))
    if not block or block == graph.source_module(layer.node):
        return block or layer.name, layer.input_node, layer.output_node
    members = [n for n in graph.nodes if n.op == "call_function" and _in_block(graph, n, block)]
    inside = set(members)
    leaving = [n for n in members if any(u not in inside for u in n.users)]
    out = leaving[-1] if leaving else layer.output_node
    out_val = out.meta.get("val")
    entering: list[fx.Node] = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in entering:
                entering.append(a)
    floats = [a for a in entering if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dtype.is_floating_point]
    same = [a for a in floats if isinstance(out_val, torch.Tensor) and tuple(a.meta["val"].shape) == tuple(out_val.shape)]
    inp = same[0] if same else (floats[0] if floats else layer.input_node)
    return block, inp, out


def _one_minus_cos(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float | None:
    total, count = 0.0, 0
    for x, y in zip(xs, ys):
        if x.shape != y.shape:
            return None
        x2 = x.reshape(x.shape[0], -1).double() if x.dim() == 4 else x.reshape(-1, x.shape[-1]).double()
        y2 = y.reshape(y.shape[0], -1).double() if y.dim() == 4 else y.reshape(-1, y.shape[-1]).double()
        cos = torch.nn.functional.cosine_similarity(x2, y2, dim=-1, eps=1e-12)
        total += float((1.0 - cos).sum())
        count += cos.numel()
    return total / count if count else None


def lim_scores(graph: Graph, layers: Sequence[QLayer]) -> tuple[dict[str, float], list[str]]:
    """``{layer: LIM of its block}`` and the blocks that could not be measured."""
    ios = {layer.name: block_io(graph, layer) for layer in layers}
    nodes = {n for _b, i, o in ios.values() for n in (i, o)}
    values = record(graph, nodes)
    per_block: dict[str, float | None] = {}
    for block, i, o in ios.values():
        if block not in per_block:
            per_block[block] = _one_minus_cos(values.get(i.name, []), values.get(o.name, []))
    measured = [v for v in per_block.values() if v is not None]
    fallback = max(measured) if measured else 1.0
    unmeasured = sorted(b for b, v in per_block.items() if v is None)
    return {name: (per_block[b] if per_block[b] is not None else fallback) for name, (b, _i, _o) in ios.items()}, unmeasured


# ---------------------------------------------------------------------------- ZD
def zd_score(w: torch.Tensor, cut: float = DEFAULT_ZD_CUT) -> float:
    """Share of weights whose z-score magnitude exceeds ``cut``."""
    w = w.detach().double().reshape(-1)
    std = float(w.std()) if w.numel() > 1 else 0.0
    if std == 0:
        return 0.0
    return float(((w - w.mean()).abs() / std > cut).double().mean())


# ---------------------------------------------------------------------------- measured
def _noise_and_kl(refs: Sequence[tuple[torch.Tensor, ...]], outs: Sequence[tuple[torch.Tensor, ...]]) -> tuple[float, float | None]:
    kls = [kl_divergence(ref[0], out[0]) for ref, out in zip(refs, outs)
           if ref and ref[0].is_floating_point() and ref[0].dim() >= 2 and ref[0].shape[-1] > 1]
    return relative_noise(refs, outs), (sum(kls) / len(kls) if kls else None)


@torch.no_grad()
def measured_sensitivities(graph: Graph, layers: Sequence[QLayer], options: dict[str, Sequence[int]], quantizer: Quantizer) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """``({layer: {bits: noise ratio}}, {layer: {bits: KL}})`` with only that layer quantized."""
    batches = graph.calibration_batches()
    refs = [graph.run(*b) for b in batches]
    noise: dict[str, dict[int, float]] = {}
    kl: dict[str, dict[int, float]] = {}
    for layer in progress_iter(layers):
        noise[layer.name], kl[layer.name] = {}, {}
        weight = graph.get_tensor(layer.weight_target)
        for b in options[layer.name]:
            if b >= 32:
                noise[layer.name][b] = 0.0
                kl[layer.name][b] = 0.0
                continue
            # swapped, not written: the pipeline's snapshot of the graph shares this weight
            with graph.swap_tensors({layer.weight_target: quantizer(layer, b).to(weight.dtype)}):
                ratio, k = _noise_and_kl(refs, [graph.run(*x) for x in batches])
            noise[layer.name][b] = ratio
            if k is not None:
                kl[layer.name][b] = k
    return noise, kl


# ---------------------------------------------------------------------------- public API
def _relative_weight_noise(w: torch.Tensor, wq: torch.Tensor) -> float:
    """``||w - wq||^2 / ||w||^2`` (float64, in chunks: :func:`~graphpress.ir.compare.relative_noise`);
    0 for an all-zero weight."""
    return relative_noise([[w.detach()]], [[wq.detach()]]) if bool(w.any()) else 0.0


def _tag(method: str, options: dict[str, Sequence[int]], quant_tag: str, zd_cut: float) -> str:
    opts = ";".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(options.items()))
    return f"{method}|{quant_tag}|{zd_cut}|{opts}"


def sensitivities(
    graph: Graph,
    layers: Sequence[QLayer],
    options: dict[str, Sequence[int]],
    method: str,
    quantizer: Quantizer,
    *,
    quant_tag: str = "",
    zd_cut: float = DEFAULT_ZD_CUT,
) -> dict[str, Any]:
    """Importance and per-bit sensitivity of every layer (cached, see module docstring).

    Parameters
    ----------
    graph : Graph
        Calibration batches from ``graph.calibration`` (else the example inputs).
    layers : sequence of QLayer
    options : dict
        ``{layer: bit widths it may take}`` (``>= 32`` means kept in float).
    method : str
        One of :data:`METHODS`.
    quantizer : callable
        ``quantizer(layer, bits)`` -> the dense fake-quantized weight.
    quant_tag : str
        Describes the quantizer (bits grid, group size ...) for the cache key.
    zd_cut : float
        z-score cut of ``zd``.

    Returns
    -------
    dict
        ``{"importance": {layer: float}, "sensitivity": {layer: {bits: float}},
        "kl": {layer: {bits: float}} (measured only), "unmeasured": [blocks] (lim only)}``.
    """
    if method not in METHODS:
        raise PassError(f"importance: method must be one of {', '.join(METHODS)}, got {method!r}")
    key = cache_key(graph, layers, _tag(method, options, quant_tag, zd_cut))
    return _cached(key, lambda: _compute(graph, layers, options, method, quantizer, zd_cut))


def _compute(graph: Graph, layers: Sequence[QLayer], options: dict[str, Sequence[int]], method: str, quantizer: Quantizer, zd_cut: float) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method}
    low = {layer.name: min(options[layer.name]) for layer in layers}
    if method == "measured":
        sens, kl = measured_sensitivities(graph, layers, options, quantizer)
        out.update(sensitivity=sens, kl=kl, importance={n: sens[n][low[n]] for n in sens})
        return out
    if method == "fisher":
        targets = sorted({layer.weight_target for layer in layers})
        fisher = fisher_diagonal(graph, targets) if targets else {}
        sens = {}
        for layer in layers:
            w = graph.get_tensor(layer.weight_target).detach().double()
            f = fisher[layer.weight_target].double()
            sens[layer.name] = {b: (0.0 if b >= 32 else float((f * (w - quantizer(layer, b).double()).pow(2)).sum())) for b in options[layer.name]}
        out.update(sensitivity=sens, importance={n: sens[n][low[n]] for n in sens})
        return out
    if method == "lim":
        scores, unmeasured = lim_scores(graph, layers)
        out["unmeasured"] = unmeasured
    else:
        scores = {layer.name: zd_score(graph.get_tensor(layer.weight_target), zd_cut) for layer in layers}
    sens = {}
    for layer in layers:
        w = graph.get_tensor(layer.weight_target).detach()
        opts = options[layer.name]
        # a layer with one width has nothing to choose between: its sensitivity is not measured
        # (0), which spares a dense fake-quantized copy of its weight (98 MB for the head of
        # a 32000-token vocabulary at width 768)
        sens[layer.name] = {
            b: (0.0 if b >= 32 or len(opts) == 1 else scores[layer.name] * _relative_weight_noise(w, quantizer(layer, b))) for b in opts
        }
    out.update(sensitivity=sens, importance=scores)
    return out


__all__ = [
    "COUNTERS",
    "METHODS",
    "block_io",
    "block_of",
    "cache_key",
    "clear_cache",
    "lim_scores",
    "measured_sensitivities",
    "sensitivities",
    "zd_score",
]
