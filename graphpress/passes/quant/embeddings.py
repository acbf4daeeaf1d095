"""``quantize-embeddings``: store embedding tables in k bits, dequantized once at load.

An embedding lookup reads ``T`` rows of a ``(V, D)`` table per call, so a low-bit *kernel* has
nothing to gain; but the table is often the largest tensor a small language model stores
(stories260K: 32,768 of its 260K weights, 128 KB in fp32 — half of an int8 artifact). Each row
is quantized group-wise along ``D`` like a linear weight's output row (asymmetric RTN, groups of
``group_size``, :func:`graphpress.ir.quant.groupwise`)::

    E[v, g*G:(g+1)*G] ~= (Q[v, g, :] - z[v, g]) * s[v, g]

and the lookup becomes ``wembedding_load`` (:mod:`graphpress.ir.ops_load`). ONNX Runtime gathers
the looked-up rows' codes, scales and zero points and dequantizes only those rows, so the table
stays in k bits in memory (no float copy folded at session creation).

Lossy (``exact = False``): the rows are rounded. The relative error of a row is that of k-bit
RTN over groups of ``G`` (8 bits, G = 32: about 45 dB SQNR per table, reported in the stats); the
pipeline checks ``min_sqnr_db`` (default 15 dB) on the model outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.quant import GROUP_BITS, GROUP_SIZES, dequantize_nbits, groupwise, to_nbits, weight_sqnr_db
from graphpress.ir.rewrite import Skips, add_constant, erase_dead, insert_call, insert_get_attr, is_op
from graphpress.passes.base import PassResult, register
from graphpress.passes.select import Selector, check_selector

aten = torch.ops.aten
NAME = "quantize-embeddings"
WEMBEDDING_LOAD = torch.ops.graphpress.wembedding_load.default
WLINEAR_NBITS = torch.ops.graphpress.wlinear_nbits.default
WLINEAR_LOAD = torch.ops.graphpress.wlinear_load.default


@dataclass(frozen=True)
class QuantizeEmbeddingsConfig:
    """Options of ``quantize-embeddings`` (see ``docs/passes/quantize-embeddings.md``).

    Attributes
    ----------
    bits : int
        Code width (2..8).
    group_size : int
        Group along the embedding dim (16, 32, 64, 128, 256).
    symmetric : bool
        Symmetric codes (no zero points).
    min_rows : int
        Tables with fewer rows are left in float (tiny tables are not worth it).
    targets, ignore : tuple of str
        Which tables (by parameter name, ``tok_embeddings.weight``) the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact table (parameter) names left in float (the older spelling of ``ignore``).
    min_sqnr_db, max_kl : float, optional
        The pipeline's budget for this pass.
    """

    version: int = 1
    bits: int = 8
    group_size: int = 32
    symmetric: bool = False
    min_rows: int = 16
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    min_sqnr_db: float | None = 15.0
    max_kl: float | None = None

    def __post_init__(self) -> None:
        check_selector(NAME, self)
        if self.bits not in GROUP_BITS:
            raise PassError(f"pass '{NAME}': option 'bits' must be one of {', '.join(map(str, GROUP_BITS))}, got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise PassError(f"pass '{NAME}': option 'group_size' must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if not isinstance(self.min_rows, int) or self.min_rows < 1:
            raise PassError(f"pass '{NAME}': option 'min_rows' must be an integer >= 1, got {self.min_rows!r}")


def _existing(graph: Graph, tensors: list[torch.Tensor | None]) -> list[str | None] | None:
    """Targets of tensors already in the graph that equal ``tensors`` (read together by one
    ``wlinear_nbits`` / ``wlinear_load`` node), or None."""
    for node in graph.gm.graph.nodes:
        if node.op != "call_function" or node.target not in (WLINEAR_NBITS, WLINEAR_LOAD):
            continue
        args = node.args[1:4]
        found: list[str | None] = []
        for want, a in zip(tensors, args, strict=True):
            have = graph.tensor_of(a) if isinstance(a, torch.fx.Node) else None
            if (want is None) != (have is None) or (want is not None and (have.shape != want.shape or have.dtype != want.dtype or not torch.equal(have, want))):
                break
            found.append(str(a.target) if isinstance(a, torch.fx.Node) else None)
        else:
            return found
    return None


@register(NAME)
class QuantizeEmbeddings:
    """``aten.embedding`` with a constant table -> ``wembedding_load`` with a k-bit table."""

    exact = False
    Config = QuantizeEmbeddingsConfig

    def __init__(self, config: QuantizeEmbeddingsConfig = QuantizeEmbeddingsConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        tables_read = {str(n.args[0].target): n for n in graph.call_nodes(aten.embedding)
                       if isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "get_attr"}
        selection = Selector.of(NAME, cfg).resolve(tables_read)
        skipped = Skips()
        tables: dict[str, dict] = {}
        dead = []
        for node in list(graph.gm.graph.nodes):
            if not is_op(node, aten.embedding):
                continue
            weight, ids = node.args[0], node.args[1]
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                skipped.add("table is not a constant")
                continue
            target = str(weight.target)
            table = graph.get_tensor(target)
            if (left_out := selection.reason(target, node)) is not None:
                skipped.add(left_out)
                continue
            if table.dim() != 2 or not table.dtype.is_floating_point:
                skipped.add("table is not a 2-D float tensor")
                continue
            if table.shape[0] < cfg.min_rows:
                skipped.add(f"fewer than min_rows={cfg.min_rows} rows")
                continue
            # a tied classifier (stories260K's output layer) keeps reading the float table, or its own
            # quantized copy when quantize-layerwise ran first; the float table then goes dead
            shared = any(u is not node for u in weight.users) or len(graph.tensor_users(target)) > 1
            nb = to_nbits(groupwise(table.detach().float(), cfg.bits, cfg.group_size, symmetric=cfg.symmetric))
            dim = int(table.shape[1])
            reused = _existing(graph, [nb.packed, nb.scales, nb.zeros])
            if reused is not None:
                # a tied classifier that quantize-layerwise stored on the same grid: one copy serves both
                consts = [insert_get_attr(graph, t, before=node) if t is not None else None for t in reused]
            else:
                consts = [add_constant(graph, f"{target}_q", nb.packed, before=node, parameter=False),
                          add_constant(graph, f"{target}_scales", nb.scales, before=node, parameter=False),
                          add_constant(graph, f"{target}_zeros", nb.zeros, before=node, parameter=False) if nb.zeros is not None else None]
            new = insert_call(graph, WEMBEDDING_LOAD, (ids, *consts, dim, nb.bits, cfg.group_size), before=node, like=node)
            node.replace_all_uses_with(new)
            dead.append(node)
            deq = dequantize_nbits(nb.packed, nb.scales, nb.zeros, nb.bits, cfg.group_size, dim)
            tables[target] = {"rows": int(table.shape[0]), "dim": dim, "bits": cfg.bits, "bytes_before": table.numel() * table.element_size(),
                              "bytes_after": 0 if reused is not None else nb.nbytes, "reuses": reused[0] if reused is not None else None, "sqnr_db": round(weight_sqnr_db(table.detach().float(), deq), 2),
                              "shared_with_other_ops": shared}
        erase_dead(graph, dead)
        if tables:
            graph.recompile()
        stats = {"tables": tables, "quantized": len(tables), "skipped": dict(skipped),
                 "bytes_before": sum(t["bytes_before"] for t in tables.values()), "bytes_after": sum(t["bytes_after"] for t in tables.values())}
        return PassResult(graph, changed=bool(tables), stats=stats)


__all__ = ["QuantizeEmbeddings", "QuantizeEmbeddingsConfig"]
