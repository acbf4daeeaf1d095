"""Layer-wise mixed-precision quantization: important layers keep more bits, to a fractional average bit-width.

For the eligible layers (:func:`graphpress.passes.layers.find_layers`) each gets one
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
activation range comes from the calibration values (``act_calibration``: min/max, percentile,
or ``mse``: the clip range minimising ``E (f(x) - f(Q(x)))^2``, ``f`` the identity or, for a
layer output whose only user is a sum ``x + r``, ``f(x) = x + r`` (``relu(x + r)`` when a relu
follows): the error that reaches the residual stream, where clipping a value the relu zeroes
costs nothing). A layer whose input is (through max-pool, flatten, view or relu) the quantized
output of an earlier layer reuses that layer's output grid, so the values are requantized
exactly and ONNX Runtime drops the duplicate Q/DQ pair. A ``relu`` that is a layer's only user is
fused into its op.

The static int8 layers (``qlinear`` with a calibrated input, ``qconv2d``) are then refined in
graph order on all calibration batches at once (:func:`refine_static_layers`), running the
float and the quantized graph in step:

* ``weight_rounding="gptq"`` (default): the int8 codes on the unchanged per-channel grid are
  chosen by GPTQ error feedback, minimising ``||(W - W_hat) X||^2`` over the layer's quantized
  calibration inputs ``X`` rather than each weight's own rounding error;
* ``bias_correction=True`` (default): each layer's bias absorbs the mean error of its output,
  ``b <- b - E[acc_q - acc_f]`` per output channel (quantized network vs float network, before
  relu and output quantization), so each layer output is unbiased on the calibration set given
  all quantization upstream -- exact in expectation there, and kept in the int32 bias.

Both change only constants: the ops, grids and the ONNX graph stay the same.

Stats: per-layer bits, importance, SQNR of the layer output on the calibration batches
(float layer vs quantized op on the same float inputs), bytes before/after, what refinement did,
and the achieved average bits. Lossy: ``exact = False``; the pipeline checks ``min_sqnr_db``
(default 15 dB, explicit) and ``max_kl``.

``on_budget="adapt"`` (default): a ``target_bits`` / ``size_budget`` below what the layers can take
(convs take 8 bits only) gives the lowest allocation instead of an error, and on an SQNR / KL
miss the pipeline backs off (:mod:`graphpress.passes.budget`): the demoted layers with the most
importance per weight go back up one width at a time (importance scores are cached, so a re-run
re-quantizes only). ``stats`` then give ``asked_bits`` (or ``asked_bytes``), ``average_bits`` and
``backed_off_layers``. ``"fail"``: both are errors.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.errors import PassError
from graphpress.ir import dist
from graphpress.ir.compare import sqnr_from_sums, square_sums
from graphpress.ir.graph import Graph
from graphpress.ir.memory import trim
from graphpress.ir.ops_quant import static_accumulator
from graphpress.ir.opsets import QUANT_PASSTHROUGH
from graphpress.ir.quant import (
    ActQuant,
    act_params,
    calibrate_range,
    fake_quant_act,
    fake_quant_groupwise,
    fake_quant_per_channel,
    gptq_groupwise,
    gptq_per_channel,
    groupwise,
    mse_range,
    sample_indices,
    symmetric_per_channel,
    to_nbits,
    weight_bytes,
    weight_sqnr_db,
)
from graphpress.ir.rewrite import (
    Skips,
    add_constant,
    arg,
    erase_dead,
    insert_call,
    is_op,
    pair,
)
from graphpress.passes.base import PassResult, register
from graphpress.passes.budget import check_on_budget, ladder, notches_at
from graphpress.passes.ilp import allocate
from graphpress.passes.quant import importance as imp
from graphpress.passes.layers import QLayer, find_layers, input_hessians, record
from graphpress.passes.select import Selector, check_names, check_selector
from graphpress.passes.quant.shortcuts import QUANTIZE_ACT, quantize_shortcuts

aten = torch.ops.aten
QLINEAR = torch.ops.graphpress.qlinear.default
QCONV2D = torch.ops.graphpress.qconv2d.default
WLINEAR_NBITS = torch.ops.graphpress.wlinear_nbits.default

NAME = "quantize-layerwise"
DEFAULT_TARGET_BITS = 6.0
FLOAT_BITS = 32
ALLOWED_BITS = (2, 3, 4, 5, 6, 7, 8, FLOAT_BITS)
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
    act_calibration : "minmax", "percentile" or "mse"
        How static activation ranges are chosen: min/max, percentiles, or the clip range that
        minimises the squared quantization error (of the value after the residual sum and relu
        it flows into, for a layer output that is summed with another tensor).
    percentile : float
        Percentile of ``act_calibration="percentile"``.
    weight_rounding : "nearest" or "gptq"
        How the per-channel int8 weights of the static layers take their grid points: round to
        nearest, or GPTQ's error feedback on the layer's calibration inputs (same grid, same ops).
    group_rounding : "nearest" or "gptq"
        How the codes of the group-wise (``MatMulNBits``) linears are chosen: round to nearest,
        or GPTQ's error feedback on the layer's calibration inputs (:func:`~graphpress.ir.quant.
        gptq_groupwise`; the same storage and op). GPTQ costs a ``k x k`` Cholesky per layer
        (seconds for a 14336-wide input), so it is asked for, not the default.
    act_order : bool
        With ``group_rounding="gptq"``: round columns in order of decreasing input energy
        (``diag X^T X``), the groups' grids then fixed from the original weights.
    bias_correction : bool
        Static layers, in graph order on the calibration set: subtract from each layer's bias the
        mean per-channel error of its output (quantized network vs float network).
    shortcuts : "quantized" or "float"
        A residual shortcut that reads the input of a static layer reads it on that layer's grid
        (:mod:`graphpress.passes.quant.shortcuts`; ONNX Runtime then fuses the sums into
        ``QLinearAdd``), or keeps reading the float value.
    lorc_rank : int
        Low-rank compensation (ZeroQuant-V2's LoRC) of the group-wise linears: the rank-``r``
        truncated SVD of the weight's quantization error ``E = W - W_hat`` is added back as two
        small float linears, ``y = W_hat x + B (A x)`` with ``B A = U_r S_r V_r^T``. 0: off.
    lorc_min_gain_db : float
        A layer keeps its compensation only when it raises the layer's weight SQNR by at least
        this much (the extra ``r (in + out)`` float32 weights and two matmuls must pay).
    layer_bits : dict of str to int
        Fixed bit-width per layer name (not allocated).
    targets, ignore : tuple of str
        Which eligible layers are quantized: exact names, ``re:`` full-match regexes or op
        families (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
        Layers not selected stay in float (not counted in the average).
    skip : tuple of str
        Exact layer names left in float (the older spelling of ``ignore``).
    zd_cut : float
        z-score cut of ``importance="zd"``.
    seed : int
        Seed of ``order="random"``.
    min_sqnr_db, max_kl : float, optional
        Budget the pipeline checks against the previous graph (15 dB SQNR by default).
    on_budget : "adapt" or "fail"
        When the bit budget is out of reach or the SQNR / KL budget is missed, take the closest
        allocation / back off on the most important layers (``adapt``), or fail.
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
    act_calibration: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    weight_rounding: Literal["nearest", "gptq"] = "gptq"
    group_rounding: Literal["nearest", "gptq"] = "nearest"
    act_order: bool = False
    bias_correction: bool = True
    shortcuts: Literal["quantized", "float"] = "quantized"
    lorc_rank: int = 0
    lorc_min_gain_db: float = 0.5
    layer_bits: dict[str, int] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    zd_cut: float = imp.DEFAULT_ZD_CUT
    seed: int = 0
    min_sqnr_db: float | None = 15.0
    max_kl: float | None = None
    on_budget: Literal["adapt", "fail"] = "adapt"

    def __post_init__(self) -> None:
        check_on_budget(NAME, self.on_budget)
        check_selector(NAME, self)
        if not self.bits or any(b not in ALLOWED_BITS for b in self.bits):
            raise _err("bits", f"{list(self.bits)} must be widths in {', '.join(map(str, ALLOWED_BITS))}")
        if self.target_bits is not None and self.size_budget is not None:
            raise _err("target_bits", "give target_bits or size_budget, not both")
        if self.target_bits is not None and not (isinstance(self.target_bits, (int, float)) and self.target_bits > 0):
            raise _err("target_bits", f"must be a number > 0, got {self.target_bits!r}")
        if self.size_budget is not None and not (isinstance(self.size_budget, int) and self.size_budget >= 0):
            raise _err("size_budget", f"must be bytes >= 0, got {self.size_budget!r}")
        checks = (("allocation", ("order", "ilp")), ("order", ("importance", "random", "reverse")), ("importance", imp.METHODS),
                  ("activations", ("none", "int8-block", "int8", "int8-dynamic")), ("act_calibration", ("minmax", "percentile", "mse")),
                  ("weight_rounding", ("nearest", "gptq")), ("group_rounding", ("nearest", "gptq")), ("shortcuts", ("quantized", "float")))
        for option, allowed in checks:
            value = getattr(self, option)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _err(option, f"{value!r} is not one of {', '.join(allowed)}{hint}")
        if self.group_size not in (16, 32, 64, 128, 256):
            raise _err("group_size", f"must be 16, 32, 64, 128 or 256, got {self.group_size!r}")
        if not isinstance(self.bias_correction, bool):
            raise _err("bias_correction", f"must be true or false, got {self.bias_correction!r}")
        if not isinstance(self.act_order, bool):
            raise _err("act_order", f"must be true or false, got {self.act_order!r}")
        if not isinstance(self.lorc_rank, int) or isinstance(self.lorc_rank, bool) or self.lorc_rank < 0:
            raise _err("lorc_rank", f"must be an integer >= 0 (0: off), got {self.lorc_rank!r}")
        if not (isinstance(self.lorc_min_gain_db, (int, float)) and self.lorc_min_gain_db >= 0):
            raise _err("lorc_min_gain_db", f"must be a number of dB >= 0, got {self.lorc_min_gain_db!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise _err("percentile", f"must be in (50, 100], got {self.percentile!r}")
        bad = {k: v for k, v in dict(self.layer_bits).items() if v not in ALLOWED_BITS}
        if bad:
            k, v = next(iter(bad.items()))
            raise _err("layer_bits", f"layer '{k}': {v!r} is not a width in {', '.join(map(str, ALLOWED_BITS))}")

    def __hash__(self) -> int:
        return hash((self.version, self.bits, self.target_bits, self.size_budget, self.allocation, self.order, self.importance,
                     self.group_size, self.symmetric, self.activations, self.act_calibration, self.percentile,
                     self.weight_rounding, self.group_rounding, self.act_order, self.bias_correction, self.shortcuts, self.lorc_rank, self.lorc_min_gain_db, tuple(sorted(self.layer_bits.items())), self.skip, self.targets, self.ignore, self.zd_cut,
                     self.seed, self.min_sqnr_db, self.max_kl, self.on_budget))

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
        # The last full run's allocation and options, shared with its back-off copies (budget.py).
        self._state: dict[str, Any] | None = None
        self._level = 0
        self._unreachable: str | None = None

    # ------------------------------------------------------------------ backing off
    def adapt_levels(self) -> int:
        """Width steps up the last run's demoted layers can take (0 before a run)."""
        if not self._state:
            return 0
        bits, options = self._state["bits"], self._state["options"]
        return sum(sum(1 for b in options[n] if b > bits[n]) for n in bits)

    def back_off(self, level: int) -> "QuantizeLayerwise":
        """This pass with the first ``level`` width steps of its ladder taken back up."""
        copy = QuantizeLayerwise(self.config)
        copy._state, copy._level, copy._unreachable = self._state, int(level), self._unreachable
        return copy

    def achieved(self, stats: dict[str, Any]) -> str:
        kind, amount = self.config.budget
        asked = f"target_bits {amount:g}" if kind == "bits" else f"size_budget {amount:g} bytes"
        return f"{stats.get('average_bits', float('nan')):.2f} average bits ({asked})"

    def advice(self) -> str:
        return "raise target_bits" if self.config.budget[0] == "bits" else "raise size_budget"

    def _backed_off_bits(self) -> dict[str, int]:
        state = self._state
        bits, options = state["bits"], state["options"]
        if "moves" not in state:
            # a layer's cost: its importance at its allocated width, none once at the top width;
            # per weight given back, so cheap wins (small, important layers) come first
            costs = {}
            for n, b in bits.items():
                ups = sorted(x for x in options[n] if x > b)
                if ups:
                    imp_n = float(state["importance"][n])
                    costs[n] = [imp_n * (ups[-1] - x) / (ups[-1] - b) for x in [b, *ups]]
            state["moves"] = ladder(costs, state["params"])
        out = dict(bits)
        for n, k in notches_at(state["moves"], self._level).items():
            out[n] = sorted(x for x in options[n] if x > bits[n])[k - 1]
        return out

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        layers, rejected = find_layers(graph, convs=cfg.activations != "none")
        names = [l.name for l in layers]
        check_names(NAME, "layer_bits", cfg.layer_bits, [*names, *rejected], names)
        selection = Selector.of(NAME, cfg).resolve({l.name: l.node for l in layers}, rejected)
        kept: dict[str, str] = dict(rejected)
        active: list[QLayer] = []
        options: dict[str, list[int]] = {}
        notes: dict[str, str] = {}
        for layer in layers:
            if (left_out := selection.reason(layer.name, layer.node)) is not None:
                kept[layer.name] = left_out
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
        # importance orders the choices of the allocation and of backing off; with one width per
        # layer there is no choice, and measuring it is a forward per block for nothing
        measured = any(len(o) > 1 for o in options.values())
        if measured:
            scores = imp.sensitivities(graph, active, options, cfg.importance, quantizer, quant_tag=quant_tag, zd_cut=cfg.zd_cut)
        else:
            scores = {"importance": {layer.name: None for layer in active}, "sensitivity": {}}
        if self._level > 0 and self._state is not None:
            bits = self._backed_off_bits()
        else:
            bits = self._allocate(active, options, scores, cfg)
            self._state = {"bits": dict(bits), "options": dict(options), "importance": dict(scores["importance"]),
                           "params": {l.name: l.params for l in active}}

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
        # LoRC's float factors are stored too, where a layer kept them
        after = sum(stored_bytes(l, bits[l.name], cfg) for l in active) + sum(
            e["lorc"]["extra_bytes"] for e in stats_layers.values() if (e.get("lorc") or {}).get("kept"))
        kind, amount = cfg.budget
        stats = {
            "quantized": sum(1 for p in plans if p.bits < FLOAT_BITS),
            "budget": {"kind": kind, "amount": amount},
            f"asked_{kind}": amount,
            "average_bits": round(avg, 4),
            "bits": {l.name: bits[l.name] for l in active},
            "importance_method": cfg.importance if measured else "not measured (one width per layer: nothing to choose)",
            "allocation": cfg.allocation if cfg.allocation == "ilp" else f"order:{cfg.order}",
            "layers": stats_layers,
            "bytes_before": before,
            "bytes_after": after,
            "compression": round(before / after, 3) if after else None,
            "activations": cfg.activations,
            "act_calibration": cfg.act_calibration,
            "refined": {"weight_rounding": cfg.weight_rounding, "bias_correction": cfg.bias_correction,
                        "layers": sum(1 for e in stats_layers.values() if "bias_shift_rms" in e or e.get("weight_rounding") == "gptq")},
            "notes": notes,
            **({"lorc": {"rank": cfg.lorc_rank, "layers_kept": sum(1 for e in stats_layers.values() if (e.get("lorc") or {}).get("kept")),
                         "layers_tried": sum(1 for e in stats_layers.values() if e.get("lorc"))}} if cfg.lorc_rank else {}),
            "kept_float": kept,
            "skipped": dict(Skips(_count(kept))),
        }
        if scores.get("unmeasured"):
            stats["importance_unmeasured_blocks"] = scores["unmeasured"]
        if self._unreachable:
            stats["budget_unreachable"] = self._unreachable
        asked = self._state["bits"] if self._state else bits
        stats["backed_off_layers"] = {n: {"asked": asked[n], "got": b} for n, b in bits.items() if b != asked.get(n, b)}
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
        self._unreachable = None
        if floor > budget * (1 + 1e-12):
            least = floor / sum(l.params for l in layers) if kind == "bits" else floor
            why = f"the lowest allocation takes {least:.6g}{' bits' if kind == 'bits' else ' bytes'}"
            if cfg.on_budget == "fail":
                raise PassError(f"{what} cannot be met: {why}; raise the budget, add lower widths to 'bits' or set on_budget: adapt")
            # adapt: the closest allocation, every layer at its lowest width
            self._unreachable = f"{what} is out of reach ({why}); every layer takes its lowest width"
            return {l.name: min(options[l.name]) for l in layers}
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
        sums = {p.layer.name: _residual_sum(p.layer.output_node) for p in static} if cfg.act_calibration == "mse" else {}
        values = record(graph, nodes + [r[0] for r in sums.values() if r is not None])
        produced: dict[str, ActQuant] = {}
        for p in static:  # graph order: producers come first
            src = _passthrough_source(p.layer.input_node)
            if src is not None and src.name in produced:
                p.in_quant = produced[src.name]
            else:
                p.in_quant = act_params(*_calibrated(values, p.layer.input_node, cfg))
            if p.layer.kind == "conv2d" or p.layer.relu is not None:
                p.out_quant = act_params(*_calibrated(values, p.layer.output_node, cfg, sums.get(p.layer.name)))
                produced[p.layer.output_node.name] = p.out_quant
        return plans

    def _rewrite(self, graph: Graph, plans: list[LayerPlan], weights: dict[str, torch.Tensor], scores: dict[str, Any], cfg: QuantizeLayerwiseConfig) -> dict[str, dict[str, Any]]:
        todo = [p for p in plans if p.bits < FLOAT_BITS]
        # names first: rewriting a layer re-points the next layer's input to the new node
        ends = {p.layer.name: (p.layer.input_node.name, _compared_node(p).name) for p in todo}
        io = record(graph, [n for p in todo for n in (p.layer.input_node, _compared_node(p))]) if todo else {}
        out: dict[str, dict[str, Any]] = {}
        calls: dict[str, _Call] = {}
        for p in plans:
            layer = p.layer
            entry: dict[str, Any] = {
                "bits": p.bits,
                "kind": layer.kind,
                "params": layer.params,
                "importance": None if scores["importance"][layer.name] is None else float(scores["importance"][layer.name]),
                "bytes_before": 4 * layer.params,
                "bytes_after": stored_bytes(layer, p.bits, cfg),
            }
            if p.bits < FLOAT_BITS:
                calls[layer.name] = call = _rewrite_layer(graph, p, weights[layer.name], cfg, io.get(ends[layer.name][0]))
                if call.rounding:
                    entry["weight_rounding"] = call.rounding
                if call.lorc is not None:
                    entry["lorc"] = call.lorc
                entry["op"] = call.op_name
                if p.in_quant is not None:
                    entry["input_quant"] = {"scale": p.in_quant.scale, "zero_point": p.in_quant.zero_point}
                if p.dynamic:
                    entry["input_quant"] = "dynamic"
                if len(graph.tensor_users(layer.weight_target)) > 0:
                    entry["note"] = "float weight kept: other ops read it too"
            out[layer.name] = entry
        if cfg.shortcuts == "quantized" and any(c.refinable for c in calls.values()):
            for shared in quantize_shortcuts(graph):
                for layer in shared["layers"]:
                    name = next((k for k, c in calls.items() if c.node.name == layer), None)
                    if name is not None:
                        out[name]["shortcut_quantized"] = shared["sums"]
        refine = [c for c in calls.values() if c.refinable]
        if refine and (cfg.weight_rounding == "gptq" or cfg.bias_correction):
            done = refine_static_layers(graph, list(calls.values()), cfg.weight_rounding == "gptq", cfg.bias_correction)
            for c in refine:
                out[c.layer].update(done.get(c.layer, {"refined": "no: calibration batches differ in shape beyond dim 0"}))
        # the float temporaries of every layer's rewrite sit in the allocator's heaps (100+ MB on a
        # 100M-parameter Llama); handed back before the per-layer checks allocate theirs, the
        # pass's peak is its output plus one layer's work instead of that plus them
        trim()
        for name, call in calls.items():  # after refinement: the error of the final op
            in_name, out_name = ends[name]
            out[name]["sqnr_db"] = _layer_sqnr(call, io[in_name], io[out_name])
        return out


