"""``dequantize-at-load``: keep k-bit weights in the artifact, compute in float where integer kernels lose.

``quantize-layerwise`` with ``activations="none"`` turns a linear into ``wlinear_nbits``, which
ONNX Runtime runs as ``MatMulNBits`` (dequantize blocks on the fly, fp32 compute). That kernel
wins on large matrices (memory-bound decoding) and loses on small ones: on stories260K (64 x 64 to
172 x 64 weights, 64 tokens) the whole model ran at 0.63x of fp32. This pass rewrites such
layers into ``wlinear_load`` (:mod:`graphpress.ir.ops_load`), whose dequantization ORT evaluates
once by constant folding at session creation::

    wlinear_nbits(x, Q, s, z, b)  ->  wlinear_load(x, Q, s, z, b)     y = x ((Q - z) s)^T + b

Exact: both ops compute the same float function from the same stored tensors (eager: bit-equal);
the artifact keeps the k-bit bytes; the speed becomes the float model's. Only weight-only layers
(``act_bits = 0``) are rewritten: a layer with int8 activations changes numbers without its
kernel. ``max_weights`` restricts the rewrite to small layers, so that a model can keep
``MatMulNBits`` where it is faster (measure both with ``compress bench``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.names import layer_name, unique_names
from graphpress.ir.rewrite import Skips, arg, erase_dead, insert_call, is_op
from graphpress.passes.base import PassResult, register
from graphpress.passes.select import Selector, check_selector

NAME = "dequantize-at-load"
WLINEAR_NBITS = torch.ops.graphpress.wlinear_nbits.default
WLINEAR_LOAD = torch.ops.graphpress.wlinear_load.default


@dataclass(frozen=True)
class DequantizeAtLoadConfig:
    """Options of ``dequantize-at-load`` (see ``docs/passes/dequantize-at-load.md``).

    Attributes
    ----------
    max_weights : int, optional
        Rewrite only layers with at most this many weights (``out * in``); None: all.
    targets, ignore : tuple of str
        Which ``wlinear_nbits`` layers (by layer name) the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact layer names left as ``MatMulNBits`` (the older spelling of ``ignore``).
    """

    version: int = 1
    max_weights: int | None = None
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_selector(NAME, self)
        if self.max_weights is not None and not (isinstance(self.max_weights, int) and self.max_weights > 0):
            raise PassError(f"pass '{NAME}': option 'max_weights' must be a positive integer or null, got {self.max_weights!r}")


@register(NAME)
class DequantizeAtLoad:
    """Weight-only ``wlinear_nbits`` -> ``wlinear_load`` (see module docstring)."""

    exact = True
    Config = DequantizeAtLoadConfig

    def __init__(self, config: DequantizeAtLoadConfig = DequantizeAtLoadConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        nodes = [n for n in graph.gm.graph.nodes if is_op(n, WLINEAR_NBITS)]
        named = dict(zip(unique_names(layer_name(graph, n) for n in nodes), nodes))
        selection = Selector.of(NAME, cfg).resolve(named)
        skipped = Skips()
        rewritten: list[str] = []
        dead = []
        for name, node in named.items():
            x, packed, scales, zeros, bias, in_features, bits, group_size = node.args[:8]
            act_bits = arg(node, 8, "act_bits", 0)
            if act_bits:
                skipped.add("int8 activations (its kernel is the point)")
                continue
            if (left_out := selection.reason(name, node)) is not None:
                skipped.add(left_out)
                continue
            out_features = int(graph.tensor_of(packed).shape[0])
            if cfg.max_weights is not None and out_features * int(in_features) > cfg.max_weights:
                skipped.add(f"more than max_weights={cfg.max_weights} weights")
                continue
            new = insert_call(graph, WLINEAR_LOAD, (x, packed, scales, zeros, bias, in_features, bits, group_size), before=node, like=node)
            node.replace_all_uses_with(new)
            dead.append(node)
            rewritten.append(name)
        erase_dead(graph, dead)
        if rewritten:
            graph.recompile()
        return PassResult(graph, changed=bool(rewritten), stats={"rewritten": len(rewritten), "layers": rewritten, "skipped": dict(skipped)})


__all__ = ["DequantizeAtLoad", "DequantizeAtLoadConfig"]
