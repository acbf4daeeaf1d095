"""Channel dependency analysis for structured pruning: which channels must be removed together.

Model
-----
A *root space* is a channel dimension a layer creates: the output channels of a conv (dim 1),
of a linear or of an embedding (last dim). Every tensor of the graph carries, for each dim that
holds channels, a *layout*: for each position ``p`` along that dim, the root space and channel it
carries, ``(gid[p], ch[p])``, or a marker: ``FOREIGN`` (a value not traced to a root; always
kept) or a *zero token* (a zero written by a constant channel pad; dropped from the pruned graph
as long as it stays zero until a layer consumes it, else turned into ``FOREIGN``).

Layouts flow forward through the graph by one rule per op family (``docs/passes/prune-channels.md``
has the table). The rules are data: ``_RULES`` indexes, by op, a pattern (:mod:`graphpress.ir.pattern`
over the families of :mod:`graphpress.ir.opsets`) and the handler that moves the layouts. A node no
rule takes pins every group it reads, with the reason: its op has no rule, or the op's rules refuse
it (a transposed convolution, ``mm`` whose weight is an activation, ``addmm`` with scaling).

Root spaces are *joined* (union-find) where an element-wise op combines two tensors whose layouts
are both the identity of their roots: channel ``i`` of one is channel ``i`` of the other (a
residual add, SwiGLU's product). A :class:`ChannelGroup` is a union of root spaces;
pruning keeps the same subset ``K`` of its channels in every member.

Channel maps, not joins
-----------------------
Where ``add``/``sub`` combines the identity layout of group ``A`` with a *re-arranged* layout
(a channel-dim zero pad, slice, ``index_select`` or concatenation), it is a :class:`ChannelMap`:
position ``p`` of ``A`` receives whatever channel the other operand holds there. ResNet's option-A
shortcut ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` maps the ``n`` channels of the previous
stage into positions ``p .. p+n-1`` of the next. The rewrite rebuilds the operand as an exact
gather from the pruned source into ``A``'s kept channels, zero where the source channel was pruned
or was padding, so source and target groups keep or prune their channels independently.
(Torch-Pruning treats that pad as an element-wise op and breaks the model.)

Parameters
----------
Every constant a group touches is a :class:`ParamUse` ``(target, dim, layout, role)``:
``producer`` (conv/linear weight rows and bias, embedding columns), ``consumer`` (conv weight
dim 1 when ``groups == 1``; linear weight dim 1, where a channel flattened before the linear owns
a block of columns) and ``passthrough`` (batch-norm weight/bias/mean/var, depthwise conv weights
and bias, layer-norm / RMS-norm weights on the channel dim, per-channel constants in element-wise
ops). Pruning slices each use at the kept positions of its layout.

Convs. ``groups == 1``: consumer + new root. Depthwise (``groups == C_in``, any channel
multiplier): the output carries the input's layout (each input channel repeated ``multiplier``
times), the weights are pass-through and ``groups`` becomes the kept count. Grouped convs
(``1 < groups < C_in``) are *pinned*: input groups and output root stay whole (equal-per-group
pruning is not implemented).

Pinned groups (left whole, with a human-readable reason): a group that reaches a graph output, is
joined with a tensor whose channels are not traced (a graph input, a matmul result), is consumed by
an op without a rule, feeds a grouped conv, is broadcast against a wider tensor, has one channel
selected (``select``), is split across dims by a reshape (attention heads ``(..., heads,
head_dim)``: "attention head reshape: not supported yet"), or whose weight is read by two ops with
different layouts or by an op the analysis does not rewrite.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from graphpress.ir.graph import Graph, op_name
from graphpress.ir.opsets import (
    ADDITIVE_JOIN,
    BATCH_NORM,
    CONV_ANY,
    JOIN,
    LAST_DIM_NORM,
    LINEAR,
    NONZERO_UNARY,
    POOLING,
    POOLING_TUPLE,
    REDUCTION,
    RESHAPE,
    SHAPE_QUERY,
    SIZED_RESHAPE,
    SOFTMAX,
    SPLIT,
    ZERO_SAFE_UNARY,
)
from graphpress.ir.pattern import Match, Rule, any as any_, argument, attr, first_match, index_rules, op
from graphpress.ir.rewrite import arg, packet, refresh_meta

aten = torch.ops.aten

FOREIGN = -1
_ZERO_BASE = -2  # a zero token of pad site k is gid == _ZERO_BASE - k

HEADS_REASON = "attention head reshape: not supported yet"
_NO_PARAM = "weight operand is not a parameter"  # addmm / mm of two activations is no layer


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True, eq=False)
class Layout:
    """What each position along one dim of a tensor carries: ``(gid[p], ch[p])``.

    ``gid >= 0`` is a root space id and ``ch`` its channel; ``gid == FOREIGN`` an untraced value
    (always kept); ``gid <= -2`` a zero token of a constant pad.
    """

    gid: torch.Tensor
    ch: torch.Tensor

    def __len__(self) -> int:
        return int(self.gid.numel())

    @staticmethod
    def identity(root: int, n: int) -> Layout:
        return Layout(torch.full((n,), root, dtype=torch.long), torch.arange(n))

    @staticmethod
    def constant(gid: int, n: int) -> Layout:
        return Layout(torch.full((n,), gid, dtype=torch.long), torch.zeros(n, dtype=torch.long))

    @staticmethod
    def cat(parts: Iterable[Layout]) -> Layout:
        parts = list(parts)
        return Layout(torch.cat([p.gid for p in parts]), torch.cat([p.ch for p in parts]))

    def take(self, index: torch.Tensor) -> Layout:
        return Layout(self.gid[index], self.ch[index])

    def root(self) -> int | None:
        """The root space when this is its identity layout (all channels, in order), else None."""
        if len(self) == 0 or int(self.gid[0]) < 0 or not bool((self.gid == self.gid[0]).all()):
            return None
        return int(self.gid[0]) if torch.equal(self.ch, torch.arange(len(self))) else None

    def roots(self) -> set[int]:
        return {int(g) for g in self.gid.unique() if g >= 0}

    def zero_pads(self) -> set[int]:
        return {_ZERO_BASE - int(g) for g in self.gid.unique() if g <= _ZERO_BASE}

    def same(self, other: Layout) -> bool:
        return self is other or (torch.equal(self.gid, other.gid) and torch.equal(self.ch, other.ch))


@dataclass(eq=False)
class RootSpace:
    """A channel dimension created by a layer: ``node``'s output along ``dim`` (``size`` channels)."""

    id: int
    node: fx.Node
    dim: int
    size: int
    kind: str  # "conv" | "linear" | "embedding" | "grouped-conv"
    name: str


