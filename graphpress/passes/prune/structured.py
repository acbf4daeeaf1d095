"""``prune-channels``: structured pruning that removes channels and leaves a smaller dense graph.

:func:`graphpress.passes.prune.deps.analyze` splits the graph's channels into groups that must be
pruned together (residual streams joined by adds, depthwise convs with their input, concatenated
segments...). For each prunable group of ``n`` channels the pass keeps the
``k = max(min_channels, roundup(n - floor(sparsity * n), round_to))`` channels of highest score:

* ``l1`` / ``l2``: ``s_c = sum_producers ||W_p[c]||_{1|2} * |gamma_c| / sqrt(var_c + eps)``, the
  norm of the producer rows (conv/linear output channel ``c``), times the scale of a batch norm
  that directly follows the producer (a row with a large norm that BN scales to nothing is not
  important);
* ``wanda``: ``s_c = sum_consumers mean|X_c| * ||W_q[:, c]||_2``, the mean absolute activation of
  channel ``c`` at each consumer's input on the calibration data (``graph.calibration``, else the
  example inputs) times the norm of the consumer columns it multiplies (a flattened channel's whole
  block of columns); Wanda's ``|W| * ||X||`` criterion applied to whole input channels. Groups
  without consumers use the producer output's activation times the row norm.

The rewrite removes the pruned channels physically: producer rows and biases, consumer columns,
batch-norm / layer-norm entries, depthwise weights (``groups`` becomes the kept count), explicit
sizes of reshapes, channel-dim slices and splits. A channel map (ResNet option-A shortcut) is
rebuilt as an exact gather: ``index_select(constant_pad_nd(x, 1 zero channel), 1, idx)`` with
``idx[j]`` the pruned source position of target channel ``K[j]``, or the zero channel (a plain pad
when the kept positions are contiguous). Padding zeros are dropped where they stay zero.

What changes numerically: only the removed channels. If every removed channel was already zero
(zero producer rows and batch-norm scale/shift), the outputs are unchanged up to float rounding
(tested). Without fine-tuning, removing half of the channels of a trained model loses accuracy
(ResNet-20 at 50% of every group: SQNR -8 dB). Lossy (``exact = False``); the default budget
``min_sqnr_db = 0`` rejects an output whose error outweighs its signal. ``on_budget="adapt"``
(default): on a miss the pipeline backs off (:mod:`graphpress.passes.budget`): the groups whose
pruning costs the most output noise per channel (measured: the graph's outputs on the calibration
batches with that group alone pruned) lose a quarter of their ratio at a time, and the pass
re-runs; ``stats`` give ``asked_sparsity``, ``achieved_sparsity`` (share of the prunable groups'
channels removed) and ``backed_off_layers`` (per group). ``"fail"``: a miss is an error. Pruning
to fine-tune afterwards: set ``min_sqnr_db`` lower (e.g. ``-100``) or ``on_budget: fail``
with a floor you choose.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.compare import relative_noise
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import (
    add_constant,
    arg,
    erase_dead,
    insert_call,
    packet,
    refresh_meta,
    set_arg,
)
from graphpress.ir.opsets import BATCH_NORM, CONV_ANY, LAST_DIM_NORM
from graphpress.ir.summary import node_flops
from graphpress.passes.base import PassResult, register
from graphpress.passes.layers import observe
from graphpress.passes.select import Selector, check_names, check_selector
from graphpress.passes.budget import SteppedBackOff, check_on_budget, convex_costs, ladder, notches_at
from graphpress.passes.prune.deps import (
    ChannelAnalysis,
    ChannelGroup,
    Layout,
    analyze,
)

NAME = "prune-channels"
SCORES = ("l1", "l2", "wanda")
aten = torch.ops.aten


def _err(option: str, msg: str) -> PassError:
    return PassError(f"pass '{NAME}': option '{option}': {msg}")


@dataclass(frozen=True)
class PruneChannelsConfig:
    """Options of ``prune-channels`` (see ``docs/passes/prune-channels.md``).

    Attributes
    ----------
    sparsity : float
        Fraction of the channels removed from every prunable group, in [0, 1).
    score : "l1", "l2" or "wanda"
        Channel importance (module docstring).
    round_to : int
        Kept channel counts are rounded up to a multiple of this (SIMD-friendly widths).
    min_channels : int
        No group keeps fewer channels.
    targets, ignore : tuple of str
        Which channel groups, by group name or the name of any layer in the group, the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact group or layer names left whole (the older spelling of ``ignore``).
    layer_ratios : dict of str to float
        Sparsity per group (by group or layer name), overriding ``sparsity``.
    min_sqnr_db, max_kl : float, optional
        Budget the pipeline checks against the previous graph (0 dB SQNR by default: pruning
        without fine-tuning is a large change, but not one whose error outweighs the output).
    on_budget : "adapt" or "fail"
        On a budget miss, back off on the most sensitive groups until it holds (``adapt``), or
        fail (:mod:`graphpress.passes.budget`).
    """

    version: int = 1
    sparsity: float = 0.5
    score: Literal["l1", "l2", "wanda"] = "l1"
    round_to: int = 1
    min_channels: int = 1
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    layer_ratios: dict[str, float] = field(default_factory=dict)
    min_sqnr_db: float | None = 0.0
    max_kl: float | None = None
    on_budget: Literal["adapt", "fail"] = "adapt"

    def __post_init__(self) -> None:
        check_on_budget(NAME, self.on_budget)
        check_selector(NAME, self)
        if self.score not in SCORES:
            close = difflib.get_close_matches(str(self.score), SCORES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _err("score", f"{self.score!r} is not one of {', '.join(SCORES)}{hint}")
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise _err("sparsity", f"must be in [0, 1), got {self.sparsity!r}")
        if not (isinstance(self.round_to, int) and self.round_to >= 1):
            raise _err("round_to", f"must be an integer >= 1, got {self.round_to!r}")
        if not (isinstance(self.min_channels, int) and self.min_channels >= 1):
            raise _err("min_channels", f"must be an integer >= 1, got {self.min_channels!r}")
        for k, v in dict(self.layer_ratios).items():
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise _err("layer_ratios", f"'{k}': {v!r} is not in [0, 1)")

    def __hash__(self) -> int:
        return hash((self.version, self.sparsity, self.score, self.round_to, self.min_channels, self.skip, self.targets, self.ignore,
                     tuple(sorted(self.layer_ratios.items())), self.min_sqnr_db, self.max_kl, self.on_budget))


def kept_count(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """Channels a group of ``n`` keeps at sparsity ``ratio``: ``n - floor(ratio n)`` rounded up to a
    multiple of ``round_to``, at least ``min_channels``, at most ``n``."""
    k = n - math.floor(ratio * n + 1e-9)
    k = math.ceil(k / round_to) * round_to
    return min(n, max(k, min_channels))


# ---------------------------------------------------------------------------- scores
def _bn_scale(graph: Graph, producer: fx.Node, n: int) -> torch.Tensor:
    """``|gamma| / sqrt(var + eps)`` of a batch norm that alone reads ``producer``, else ones."""
    users = list(producer.users)
    if len(users) != 1 or packet(users[0]) not in BATCH_NORM or users[0].args[0] is not producer:
        return torch.ones(n)
    bn = users[0]
    eps_index = 6 if packet(bn) is aten._native_batch_norm_legit_no_training else 7
    gamma = graph.tensor_of(arg(bn, 1, "weight"))
    var = graph.tensor_of(arg(bn, 4, "running_var"))
    eps = float(arg(bn, eps_index, "eps", 1e-5))
    if var is None or var.numel() != n:
        return torch.ones(n)
    g = gamma.detach().abs().float() if gamma is not None else torch.ones(n)
    return g / torch.sqrt(var.detach().float() + eps)


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().float().movedim(dim, 0).reshape(t.shape[dim], -1)


def norm_scores(graph: Graph, group: ChannelGroup, p: int) -> torch.Tensor:
    """``l1`` (``p = 1``) or ``l2`` (``p = 2``) score of each channel of ``group``."""
    s = torch.zeros(group.size)
    for u in group.producers:
        if u.part != "weight":
            continue
        rows = _rows(graph.get_tensor(u.target), u.dim)
        norm = rows.abs().sum(1) if p == 1 else rows.pow(2).sum(1).sqrt()
        s.index_add_(0, u.layout.ch, norm * _bn_scale(graph, u.node, len(norm)))
    return s


def activation_means(graph: Graph, wanted: dict[fx.Node, int]) -> dict[str, torch.Tensor]:
    """``mean |x|`` per position along ``wanted[node]`` over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(n: fx.Node, out: torch.Tensor) -> None:  # a running sum: no batch is kept
        rows = _rows(out, wanted[n]).abs()
        sums[n.name] = sums.get(n.name, 0) + rows.sum(1)
        counts[n.name] = counts.get(n.name, 0) + rows.shape[1]

    observe(graph, wanted, add)
    return {k: v / max(1, counts[k]) for k, v in sums.items()}