# ---------------------------------------------------------------------------- activation ranges
#: Samples the MSE range search runs on (random, extremes kept).
MSE_SAMPLES = 1 << 17


def _residual_sum(node: fx.Node) -> tuple[fx.Node, bool] | None:
    """``(other, relu)`` when ``node``'s only user is ``node + other`` (alpha 1), ``relu`` telling
    whether a relu is the sum's only user; else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.add.Tensor or users[0].kwargs.get("alpha", 1) != 1:
        return None
    add = users[0]
    others = [a for a in add.args[:2] if a is not node]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        return None
    after = list(add.users)
    return others[0], len(after) == 1 and is_op(after[0], aten.relu, aten.relu_)


def _paired_sample(xs: list[torch.Tensor], rs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``<= n`` random positions (:func:`graphpress.ir.quant.sample_indices`) of ``x`` and
    of ``r`` (broadcast to ``x``), plus the positions of ``x``'s min and max."""
    x = torch.cat([a.reshape(-1).float() for a in xs])
    r = torch.cat([torch.broadcast_to(b, a.shape).reshape(-1).float() for a, b in zip(xs, rs)])
    idx = sample_indices(x.numel(), n)
    idx = torch.cat([idx, x.argmin().reshape(1), x.argmax().reshape(1)])
    return x[idx], r[idx]


