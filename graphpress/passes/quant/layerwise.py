"""Layer-wise mixed-precision quantization: important layers keep more bits, to a fractional average bit-width.

For the eligible layers (:func:`graphpress.passes.quant.layers.find_layers`) each gets one
bit-width from ``bits`` (e.g. ``(8, 4)``; ``32`` keeps a layer in float) so that the weighted
average ``sum_l b_l n_l / sum_l n_l`` (``n_l`` = the layer's weights) is at most
``target_bits``, or the stored bytes (codes + scales + zero points) at most ``size_budget``.

Allocation:

* ``allocation="order"`` (the paper's method): all layers start at the highest width; layers
  are demoted one width step at a time in a fixed order until the budget holds. ``order``:
  ``importance`` (least important first, by :mod:`graphpress.passes.quant.importance`),
  ``reverse`` (most important first: the control that should hurt most) or ``random``
  (seeded shuffle: the paper's "arbitrary order").
* ``allocation="ilp"``: one multiple-choice knapsack over (layer, bits) minimising the summed
  per-bit sensitivity under the budget (:func:`graphpress.passes.ilp.allocate`).

Quantizers (:mod:`graphpress.ir.quant`) and the ops each layer becomes
(:mod:`graphpress.ir.ops_quant`), by ``activations``:

* ``none`` (weight-only): linears -> ``wlinear_nbits`` k-bit groups with float activations
  (MatMulNBits, ``accuracy_level=0``); convs are not eligible (no weight-only conv kernel).
* ``int8-block`` (default): linears -> ``wlinear_nbits`` with int8 activations per (row, group)
  (MatMulNBits ``accuracy_level=4``: fast at every width; ORT's 8-bit fp32-compute path is
  slower than fp32).
* ``int8``: 8-bit linears -> ``qlinear`` with calibrated static uint8 activations (QGemm, U8S8);
  lower widths as ``int8-block``.
* ``int8-dynamic``: 8-bit linears -> ``qlinear`` with per-tensor activation ranges taken at run
  time (DynamicQuantizeMatMul); lower widths as ``int8-block``.

In every mode but ``none`` convs take 8 bits only and become ``qconv2d`` (QLinearConv) with
static calibrated activations.

Group-wise codes are asymmetric RTN with a zero point unless ``symmetric``; a static
activation range comes from the calibration values (``act_calibration``: min/max or
percentile). A layer whose input is (through max-pool, flatten, view or relu) the quantized
output of an earlier layer reuses that layer's output grid, so the values are requantized
exactly and ONNX Runtime drops the duplicate Q/DQ pair. A ``relu`` that is a layer's only user is
fused into its op.

Stats: per-layer bits, importance, SQNR of the layer output on the calibration batches
(float layer vs quantized op on the same float inputs), bytes before/after, and the achieved
average bits. Lossy: ``exact = False``; the pipeline checks ``min_sqnr_db`` (default 15 dB,
explicit) and ``max_kl``.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.errors import PassError
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.ir.quant import (
    ActQuant,
    act_params,
    calibrate_range,
    fake_quant_groupwise,
    fake_quant_per_channel,
    groupwise,
    symmetric_per_channel,
    to_nbits,
    weight_bytes,
)
from graphpress.ir.rewrite import (
    Skips,
    add_constant,
    arg,
    erase_dead,
    insert_call,
    is_op,
)
from graphpress.passes.base import PassResult, register
from graphpress.passes.ilp import allocate
from graphpress.passes.quant import importance as imp
from graphpress.passes.quant.layers import QLayer, find_layers, record

aten = torch.ops.aten
QLINEAR = torch.ops.graphpress.qlinear.default
QCONV2D = torch.ops.graphpress.qconv2d.default
WLINEAR_NBITS = torch.ops.graphpress.wlinear_nbits.default

NAME = "quantize-layerwise"
DEFAULT_TARGET_BITS = 6.0
FLOAT_BITS = 32
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
_PASSTHROUGH = (aten.max_pool2d, aten.flatten, aten.view, aten.reshape, aten._unsafe_view, aten.relu, aten.relu_, aten.clone,
                aten.contiguous, aten.dropout)
_INT32 = (-(2**31), 2**31 - 1)


def _err(option: str, msg: str) -> PassError:
    return PassError(f"pass '{NAME}': option '{option}': {msg}")


@dataclass(frozen=True)
class QuantizeLayerwiseConfig:
    """Options of ``quantize-layerwise`` (see ``docs/passes/quantize-layerwise.md``).

    Attributes
    ----------
    bits : tuple of int
        Bit-widths a layer may take (2..8; 32 keeps it in float).
    target_bits : float, optional
        Budget: average bits per weight over the eligible layers. When neither this nor
        ``size_budget`` is given the budget is 6.0.
    size_budget : int, optional
        Budget: bytes of the eligible layers' stored weights (codes, scales, zero points).
    allocation : "order" or "ilp"
    order : "importance", "random" or "reverse"
        Demotion order of ``allocation="order"``.
    importance : "lim", "zd", "fisher" or "measured"
        Importance / sensitivity score (:mod:`graphpress.passes.quant.importance`).
    group_size : int
        Group of the group-wise quantizer (16, 32, 64, 128, 256).
    symmetric : bool
        Symmetric group-wise codes (no zero points) instead of asymmetric.
    activations : "none", "int8-block", "int8" or "int8-dynamic"
        How activations are quantized (module docstring): not at all, int8 per (row, group),
        static calibrated uint8 per tensor, or dynamic per-tensor uint8 for the 8-bit linears.
    act_calibration : "minmax" or "percentile"
    percentile : float
        Percentile of ``act_calibration="percentile"``.
    layer_bits : dict of str to int
        Fixed bit-width per layer name (not allocated).
    skip : tuple of str
        Layers left in float (not counted in the average).
    zd_cut : float
        z-score cut of ``importance="zd"``.
    seed : int
        Seed of ``order="random"``.
    min_sqnr_db, max_kl : float, optional
        Budget the pipeline checks against the previous graph.
    """

    version: int = 1
    bits: tuple[int, ...] = (8, 4)
    target_bits: float | None = None
    size_budget: int | None = None
    allocation: Literal["order", "ilp"] = "order"
    order: Literal["importance", "random", "reverse"] = "importance"
    importance: Literal["lim", "zd", "fisher", "measured"] = "lim"
    group_size: int = 32
    symmetric: bool = False
    activations: Literal["none", "int8-block", "int8", "int8-dynamic"] = "int8-block"
    act_calibration: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.99
    layer_bits: dict[str, int] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    zd_cut: float = imp.DEFAULT_ZD_CUT
    seed: int = 0
    min_sqnr_db: float | None = 15.0
    max_kl: float | None = None

    def __post_init__(self) -> None:
        if not self.bits or any(b not in ALLOWED_BITS for b in self.bits):
            raise _err("bits", f"{list(self.bits)} must be widths in {', '.join(map(str, ALLOWED_BITS))}")
        if self.target_bits is not None and self.size_budget is not None:
            raise _err("target_bits", "give target_bits or size_budget, not both")
        if self.target_bits is not None and not (isinstance(self.target_bits, (int, float)) and self.target_bits > 0):
            raise _err("target_bits", f"must be a number > 0, got {self.target_bits!r}")
        if self.size_budget is not None and not (isinstance(self.size_budget, int) and self.size_budget >= 0):
            raise _err("size_budget", f"must be bytes >= 0, got {self.size_budget!r}")
        checks = (("allocation", ("order", "ilp")), ("order", ("importance", "random", "reverse")), ("importance", imp.METHODS),
                  ("activations", ("none", "int8-block", "int8", "int8-dynamic")), ("act_calibration", ("minmax", "percentile")))
        for option, allowed in checks:
            value = getattr(self, option)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _err(option, f"{value!r} is not one of {', '.join(allowed)}{hint}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise _err("group_size", f"must be 16, 32, 64, 128 or 256, got {self.group_size!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise _err("percentile", f"must be in (50, 100], got {self.percentile!r}")
        bad = {k: v for k, v in dict(self.layer_bits).items() if v not in ALLOWED_BITS}
        if bad:
            k, v = next(iter(bad.items()))
            raise _err("layer_bits", f"layer '{k}': {v!r} is not a width in {', '.join(map(str, ALLOWED_BITS))}")

    def __hash__(self) -> int:
        return hash((self.version, self.bits, self.target_bits, self.size_budget, self.allocation, self.order, self.importance,
                     self.group_size, self.symmetric, self.activations, self.act_calibration, self.percentile,
                     tuple(sorted(self.layer_bits.items())), self.skip, self.zd_cut, self.seed, self.min_sqnr_db, self.max_kl))

    @property
    def budget(self) -> tuple[str, float]:
        """``("bits", average)`` or ``("bytes", size)``."""
        if self.size_budget is not None:
            return "bytes", float(self.size_budget)
        return "bits", float(self.target_bits if self.target_bits is not None else DEFAULT_TARGET_BITS)


@dataclass
class LayerPlan:
    """What happens to one layer."""

    layer: QLayer
    bits: int
    in_quant: ActQuant | None = None
    out_quant: ActQuant | None = None
    dynamic: bool = False


# ---------------------------------------------------------------------------- quantizer choice
def per_channel_int8(layer: QLayer, bits: int, cfg: QuantizeLayerwiseConfig) -> bool:
    """Whether ``layer`` at ``bits`` uses the per-output-channel int8 grid (``qlinear``/``qconv2d``)
    rather than the group-wise one (``wlinear_nbits``)."""
    return layer.kind == "conv2d" or (bits == 8 and cfg.activations in ("int8", "int8-dynamic"))


def fake_weight(layer: QLayer, w: torch.Tensor, bits: int, cfg: QuantizeLayerwiseConfig) -> torch.Tensor:
    """The dense fake-quantized weight ``layer`` gets at ``bits`` under ``cfg``."""
    if bits >= FLOAT_BITS:
        return w.detach().clone()
    if per_channel_int8(layer, bits, cfg):
        return fake_quant_per_channel(w, bits, 0)
    return fake_quant_groupwise(w, bits, cfg.group_size, symmetric=cfg.symmetric)


def stored_bytes(layer: QLayer, bits: int, cfg: QuantizeLayerwiseConfig) -> int:
    """Bytes the layer's weight takes at ``bits`` (float32 at 32)."""
    k = layer.in_features * layer.kernel[0] * layer.kernel[1]
    if bits >= FLOAT_BITS:
        return 4 * layer.out_features * k
    if per_channel_int8(layer, bits, cfg):
        return weight_bytes(layer.out_features, k, bits, None)
    return weight_bytes(layer.out_features, k, bits, cfg.group_size, symmetric=cfg.symmetric)