def _consumer_input(node: fx.Node) -> tuple[fx.Node, int]:
    """The activation a consumer layer reads and its channel dim (conv: 1, linear / mm: last)."""
    x = node.args[1] if packet(node) is aten.addmm else node.args[0]
    return x, (1 if packet(node) in CONV_ANY else x.meta["val"].dim() - 1)


def wanda_scores(graph: Graph, groups: list[ChannelGroup], analysis: ChannelAnalysis) -> dict[int, torch.Tensor]:
    """``wanda`` score of each channel of each group (module docstring)."""
    wanted: dict[fx.Node, int] = {}
    for g in groups:
        for u in g.consumers:
            x, d = _consumer_input(u.node)
            wanted[x] = d
        if not g.consumers:
            for r in g.roots:
                wanted[r.node] = r.dim
    acts = activation_means(graph, wanted)
    out = {}
    for g in groups:
        s = torch.zeros(g.size)
        roots = torch.tensor([r.id for r in g.roots])
        for u in g.consumers:
            x = acts.get(_consumer_input(u.node)[0].name)
            if x is None:
                continue
            cols = _rows(graph.get_tensor(u.target), u.dim).pow(2).sum(1).sqrt()
            sel = torch.isin(u.layout.gid, roots)  # a concat consumer also reads other groups
            s.index_add_(0, u.layout.ch[sel], (x * cols)[sel])
        if not g.consumers:
            for u in g.producers:
                x = acts.get(u.node.name)
                if u.part == "weight" and x is not None:
                    s.index_add_(0, u.layout.ch, x * _rows(graph.get_tensor(u.target), u.dim).pow(2).sum(1).sqrt())
        out[g.id] = s
    return out


