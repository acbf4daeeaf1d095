"""Activation-aware weight scaling (AWQ): W -> W diag(s), the inverse folded into the op that produces the input.

Low-bit group-wise quantization hurts most on the input channels that carry large activations
(their weight error is amplified by ``|x_c|``). Scaling those weight columns up before
quantization shrinks their relative rounding error; dividing the layer's input by the same
``s`` keeps the float function unchanged::

    y = W x = (W diag(s)) (diag(1/s) x)

For each group of linear layers that read the same input ``X`` (e.g. ``wq, wk, wv`` after one
norm) the pass searches ``s`` on the calibration batches over a grid of ``alpha`` in [0, 1]::

    s = mean_rows|X_c|^alpha / wbar_c^(1 - alpha),   s <- s / sqrt(max s * min s)
    loss(s) = sum_layers || X (Q(W diag(s)) diag(1/s))^T - X W^T ||^2

(``wbar_c`` = mean over rows of ``|W|`` normalised by each row's max; ``Q`` = the group-wise RTN
quantizer of :mod:`graphpress.ir.quant` at ``bits`` / ``group_size``, as ``quantize-layerwise``
will apply it) and keeps the best ``s``, or leaves the group unchanged when no ``alpha`` beats
``s = 1``.

With ``activations="int8"`` / ``"int8-dynamic"`` the same rewrite serves int8 *activations*
(SmoothQuant): a per-tensor uint8 grid over ``X`` is set by its largest channels, so the
outlier channels are divided down and their weight columns scaled up::

    s = max_rows|X_c|^alpha / max_rows|W_c|^(1 - alpha),   s <- s / sqrt(max s * min s)
    loss(s) = sum_layers || Q_a(X diag(1/s)) Q_c(W diag(s))^T - X W^T ||^2

with ``Q_a`` the per-tensor uint8 min/max quantizer over the calibration rows and ``Q_c`` the
symmetric per-output-channel int8 weight quantizer -- the grids ``quantize-layerwise`` uses for
8-bit linears with ``activations="int8"`` or ``"int8-dynamic"``.

``diag(1/s)`` is folded into the producer of ``X`` as a graph rewrite, only where that is exact:

* ``mul(a, w)`` with ``w`` a constant broadcast along the channel dim (an RMSNorm / norm weight):
  ``w / s``;
* ``linear`` producing ``X``: its weight rows and bias divided by ``s``;
* ``layer_norm``: its weight and bias divided by ``s``;
* through ``relu`` (``relu(z) / s = relu(z / s)`` for ``s > 0``) and through the other factor of
  a ``mul`` (``a * (b / s)``, e.g. SwiGLU's ``silu(w1 x) * (w3 x)`` folds into ``w3``).

Every node on the way must feed only the next one, and ``X`` only the group's layers;
otherwise the group is skipped with the reason (``stats["skipped"]``). Convs are not scaled
(their per-output-channel int8 grid gains nothing from input scaling).

Exact (``exact = True``): the float outputs change only by rounding; the gain shows after
quantization (``stats["groups"]``: the layer-output quantization loss before/after).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.graph import Graph, op_name
from graphpress.ir.opsets import RELU
from graphpress.ir.quant import GROUP_BITS, GROUP_SIZES, fake_quant_act_dynamic, fake_quant_groupwise, fake_quant_per_channel
from graphpress.ir.rewrite import Skips, arg, is_op
from graphpress.passes.base import PassResult, register
from graphpress.passes.layers import QLayer, find_layers, record, rows
from graphpress.passes.select import Selector, check_selector

aten = torch.ops.aten
NAME = "awq-scale"
ACTIVATIONS = ("none", "int8", "int8-dynamic")


@dataclass(frozen=True)
class AwqScaleConfig:
    """Options of ``awq-scale`` (see ``docs/passes/awq-scale.md``).

    Attributes
    ----------
    bits, group_size, symmetric
        The group-wise quantizer the scales are searched for (use the values
        ``quantize-layerwise`` will use for the low-bit layers).
    grid : int
        Number of ``alpha`` steps in [0, 1] (``grid + 1`` points).
    max_rows : int
        Calibration rows used by the search (evenly strided subsample).
    targets, ignore : tuple of str
        Which eligible layers the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact layer names never scaled (the older spelling of ``ignore``).
    activations : "none", "int8" or "int8-dynamic"
        ``"none"``: search for group-wise weight-only quantization (AWQ; ``bits`` /
        ``group_size`` / ``symmetric`` apply). ``"int8"`` / ``"int8-dynamic"``: search for
        per-tensor uint8 activations times per-channel int8 weights (SmoothQuant; the group
        options are ignored).
    """

    version: int = 1
    bits: int = 4
    group_size: int = 32
    symmetric: bool = False
    grid: int = 20
    max_rows: int = 4096
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    activations: str = "none"

    def __post_init__(self) -> None:
        check_selector(NAME, self)
        if self.bits not in GROUP_BITS:
            raise PassError(f"pass '{NAME}': option 'bits' must be one of {', '.join(map(str, GROUP_BITS))}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise PassError(f"pass '{NAME}': option 'group_size' must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if not isinstance(self.grid, int) or self.grid < 1:
            raise PassError(f"pass '{NAME}': option 'grid' must be an integer >= 1, got {self.grid!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise PassError(f"pass '{NAME}': option 'max_rows' must be an integer >= 1, got {self.max_rows!r}")
        if self.activations not in ACTIVATIONS:
            raise PassError(f"pass '{NAME}': option 'activations' must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")

    @property
    def smooth(self) -> bool:
        """Whether the search targets int8 activations (SmoothQuant) rather than weight-only groups."""
        return self.activations != "none"


@dataclass
class _Fold:
    """One exact place to divide by ``s``: tensors and the dim of each that runs over channels."""

    where: str
    tensors: list[tuple[str, int]]  # (get_attr target, channel dim; -1 = last)


def _const_operand(graph: Graph, node: Any, channels: int) -> str | None:
    """``node``'s target when it is a constant read only once whose last dim is ``channels``
    and whose other dims are 1 (a per-channel vector broadcast along the last dim)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    t = graph.tensor_of(node)
    if t is None or not t.dtype.is_floating_point or t.dim() == 0 or t.shape[-1] != channels or t.numel() != channels:
        return None
    if len(graph.tensor_users(str(node.target))) != 1:
        return None
    return str(node.target)