def layer_options(layer: QLayer, cfg: QuantizeLayerwiseConfig) -> tuple[list[int], str | None]:
    """Bit-widths ``layer`` may take and, when some of ``cfg.bits`` are unavailable, why."""
    if layer.kind == "conv2d":
        opts = [b for b in cfg.bits if b in (8, FLOAT_BITS)]
        why = "conv2d lowers to int8 QLinearConv only (no low-bit conv kernel)" if len(opts) < len(cfg.bits) else None
        return (opts or [FLOAT_BITS]), why
    return sorted(set(cfg.bits), reverse=True), None


# ---------------------------------------------------------------------------- allocation
def allocate_by_order(
    layers: list[QLayer], options: dict[str, list[int]], order: list[str], cost: dict[str, dict[int, float]], budget: float
) -> dict[str, int]:
    """Demote layers one width step at a time in ``order`` until ``sum cost <= budget``."""
    bits = {layer.name: max(options[layer.name]) for layer in layers}

    def total() -> float:
        return math.fsum(cost[n][b] for n, b in bits.items())

    if total() <= budget:
        return bits
    levels = sorted({b for opts in options.values() for b in opts}, reverse=True)
    for level in levels[1:]:
        for name in order:
            lower = [b for b in options[name] if b < bits[name] and b >= level]
            if not lower:
                continue
            bits[name] = max(lower)
            if total() <= budget:
                return bits
    return bits