# ---------------------------------------------------------------------------- rewrite
class _Kept:
    """Kept positions of layouts, cached per layout object."""

    def __init__(self, analysis: ChannelAnalysis, keep: dict[int, torch.Tensor]):
        self.analysis, self.keep, self.cache = analysis, keep, {}

    def __call__(self, layout: Layout) -> torch.Tensor:
        key = id(layout)
        if key not in self.cache:
            self.cache[key] = (layout, self.analysis.kept_positions(layout, self.keep))
        return self.cache[key][1]


def _rank(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _channel_pad(rank: int, dim: int, before: int, after: int) -> list[int]:
    """``constant_pad_nd`` amounts (last dim first) padding only ``dim``."""
    return [0, 0] * (rank - 1 - dim) + [before, after]


def _replace(node: fx.Node, new: fx.Node) -> None:
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _gather(graph: Graph, x: fx.Node, dim: int, idx: torch.Tensor, *, before: fx.Node, like: fx.Node, hint: str) -> fx.Node:
    """``x`` restricted to positions ``idx`` along ``dim``: a slice when contiguous, else index_select."""
    n = len(idx)
    if n and torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + n)):
        return insert_call(graph, aten.slice.Tensor, (x, dim, int(idx[0]), int(idx[0]) + n), before=before, like=like)
    index = add_constant(graph, hint, idx.long(), before=before, parameter=False)
    return insert_call(graph, aten.index_select.default, (x, dim, index), before=before, like=like)