def _calibrated(values: dict[str, list[torch.Tensor]], node: fx.Node, cfg: QuantizeLayerwiseConfig, residual: tuple[fx.Node, bool] | None = None) -> tuple[float, float]:
    """The static range of ``node``'s values: ``cfg.act_calibration``; with ``"mse"`` and a
    ``residual`` sum after the node, the error is measured after the sum (and its relu)."""
    if residual is None or cfg.act_calibration != "mse":
        return calibrate_range(values[node.name], cfg.act_calibration, cfg.percentile)
    other, relu = residual
    x, r = _paired_sample(values[node.name], values[other.name], MSE_SAMPLES)
    return mse_range(x, after=(lambda v: torch.relu(v + r)) if relu else (lambda v: v + r))


# ---------------------------------------------------------------------------- refinement
@torch.no_grad()
def refine_static_layers(graph: Graph, calls: list[_Call], gptq: bool, bias_correction: bool) -> dict[str, dict[str, Any]]:
    """GPTQ rounding and/or bias correction of the static int8 ops among ``calls``
    (:attr:`_Call.refinable`), in graph order, on the calibration set.

    The graph is run twice in step on all calibration batches at once: a *float* run (every op
    of ``calls`` replaced by its float layer) and the *quantized* run. At each refinable op, with
    ``x_f`` / ``x_q`` its input in the two runs:

    * ``gptq``: the codes are re-chosen by :func:`graphpress.ir.quant.gptq_per_channel` with
      ``H = X X^T`` of the op's quantized input ``Q(x_q)`` (on about :data:`GPTQ_ROWS` rows:
      random ones of a linear's input, all im2col rows of random images for a conv; one ``H``
      per conv group);
    * ``bias_correction``: ``b <- b - E[acc_q - acc_f]`` per output channel, ``acc`` the value
      before relu and output quantization (``Q(x_q) W_hat + b`` vs ``x_f W + b``), the mean over
      the calibration set (batch and spatial positions), so that the layer's output is unbiased
      there given everything quantized before it. Rounded into the int32 bias.

    The quantized run then continues from the refined op's output.

    Returns
    -------
    dict
        Per refined layer what was done; empty when the calibration batches differ in shape
        beyond dim 0 (they cannot be stacked; nothing is refined).
    """
    inputs = _stacked_calibration(graph)
    if inputs is None:
        return {}
    by_node = {c.node: c for c in calls}
    todo = sum(1 for c in calls if c.refinable)
    gm = graph.gm
    last_use: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    env_f: dict[fx.Node, Any] = {}
    env_q: dict[fx.Node, Any] = {}
    feed = iter(inputs)
    done: dict[str, dict[str, Any]] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        if n.op == "placeholder":
            env_f[n] = env_q[n] = next(feed)
        elif n.op == "get_attr":
            env_f[n] = env_q[n] = _fetch(gm, n.target)
        elif n in by_node and by_node[n].refinable:
            c = by_node[n]
            env_f[n], env_q[n], done[c.layer] = _refine_one(graph, c, env_f[n.args[0]], env_q[n.args[0]], gptq, bias_correction)
            if len(done) == todo:
                break
        elif n in by_node:
            env_f[n], env_q[n] = _float_layer(by_node[n], env_f[n.args[0]]), by_node[n](env_q[n.args[0]])
        elif n.op == "call_function" and n.target is QUANTIZE_ACT:  # the float run does not round
            env_f[n], env_q[n] = env_f[n.args[0]], _run_node(gm, n, env_q)
        else:
            same = all(env_f[a] is env_q[a] for a in n.all_input_nodes)
            if not same and _mutates(n):  # an in-place op must not run twice on a tensor the two runs share
                for a in n.all_input_nodes:
                    if env_q[a] is env_f[a] and isinstance(env_q[a], torch.Tensor):
                        env_q[a] = env_q[a].clone()
            env_f[n] = _run_node(gm, n, env_f)
            env_q[n] = env_f[n] if same else _run_node(gm, n, env_q)
        for a in n.all_input_nodes:
            if last_use.get(a) is n:
                env_f.pop(a, None)
                env_q.pop(a, None)
    return done


