"""Data-aware block-circulant projection: the compact weights that best reproduce a layer's outputs.

The plain projection (``method="mean"``) minimises ``||W - W_b||_F``: every weight counts the
same, whatever inputs it meets. What the network needs is that the *layer's outputs* stay close
on the inputs it really sees. With ``X`` the layer's calibration inputs (rows of a linear layer's
input; ``im2col`` patches ``(C_in, kh, kw)`` of a conv) and ``Sigma = sum_x x x^T`` their second
moment, the output error of a weight error ``E = W - W_b`` is::

    sum_x ||E x||^2 = tr(E Sigma E^T) = sum_rows e_r^T Sigma e_r

(the layer-wise reconstruction objective of OBC/GPTQ, here with the circulant structure as the
constraint). Row ``r = i*b + s`` of a block-circulant ``W_b`` reads only block-row ``i``'s
compact vectors ``c_i`` (``D = q*b*kh*kw`` numbers), each exactly once: ``(W_b)_r = P_s c_i`` with
``P_s`` a permutation that depends on ``s`` but not on ``i``. Setting the gradient to zero gives
one ``D x D`` system shared by all ``p`` block rows::

    H c_i = g_i,    H = sum_s P_s^T Sigma P_s,    g_i = sum_s P_s^T Sigma w_{i*b+s}

solved by Cholesky after damping ``H += damp * mean(diag H) * I`` (``Sigma`` is rank-deficient
when a layer sees few distinct inputs). With ``Sigma = I`` the solution is the plain mean along
wrapped diagonals, so this generalises ``method="mean"``; it is the exact minimiser of the output
error for ``damp = 0`` and full-rank ``Sigma``. Lossy like every projection.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.circulant import expand, project
from graphpress.ir.graph import Graph
from graphpress.ir.rewrite import arg
from graphpress.passes.circulant.layers import Layer
from graphpress.passes.circulant.layers import pair as _pair
from graphpress.passes.layers import observe

DEFAULT_DAMP = 0.01


def _rows(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows ``(samples, D)`` in the weight's column order."""
    if layer.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    node = layer.node
    padding = arg(node, 4, "padding", [0, 0])
    if isinstance(padding, str):
        padding = [d * (k - 1) // 2 for d, k in zip(_pair(arg(node, 5, "dilation", [1, 1]), 1), layer.kernel)] if padding == "same" else [0, 0]
    cols = F.unfold(
        x,
        layer.kernel,
        dilation=_pair(arg(node, 5, "dilation", [1, 1]), 1),
        padding=_pair(padding, 0),
        stride=_pair(arg(node, 3, "stride", [1, 1]), 1),
    )  # (N, C_in*kh*kw, L): column order (c, kh, kw) = the weight's (C_in, kh, kw) flattening
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_moments(graph: Graph, layers: Sequence[Layer], batches: Iterable[tuple[torch.Tensor, ...]] | None = None) -> dict[str, torch.Tensor]:
    """``{weight target: Sigma}``: the second moment ``sum x x^T`` (float64) of each layer's inputs.

    One pass over the calibration batches (:func:`graphpress.passes.layers.observe`) adds each
    batch's moment of every layer's input to a running sum (no batch is kept). Layers sharing a
    weight tensor add their moments (the shared ``W_b`` must serve both).
    """
    readers: dict[fx.Node, list[Layer]] = {}
    for layer in layers:
        readers.setdefault(layer.node.args[0], []).append(layer)
    sums: dict[str, torch.Tensor] = {}

    def add(x_node: fx.Node, x: torch.Tensor) -> None:
        for layer in readers[x_node]:
            rows = _rows(layer, x).double()
            m = rows.T @ rows
            key = layer.weight_target
            sums[key] = sums[key] + m if key in sums else m

    batches = list(batches) if batches is not None else graph.calibration_batches()
    if not batches:
        raise PassError("block-circulant: method 'reconstruct' needs calibration inputs (graph.calibration)")
    observe(graph, readers, add, batches)
    return sums


def _matrix(layer: Layer, w: torch.Tensor) -> torch.Tensor:
    """Weight as ``(C_out, D)`` with columns in input-row order."""
    return w.reshape(w.shape[0], -1)


def _compact_shape(layer: Layer, b: int) -> tuple[int, ...]:
    p, q = layer.out_features // b, layer.in_features // b
    return (p, q, b) if layer.kind == "linear" else (*layer.kernel, p, q, b)


def _index_matrix(layer: Layer, b: int) -> torch.Tensor:
    """``I (C_out, D)``: which entry of the flattened compact ``c`` each dense weight copies."""
    shape = _compact_shape(layer, b)
    idx = expand(torch.arange(int(torch.tensor(shape).prod())).reshape(shape))
    if layer.kind == "conv2d":
        idx = idx.permute(2, 3, 0, 1)  # (kh, kw, C_out, C_in) -> (C_out, C_in, kh, kw)
    return idx.reshape(layer.out_features, -1)


def project_reconstruct(layer: Layer, w: torch.Tensor, b: int, moment: torch.Tensor, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """Compact ``c`` (the layout :func:`graphpress.ir.circulant.project` gives) minimising
    ``tr((W - W_b) Sigma (W - W_b)^T)`` + damping (see module docstring).

    Parameters
    ----------
    layer : Layer
        The layer (kind, shape, kernel).
    w : Tensor
        Its dense weight ``(C_out, C_in)`` or ``(C_out, C_in, kh, kw)``.
    b : int
        Block size (> 1, dividing both channel dims).
    moment : Tensor ``(D, D)``
        ``Sigma`` from :func:`input_moments`.
    damp : float
        Relative ridge ``damp * mean(diag H)`` added to ``H``.
    """
    wm = _matrix(layer, w).double()
    d = wm.shape[1]
    if moment.shape != (d, d):
        raise PassError(f"block-circulant: input moment of '{layer.name}' is {tuple(moment.shape)}, expected ({d}, {d})")
    idx = _index_matrix(layer, b)
    p = layer.out_features // b
    # local position of each column's compact entry within its block row (same for every block row)
    base = idx[0].sort().values  # compact entries of block row 0
    inv = []  # inv[s][a] = column that reads local entry a in row s of a block row
    for s in range(b):
        local = torch.searchsorted(base, idx[s])
        inv_s = torch.empty_like(local)
        inv_s[local] = torch.arange(d)
        inv.append(inv_s)
    h = torch.zeros(d, d, dtype=torch.float64)
    g = torch.zeros(p, d, dtype=torch.float64)
    sw = wm @ moment  # (C_out, D): Sigma w_r for every row (Sigma is symmetric)
    for s in range(b):
        h += moment[inv[s]][:, inv[s]]
        g += sw[s::b][:, inv[s]]
    diag_mean = float(h.diagonal().mean())
    if diag_mean <= 0:  # the layer never saw a non-zero input: nothing to fit, use the plain mean
        return project(w if layer.kind == "linear" else w.permute(2, 3, 0, 1), b)
    h += damp * diag_mean * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise PassError(f"block-circulant: the damped input moment of '{layer.name}' is not positive definite; raise 'damp'")
    local_c = torch.cholesky_solve(g.T, chol).T  # (p, D)
    flat = torch.empty(p * d, dtype=torch.float64)
    entries = torch.stack([idx[i * b].sort().values for i in range(p)])  # compact entries of each block row
    flat[entries.reshape(-1)] = local_c.reshape(-1)
    return flat.reshape(_compact_shape(layer, b)).to(w.dtype)


def output_error(layer: Layer, w: torch.Tensor, c: torch.Tensor, moment: torch.Tensor) -> float:
    """Relative output error ``tr(E Sigma E^T) / tr(W Sigma W^T)`` of compact ``c``."""
    wb = expand(c.double())
    if layer.kind == "conv2d":
        wb = wb.permute(2, 3, 0, 1)
    wm = _matrix(layer, w).double()
    e = wm - _matrix(layer, wb)
    den = float(torch.einsum("rd,de,re->", wm, moment, wm))
    num = float(torch.einsum("rd,de,re->", e, moment, e))
    return num / den if den > 0 else 0.0


__all__ = ["DEFAULT_DAMP", "input_moments", "output_error", "project_reconstruct"]