def rewrite(graph: Graph, analysis: ChannelAnalysis, keep: dict[int, torch.Tensor]) -> int:
    """Remove the channels ``keep`` (bool mask per group id) drops; returns the channel maps rebuilt."""
    kept = _Kept(analysis, keep)
    sliced: set[tuple[str, int]] = set()
    # Tied weights (one storage under two names) must stay one tensor: same input, same slice.
    results: dict[tuple, torch.Tensor] = {}
    old_storages: set[int] = set()
    for u in analysis.uses:
        if (u.target, u.dim) in sliced:
            continue
        sliced.add((u.target, u.dim))
        idx = kept(u.layout)
        if len(idx) != len(u.layout):
            t = graph.get_tensor(u.target)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype, u.dim, tuple(idx.tolist()))
            if key not in results:
                results[key] = t.index_select(u.dim, idx)
            graph.set_tensor(u.target, results[key])
            old_storages.add(key[0])
    # An unread alias of a sliced tied weight would keep the old full tensor counted and stored.
    dead: list[fx.Node] = [
        n for n in graph.nodes
        if n.op == "get_attr" and not n.users and (t := graph.tensor_of(n)) is not None and t.untyped_storage().data_ptr() in old_storages
    ]
    for node, cin in analysis.depthwise:
        set_arg(node, 8 if packet(node) is aten.convolution else 6, "groups", len(kept(cin)))
    for site in analysis.sized:
        node, p = site.node, packet(site.node)
        if p in LAST_DIM_NORM:
            (lay,) = site.layouts.values()
            node.update_arg(1, [len(kept(lay))])
            continue
        if p is aten.unflatten:
            first = node.args[1] + (_rank(node.args[0]) if node.args[1] < 0 else 0)
            sizes, offset = list(node.args[2]), first
        else:
            sizes, offset = list(node.args[1]), 0
        for d, lay in site.layouts.items():
            i = d - offset
            if 0 <= i < len(sizes) and isinstance(sizes[i], int) and sizes[i] != -1:
                sizes[i] = len(kept(lay))
        node.update_arg(2 if p is aten.unflatten else 1, sizes)
    for site in analysis.pads:
        amounts = list(site.node.args[1])
        k = _rank(site.node) - 1 - site.dim
        amounts[2 * k] = amounts[2 * k + 1] = 0
        if any(amounts):
            site.node.update_arg(1, amounts)
        else:
            site.node.replace_all_uses_with(site.node.args[0])
            dead.append(site.node)
    for g in analysis.gathers:
        kin = kept(g.layout_in)
        pos = torch.full((len(g.layout_in),), -1, dtype=torch.long)
        pos[kin] = torch.arange(len(kin))
        idx = pos[g.src[kept(g.layout_in.take(g.src))]]
        x = g.node.args[0]
        if torch.equal(idx, torch.arange(len(kin))):
            _replace(g.node, x)
        else:
            _replace(g.node, _gather(graph, x, g.dim, idx, before=g.node, like=g.node, hint=f"{g.node.name}_index"))
    for s in analysis.splits:
        sizes = [len(kept(seg)) for seg in s.segments]
        new = insert_call(graph, aten.split_with_sizes.default, (s.node.args[0], sizes, s.dim), before=s.node, like=s.node)
        _replace(s.node, new)
    rebuilt = 0
    for m in analysis.maps:
        op = m.join.args[m.operand]
        kt, km = kept(m.target), kept(m.layout)
        pos = torch.full((len(m.layout),), -1, dtype=torch.long)
        pos[km] = torch.arange(len(km))
        idx = pos[kt]
        z = len(km)
        idx[idx < 0] = z
        if torch.equal(idx, torch.arange(z)):
            continue
        rank = _rank(op)
        real = (idx < z).nonzero().flatten()
        before = int(real[0]) if len(real) else len(idx)
        after = len(idx) - before - z
        if len(real) == z and after >= 0 and torch.equal(idx[before : before + z], torch.arange(z)):
            new = insert_call(graph, aten.constant_pad_nd.default, (op, _channel_pad(rank, m.dim, before, after), 0.0), before=m.join)
        else:
            padded = insert_call(graph, aten.constant_pad_nd.default, (op, _channel_pad(rank, m.dim, 0, 1), 0.0), before=m.join)
            index = add_constant(graph, f"{m.join.name}_channel_map", idx, before=m.join, parameter=False)
            new = insert_call(graph, aten.index_select.default, (padded, m.dim, index), before=m.join)
        m.join.update_arg(m.operand, new)
        rebuilt += 1
    erase_dead(graph, dead)
    refresh_meta(graph)
    graph.recompile()
    return rebuilt


