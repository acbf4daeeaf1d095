"""Diagonal Fisher information of graph weights: the importance behind second-order sensitivity.

For a weight ``W`` the empirical diagonal Fisher is ``F = sum_batches (dL/dW)^2`` with ``L`` the
cross-entropy of the model's outputs against labels. Without labels (the usual case for a
compression tool) the labels are the model's *own* predictions (argmax over the last dim), so
``F`` measures how strongly a perturbation of each weight would move the model away from what
it predicts now. ``sum F (W - W')^2`` is then the second-order estimate of the loss increase of
replacing ``W`` by ``W'`` (used by block-circulant projection and block-size search).

Micro-batches: gradients are squared per micro-batch (default 1 sample: the true empirical
Fisher; larger is faster and smooths the estimate).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils import _pytree as pytree

from graphpress.errors import PassError
from graphpress.ir.graph import Graph


def _split(batch: tuple[torch.Tensor, ...], size: int):
    n = batch[0].shape[0]
    for i in range(0, n, size):
        yield tuple(x[i : i + size] for x in batch)


def fisher_diagonal(
    graph: Graph,
    targets: Sequence[str],
    batches: Sequence[tuple[torch.Tensor, ...]] | None = None,
    *,
    labels: Sequence[torch.Tensor] | None = None,
    micro_batch: int = 1,
) -> dict[str, torch.Tensor]:
    """Accumulated squared gradients for each tensor target (same shapes as the tensors).

    Parameters
    ----------
    graph : Graph
        Its module is used as is; the tensors' ``requires_grad`` is restored afterwards.
    targets : sequence of str
        ``get_attr`` targets, e.g. ``"layer1.0.conv1.weight"``.
    batches : sequence of input tuples, optional
        Defaults to :meth:`Graph.calibration_batches`.
    labels : sequence of Tensor, optional
        One label tensor per batch (class indices over the first output's last dim); default:
        the model's own argmax predictions.
    micro_batch : int
        Samples per squared gradient.
    """
    batches = list(batches) if batches is not None else graph.calibration_batches()
    if not batches:
        raise PassError("fisher: no calibration inputs")
    tensors = {t: graph.get_tensor(t) for t in targets}
    flags = {t: v.requires_grad for t, v in tensors.items()}
    fisher = {t: torch.zeros_like(v, dtype=torch.float64) for t, v in tensors.items()}
    try:
        for v in tensors.values():
            v.requires_grad_(True)
        for bi, batch in enumerate(batches):
            with torch.no_grad():
                ref = [x for x in pytree.tree_leaves(graph.gm(*batch)) if isinstance(x, torch.Tensor)][0]
            y_all = labels[bi] if labels is not None else ref.argmax(-1)
            start = 0
            for mb in _split(tuple(batch), micro_batch):
                n = mb[0].shape[0]
                out = [x for x in pytree.tree_leaves(graph.gm(*mb)) if isinstance(x, torch.Tensor)][0]
                y = y_all[start : start + n]
                start += n
                if not out.dtype.is_floating_point or out.dim() < 2:
                    raise PassError("fisher: the first output must be logits (N, ..., classes)")
                loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum")
                grads = torch.autograd.grad(loss, list(tensors.values()), allow_unused=True)
                for t, g in zip(tensors, grads):
                    if g is not None:
                        fisher[t] += g.detach().double().pow(2)
    finally:
        for t, v in tensors.items():
            v.requires_grad_(flags[t])
    return {t: f.to(tensors[t].dtype) for t, f in fisher.items()}


__all__ = ["fisher_diagonal"]