def find_fold(graph: Graph, x: fx.Node, channels: int) -> _Fold | str:
    """Where ``diag(1/s)`` can be folded exactly for input ``x`` (see module docstring), or why not."""
    cur = x
    for _ in range(64):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            return f"input comes from a {getattr(cur, 'op', 'constant')} ({getattr(cur, 'name', cur)}): no op to fold 1/s into"
        if is_op(cur, aten.linear):
            w_t = cur.args[1].target if isinstance(cur.args[1], fx.Node) and cur.args[1].op == "get_attr" else None
            w = graph.get_tensor(str(w_t)) if w_t is not None else None
            if w is None or w.dim() != 2 or w.shape[0] != channels or len(graph.tensor_users(str(w_t))) != 1:
                return f"input comes from linear '{cur.name}' whose weight is not a private constant"
            tensors = [(str(w_t), 0)]
            b = arg(cur, 2, "bias")
            if isinstance(b, fx.Node):
                if b.op != "get_attr" or len(graph.tensor_users(str(b.target))) != 1:
                    return f"input comes from linear '{cur.name}' whose bias is not a private constant"
                tensors.append((str(b.target), 0))
            return _Fold(f"linear {graph.source_module(cur) or cur.name}", tensors)
        if is_op(cur, aten.layer_norm):
            tensors = []
            for i, name in ((2, "weight"), (3, "bias")):
                t = arg(cur, i, name)
                if t is None:
                    continue
                target = _const_operand(graph, t, channels)
                if target is None:
                    return f"input comes from layer_norm '{cur.name}' whose {name} is not a private constant"
                tensors.append((target, -1))
            if not tensors:
                return f"input comes from layer_norm '{cur.name}' without an affine weight"
            return _Fold(f"layer_norm {graph.source_module(cur) or cur.name}", tensors)
        if is_op(cur, aten.mul) and len(cur.args) == 2:
            a, b = cur.args
            for operand in (b, a):
                target = _const_operand(graph, operand, channels)
                if target is not None:
                    return _Fold(f"norm weight {target}", [(target, -1)])
            # a * (b / s): follow a factor that is itself foldable and private to this mul
            for operand in (b, a):
                if isinstance(operand, fx.Node) and len(operand.users) == 1 and operand.op == "call_function":
                    found = find_fold(graph, operand, channels)
                    if isinstance(found, _Fold):
                        return found
            return f"input comes from mul '{cur.name}' with no foldable factor"
        if is_op(cur, *RELU):
            nxt = cur.args[0]
            if not isinstance(nxt, fx.Node) or len(nxt.users) != 1:
                return f"the input of relu '{cur.name}' has other users"
            cur = nxt
            continue
        return f"input comes from {op_name(cur)}: no exact place to fold 1/s"
    return "fold chain too long"


