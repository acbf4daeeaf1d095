"""The search space of ``compress auto``: one choice per layer, across compression families.

A :class:`Choice` is what one layer (a conv or linear, named as every pass names it) becomes:

* ``bits``: 32 keeps float; 8 is int8 with calibrated static uint8 activations (``QLinearConv`` /
  ``QGemm`` on ONNX Runtime, the U8S8 kernels that are fast on x86), or with ``weight_only`` 8-bit
  weight groups and float activations (``MatMulNBits``: small, not faster; linears only); 4 is
  4-bit weight-only groups (``MatMulNBits``; linears only: there is no weight-only conv kernel);
* ``prune``: the fraction of the layer's output channels removed (``prune-channels``), for layers
  that alone produce an unpinned channel group -- the next layer loses the same input channels;
* ``sparsity``: unstructured weight sparsity stored as compressed rows (``prune-weights`` then
  ``store-sparse``), a size choice;
* ``block``: block-circulant weights with ``b x b`` blocks (``block-circulant``, PrivCirNet), an
  encrypted-inference choice: under coefficient encoding the HE products fall with ``b``.

A :class:`Candidate` maps layers to choices (absent = float, untouched) and turns into one
recipe (:meth:`Candidate.recipe`): structured pruning, then unstructured sparsity, then
quantization, each pass configured per layer, with the passes' own budgets off -- ``auto``
measures quality itself, end to end, against ``--max-drop``.

Which choices a layer may take depends on the objective (:func:`layer_choices`): latency on ONNX
Runtime searches {float, int8} x {0, 25%, 50% channels}; size searches {float, 8-bit and 4-bit
weight-only groups, 50% sparse} on linears and {float, int8} on convs; HE latency searches the block sizes
{1 (dense), 2, 4, 8, 16} each layer's shape admits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from graphpress.ir.graph import Graph
from graphpress.ir.names import layer_name
from graphpress.passes.layers import find_layers
from graphpress.passes.prune.deps import analyze

OBJECTIVES = ("latency", "size", "he-latency")
#: Block sizes the HE objective offers (a layer takes those that divide its dimensions).
HE_BLOCKS = (2, 4, 8, 16)


@dataclass(frozen=True, order=True)
class Choice:
    """What one layer becomes (see the module docstring)."""

    bits: int = 32
    prune: float = 0.0
    sparsity: float = 0.0
    block: int = 1
    weight_only: bool = False

    @property
    def label(self) -> str:
        parts = []
        if self.block != 1:
            parts.append(f"circ{self.block}")
        if self.bits != 32:
            parts.append(f"w{self.bits}" if self.weight_only and self.bits == 8 else f"int{self.bits}")
        if self.prune:
            parts.append(f"prune{round(self.prune * 100)}")
        if self.sparsity:
            parts.append(f"sparse{round(self.sparsity * 100)}")
        return "+".join(parts) or "float"

    @property
    def leaves(self) -> bool:
        return self.bits == 32 and not self.prune and not self.sparsity and self.block == 1

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "prune": self.prune, "sparsity": self.sparsity, "block": self.block, "weight_only": self.weight_only}

    @classmethod
    def parse(cls, label: str) -> "Choice":
        """Inverse of :attr:`label` (``"int8+prune25"``)."""
        bits, prune, sparsity, block, weight_only = 32, 0.0, 0.0, 1, False
        for part in label.split("+"):
            if part == "float":
                continue
            if part.startswith("circ"):
                block = int(part[4:])
            elif part == "w8":
                bits, weight_only = 8, True
            elif part.startswith("int"):
                bits = int(part[3:])
            elif part.startswith("prune"):
                prune = int(part[5:]) / 100
            elif part.startswith("sparse"):
                sparsity = int(part[6:]) / 100
            else:
                raise ValueError(f"unknown choice {label!r}")
        return cls(bits, prune, sparsity, block, weight_only)


FLOAT = Choice()


@dataclass(frozen=True)
class LayerInfo:
    """A layer of the search: its kind, weights and, when it alone produces a prunable channel
    group, the layers that read those channels."""

    name: str
    kind: str  # "linear" | "conv2d"
    params: int
    prunable: bool = False
    consumers: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()  # block-circulant sizes its shape admits (b > 1)


@dataclass(frozen=True)
class Candidate:
    """One choice per layer; layers not named stay float."""

    choices: tuple[tuple[str, Choice], ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, mapping: Mapping[str, Choice]) -> "Candidate":
        return cls(tuple(sorted((k, v) for k, v in mapping.items() if not v.leaves)))

    def as_dict(self) -> dict[str, Choice]:
        return dict(self.choices)

    def label(self) -> str:
        counts: dict[str, int] = {}
        for _l, c in self.choices:
            counts[c.label] = counts.get(c.label, 0) + 1
        return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "all float"

    def to_dict(self) -> dict[str, str]:
        return {name: c.label for name, c in self.choices}

    def recipe(self, *, act_calibration: str = "mse") -> list[dict[str, Any]]:
        """The passes that realize this candidate (empty when every layer stays float)."""
        d = self.as_dict()
        passes: list[dict[str, Any]] = []
        blocks = {n: c.block for n, c in d.items() if c.block != 1}
        if blocks:
            # reconstruct: the compact weights fitted to each layer's outputs on the calibration data
            passes.append({"block-circulant": {"blocks": blocks, "targets": sorted(blocks), "method": "reconstruct", "min_sqnr_db": None}})
        prune = {n: c.prune for n, c in d.items() if c.prune}
        if prune:
            passes.append({"prune-channels": {"sparsity": 0.0, "layer_ratios": prune, "min_sqnr_db": None, "on_budget": "fail"}})
        sparse = {n: c.sparsity for n, c in d.items() if c.sparsity}
        if sparse:
            passes.append({"prune-weights": {"sparsity": 0.0, "layer_sparsity": sparse, "min_sqnr_db": None, "on_budget": "fail"}})
            passes.append({"store-sparse": {"targets": sorted(sparse)}})
        int8 = sorted(n for n, c in d.items() if c.bits == 8 and not c.weight_only)
        w8 = sorted(n for n, c in d.items() if c.bits == 8 and c.weight_only)
        int4 = sorted(n for n, c in d.items() if c.bits == 4)
        if int8:
            passes.append({"quantize-layerwise": {"bits": [8], "target_bits": 8, "targets": int8, "activations": "int8", "act_calibration": act_calibration,
                                                  "min_sqnr_db": None, "on_budget": "fail"}})
        for bits, names in ((8, w8), (4, int4)):
            if names:
                passes.append({"quantize-layerwise": {"bits": [bits], "target_bits": bits, "targets": names, "activations": "none",
                                                      "min_sqnr_db": None, "on_budget": "fail"}})
        return passes


def search_layers(graph: Graph) -> list[LayerInfo]:
    """The convs and linears of ``graph`` in graph order, with which of them may be pruned.

    A layer may take a ``prune`` choice when it is the only producer of an unpinned channel group
    (a residual sum joins several producers into one group; those stay whole here).
    """
    from graphpress.passes.circulant.layers import find_layers as circulant_layers

    layers, _rejected = find_layers(graph)
    circ = {lay.name: tuple(b for b in lay.feasible(HE_BLOCKS) if b > 1) for lay in circulant_layers(graph)[0]}
    analysis = analyze(graph)
    groups = {}
    for g in analysis.groups:
        if g.pinned or len(g.layers) != 1:
            continue
        consumers = sorted({layer_name(graph, u.node) for u in g.consumers})
        groups[g.layers[0]] = tuple(consumers)
    return [LayerInfo(q.name, q.kind, q.params, q.name in groups, groups.get(q.name, ()), circ.get(q.name, ())) for q in layers]


def layer_choices(layer: LayerInfo, objective: str) -> list[Choice]:
    """The choices ``layer`` may take under ``objective`` (float first)."""
    if objective == "latency":
        prunes = (0.0, 0.25, 0.5) if layer.prunable else (0.0,)
        return [Choice(b, p) for b in (32, 8) for p in prunes]
    if objective == "size":
        if layer.kind == "linear":
            # weight-only widths (the size is what counts) and float weights stored sparse
            return [Choice(), Choice(8, weight_only=True), Choice(4), Choice(sparsity=0.5)]
        return [Choice(32), Choice(8)]
    if objective == "he-latency":
        return [Choice(), *(Choice(block=b) for b in layer.blocks)]
    raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def uniform(layers: Iterable[LayerInfo], choice: Choice, objective: str) -> Candidate:
    """Every layer that may take ``choice`` takes it (the single-technique recipe)."""
    return Candidate.of({lay.name: choice for lay in layers if choice in layer_choices(lay, objective)})


__all__ = ["Candidate", "Choice", "FLOAT", "LayerInfo", "OBJECTIVES", "layer_choices", "search_layers", "uniform"]