# ---------------------------------------------------------------------------- the pass
def macs_per_sample(graph: Graph) -> int:
    """Multiply-accumulates of the graph's matrix ops (convs, linears, matmuls; what
    :func:`graphpress.ir.summary.node_flops` counts) per example row (batch 1) at the example
    inputs' other sizes; needs fresh ``meta['val']``."""
    flops = sum(node_flops(n) for n in graph.call_nodes())
    x = graph.example_inputs[0] if graph.example_inputs else None
    batch = int(x.shape[0]) if graph.dynamic_batch and isinstance(x, torch.Tensor) and x.dim() else 1
    return flops // 2 // max(1, batch)


@register(NAME)
class PruneChannels(SteppedBackOff):
    """Structured channel pruning with dependency groups (see module docstring)."""

    exact = False
    Config = PruneChannelsConfig

    def __init__(self, config: PruneChannelsConfig = PruneChannelsConfig()):
        self.config = config
        # The last full run's ratio per pruned group, shared with its back-off copies (budget.py);
        # a back-off copy prunes group g at _override[g] instead.
        self._state: dict[str, Any] | None = None
        self._level = 0
        self._override: dict[str, float] = {}

    # ------------------------------------------------------------------ backing off
    NOTCHES = 4  #: a group backs off in quarters of its ratio

    def achieved(self, stats: dict[str, Any]) -> str:
        return f"sparsity {stats.get('achieved_sparsity', 0.0):.3f} (sparsity {self.config.sparsity:g})"

    def advice(self) -> str:
        return "lower sparsity"

    @torch.no_grad()
    def _measure_groups(self, graph: Graph) -> None:
        """The ladder: each group's relative output noise with it alone pruned at its ratio."""
        state = self._state
        batches = graph.calibration_batches()
        refs = [graph.run(*b) for b in batches]
        costs = {}
        for name, steps in state["steps"].items():
            alone = PruneChannels(dataclasses.replace(self.config, sparsity=0.0, layer_ratios={name: steps[0]}, skip=(), targets=(), ignore=()))
            g = alone(graph.clone()).graph
            costs[name] = convex_costs(relative_noise(refs, [g.run(*b) for b in batches]), steps)
        state["moves"] = ladder(costs, state["sizes"])

    def _ratio(self, g: ChannelGroup) -> float:
        if g.name in self._override:
            return self._override[g.name]
        for name in [g.name, *g.layers]:
            if name in self.config.layer_ratios:
                return float(self.config.layer_ratios[name])
        return float(self.config.sparsity)

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        analysis = analyze(graph)
        # a group is selected by its name or the name of any layer in it; pinned groups are valid names too
        units = {n: [u.node for u in g.producers] for g in analysis.groups if not g.pinned for n in [g.name, *g.layers]}
        pinned_names = [n for g in analysis.groups if g.pinned for n in [g.name, *g.layers]]
        check_names(NAME, "layer_ratios", cfg.layer_ratios, [*units, *pinned_names], [g.name for g in analysis.groups])
        selection = Selector.of(NAME, cfg).resolve(units, pinned_names)
        backing_off = self._level > 0 and self._state is not None
        if backing_off:
            if "moves" not in self._state:
                self._measure_groups(graph)
            taken = notches_at(self._state["moves"], self._level)
            self._override = {n: steps[taken.get(n, 0)] for n, steps in self._state["steps"].items()}
        params_before, macs_before = graph.parameter_count(), macs_per_sample(graph)
        pinned = {g.name: "; ".join(g.pinned) for g in analysis.groups if g.pinned}
        skipped: dict[str, str] = {}
        todo: list[tuple[ChannelGroup, int]] = []
        for g in analysis.groups:
            if g.pinned:
                continue
            if (left_out := selection.reason([g.name, *g.layers], [u.node for u in g.producers])) is not None:
                skipped[g.name] = left_out
                continue
            k = kept_count(g.size, self._ratio(g), cfg.round_to, cfg.min_channels)
            if k >= g.size:
                skipped[g.name] = f"keeps all {g.size} channels at this ratio, round_to and min_channels"
                continue
            todo.append((g, k))
        if not backing_off:
            self._state = {"steps": {g.name: [self._ratio(g) * (1 - j / self.NOTCHES) for j in range(self.NOTCHES + 1)] for g, _ in todo},
                           "sizes": {g.name: g.size for g, _ in todo}, "channels": sum(g.size for g, _ in todo)}
        asked = {n: steps[0] for n, steps in self._state["steps"].items()} if self._state else {}
        budget = {
            "asked_sparsity": cfg.sparsity,
            "achieved_sparsity": sum(g.size - k for g, k in todo) / self._state["channels"] if self._state and self._state["channels"] else 0.0,
            "backed_off_layers": {n: {"asked": round(asked[n], 4), "got": round(r, 4)} for n, r in self._override.items() if r < asked[n] - 1e-12},
        }
        if not todo:
            return PassResult(graph, changed=False, stats={"pruned_groups": 0, "pinned": pinned, "skipped": skipped, **budget})
        if cfg.score == "wanda":
            scores = wanda_scores(graph, [g for g, _ in todo], analysis)
        else:
            scores = {g.id: norm_scores(graph, g, 1 if cfg.score == "l1" else 2) for g, _ in todo}
        keep: dict[int, torch.Tensor] = {}
        rows = []
        for g, k in todo:
            s = scores[g.id]
            order = sorted(range(g.size), key=lambda i: (-float(s[i]), i))[:k]
            mask = torch.zeros(g.size, dtype=torch.bool)
            mask[order] = True
            keep[g.id] = mask
            rows.append({"name": g.name, "channels_before": g.size, "channels_after": k, "members": g.layers})
        rebuilt = rewrite(graph, analysis, keep)
        stats = {
            "score": cfg.score,
            "pruned_groups": len(todo),
            "groups": rows,
            "channels_before": sum(g.size for g, _ in todo),
            "channels_after": sum(k for _, k in todo),
            "channel_maps_rebuilt": rebuilt,
            "params_before": params_before,
            "params_after": graph.parameter_count(),
            "macs_before": macs_before,
            "macs_after": macs_per_sample(graph),
            "pinned": pinned,
            "skipped": skipped,
            **budget,
        }
        return PassResult(graph, changed=True, stats=stats)


__all__ = ["PruneChannels", "PruneChannelsConfig", "activation_means", "kept_count", "macs_per_sample", "norm_scores", "rewrite", "wanda_scores"]
