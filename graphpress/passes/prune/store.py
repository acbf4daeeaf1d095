"""``store-sparse``: keep pruned weights as a bitmask plus their nonzero values in the artifact.

Pruning (Wanda, SparseGPT, magnitude, 2:4) zeroes weights but leaves them dense, so the exported
file is as large as before. For every constant weight of ``aten.linear`` / ``aten.conv2d`` /
``aten.embedding`` whose zero fraction is at least ``min_sparsity``::

    W  ->  sparse_unpack(bitmask, values, shape)          bytes: n/8 + kept * itemsize

(:mod:`graphpress.ir.ops_sparse_store`); the layer op itself is unchanged and reads the rebuilt
dense weight. At 50% zeros a float32 weight takes 1/32 + 1/2 = 0.53x of its dense bytes. ONNX
Runtime rebuilds the weight once, by constant folding at session creation, and then runs the
dense graph: the artifact is smaller, the speed is the dense model's (this pass does no sparse
compute; speed comes from structured pruning).

Exact: the rebuilt weight holds exactly the stored numbers (eager and ORT), so outputs are
bit-identical up to the sign of a zero (``-0.0`` is stored as a zero and comes back ``+0.0``).
A tensor read by several ops (a classifier tied to the embedding, or one weight under two
names) is stored once and unpacked by one node that all of them read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.names import layer_name
from graphpress.ir.ops_sparse_store import VALUE_DTYPES, pack_sparse, packed_bytes
from graphpress.ir.rewrite import (
    Skips,
    add_constant,
    arg,
    erase_dead,
    insert_call,
    mutated_targets,
)
from graphpress.passes.base import PassResult, register
from graphpress.passes.select import Selector, check_selector

NAME = "store-sparse"
SPARSE_UNPACK = torch.ops.graphpress.sparse_unpack.default
aten = torch.ops.aten
#: layer op -> (position, name) of its weight argument
WEIGHT_ARG = {aten.linear: (1, "weight"), aten.conv2d: (1, "weight"), aten.embedding: (0, "weight")}


@dataclass(frozen=True)
class StoreSparseConfig:
    """Options of ``store-sparse`` (see ``docs/passes/store-sparse.md``).

    Attributes
    ----------
    min_sparsity : float
        Store a weight sparse only when at least this fraction of it is zero, in (0, 1].
    targets, ignore : tuple of str
        Which weights, by weight name (``fc1.weight``) or the name of a layer reading it (``fc1``), the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact weight or layer names left dense (the older spelling of ``ignore``).
    """

    version: int = 1
    min_sparsity: float = 0.3
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_selector(NAME, self)
        if not (isinstance(self.min_sparsity, (int, float)) and 0 < self.min_sparsity <= 1):
            raise PassError(f"pass '{NAME}': option 'min_sparsity' must be a fraction in (0, 1], got {self.min_sparsity!r}")


@dataclass
class _Weight:
    """One stored tensor and every ``get_attr`` node and layer that reads it."""

    targets: list[str]
    tensor: torch.Tensor
    getters: list[fx.Node]
    layers: list[str]
    readers: list[fx.Node]  # the layer nodes, in the order of ``layers``


def _storage_key(t: torch.Tensor) -> tuple:
    # one tensor under two names (tied weights) has the same storage, offset, shape and strides
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _find_weights(graph: Graph, skipped: Skips) -> list[_Weight]:
    """Constant float weights of layer ops, grouped by storage, in graph order."""
    mutated = mutated_targets(graph)
    groups: dict[tuple, _Weight] = {}
    for node in graph.call_nodes(*WEIGHT_ARG):
        index, name = WEIGHT_ARG[node.target.overloadpacket]
        w = arg(node, index, name)
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            skipped.add("weight is computed in the graph, not a constant")
            continue
        if str(w.target) in mutated:
            skipped.add("weight is written by the graph")
            continue
        t = graph.tensor_of(w)
        if t is None or t.dtype not in VALUE_DTYPES or t.numel() == 0:
            skipped.add("weight is not a non-empty float32/float16/bfloat16 tensor")
            continue
        key = _storage_key(t)
        group = groups.setdefault(key, _Weight([], t, [], [], []))
        if str(w.target) not in group.targets:
            group.targets.append(str(w.target))
        group.layers.append(layer_name(graph, node))
        group.readers.append(node)
    # every get_attr of the same tensor, under any name and with users or not, reads the one unpacked copy
    for n in graph.nodes:
        t = graph.tensor_of(n) if n.op == "get_attr" else None
        group = groups.get(_storage_key(t)) if t is not None and t.dtype in VALUE_DTYPES else None
        if group is not None:
            group.getters.append(n)
            if str(n.target) not in group.targets:
                group.targets.append(str(n.target))
    out = []
    for group in groups.values():
        if mutated & set(group.targets):
            skipped.add("weight is written by the graph", len(group.layers))
        else:
            out.append(group)
    return out


def _store(graph: Graph, weight: _Weight) -> None:
    """Replace every read of ``weight`` by one ``sparse_unpack`` of its packed form."""
    first = weight.getters[0]
    hint = weight.targets[0]
    module = graph.source_module(first)
    bitmask, values = pack_sparse(weight.tensor)
    b_node = add_constant(graph, f"{hint}_bitmask", bitmask, before=first, parameter=False, module=module)
    v_node = add_constant(graph, f"{hint}_values", values, before=first, parameter=False, module=module)
    unpacked = insert_call(graph, SPARSE_UNPACK, (b_node, v_node, list(weight.tensor.shape)), before=first, like=first)
    for getter in weight.getters:
        getter.replace_all_uses_with(unpacked)
    erase_dead(graph, weight.getters)


@register(NAME)
class StoreSparse:
    """Mostly-zero layer weights -> ``sparse_unpack(bitmask, values)`` (see module docstring)."""

    exact = True
    Config = StoreSparseConfig

    def __init__(self, config: StoreSparseConfig = StoreSparseConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        skipped = Skips()
        layers: dict[str, dict] = {}
        before_total = after_total = 0
        weights = _find_weights(graph, skipped)
        # weights the scan refused are still valid names to ignore (every constant, every weight layer)
        others = [str(n.target) for n in graph.nodes if n.op == "get_attr"] + [layer_name(graph, n) for n in graph.call_nodes(*WEIGHT_ARG)]
        units = {name: w.readers for w in weights for name in [*w.targets, *w.layers]}
        selection = Selector.of(NAME, cfg).resolve(units, others)
        for weight in weights:
            if (left_out := selection.reason([*weight.targets, *weight.layers], weight.readers)) is not None:
                skipped.add(left_out)
                continue
            t = weight.tensor
            n = t.numel()
            zeros = int((t == 0).sum())
            fraction = zeros / n
            dense = n * t.element_size()
            stored = packed_bytes(n, n - zeros, t.element_size())
            if fraction < cfg.min_sparsity:
                skipped.add(f"zero fraction below min_sparsity={cfg.min_sparsity:g}")
                continue
            if stored >= dense:  # only for min_sparsity below 1/32 (float32) or 1/16 (16-bit)
                skipped.add("stored form would not be smaller")
                continue
            _store(graph, weight)
            layers[weight.targets[0]] = {
                "names": list(weight.targets),
                "layers": list(weight.layers),
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "zero_fraction": round(fraction, 6),
                "bytes_before": dense,
                "bytes_after": stored,
            }
            before_total += dense
            after_total += stored
        if layers:
            graph.remove_unused_tensors()
            graph.recompile()
        stats = {
            "stored": len(layers),
            "bytes_before": before_total,
            "bytes_after": after_total,
            "ratio": round(after_total / before_total, 4) if before_total else None,
            "weights": layers,
            "skipped": dict(skipped),
        }
        return PassResult(graph, changed=bool(layers), stats=stats)


__all__ = ["StoreSparse", "StoreSparseConfig"]
