"""Project linear/conv weights onto block-circulant matrices (PrivCirNet): W -> nearest W_b, stored compactly as c (p, q, b).

Every eligible layer (:func:`graphpress.passes.circulant.layers.find_layers`: ``aten.linear``
and ``aten.conv2d`` with ``groups = 1`` and a constant weight) whose block size ``b > 1`` divides
both matrix dims is rewritten::

    aten.linear(x, W, bias)                               -> graphpress.circulant_linear(x, c, bias)
    aten.conv2d(x, W, bias, stride, padding, dilation, 1) -> graphpress.circulant_conv2d(x, c, bias, stride, padding, dilation)

A ``(p*b, q*b)`` matrix is block-circulant when each ``b x b`` block is circulant,
``W_ij[r, s] = c_ij[(r - s) mod b]``. The projection is the (weighted) least-squares fit, per
block and wrapped diagonal ``k``::

    c_ij[k] = sum_{(r-s) mod b = k} F[r,s] W_ij[r,s]  /  sum_{(r-s) mod b = k} F[r,s]

``method="mean"``: ``F = 1`` (the plain mean along each wrapped diagonal: the nearest
block-circulant matrix in the Frobenius norm). ``method="fisher"``: ``F`` = the diagonal Fisher
information (accumulated squared gradients of the model's pseudo-label cross-entropy on the
calibration batches, :func:`graphpress.passes.fisher.fisher_diagonal`), which minimizes
``sum F (W - W_b)^2``, the second-order estimate of the loss increase (PrivCirNet's better
initialization). Conv weights ``(C_out, C_in, kh, kw)`` are circulant over ``(C_out, C_in)`` at
each kernel position: ``c = project(W.permute(2, 3, 0, 1), b)`` has shape ``(kh, kw, p, q, b)``.
``method="reconstruct"`` fits ``c`` to the layer's *outputs* on its calibration inputs instead,
minimising ``tr((W - W_b) Sigma (W - W_b)^T)`` with ``Sigma`` the inputs' second moment
(:mod:`graphpress.passes.circulant.reconstruct`); ``projection_error`` is then the relative
output error ``sqrt(tr(E Sigma E^T) / tr(W Sigma W^T))`` rather than the weight error.

Lossy (``exact = False``): the pipeline checks ``min_sqnr_db`` / ``max_kl``. The default
``min_sqnr_db = 0.0`` only rejects a projection that destroys the output (projection without
fine-tuning usually falls below the pipeline's 20 dB default floor); a recipe should set its
own budget. Exact (outputs unchanged up to float rounding) when the weights are already
block-circulant.

Batch-norm: fold it first (``fold-batchnorm`` before ``block-circulant``): the per-channel BN
scale is then inside the dense weight and the projection keeps everything circulant. A BN still
following a converted layer is left as a separate op (folding its per-channel scale into ``c``
would break circulance); ``stats["bn_handling"]`` says which case applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.circulant_*
from graphpress.errors import PassError
from graphpress.ir.circulant import expand, project
from graphpress.ir.graph import Graph
from graphpress.ir.opsets import BATCH_NORM
from graphpress.ir.rewrite import (
    Skips,
    add_constant,
    arg,
    erase_dead,
    insert_call,
    insert_get_attr,
    packet,
)
from graphpress.passes.base import PassResult, register
from graphpress.passes.circulant.layers import Layer, find_layers
from graphpress.passes.circulant.layers import pair as _pair
from graphpress.passes.circulant.reconstruct import (
    DEFAULT_DAMP,
    input_moments,
    output_error,
    project_reconstruct,
)
from graphpress.passes.fisher import fisher_diagonal
from graphpress.passes.select import Selector, check_names, check_selector

aten = torch.ops.aten
CIRCULANT_LINEAR = torch.ops.graphpress.circulant_linear.default
CIRCULANT_CONV2D = torch.ops.graphpress.circulant_conv2d.default

_NAME = "block-circulant"
METHODS = ("mean", "fisher", "reconstruct")


def _power_of_two(b: Any) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and b >= 1 and (b & (b - 1)) == 0


@dataclass(frozen=True)
class BlockCirculantConfig:
    """Options of ``block-circulant``.

    Attributes
    ----------
    block_size : int
        Block size ``b`` (a power of two) for every eligible layer not named in ``blocks``.
    blocks : dict of str to int
        Per-layer block size by layer name (:func:`find_layers` names: the source module path,
        e.g. ``layer1.0.conv1``); ``1`` keeps a layer dense. A name that is no layer is an error.
    targets, ignore : tuple of str
        Which eligible layers the pass touches: exact names, ``re:`` full-match regexes or op
        families (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Layer names kept dense.
    method : "mean", "fisher" or "reconstruct"
        Plain mean along wrapped diagonals; Fisher-weighted mean; or ``"reconstruct"``: the
        compact weights minimising the layer's output error on its calibration inputs
        (:mod:`graphpress.passes.circulant.reconstruct`). The last two need calibration data
        (``graph.calibration`` batches, else the example inputs).
    fisher_micro_batch : int
        Samples per squared gradient when ``method="fisher"``.
    damp : float
        Relative ridge of ``method="reconstruct"`` (``damp * mean(diag H)``).
    min_sqnr_db, max_kl : float, optional
        Budget the pipeline checks against the previous graph. The default (0 dB) only catches a
        broken projection; set a real budget in a recipe.
    """

    version: int = 1
    block_size: int = 4
    blocks: dict[str, int] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    method: Literal["mean", "fisher", "reconstruct"] = "mean"
    fisher_micro_batch: int = 1
    damp: float = DEFAULT_DAMP
    min_sqnr_db: float | None = 0.0
    max_kl: float | None = None

    def __post_init__(self) -> None:
        check_selector(_NAME, self)
        if not _power_of_two(self.block_size):
            raise PassError(f"pass '{_NAME}': block_size must be a power of two >= 1, got {self.block_size!r}")
        bad = {k: v for k, v in dict(self.blocks).items() if not _power_of_two(v)}
        if bad:
            k, v = next(iter(bad.items()))
            raise PassError(f"pass '{_NAME}': blocks['{k}'] must be a power of two >= 1, got {v!r}")
        if self.method not in METHODS:
            raise PassError(f"pass '{_NAME}': method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise PassError(f"pass '{_NAME}': damp must be > 0, got {self.damp!r}")
        if not isinstance(self.fisher_micro_batch, int) or self.fisher_micro_batch < 1:
            raise PassError(f"pass '{_NAME}': fisher_micro_batch must be an integer >= 1, got {self.fisher_micro_batch!r}")

    def __hash__(self) -> int:  # the dict field is unhashable; hash the sorted items instead
        return hash((self.version, self.block_size, tuple(sorted(self.blocks.items())), self.skip, self.targets, self.ignore, self.method,
                     self.fisher_micro_batch, self.damp, self.min_sqnr_db, self.max_kl))


@register(_NAME)
class BlockCirculant:
    """Project eligible linear/conv layers onto block-circulant weights (see module docstring)."""

    exact = False
    Config = BlockCirculantConfig

    def __init__(self, config: BlockCirculantConfig = BlockCirculantConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        layers, rejected = find_layers(graph)
        names = [layer.name for layer in layers]
        check_names(_NAME, "blocks", cfg.blocks, [*names, *rejected], names)
        selection = Selector.of(_NAME, cfg).resolve({l.name: l.node for l in layers}, rejected)

        kept: dict[str, str] = {name: reason for name, reason in rejected.items()}
        blocks: dict[str, int] = {}
        plans: list[tuple[Layer, int, list[int] | None]] = []
        for layer in layers:
            b = cfg.blocks.get(layer.name, cfg.block_size)
            blocks[layer.name] = 1
            if (left_out := selection.reason(layer.name, layer.node)) is not None:
                kept[layer.name] = left_out
            elif b == 1:
                kept[layer.name] = "b=1 requested"
            elif not layer.fits(b):
                kept[layer.name] = f"b={b} does not divide {layer.out_features}x{layer.in_features}"
            else:
                padding = _conv_padding(layer) if layer.kind == "conv2d" else None
                if isinstance(padding, str):
                    kept[layer.name] = padding
                    continue
                plans.append((layer, b, padding))
                blocks[layer.name] = b

        fisher: dict[str, torch.Tensor] = {}
        if cfg.method == "fisher" and plans:
            targets = sorted({layer.weight_target for layer, _b, _p in plans})
            fisher = fisher_diagonal(graph, targets, micro_batch=cfg.fisher_micro_batch)
        moments: dict[str, torch.Tensor] = {}
        if cfg.method == "reconstruct" and plans:
            moments = input_moments(graph, [layer for layer, _b, _p in plans])

        errors: dict[str, float] = {}
        params_before = params_after = 0
        made: dict[tuple[str, int], str] = {}  # (weight target, b) -> compact tensor target (shared weights)
        new_nodes: list[fx.Node] = []
        for layer, b, padding in plans:
            w = graph.get_tensor(layer.weight_target).detach()
            f = fisher.get(layer.weight_target)
            mat = w if layer.kind == "linear" else w.permute(2, 3, 0, 1)
            fmat = None if f is None else (f if layer.kind == "linear" else f.permute(2, 3, 0, 1))
            key = (layer.weight_target, b)
            if cfg.method == "reconstruct":
                c = project_reconstruct(layer, w, b, moments[layer.weight_target], cfg.damp)
                errors[layer.name] = output_error(layer, w, c, moments[layer.weight_target]) ** 0.5
            else:
                c = project(mat, b, fmat)
                errors[layer.name] = _relative_error(mat, c, fmat)
            node = _rewrite(graph, layer, b, c, padding, made.get(key))
            made[key] = str(node.args[1].target)
            dense, compact = layer.dense_params, c.numel()
            params_before += dense
            params_after += compact
            graph.annotations(node)["circulant"] = {
                "block": b,
                "method": cfg.method,
                "dense_params": dense,
                "compact_params": compact,
                "layer": layer.name,
            }
            graph.annotations(node)["trainable_inputs"] = [1, 2]
            new_nodes.append(node)

        if plans:
            graph.remove_unused_tensors()
            graph.recompile()

        skipped = Skips()
        for reason in kept.values():
            skipped.add(reason)
        stats = {
            "converted": len(plans),
            "blocks": blocks,
            "method": cfg.method,
            "params_before": params_before,
            "params_after": params_after,
            "compression": round(params_before / params_after, 3) if params_after else None,
            "projection_error": {k: round(v, 6) for k, v in errors.items()},
            "kept_dense": kept,
            "bn_handling": _bn_handling(graph, new_nodes),
            "skipped": dict(skipped),
        }
        return PassResult(graph, changed=bool(plans), stats=stats)


def _conv_padding(layer: Layer) -> list[int] | str:
    """Explicit symmetric padding of a conv2d node, or why it has none (``padding="same"`` with
    an odd total padding is asymmetric)."""
    node = layer.node
    padding = arg(node, 4, "padding", [0, 0])
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        dilation = _pair(arg(node, 5, "dilation", [1, 1]), 1)
        totals = [d * (k - 1) for d, k in zip(dilation, layer.kernel)]
        if any(t % 2 for t in totals):
            return "padding='same' is asymmetric for this kernel"
        return [t // 2 for t in totals]
    return _pair(padding, 0)


def _rewrite(graph: Graph, layer: Layer, b: int, c: torch.Tensor, padding: list[int] | None, existing: str | None) -> fx.Node:
    """Replace ``layer.node`` by the circulant op reading compact ``c`` (or ``existing`` tensor)."""
    node = layer.node
    module = graph.source_module(node)
    w_node = node.args[1]
    x, bias = node.args[0], arg(node, 2, "bias")
    if existing is None:
        hint = f"{layer.weight_target}_circulant{b}"
        c_node = add_constant(graph, hint, c.contiguous(), before=node, parameter=True, module=module)
    else:
        c_node = insert_get_attr(graph, existing, before=node, module=module)
    if layer.kind == "linear":
        new = insert_call(graph, CIRCULANT_LINEAR, (x, c_node, bias), before=node, like=node)
    else:
        stride = _pair(arg(node, 3, "stride", [1, 1]), 1)
        dilation = _pair(arg(node, 5, "dilation", [1, 1]), 1)
        new = insert_call(graph, CIRCULANT_CONV2D, (x, c_node, bias, stride, list(padding), dilation), before=node, like=node)
    node.replace_all_uses_with(new)
    graph.gm.graph.erase_node(node)
    erase_dead(graph, [w_node])
    return new


def _relative_error(mat: torch.Tensor, c: torch.Tensor, fisher: torch.Tensor | None) -> float:
    """``||W - W_b|| / ||W||`` (Frobenius, or Fisher-weighted: ``sqrt(sum F (W-W_b)^2 / sum F W^2)``)."""
    w = mat.double()
    err = (w - expand(c.double())).pow(2)
    ref = w.pow(2)
    if fisher is not None:
        f = fisher.double()
        err, ref = f * err, f * ref
    den = float(ref.sum())
    return float(err.sum()) ** 0.5 / den**0.5 if den > 0 else 0.0


def _bn_handling(graph: Graph, new_nodes: list[fx.Node]) -> str:
    """How batch-norm relates to the converted layers (see module docstring)."""
    if not new_nodes:
        return "no layer converted"
    separate = [n for n in new_nodes if any(packet(u) in BATCH_NORM and u.args and u.args[0] is n for u in n.users)]
    folded = [n for n in new_nodes if graph.annotations(n).get("folded_batchnorm") and n not in separate]
    parts = []
    if separate:
        kinds = {n.target for n in separate}
        what = "conv(s)" if kinds == {CIRCULANT_CONV2D} else "layer(s)"
        parts.append(f"kept separate after {len(separate)} circulant {what}; run fold-batchnorm first to fold it exactly")
    if folded:
        parts.append("folded before projection" + (f" ({len(folded)} layer(s))" if separate else ""))
    return "; ".join(parts) if parts else "no batch-norm after the converted layers"


__all__ = ["CIRCULANT_CONV2D", "CIRCULANT_LINEAR", "BlockCirculant", "BlockCirculantConfig"]