def _stacked_calibration(graph: Graph) -> list[torch.Tensor] | None:
    """All calibration batches concatenated along dim 0 (bias correction needs the mean over all
    of them before the next layer runs); None when their shapes differ beyond dim 0."""
    batches = graph.calibration_batches()
    parts = list(zip(*batches))
    if any(not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[1:] != group[0].shape[1:] for group in parts for t in group):
        return None
    return [torch.cat(group) for group in parts]


#: Rows of the layer input (im2col rows for a conv) that GPTQ's ``H`` is estimated on, at most.
GPTQ_ROWS = 1 << 17


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _mutates(n: fx.Node) -> bool:
    return n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable


def _run_node(gm: fx.GraphModule, n: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return gm.get_submodule(n.target)(*args, **kwargs)


def _input_hessians(x: torch.Tensor, w_shape: torch.Size, conv: tuple | None) -> list[torch.Tensor]:
    """``X X^T`` of a layer's input rows, one per conv group (float64): on at most
    :data:`GPTQ_ROWS` random rows (a linear), or all im2col rows of as many random images (a conv)."""
    if conv is None:
        rows = x.reshape(-1, x.shape[-1]).float()
        rows = rows[sample_indices(rows.shape[0], GPTQ_ROWS)]
        return [(rows.T @ rows).double()]
    stride, padding, dilation, groups = conv
    cin = w_shape[1]
    k = cin * w_shape[2] * w_shape[3]
    positions = _positions(x, w_shape, conv)
    images = x[sample_indices(x.shape[0], max(1, GPTQ_ROWS // positions))].float()
    per_chunk = max(1, (1 << 22) // max(1, k * positions))  # ~16 MB of im2col at a time
    hs = [torch.zeros(k, k, dtype=torch.float64) for _ in range(groups)]
    for i in range(0, images.shape[0], per_chunk):
        chunk = images[i : i + per_chunk]
        for g in range(groups):
            cols = F.unfold(chunk[:, g * cin : (g + 1) * cin], tuple(w_shape[2:]), dilation=list(dilation), padding=list(padding), stride=list(stride))
            rows = cols.transpose(1, 2).reshape(-1, k)
            hs[g] += (rows.T @ rows).double()
    return hs


def _positions(x: torch.Tensor, w_shape: torch.Size, conv: tuple) -> int:
    stride, padding, dilation, _ = conv
    h = (x.shape[2] + 2 * padding[0] - dilation[0] * (w_shape[2] - 1) - 1) // stride[0] + 1
    w = (x.shape[3] + 2 * padding[1] - dilation[1] * (w_shape[3] - 1) - 1) // stride[1] + 1
    return h * w


def _refine_one(graph: Graph, c: _Call, x_f: torch.Tensor, x_q: torch.Tensor, gptq: bool, bias_correction: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Refine one static op (see :func:`refine_static_layers`); returns its float-run and
    quantized-run outputs and what was done."""
    n = c.node
    conv = tuple(c.scalars[:4]) if c.op is QCONV2D else None
    in_scale, in_zp, relu = c.scalars[-5], c.scalars[-4], c.scalars[-1]
    w = c.w_float.float()
    acc_f = _float_layer(c, x_f, relu=False)
    w_q, w_scale, bias_q = c.tensors
    info: dict[str, Any] = {}
    if gptq:
        hs = _input_hessians(fake_quant_act(x_q, in_scale, in_zp), w.shape, conv)
        out_g = w.shape[0] // len(hs)
        codes = [gptq_per_channel(w[g * out_g : (g + 1) * out_g].reshape(out_g, -1), h, w_scale[g * out_g : (g + 1) * out_g]) for g, h in enumerate(hs)]
        w_q = torch.cat(codes).reshape(w.shape)
        graph.set_tensor(n.args[1].target, w_q)
        c.tensors[0] = w_q
        info["weight_rounding"] = "gptq"
    if bias_correction:
        acc_q = static_accumulator(x_q, w_q, w_scale, bias_q, in_scale, in_zp, conv)
        shift = _channel_mean(acc_q - acc_f, c)
        _set_bias(graph, c, _bias_float(c) - shift)
        info["bias_shift_rms"] = round(float(shift.pow(2).mean().sqrt()), 6)
    y_q = c(x_q)
    return (acc_f.relu() if relu else acc_f), y_q, info


def _float_layer(c: _Call, x: torch.Tensor, relu: bool | None = None) -> torch.Tensor:
    """The float layer an op replaced, on ``x`` (with the op's fused relu unless ``relu=False``)."""
    w, b = c.w_float.float(), c.b_float
    if c.op is QCONV2D:
        stride, padding, dilation, groups = c.scalars[:4]
        y = F.conv2d(x.float(), w, b, list(stride), list(padding), list(dilation), groups)
    else:
        y = F.linear(x.float(), w, b)
    fused = c.op in (QLINEAR, QCONV2D) and bool(c.scalars[-1])
    return y.relu() if (fused if relu is None else relu) else y


def _channel_mean(t: torch.Tensor, c: _Call) -> torch.Tensor:
    """Mean of ``t`` (an op output) over everything but the channel dim (1 for convs, last for linears)."""
    channel = 1 if c.op is QCONV2D else t.dim() - 1
    return t.float().mean([d for d in range(t.dim()) if d != channel])


def _bias_float(c: _Call) -> torch.Tensor:
    """The op's int32 bias in float (zeros when it has none)."""
    w_scale, bias_q = c.tensors[1], c.tensors[2]
    if bias_q is None:
        return torch.zeros(w_scale.shape[0])
    return bias_q.float() * (torch.tensor(c.scalars[-5], dtype=torch.float32) * w_scale.float())


def _set_bias(graph: Graph, c: _Call, bias: torch.Tensor) -> None:
    """Store ``bias`` as the op's int32 bias (a new constant when it had none)."""
    n = c.node
    bias_q = _int32_bias(bias, c.scalars[-5], c.tensors[1])
    if n.args[3] is None:
        node = add_constant(graph, f"{n.args[1].target}_bias", bias_q, before=n, parameter=False, module=graph.source_module(n))
        n.update_arg(3, node)
    else:
        graph.set_tensor(n.args[3].target, bias_q)
    c.tensors[2] = bias_q


# ---------------------------------------------------------------------------- rewriting
def _fuses_relu(plan: LayerPlan) -> bool:
    return plan.layer.relu is not None and (plan.in_quant is not None or plan.dynamic)


def _compared_node(plan: LayerPlan) -> fx.Node:
    """The float node the quantized op replaces the value of (the relu when it is fused)."""
    return plan.layer.relu if _fuses_relu(plan) else plan.layer.node


@dataclass
class _Call:
    """A quantized op call with its constant tensors (to evaluate the layer's error), and what
    refinement needs: the node, the layer's name and its float weight and bias."""

    op: Any
    tensors: list[torch.Tensor | None]
    scalars: list[Any]
    node: fx.Node | None = None
    layer: str = ""
    w_float: torch.Tensor | None = None
    b_float: torch.Tensor | None = None
    rounding: str = ""  # how a group-wise op's codes were chosen, when not to nearest
    lorc: dict[str, Any] | None = None  # low-rank compensation's figures (lorc_rank > 0)

    @property
    def op_name(self) -> str:
        return str(self.op.name()).replace("graphpress::", "")

    @property
    def refinable(self) -> bool:
        """A static int8 op (int32 bias, calibrated input grid): what GPTQ and bias correction act on."""
        return self.op in (QLINEAR, QCONV2D) and self.scalars[-5] > 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, *self.tensors, *self.scalars)


def _layer_sqnr(call: _Call, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    # summed batch by batch: an LM head's outputs are tens of MB per batch, never concatenated
    signal = noise = 0.0
    with torch.no_grad():
        for x, ref in zip(inputs, outputs):
            s, n = square_sums(ref, call(x))
            signal, noise = signal + s, noise + n
    value = sqnr_from_sums(signal, noise)
    return round(value, 3) if math.isfinite(value) else (1e9 if value > 0 else -1e9)


def _conv_args(layer: QLayer) -> tuple[list[int], list[int], list[int]]:
    node = layer.node
    stride = pair(arg(node, 3, "stride", [1, 1]), 1)
    dilation = pair(arg(node, 5, "dilation", [1, 1]), 1)
    padding = arg(node, 4, "padding", [0, 0])
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        else:
            totals = [d * (k - 1) for d, k in zip(dilation, layer.kernel)]
            if any(t % 2 for t in totals):
                raise PassError(f"pass '{NAME}': layer '{layer.name}': padding='same' is asymmetric for this kernel; cannot lower to QLinearConv")
            padding = [t // 2 for t in totals]
    return stride, pair(padding, 0), dilation


def _int32_bias(bias: torch.Tensor, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor:
    unit = torch.tensor(in_scale, dtype=torch.float32) * w_scale.float()
    return torch.clamp(torch.round(bias.detach().double() / unit.double()), *_INT32).to(torch.int32)


def _rewrite_layer(graph: Graph, plan: LayerPlan, w: torch.Tensor, cfg: QuantizeLayerwiseConfig,
                   inputs: list[torch.Tensor] | None = None) -> _Call:
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
    result = None  # the node the layer's users read, when not the quantized op itself (LoRC's sum)
    if layer.kind == "linear" and not static and not plan.dynamic:
        gptq = cfg.group_rounding == "gptq" and inputs
        if gptq:
            # X^T X of the layer's calibration inputs, summed over ranks: every rank rounds alike
            (hessian,) = input_hessians(layer, inputs)
            dist.all_reduce_sum(hessian)
            n_rows = int(dist.all_reduce_sum(torch.tensor([float(sum(x.numel() // x.shape[-1] for x in inputs))]))[0])
            gq = gptq_groupwise(w, hessian, plan.bits, cfg.group_size, symmetric=cfg.symmetric, act_order=cfg.act_order)
        else:
            gq = groupwise(w, plan.bits, cfg.group_size, symmetric=cfg.symmetric)
        nb = to_nbits(gq)
        act_bits = 0 if cfg.activations == "none" else 8
        tensors = [nb.packed, nb.scales, nb.zeros, None if bias is None else bias.detach().float().clone()]
        args_nodes = [const("q", nb.packed), const("scales", nb.scales), const("zeros", nb.zeros) if nb.zeros is not None else None, bias_node]
        scalars = [layer.in_features, nb.bits, cfg.group_size, act_bits]
        new = insert_call(graph, WLINEAR_NBITS, (x, *args_nodes, *scalars), before=node, like=node)
        call = _Call(WLINEAR_NBITS, tensors, scalars)
        if cfg.lorc_rank and replaced is None:
            summed, call.lorc = _low_rank_compensation(graph, gq, w, cfg, x, new, node, const)
            result = summed if summed is not None else new
        if gptq:
            call.rounding = "gptq (act order)" if cfg.act_order else "gptq"
            if n_rows < layer.in_features:
                # X^T X of fewer rows than inputs is singular: the codes fit the calibration
                # rows' subspace and can do worse than rounding to nearest on other inputs
                call.rounding += f"; only {n_rows} calibration rows for {layer.in_features} inputs: may overfit, give more calibration data"
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
    call.node, call.layer, call.w_float = new, layer.name, w.detach()
    new = result if result is not None else new
    call.b_float = None if bias is None else bias.detach().float().clone()
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


def _low_rank_compensation(graph: Graph, gq: Any, w: torch.Tensor, cfg: QuantizeLayerwiseConfig, x: fx.Node, new: fx.Node,
                           node: fx.Node, const: Callable[[str, torch.Tensor], fx.Node]) -> tuple[fx.Node | None, dict[str, Any]]:
    """LoRC (``lorc_rank``): ``new + B (A x)`` with ``B A`` the rank-r truncated SVD of the
    quantization error, when it raises the weight SQNR by ``lorc_min_gain_db``; else nothing
    is inserted. Returns the sum node (or None) and the layer's figures."""
    w = w.detach().float()
    deq = gq.dequantize().float()
    u, sv, vh = torch.linalg.svd(w - deq, full_matrices=False)
    r = min(cfg.lorc_rank, sv.numel())
    b, a = (u[:, :r] * sv[:r]).contiguous(), vh[:r].contiguous()
    before, after = weight_sqnr_db(w, deq), weight_sqnr_db(w, deq + b @ a)
    info = {"rank": r, "weight_sqnr_db": [round(before, 2), round(after, 2)], "extra_bytes": 4 * r * (w.shape[0] + w.shape[1])}
    if after - before < cfg.lorc_min_gain_db:
        info["kept"] = False
        return None, info
    info["kept"] = True
    low = insert_call(graph, torch.ops.aten.linear.default, (x, const("lorc_a", a)), before=node)
    low = insert_call(graph, torch.ops.aten.linear.default, (low, const("lorc_b", b)), before=node)
    return insert_call(graph, torch.ops.aten.add.Tensor, (new, low), before=node, like=node), info


def _passthrough_source(node: Any) -> fx.Node | None:
    """Walk back from a layer input through value-preserving ops (max-pool, flatten, view, relu ...)."""
    cur = node
    while isinstance(cur, fx.Node) and is_op(cur, *QUANT_PASSTHROUGH):
        cur = cur.args[0]
    return cur if isinstance(cur, fx.Node) else None


def _count(kept: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in kept.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


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