@dataclass(eq=False)
class ParamUse:
    """Constant ``target`` read by ``node``, indexed along ``dim`` by ``layout``.

    ``role``: ``producer`` (rows of the layer creating the channels), ``consumer`` (columns of a
    layer reading them) or ``passthrough`` (per-channel entries: norms, depthwise weights, scales).
    ``part`` names the argument (``weight``, ``bias``, ``running_var``...).
    """

    node: fx.Node
    target: str
    dim: int
    layout: Layout
    role: str
    part: str


@dataclass(eq=False)
class ChannelMap:
    """Operand ``operand`` of element-wise ``join`` re-arranges channels into the identity layout
    ``target`` (ResNet option-A): rebuilt as a gather, not joined."""

    join: fx.Node
    operand: int
    dim: int
    layout: Layout
    target: Layout


@dataclass(eq=False)
class Gather:
    """``node`` (slice / index_select) takes input positions ``src`` along ``dim``."""

    node: fx.Node
    dim: int
    src: torch.Tensor
    layout_in: Layout


@dataclass(eq=False)
class Split:
    """``node`` (split / chunk) cuts ``dim`` into ``segments``."""

    node: fx.Node
    dim: int
    segments: list[Layout]


@dataclass(eq=False)
class PadSite:
    """Constant zero pad ``node`` on channel ``dim`` (before/after amounts); its zeros are dropped."""

    node: fx.Node
    dim: int
    pad_id: int


@dataclass(eq=False)
class SizedSite:
    """``node`` states output sizes explicitly (view, reshape, expand, unflatten, layer_norm's
    normalized_shape): ``layouts`` by output dim tell the new sizes."""

    node: fx.Node
    layouts: dict[int, Layout]