def demotion_order(names: list[str], importance: dict[str, float], order: str, seed: int) -> list[str]:
    """Layer names in demotion order (ties keep graph order)."""
    pos = {n: i for i, n in enumerate(names)}
    if order == "importance":
        return sorted(names, key=lambda n: (importance[n], pos[n]))
    if order == "reverse":
        return sorted(names, key=lambda n: (-importance[n], pos[n]))
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# ---------------------------------------------------------------------------- the pass
@register(NAME)
class QuantizeLayerwise:
    """Mixed-precision weight (and activation) quantization to a budget (see module docstring)."""

    exact = False
    Config = QuantizeLayerwiseConfig

    def __init__(self, config: QuantizeLayerwiseConfig = QuantizeLayerwiseConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        layers, rejected = find_layers(graph, convs=cfg.activations != "none")
        _check_names(cfg.layer_bits, "layer_bits", layers, rejected)
        _check_names(dict.fromkeys(cfg.skip), "skip", layers, rejected)
        kept: dict[str, str] = dict(rejected)
        active: list[QLayer] = []
        options: dict[str, list[int]] = {}
        notes: dict[str, str] = {}
        for layer in layers:
            if layer.name in cfg.skip:
                kept[layer.name] = "skipped by config"
                continue
            opts, why = layer_options(layer, cfg)
            if layer.name in cfg.layer_bits:
                fixed = cfg.layer_bits[layer.name]
                if fixed not in opts + [FLOAT_BITS]:
                    raise _err("layer_bits", f"layer '{layer.name}' cannot take {fixed} bits: {why or 'not in bits'}")
                opts = [fixed]
            if why:
                notes[layer.name] = why
            options[layer.name] = opts
            active.append(layer)
        if not active:
            return PassResult(graph, changed=False, stats={"quantized": 0, "kept_float": kept, "skipped": dict(Skips(_count(kept)))})

        weights = {layer.name: graph.get_tensor(layer.weight_target).detach() for layer in active}

        def quantizer(layer: QLayer, b: int) -> torch.Tensor:
            return fake_weight(layer, graph.get_tensor(layer.weight_target), b, cfg)

        quant_tag = f"g{cfg.group_size}|sym{cfg.symmetric}|act{cfg.activations}"
        scores = imp.sensitivities(graph, active, options, cfg.importance, quantizer, quant_tag=quant_tag, zd_cut=cfg.zd_cut)
        bits = self._allocate(active, options, scores, cfg)

        plans = self._plan(graph, active, bits, cfg)
        stats_layers = self._rewrite(graph, plans, weights, scores, cfg)
        if any(p.bits < FLOAT_BITS for p in plans):
            graph.remove_unused_tensors()
            graph.recompile()
        for p in plans:
            if p.bits >= FLOAT_BITS:
                kept[p.layer.name] = "allocated 32 bits (float)"

        n = sum(layer.params for layer in active)
        avg = math.fsum(bits[l.name] * l.params for l in active) / n
        before = sum(4 * l.params for l in active)
        after = sum(stored_bytes(l, bits[l.name], cfg) for l in active)
        kind, amount = cfg.budget
        stats = {
            "quantized": sum(1 for p in plans if p.bits < FLOAT_BITS),
            "budget": {"kind": kind, "amount": amount},
            "average_bits": round(avg, 4),
            "bits": {l.name: bits[l.name] for l in active},
            "importance_method": cfg.importance,
            "allocation": cfg.allocation if cfg.allocation == "ilp" else f"order:{cfg.order}",
            "layers": stats_layers,
            "bytes_before": before,
            "bytes_after": after,
            "compression": round(before / after, 3) if after else None,
            "activations": cfg.activations,
            "notes": notes,
            "kept_float": kept,
            "skipped": dict(Skips(_count(kept))),
        }
        if scores.get("unmeasured"):
            stats["importance_unmeasured_blocks"] = scores["unmeasured"]
        return PassResult(graph, changed=stats["quantized"] > 0, stats=stats)

    # ------------------------------------------------------------------ steps
    def _allocate(self, layers: list[QLayer], options: dict[str, list[int]], scores: dict[str, Any], cfg: QuantizeLayerwiseConfig) -> dict[str, int]:
        kind, amount = cfg.budget
        if kind == "bits":
            cost = {l.name: {b: float(b * l.params) for b in options[l.name]} for l in layers}
            budget = amount * sum(l.params for l in layers)
            what = f"pass '{NAME}': option 'target_bits' ({amount:g} average bits)"
        else:
            cost = {l.name: {b: float(stored_bytes(l, b, cfg)) for b in options[l.name]} for l in layers}
            budget = amount
            what = f"pass '{NAME}': option 'size_budget' (bytes)"
        floor = math.fsum(min(c.values()) for c in cost.values())
        if floor > budget * (1 + 1e-12):
            least = floor / sum(l.params for l in layers) if kind == "bits" else floor
            raise PassError(f"{what} cannot be met: the lowest allocation takes {least:.6g}{' bits' if kind == 'bits' else ' bytes'}; "
                            f"raise the budget or add lower widths to 'bits'")
        if cfg.allocation == "ilp":
            sens = scores["sensitivity"]
            items = [[(b, float(sens[l.name][b]), cost[l.name][b]) for b in options[l.name]] for l in layers]
            alloc = allocate(items, budget, what=what)
            return {l.name: int(b) for l, b in zip(layers, alloc.choice)}
        order = demotion_order([l.name for l in layers], scores["importance"], cfg.order, cfg.seed)
        return allocate_by_order(layers, options, order, cost, budget)

    def _plan(self, graph: Graph, layers: list[QLayer], bits: dict[str, int], cfg: QuantizeLayerwiseConfig) -> list[LayerPlan]:
        plans = [LayerPlan(l, bits[l.name]) for l in layers]
        for p in plans:
            p.dynamic = p.bits == 8 and cfg.activations == "int8-dynamic" and p.layer.kind == "linear"
        static = [p for p in plans if p.bits < FLOAT_BITS and per_channel_int8(p.layer, p.bits, cfg) and not p.dynamic]
        if not static:
            return plans
        nodes = [n for p in static for n in (p.layer.input_node, p.layer.output_node)]
        values = record(graph, nodes)
        produced: dict[str, ActQuant] = {}
        for p in static:  # graph order: producers come first
            src = _passthrough_source(p.layer.input_node)
            if src is not None and src.name in produced:
                p.in_quant = produced[src.name]
            else:
                p.in_quant = act_params(*calibrate_range(values[p.layer.input_node.name], cfg.act_calibration, cfg.percentile))
            if p.layer.kind == "conv2d" or p.layer.relu is not None:
                p.out_quant = act_params(*calibrate_range(values[p.layer.output_node.name], cfg.act_calibration, cfg.percentile))
                produced[p.layer.output_node.name] = p.out_quant
        return plans

    def _rewrite(self, graph: Graph, plans: list[LayerPlan], weights: dict[str, torch.Tensor], scores: dict[str, Any], cfg: QuantizeLayerwiseConfig) -> dict[str, dict[str, Any]]:
        todo = [p for p in plans if p.bits < FLOAT_BITS]
        # names first: rewriting a layer re-points the next layer's input to the new node
        ends = {p.layer.name: (p.layer.input_node.name, _compared_node(p).name) for p in todo}
        io = record(graph, [n for p in todo for n in (p.layer.input_node, _compared_node(p))]) if todo else {}
        out: dict[str, dict[str, Any]] = {}
        for p in plans:
            layer = p.layer
            entry: dict[str, Any] = {
                "bits": p.bits,
                "kind": layer.kind,
                "params": layer.params,
                "importance": float(scores["importance"][layer.name]),
                "bytes_before": 4 * layer.params,
                "bytes_after": stored_bytes(layer, p.bits, cfg),
            }
            if p.bits < FLOAT_BITS:
                in_name, out_name = ends[layer.name]
                call = _rewrite_layer(graph, p, weights[layer.name], cfg)
                entry["op"] = call.op_name
                entry["sqnr_db"] = _layer_sqnr(layer, call, io[in_name], io[out_name])
                if p.in_quant is not None:
                    entry["input_quant"] = {"scale": p.in_quant.scale, "zero_point": p.in_quant.zero_point}
                if p.dynamic:
                    entry["input_quant"] = "dynamic"
                if len(graph.tensor_users(layer.weight_target)) > 0:
                    entry["note"] = "float weight kept: other ops read it too"
            out[layer.name] = entry
        return out


# ---------------------------------------------------------------------------- rewriting
def _fuses_relu(plan: LayerPlan) -> bool:
    return plan.layer.relu is not None and (plan.in_quant is not None or plan.dynamic)


def _compared_node(plan: LayerPlan) -> fx.Node:
    """The float node the quantized op replaces the value of (the relu when it is fused)."""
    return plan.layer.relu if _fuses_relu(plan) else plan.layer.node


@dataclass
class _Call:
    """A quantized op call with its constant tensors, to evaluate the layer's error."""

    op: Any
    tensors: list[torch.Tensor | None]
    scalars: list[Any]

    @property
    def op_name(self) -> str:
        return str(self.op.name()).replace("graphpress::", "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *self.tensors, *self.scalars)


def _layer_sqnr(layer: QLayer, call: _Call, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        got = [call(x) for x in inputs]
    ref = torch.cat([o.reshape(-1) for o in outputs])
    test = torch.cat([g.reshape(-1) for g in got])
    value = sqnr_db(ref, test)
    return round(value, 3) if math.isfinite(value) else (1e9 if value > 0 else -1e9)


def _pair(v: Any, default: int) -> list[int]:
    if v is None:
        return [default, default]
    if isinstance(v, int):
        return [v, v]
    v = [int(x) for x in v]
    return v * 2 if len(v) == 1 else v


def _conv_args(layer: QLayer) -> tuple[list[int], list[int], list[int]]:
    node = layer.node
    stride = _pair(arg(node, 3, "stride", [1, 1]), 1)
    dilation = _pair(arg(node, 5, "dilation", [1, 1]), 1)
    padding = arg(node, 4, "padding", [0, 0])
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        else:
            totals = [d * (k - 1) for d, k in zip(dilation, layer.kernel)]
            if any(t % 2 for t in totals):
                raise PassError(f"pass '{NAME}': layer '{layer.name}': padding='same' is asymmetric for this kernel; cannot lower to QLinearConv")
            padding = [t // 2 for t in totals]
    return stride, _pair(padding, 0), dilation


def _int32_bias(bias: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    unit = torch.tensor(in_scale, dtype=torch.float32) * w_scale.float()
    return torch.clamp(torch.round(bias.detach().double() / unit.double()), *_INT32).to(torch.int32)


def _rewrite_layer(graph: Graph, plan: LayerPlan, w: torch.Tensor, cfg: QuantizeLayerwiseConfig) -> _Call:
    layer = plan.layer
    node = layer.node
    module = graph.source_module(node)
    x = node.args[0]
    bias_node = layer.bias_node()
    bias = graph.tensor_of(bias_node) if bias_node is not None else None
    if bias_node is not None and bias is None:
        raise PassError(f"pass '{NAME}': layer '{layer.name}': bias is not a constant tensor")
    hint = layer.weight_target.replace(".", "_")

    def const(suffix: str, t: torch.Tensor) -> fx.Node:
        return add_constant(graph, f"{hint}_{suffix}", t.contiguous(), before=node, parameter=False, module=module)

    replaced = layer.relu if _fuses_relu(plan) else None
    static = plan.in_quant is not None
    if layer.kind == "linear" and not static and not plan.dynamic:
        nb = to_nbits(groupwise(w, plan.bits, cfg.group_size, symmetric=cfg.symmetric))
        act_bits = 0 if cfg.activations == "none" else 8
        tensors = [nb.packed, nb.scales, nb.zeros, None if bias is None else bias.detach().float().clone()]
        args_nodes = [const("q", nb.packed), const("scales", nb.scales), const("zeros", nb.zeros) if nb.zeros is not None else None, bias_node]
        scalars = [layer.in_features, nb.bits, cfg.group_size, act_bits]
        new = insert_call(graph, WLINEAR_NBITS, (x, *args_nodes, *scalars), before=node, like=node)
        call = _Call(WLINEAR_NBITS, tensors, scalars)
    else:
        q, scale = symmetric_per_channel(w, plan.bits, 0)
        relu = replaced is not None
        if plan.dynamic:
            b = None if bias is None else bias.detach().float().clone()
            scalars = [0.0, 0, 0.0, 0, relu]
        else:
            b = None if bias is None else _int32_bias(bias, plan.in_quant.scale, scale)
            oq = plan.out_quant
            scalars = [plan.in_quant.scale, plan.in_quant.zero_point, oq.scale if oq else 0.0, oq.zero_point if oq else 0, relu]
        args_nodes = [const("q", q), const("scale", scale), const("bias_q", b) if b is not None and static else bias_node]
        if layer.kind == "linear":
            new = insert_call(graph, QLINEAR, (x, *args_nodes, *scalars), before=node, like=node)
            call = _Call(QLINEAR, [q, scale, b], scalars)
        else:
            stride, padding, dilation = _conv_args(layer)
            conv_scalars = [stride, padding, dilation, layer.groups, *scalars]
            new = insert_call(graph, QCONV2D, (x, *args_nodes, *conv_scalars), before=node, like=node)
            call = _Call(QCONV2D, [q, scale, b], conv_scalars)
    graph.annotations(new)["quant"] = {"bits": plan.bits, "layer": layer.name}
    inputs = [a for a in node.all_input_nodes]  # before erasing: erase_node clears the args
    old_out = replaced if replaced is not None else node
    if replaced is not None and "val" in replaced.meta:
        new.meta["val"] = replaced.meta["val"]
    old_out.replace_all_uses_with(new)
    dead = [old_out, node] if replaced is not None else [node]
    for d in dead:
        if not d.users:
            graph.gm.graph.erase_node(d)
    erase_dead(graph, inputs)
    return call


def _passthrough_source(node: Any) -> fx.Node | None:
    """Walk back from a layer input through value-preserving ops (max-pool, flatten, view, relu ...)."""
    cur = node
    while isinstance(cur, fx.Node) and is_op(cur, *_PASSTHROUGH):
        cur = cur.args[0]
    return cur if isinstance(cur, fx.Node) else None


def _count(kept: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in kept.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def _check_names(keys: dict[str, Any], option: str, layers: list[QLayer], rejected: dict[str, str]) -> None:
    names = [l.name for l in layers]
    known = set(names) | set(rejected)
    for key in keys:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"did you mean '{close[0]}'?" if close else (f"layers are: {', '.join(names[:6])}" if names else "the graph has no eligible layer")
        raise _err(option, f"names unknown layer '{key}': {hint}")


__all__ = [
    "QCONV2D",
    "QLINEAR",
    "WLINEAR_NBITS",
    "QuantizeLayerwise",
    "QuantizeLayerwiseConfig",
    "allocate_by_order",
    "demotion_order",
    "fake_weight",
    "layer_options",
    "stored_bytes",
]