def _subsample(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    if x.shape[0] <= max_rows:
        return x
    return x[:: -(-x.shape[0] // max_rows)][:max_rows]


def _quant_loss(x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor, cfg: AwqScaleConfig) -> float:
    total = 0.0
    if cfg.smooth:
        # the int8 path quantizes both operands: X/s on one per-tensor grid, W s per output row
        xq = fake_quant_act_dynamic(x / s)
        for w, ref in zip(weights, refs):
            total += float((xq @ fake_quant_per_channel(w * s, 8).t() - ref).double().pow(2).sum())
        return total
    for w, ref in zip(weights, refs):
        wq = fake_quant_groupwise(w * s, cfg.bits, cfg.group_size, symmetric=cfg.symmetric) / s
        total += float((x @ wq.t() - ref).double().pow(2).sum())
    return total


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], cfg: AwqScaleConfig) -> tuple[torch.Tensor | None, float | None, float, float]:
    """Best ``s`` for input rows ``x (R, C)`` and the group's weights ``(out_i, C)``.

    Returns ``(s or None when s = 1 is best, alpha, loss at s = 1, best loss)``.
    """
    x = x.float()
    weights = [w.detach().float() for w in weights]
    refs = [x @ w.t() for w in weights]
    w_all = torch.cat(weights)
    if cfg.smooth:
        # SmoothQuant balances the channel *maxima*: they set the per-tensor activation grid
        x_mean = x.abs().amax(0)
        w_mean = w_all.abs().amax(0)
    else:
        x_mean = x.abs().mean(0)
        w_norm = w_all.abs() / w_all.abs().amax(1, keepdim=True).clamp(min=1e-12)
        w_mean = w_norm.mean(0)
    base = _quant_loss(x, weights, refs, torch.ones_like(x_mean), cfg)
    best: tuple[float, torch.Tensor | None, float | None] = (base, None, None)
    for i in range(cfg.grid + 1):
        alpha = i / cfg.grid
        s = (x_mean.clamp(min=1e-8).pow(alpha) / w_mean.clamp(min=1e-8).pow(1 - alpha)).clamp(min=1e-4)
        s = s / math.sqrt(float(s.max()) * float(s.min()))
        loss = _quant_loss(x, weights, refs, s, cfg)
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2], base, best[0]


@register(NAME)
class AwqScale:
    """Search per-input-channel scales for group-wise quantization and fold them exactly (see module docstring)."""

    exact = True
    Config = AwqScaleConfig

    def __init__(self, config: AwqScaleConfig = AwqScaleConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        layers, rejected = find_layers(graph, convs=False)
        selection = Selector.of(NAME, cfg).resolve({l.name: l.node for l in layers}, rejected)
        skipped = Skips()
        for reason in rejected.values():
            skipped.add(reason)
        groups: dict[fx.Node, list[QLayer]] = {}
        for layer in layers:
            if (left_out := selection.reason(layer.name, layer.node)) is not None:
                skipped.add(left_out)
                continue
            groups.setdefault(layer.input_node, []).append(layer)

        plans: list[tuple[fx.Node, list[QLayer], _Fold]] = []
        reasons: dict[str, str] = {}
        for x, members in groups.items():
            names = ", ".join(l.name for l in members)
            layer_nodes = {l.node for l in members}
            # call_module users are export's shape guards (_guards_fn): they read no values
            others = sorted(op_name(u) for u in x.users if u not in layer_nodes and u.op != "call_module")
            why = None
            if others:
                why = f"input also feeds {', '.join(others)}"
            elif any(len(graph.tensor_users(l.weight_target)) != 1 for l in members):
                why = "a weight is shared with other ops"
            else:
                found = find_fold(graph, x, members[0].in_features)
                if isinstance(found, str):
                    why = found
                else:
                    plans.append((x, members, found))
            if why:
                reasons[names] = why
                skipped.add(why)

        values = record(graph, [x for x, _m, _f in plans]) if plans else {}
        stats_groups: dict[str, dict[str, Any]] = {}
        scaled = 0
        for x, members, fold in plans:
            names = ", ".join(l.name for l in members)
            xs = _subsample(rows(values[x.name], "linear"), cfg.max_rows)
            weights = [graph.get_tensor(l.weight_target) for l in members]
            s, alpha, base, loss = search_scale(xs, weights, cfg)
            entry = {"layers": [l.name for l in members], "fold": fold.where, "loss_unscaled": base, "loss_scaled": loss}
            if s is None:
                entry["alpha"] = None
                skipped.add("no alpha beats s = 1")
                stats_groups[names] = entry
                continue
            entry["alpha"] = alpha
            entry["gain_db"] = round(10 * math.log10(base / loss), 3) if loss > 0 and base > 0 else None
            for layer, w in zip(members, weights):
                graph.set_tensor(layer.weight_target, (w.detach() * s.to(w.dtype)).contiguous())
            for target, dim in fold.tensors:
                t = graph.get_tensor(target).detach()
                shape = [1] * t.dim()
                shape[dim] = -1
                graph.set_tensor(target, (t / s.to(t.dtype).reshape(shape)).contiguous())
            stats_groups[names] = entry
            scaled += 1
        if scaled:
            graph.recompile()
        stats = {"scaled_groups": scaled, "groups": stats_groups, "not_scaled": reasons, "skipped": dict(skipped)}
        return PassResult(graph, changed=scaled > 0, stats=stats)


__all__ = ["AwqScale", "AwqScaleConfig", "find_fold", "search_scale"]