@dataclass(eq=False)
class ChannelGroup:
    """Channels pruned together: the union of joined root spaces and everything that indexes them."""

    id: int
    name: str
    size: int
    roots: list[RootSpace]
    spaces: list[tuple[str, int]] = field(default_factory=list)
    producers: list[ParamUse] = field(default_factory=list)
    consumers: list[ParamUse] = field(default_factory=list)
    passthrough: list[ParamUse] = field(default_factory=list)
    maps_in: list[ChannelMap] = field(default_factory=list)
    maps_out: list[ChannelMap] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.pinned

    @property
    def layers(self) -> list[str]:
        """Names of the layers whose output channels form this group."""
        return [r.name for r in self.roots]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.size,
            "members": self.layers,
            "consumers": sorted({u.target for u in self.consumers}),
            "passthrough": sorted({u.target for u in self.passthrough}),
            "maps_in": len(self.maps_in),
            "maps_out": len(self.maps_out),
            "pinned": "; ".join(self.pinned),
        }


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze`: groups, the layouts of every node and the rewrite sites."""

    groups: list[ChannelGroup]
    roots: list[RootSpace]
    group_of_root: dict[int, int]
    layouts: dict[fx.Node, dict[int, Layout]]
    uses: list[ParamUse]
    maps: list[ChannelMap]
    gathers: list[Gather]
    splits: list[Split]
    pads: list[PadSite]
    sized: list[SizedSite]
    depthwise: list[tuple[fx.Node, Layout]]
    kept_zero_pads: set[int]

    def group(self, name: str) -> ChannelGroup:
        """The group named ``name`` or containing layer ``name``."""
        for g in self.groups:
            if g.name == name or name in g.layers:
                return g
        raise KeyError(name)

    def kept_positions(self, layout: Layout, keep: dict[int, torch.Tensor]) -> torch.Tensor:
        """Positions of ``layout`` that survive when group ``g`` keeps channels ``keep[g]`` (bool
        masks; groups missing from ``keep`` keep everything): foreign positions stay, zero tokens
        of droppable pads go."""
        mask = layout.gid == FOREIGN
        for root in layout.roots():
            sel = layout.gid == root
            k = keep.get(self.group_of_root[root])
            mask[sel] = True if k is None else k[layout.ch[sel]]
        for pad in layout.zero_pads():
            if pad in self.kept_zero_pads:
                mask[layout.gid == _ZERO_BASE - pad] = True
        return mask.nonzero().flatten()


# ---------------------------------------------------------------------------- analysis
def analyze(graph: Graph) -> ChannelAnalysis:
    """Channel groups of ``graph`` (see the module docstring).

    Refreshes ``meta['val']`` by fake propagation on the example inputs (as ``verify`` does), so
    every shape is concrete. Pads whose zeros turn out to be used as values are re-analysed with
    their zeros kept (a few passes at most).
    """
    refresh_meta(graph)
    kept_zero: set[int] = set()
    while True:
        a = _Analyzer(graph, kept_zero)
        a.run()
        if a.unsafe_zero <= kept_zero:
            return a.result()
        kept_zero |= a.unsafe_zero


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"graph input '{node.name}'"
    if node.op == "call_function":
        return f"'{node.name}' ({op_name(node)})"
    return f"'{node.name}'"


class _Analyzer:
    def __init__(self, graph: Graph, kept_zero: set[int]):
        self.graph = graph
        self.kept_zero = kept_zero
        self.unsafe_zero: set[int] = set()
        self.layouts: dict[fx.Node, dict[int, Layout]] = {}
        self.tuples: dict[fx.Node, list[dict[int, Layout]]] = {}
        self.roots: list[RootSpace] = []
        self.parent: list[int] = []
        self.pins: dict[int, list[str]] = {}
        self.uses: list[ParamUse] = []
        self.maps: list[ChannelMap] = []
        self.gathers: list[Gather] = []
        self.splits: list[Split] = []
        self.pads: list[PadSite] = []
        self.sized: list[SizedSite] = []
        self.depthwise: list[tuple[fx.Node, Layout]] = []
        self.pad_count = 0
        self.names: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping
    def L(self, node: Any) -> dict[int, Layout]:
        return self.layouts.get(node, {}) if isinstance(node, fx.Node) else {}

    def new_root(self, node: fx.Node, dim: int, size: int, kind: str) -> int:
        base = self.graph.source_module(node) or node.name
        k = self.names.get(base, 0)
        self.names[base] = k + 1
        rid = len(self.roots)
        self.roots.append(RootSpace(rid, node, dim, size, kind, f"{base}#{k}" if k else base))
        self.parent.append(rid)
        return rid

    def find(self, r: int) -> int:
        while self.parent[r] != r:
            self.parent[r] = self.parent[self.parent[r]]
            r = self.parent[r]
        return r

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def pin(self, layout: Layout, reason: str) -> None:
        """Leave every group in ``layout`` whole; its zero tokens are values now."""
        for r in layout.roots():
            reasons = self.pins.setdefault(r, [])
            if reason not in reasons:
                reasons.append(reason)
        self.unsafe_zero |= layout.zero_pads()

    def pin_all(self, layouts: Iterable[Layout], reason: str) -> None:
        for lay in layouts:
            self.pin(lay, reason)

    def zeros_become_values(self, layouts: Iterable[Layout]) -> None:
        for lay in layouts:
            self.unsafe_zero |= lay.zero_pads()

    def use(self, node: fx.Node, const: Any, dim: int, layout: Layout, role: str, part: str) -> bool:
        """Record a constant read; False (and the caller pins) when it is not a constant tensor."""
        if not isinstance(const, fx.Node) or const.op != "get_attr" or self.graph.tensor_of(const) is None:
            return False
        self.uses.append(ParamUse(node, str(const.target), dim, layout, role, part))
        return True

    # ------------------------------------------------------------------ walk
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "output":
                self.output(node)
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "call_module":
                self.unknown(node, "a submodule call")
        self.check_params()

    def output(self, node: fx.Node) -> None:
        leaves = [a for a in pytree.tree_leaves(node.args[0]) if isinstance(a, fx.Node)]
        names = self.graph.output_names if len(self.graph.output_names) == len(leaves) else [a.name for a in leaves]
        for a, name in zip(leaves, names):
            for lay in self.L(a).values():
                self.pin(lay, f"reaches graph output '{name}'")

    def unknown(self, node: fx.Node, what: str | None = None) -> None:
        reason = f"consumed by '{node.name}': {what or f'{op_name(node)} (no pruning rule)'}"
        for inp in node.all_input_nodes:
            self.pin_all([*self.L(inp).values(), *(x for t in self.tuples.get(inp, []) for x in t.values())], reason)

    def call(self, node: fx.Node) -> None:
        if isinstance(found := first_match(_RULES, node), tuple):
            return found[0].rewrite(self, node, found[1])
        reasons = "; ".join(dict.fromkeys(f.reason if f.node is node else str(f) for f in found))
        self.unknown(node, f"{op_name(node)} (no pruning rule: {reasons})" if reasons else None)

    def getitem(self, node: fx.Node, m: Match) -> None:
        src, i = node.args
        if src in self.tuples and isinstance(i, int) and i < len(self.tuples[src]):
            self.layouts[node] = self.tuples[src][i]

    # ------------------------------------------------------------------ layers
    def conv(self, node: fx.Node, m: Match) -> None:
        x, w, bias, groups = m["x"], m["w"], m["bias"], m["groups"]
        wt = self.graph.tensor_of(w) if isinstance(w, fx.Node) else None
        shape = _shape(node)
        lin = self.L(x)
        name = self.graph.source_module(node) or node.name
        for d, lay in lin.items():
            if d != 1:
                self.pin(lay, f"channels on spatial dim {d} of conv '{name}'")
        cin = lin.get(1)
        if wt is None:
            return self.whole_conv(node, cin, shape[1], "conv", f"conv '{name}' weight is not a constant")
        out_ch, in_per_group = int(wt.shape[0]), int(wt.shape[1])
        c_in = in_per_group * int(groups)
        if groups == 1:
            if cin is not None:
                self.use(node, w, 1, cin, "consumer", "weight")
            rid = self.new_root(node, 1, out_ch, "conv")
            ident = Layout.identity(rid, out_ch)
            self.use(node, w, 0, ident, "producer", "weight")
            if bias is not None and not self.use(node, bias, 0, ident, "producer", "bias"):
                self.pins.setdefault(rid, []).append(f"conv '{name}' bias is not a constant")
            self.layouts[node] = {1: ident}
        elif groups == c_in and in_per_group == 1 and out_ch % c_in == 0:
            if cin is None:
                self.layouts[node] = {}
                return
            mult = out_ch // c_in
            lout = cin.take(torch.arange(out_ch) // mult)
            ok = self.use(node, w, 0, lout, "passthrough", "weight")
            if bias is not None:
                ok = self.use(node, bias, 0, lout, "passthrough", "bias") and ok
                self.zeros_become_values([cin])
            if not ok:
                self.pin(cin, f"depthwise conv '{name}' bias is not a constant")
            self.depthwise.append((node, cin))
            self.layouts[node] = {1: lout}
        else:
            self.whole_conv(node, cin, out_ch, "grouped-conv",
                            f"grouped conv '{name}' (groups={groups}): channel groups are not pruned per conv group")

    def whole_conv(self, node: fx.Node, cin: Layout | None, out_ch: int, kind: str, reason: str) -> None:
        """A conv the analysis cannot slice: its input channels and its new root stay whole."""
        if cin is not None:
            self.pin(cin, reason)
        rid = self.new_root(node, 1, out_ch, kind)
        self.pins.setdefault(rid, []).append(reason)
        self.layouts[node] = {1: Layout.identity(rid, out_ch)}

    def linear(self, node: fx.Node, m: Match) -> None:
        x, w, bias = m["x"], m["w"], m["bias"]
        shape = _shape(node)
        last = len(shape) - 1
        lin = self.L(x)
        name = self.graph.source_module(node) or node.name
        out = {d: lay for d, lay in lin.items() if d != last}
        cin = lin.get(last)
        rid = self.new_root(node, last, shape[last], "linear")
        ident = Layout.identity(rid, shape[last])
        const = self.use(node, w, 0, ident, "producer", "weight")
        if cin is not None and not (const and self.use(node, w, 1, cin, "consumer", "weight")):
            self.pin(cin, f"linear '{name}' weight is not a constant")
        if not const or (bias is not None and not self.use(node, bias, 0, ident, "producer", "bias")):
            self.pins.setdefault(rid, []).append(f"linear '{name}' weight or bias is not a constant")
        out[last] = ident
        self.layouts[node] = out

    def matmul(self, node: fx.Node, m: Match) -> None:
        """``addmm(bias, x, W)`` / ``mm(x, W)`` with a constant ``W`` (in x out): GPT-2's Conv1D."""
        bias, x, w = m.get("bias"), m["x"], m["w"]
        lin = self.L(x)
        name = self.graph.source_module(node) or node.name
        for d, lay in lin.items():
            if d != 1:
                self.pin(lay, f"'{name}' multiplies along dim {d}")
        n = _shape(node)[1]
        rid = self.new_root(node, 1, n, "linear")
        ident = Layout.identity(rid, n)
        if not self.use(node, w, 1, ident, "producer", "weight"):
            self.pins.setdefault(rid, []).append(f"'{name}' weight is not a constant")
        if 1 in lin:
            self.use(node, w, 0, lin[1], "consumer", "weight")
        if isinstance(bias, fx.Node):
            bs = _shape(bias)
            if bs is None or bs[-1] != n or not self.use(node, bias, len(bs) - 1, ident, "producer", "bias"):
                self.pins.setdefault(rid, []).append(f"'{name}' bias is not a per-channel constant")
        self.layouts[node] = {1: ident}

    def embedding(self, node: fx.Node, m: Match) -> None:
        w, idx = node.args[0], node.args[1]
        for lay in self.L(idx).values():
            self.pin(lay, f"used as embedding indices in '{node.name}'")
        shape = _shape(node)
        last = len(shape) - 1
        rid = self.new_root(node, last, shape[last], "embedding")
        ident = Layout.identity(rid, shape[last])
        if not self.use(node, w, 1, ident, "producer", "weight"):
            self.pins.setdefault(rid, []).append(f"embedding '{node.name}' table is not a constant")
        self.layouts[node] = {last: ident}

    def batch_norm(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = dict(self.L(x))
        c = lin.get(1)
        if c is not None:
            self.zeros_become_values([c])
            for i, part in ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")):
                t = arg(node, i, part)
                if t is not None and not self.use(node, t, 0, c, "passthrough", part):
                    self.pin(c, f"batch_norm '{node.name}' {part} is not a constant")
        if packet(node) is aten.batch_norm:
            self.layouts[node] = lin
        else:
            self.tuples[node] = [lin, {}, {}]

    def layer_norm(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        shape = _shape(node)
        ns = list(node.args[1])
        lin = self.L(x)
        normed = range(len(shape) - len(ns), len(shape))
        hit = {d: lay for d, lay in lin.items() if d in normed}
        if hit:
            last = len(shape) - 1
            if len(ns) != 1 or last not in hit:
                self.pin_all(hit.values(), f"'{node.name}' normalizes over several dims including channels")
            else:
                c = hit[last]
                self.zeros_become_values([c])
                for part in ("weight", "bias"):  # rms_norm has no bias
                    t = argument(node, part, None)
                    if t is not None and not self.use(node, t, 0, c, "passthrough", part):
                        self.pin(c, f"'{node.name}' {part} is not a constant")
                self.sized.append(SizedSite(node, {last: c}))
        self.layouts[node] = dict(lin)

    # ------------------------------------------------------------------ channel-preserving
    def unary(self, node: fx.Node, m: Match) -> None:
        x, p = node.args[0], packet(node)
        lin = self.L(x)
        zero_safe = p in ZERO_SAFE_UNARY or (p is aten.pow and isinstance(arg(node, 1, "exponent"), (int, float)) and arg(node, 1, "exponent") > 0)
        if not zero_safe:
            self.zeros_become_values(lin.values())
        for other in node.all_input_nodes[1:]:
            if self.L(other):
                return self.unknown(node, f"{op_name(node)} with a second tensor input")
        self.layouts[node] = dict(lin)

    def pooling(self, node: fx.Node, m: Match) -> None:
        lin = self.L(node.args[0])
        for d, lay in lin.items():
            if d != 1:
                self.pin(lay, f"channels on pooled dim {d} in '{node.name}'")
        out = {1: lin[1]} if 1 in lin else {}
        if packet(node) in POOLING_TUPLE:
            self.tuples[node] = [out, dict(out)]
        else:
            self.layouts[node] = out

    def reduction(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = self.L(x)
        if not lin:
            return
        rank = len(_shape(x))
        dims = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], (int, list, tuple)) else node.kwargs.get("dim")
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            reduced = set(range(rank))
        else:
            dims = [dims] if isinstance(dims, int) else list(dims)
            reduced = {_norm_dim(int(d), rank) for d in dims}
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else False))
        out = {}
        for d, lay in lin.items():
            if d in reduced:
                # averaging over channels: pruning changes the value (RMSNorm's mean of squares);
                # zeros may not be dropped from the average.
                self.zeros_become_values([lay])
                continue
            out[d if keepdim else d - sum(1 for r in reduced if r < d)] = lay
        self.layouts[node] = out

    # ------------------------------------------------------------------ joins
    def join(self, node: fx.Node, m: Match) -> None:
        out_shape, p = _shape(node), packet(node)
        if out_shape is None:
            return self.unknown(node)
        rank = len(out_shape)
        operands = [(i, a) for i, a in enumerate(node.args[:2]) if isinstance(a, fx.Node)]
        name = f"'{node.name}' ({op_name(node)})"
        out: dict[int, Layout] = {}
        for d in range(rank):
            lays: list[tuple[int, int, Layout]] = []
            consts: list[tuple[fx.Node, int]] = []
            untraced: list[fx.Node] = []
            for i, a in operands:
                sa = _shape(a)
                if sa is None:
                    continue
                ad = d - (rank - len(sa))
                if ad < 0:
                    continue
                lay = self.L(a).get(ad)
                if sa[ad] == 1 and out_shape[d] != 1:
                    if lay is not None:
                        self.pin(lay, f"broadcast against a wider tensor in {name}")
                    continue
                if lay is not None:
                    lays.append((i, ad, lay))
                elif a.op == "get_attr":
                    consts.append((a, ad))
                else:
                    untraced.append(a)
            if not lays:
                continue
            layouts = [lay for _i, _d, lay in lays]
            if untraced:
                self.pin_all(layouts, f"joined in {name} with {_describe(untraced[0])}, whose channels are not traced")
                res = layouts[0]
            elif all(lay.same(layouts[0]) for lay in layouts):
                res = layouts[0]
            elif all(lay.root() is not None for lay in layouts):
                for lay in layouts[1:]:
                    self.union(layouts[0].root(), lay.root())
                res = layouts[0]
            else:
                ident = next((lay for lay in layouts if lay.root() is not None), None)
                if p in ADDITIVE_JOIN and ident is not None:
                    for i, ad, lay in lays:
                        if lay.root() is None:
                            self.maps.append(ChannelMap(node, i, ad, lay, ident))
                        elif lay is not ident:
                            self.union(ident.root(), lay.root())
                    res = ident
                else:
                    self.pin_all(layouts, f"{name} combines re-arranged channel layouts")
                    res = layouts[0]
            for c, cd in consts:
                if not self.use(node, c, cd, res, "passthrough", "constant"):
                    self.pin(res, f"{name} reads a non-tensor constant")
            if res.zero_pads() and not (p in (aten.mul, aten.div) and len(lays) == 1):
                self.zeros_become_values([res])
            out[d] = res
        self.layouts[node] = out

    # ------------------------------------------------------------------ shapes
    def reshape(self, node: fx.Node, m: Match) -> None:
        x, p = node.args[0], packet(node)
        lin = self.L(x)
        if not lin:
            return
        in_shape, out_shape = _shape(x), _shape(node)
        out: dict[int, Layout] = {}
        for c, lay in lin.items():
            coord = torch.arange(in_shape[c], dtype=torch.int32).view([-1 if i == c else 1 for i in range(len(in_shape))])
            coord = coord.expand(in_shape).reshape(out_shape)
            varying = [d for d in range(len(out_shape)) if out_shape[d] > 1 and not torch.equal(coord, coord.narrow(d, 0, 1).expand_as(coord))]
            if len(varying) > 1:
                self.pin(lay, f"'{node.name}' splits the channels of dim {c} across dims {varying} ({HEADS_REASON})")
                continue
            if not varying:
                continue
            d = varying[0]
            if d in out:
                self.pin_all([lay, out.pop(d)], f"'{node.name}' merges two channel dims")
                continue
            vec = coord
            for k in reversed(range(len(out_shape))):
                if k != d:
                    vec = vec.select(k, 0)
            out[d] = lay.take(vec.long())
        self.layouts[node] = out
        if p in SIZED_RESHAPE or p is aten.unflatten:
            self.sized.append(SizedSite(node, out))

    def expand(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = self.L(x)
        if not lin:
            return
        shift = len(_shape(node)) - len(_shape(x))
        out = {d + shift: lay for d, lay in lin.items()}
        self.layouts[node] = out
        self.sized.append(SizedSite(node, out))

    def permute(self, node: fx.Node, m: Match) -> None:
        x, p = node.args[0], packet(node)
        lin = self.L(x)
        rank = len(_shape(x))
        if p is aten.permute:
            order = [_norm_dim(int(d), rank) for d in node.args[1]]
        else:
            order = list(range(rank))
            a, b = (0, 1) if p is aten.t else (_norm_dim(int(node.args[1]), rank), _norm_dim(int(node.args[2]), rank))
            if rank >= 2:
                order[a], order[b] = order[b], order[a]
        self.layouts[node] = {j: lin[src] for j, src in enumerate(order) if src in lin}

    def select(self, node: fx.Node, m: Match) -> None:
        x, dim = node.args[0], node.args[1]
        lin = self.L(x)
        dim = _norm_dim(int(dim), len(_shape(x)))
        if dim in lin:
            self.pin(lin[dim], f"'{node.name}' selects a single channel")
        self.layouts[node] = {(d if d < dim else d - 1): lay for d, lay in lin.items() if d != dim}

    def gather(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = self.L(x)
        if not lin:
            return
        dim = _norm_dim(int(arg(node, 1, "dim", 0)), len(_shape(x)))
        out, lay = dict(lin), lin.get(dim)
        if lay is not None:
            if packet(node) is aten.slice:
                bounds = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step", 1)
                ok = all(v is None or isinstance(v, int) for v in bounds)
                src, why = torch.arange(len(lay))[slice(*bounds)] if ok else None, "slices channels with symbolic bounds"
            else:
                index = self.graph.tensor_of(node.args[2]) if isinstance(node.args[2], fx.Node) else None
                src, why = None if index is None else index.long().flatten(), "gathers channels with a computed index"
            if src is None:
                self.pin(lay, f"'{node.name}' {why}")
                del out[dim]
            else:
                out[dim] = lay.take(src)
                self.gathers.append(Gather(node, dim, src, lay))
        self.layouts[node] = out

    def pad(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = self.L(x)
        if not lin:
            return
        rank = len(_shape(x))
        amounts, mode, value = list(node.args[1]), argument(node, "mode", "constant"), argument(node, "value")
        out = dict(lin)
        for k in range(len(amounts) // 2):
            d = rank - 1 - k
            a, b = int(amounts[2 * k]), int(amounts[2 * k + 1])
            if d not in lin or (a == 0 and b == 0):
                continue
            lay = lin[d]
            if a < 0 or b < 0 or mode != "constant":
                self.pin(lay, f"'{node.name}' pads channels with mode={mode!r} or negative amounts")
                continue
            if value is None or float(value) == 0.0:
                pad_id = self.pad_count
                self.pad_count += 1
                gid = FOREIGN if pad_id in self.kept_zero else _ZERO_BASE - pad_id
                if pad_id not in self.kept_zero:
                    self.pads.append(PadSite(node, d, pad_id))
            else:
                gid = FOREIGN
            out[d] = Layout.cat([Layout.constant(gid, a), lay, Layout.constant(gid, b)])
        self.layouts[node] = out

    def cat(self, node: fx.Node, m: Match) -> None:
        tensors = list(node.args[0])
        out_shape = _shape(node)
        rank = len(out_shape)
        dim = _norm_dim(int(arg(node, 1, "dim", 0)), rank)
        lins = [self.L(t) for t in tensors]
        out: dict[int, Layout] = {}
        if any(dim in lin for lin in lins):
            out[dim] = Layout.cat([lin[dim] if dim in lin else Layout.constant(FOREIGN, _shape(t)[dim]) for t, lin in zip(tensors, lins)])
        for d in range(rank):
            if d == dim:
                continue
            lays = [lin.get(d) for lin in lins]
            present = [lay for lay in lays if lay is not None]
            if not present:
                continue
            if len(present) == len(lays) and all(lay.same(present[0]) for lay in present):
                out[d] = present[0]
            elif len(present) == len(lays) and all(lay.root() is not None for lay in present):
                for lay in present[1:]:
                    self.union(present[0].root(), lay.root())
                out[d] = present[0]
            else:
                self.pin_all(present, f"'{node.name}' concatenates tensors with different channel layouts on dim {d}")
        self.layouts[node] = out

    def split(self, node: fx.Node, m: Match) -> None:
        x = node.args[0]
        lin = self.L(x)
        rank = len(_shape(x))
        vals = node.meta.get("val")
        if not isinstance(vals, (list, tuple)):
            return self.unknown(node)
        dim = _norm_dim(int(arg(node, 2, "dim", 0)), rank)
        sizes = [int(v.shape[dim]) for v in vals]
        outs = [dict(lin) for _ in sizes]
        if dim in lin:
            lay, start, segments = lin[dim], 0, []
            for o, n in zip(outs, sizes):
                seg = lay.take(torch.arange(start, start + n))
                o[dim] = seg
                segments.append(seg)
                start += n
            self.splits.append(Split(node, dim, segments))
        self.tuples[node] = outs

    # ------------------------------------------------------------------ result
    def result(self) -> ChannelAnalysis:
        by_group: dict[int, ChannelGroup] = {}
        group_of_root: dict[int, int] = {}
        for r in self.roots:
            top = self.find(r.id)
            if top not in by_group:
                by_group[top] = ChannelGroup(len(by_group), r.name, r.size, [])
            g = by_group[top]
            g.roots.append(r)
            group_of_root[r.id] = g.id
            for reason in self.pins.get(r.id, []):
                if reason not in g.pinned:
                    g.pinned.append(reason)
        groups = sorted(by_group.values(), key=lambda g: g.id)
        for node, dims in self.layouts.items():
            for d, lay in dims.items():
                root = lay.root()
                if root is not None:
                    groups[group_of_root[root]].spaces.append((node.name, d))
        for u in self.uses:
            for root in u.layout.roots():
                g = groups[group_of_root[root]]
                bucket = {"producer": g.producers, "consumer": g.consumers}.get(u.role, g.passthrough)
                if u not in bucket:
                    bucket.append(u)
        for m in self.maps:
            groups[group_of_root[m.target.root()]].maps_in.append(m)
            for root in m.layout.roots():
                g = groups[group_of_root[root]]
                if m not in g.maps_out:
                    g.maps_out.append(m)
        return ChannelAnalysis(
            groups, self.roots, group_of_root, self.layouts, self.uses, self.maps, self.gathers, self.splits,
            self.pads, self.sized, self.depthwise, set(self.kept_zero),
        )

    def check_params(self) -> None:
        """Pin groups whose constants cannot be sliced consistently."""
        by_key: dict[tuple[str, int], list[ParamUse]] = {}
        readers: dict[str, set[fx.Node]] = {}
        for u in self.uses:
            by_key.setdefault((u.target, u.dim), []).append(u)
            readers.setdefault(u.target, set()).add(u.node)
        for (target, dim), us in by_key.items():
            t = self.graph.get_tensor(target)
            roots = [u.layout.root() for u in us]
            if all(r is not None for r in roots) and len({len(u.layout) for u in us}) == 1:
                for r in roots[1:]:
                    # a tied weight (embedding table read again as the LM head): one channel set
                    self.union(roots[0], r)
            elif any(not u.layout.same(us[0].layout) for u in us):
                self.pin_all([u.layout for u in us], f"'{target}' is read with different channel layouts on dim {dim}")
            if any(t.dim() <= dim or t.shape[dim] != len(u.layout) for u in us):
                self.pin_all([u.layout for u in us], f"'{target}' dim {dim} does not match its channels")
        for node in self.graph.nodes:
            if node.op != "get_attr" or str(node.target) not in readers:
                continue
            for user in node.users:
                if user not in readers[str(node.target)]:
                    self.pin_all(
                        [u.layout for u in self.uses if u.target == str(node.target)],
                        f"'{node.target}' is also read by {_describe(user)}, which is not rewritten",
                    )


#: The rule of each op family; ``rewrite`` is the handler, called as ``handler(analyzer, node, match)``.
_RULES = index_rules([
    Rule("getitem", op(operator.getitem), _Analyzer.getitem),
    Rule("conv", op(CONV_ANY, any_("x"), any_("w"), bias=any_("bias"), groups=any_("groups"),
                    check=lambda n, m: "transposed convolution" if argument(n, "transposed", False) else None), _Analyzer.conv),
    Rule("linear", op(LINEAR, any_("x"), any_("w"), bias=any_("bias")), _Analyzer.linear),
    Rule("addmm", op(aten.addmm, any_("bias"), any_("x"), attr("w", why=_NO_PARAM), beta=1, alpha=1), _Analyzer.matmul),
    Rule("mm", op(aten.mm, any_("x"), attr("w", why=_NO_PARAM)), _Analyzer.matmul),
    Rule("dtype check", op(aten._assert_tensor_metadata, size=None, stride=None), lambda *_: None),
    Rule("shape query", op(SHAPE_QUERY), lambda *_: None),
    Rule("embedding", op(aten.embedding), _Analyzer.embedding),
    Rule("batch norm", op(BATCH_NORM), _Analyzer.batch_norm),
    Rule("last-dim norm", op(LAST_DIM_NORM), _Analyzer.layer_norm),
    Rule("group norm", op(aten.group_norm), lambda a, n, m: a.unknown(n, "group_norm normalizes channels in groups")),
    Rule("unary", op(ZERO_SAFE_UNARY | NONZERO_UNARY | SOFTMAX | {aten.pow}), _Analyzer.unary),
    Rule("pooling", op(POOLING | POOLING_TUPLE), _Analyzer.pooling),
    Rule("join", op(JOIN), _Analyzer.join),
    Rule("reshape", op(RESHAPE), _Analyzer.reshape),
    Rule("expand", op(aten.expand), _Analyzer.expand),
    Rule("permute", op(aten.permute), _Analyzer.permute), Rule("transpose", op(aten.transpose), _Analyzer.permute),
    Rule("t", op(aten.t), _Analyzer.permute),
    Rule("select", op(aten.select), _Analyzer.select),
    Rule("slice", op(aten.slice), _Analyzer.gather), Rule("index_select", op(aten.index_select), _Analyzer.gather),
    Rule("pad", op(aten.pad), _Analyzer.pad), Rule("constant_pad_nd", op(aten.constant_pad_nd), _Analyzer.pad),
    Rule("cat", op(aten.cat), _Analyzer.cat),
    Rule("split", op(SPLIT), _Analyzer.split),
    Rule("reduction", op(REDUCTION), _Analyzer.reduction),
])

__all__ = [
    "FOREIGN",
    "HEADS_REASON",
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelMap",
    "Gather",
    "Layout",
    "PadSite",
    "ParamUse",
    "RootSpace",
    "SizedSite",
    "Split",
    "analyze",
]
