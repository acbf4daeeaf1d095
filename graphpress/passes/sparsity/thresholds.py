"""Calibrated activation thresholds for TEAL, CHESS and WINA, and the error they cause.

A linear layer ``y = x W^T + b`` with input rows ``X`` (calibration) is sparsified to
``x_hat = x ⊙ [ |x| ⊙ s > t ]``. For a target sparsity ``p`` (share of input entries zeroed):

* ``teal`` -- one magnitude threshold per layer: ``t = Quantile_p(|X|)`` over all entries,
  ``s = 1`` (TEAL: the hidden states are zero-mean and unimodal, so a magnitude cut is the
  low-error choice of which entries to drop).
* ``chess`` -- one threshold per input channel: ``t_c = Quantile_p(|X[:, c]|)``, ``s = 1``
  (CHESS: channels differ in scale, so a per-channel cut keeps every channel's large entries).
* ``wina`` -- weight-informed: an entry's effect on the output is ``|x_i| ||W[:, i]||``, so
  ``s_i = ||W[:, i]||_2`` and ``t = Quantile_p(|X| ⊙ s)`` (WINA's score; a calibrated global
  cut instead of a per-token top-k, so that the op stays a threshold).

The output error of a layer at sparsity ``p`` is measured on the calibration rows:
``noise(p) = ||(X - X_hat) W^T||^2 / ||X W^T||^2`` (bias-free; the relative output noise power).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from graphpress.ir.sparse_kernel import keep_mask

METHODS = ("teal", "chess", "wina")


@dataclass
class Thresholds:
    """What the op needs: a scalar ``threshold`` (teal) or per-channel ``thresholds`` and
    optional ``scores`` (chess, wina), for one target sparsity."""

    sparsity: float
    threshold: float = 0.0
    thresholds: torch.Tensor | None = None
    scores: torch.Tensor | None = None

    @property
    def per_channel(self) -> bool:
        return self.thresholds is not None

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return keep_mask(x, self.threshold, self.thresholds, self.scores)

    def summary(self) -> dict[str, float]:
        if self.thresholds is None:
            return {"threshold": self.threshold}
        t = self.thresholds.float()
        return {"threshold_min": float(t.min()), "threshold_median": float(t.median()), "threshold_max": float(t.max())}


def _pick(sorted_values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile (lower) of values sorted along dim 0: the cut below which a share
    ``q`` lies."""
    n = sorted_values.shape[0]
    return sorted_values[min(int(q * n), n - 1)]


class LayerCalibration:
    """One layer's calibration rows ``x (rows, in)`` and weight ``(out, in)``, with the sorts each
    method needs done once, so that thresholds and errors for a whole sparsity grid are cheap."""

    def __init__(self, method: str, x: torch.Tensor, weight: torch.Tensor):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        self.method = method
        self.x = x.detach().float()
        self.w = weight.detach().float()
        self.y_power = float((self.x @ self.w.t()).pow(2).sum())
        a = self.x.abs()
        if method == "teal":
            self._sorted = a.reshape(-1).sort().values
        elif method == "chess":
            self._sorted = a.sort(dim=0).values  # per channel
        else:
            self.scores = self.w.norm(dim=0).contiguous()
            self._sorted = (a * self.scores).reshape(-1).sort().values

    def thresholds(self, sparsity: float) -> Thresholds:
        """Thresholds that zero a share ``sparsity`` of the calibration entries."""
        if sparsity <= 0:
            return Thresholds(0.0)
        cut = _pick(self._sorted, sparsity)
        if self.method == "teal":
            return Thresholds(sparsity, threshold=float(cut))
        if self.method == "chess":
            return Thresholds(sparsity, thresholds=cut.contiguous())
        return Thresholds(sparsity, thresholds=torch.full_like(self.scores, float(cut)), scores=self.scores)

    def noise(self, t: Thresholds) -> float:
        """``||(X - X_hat) W^T||^2 / ||X W^T||^2``."""
        if t.sparsity <= 0 or self.y_power <= 0:
            return 0.0
        dropped = torch.where(t.mask(self.x), 0.0, self.x)
        return float((dropped @ self.w.t()).pow(2).sum()) / self.y_power

    def achieved(self, t: Thresholds) -> float:
        """Share of the calibration entries ``t`` zeroes (exact zeros included)."""
        return 1.0 - float(t.mask(self.x).float().mean())


def calibrate(method: str, x: torch.Tensor, weight: torch.Tensor, sparsity: float) -> Thresholds:
    """Thresholds of ``method`` that zero a share ``sparsity`` of the entries of the calibration
    rows ``x (rows, in)`` for a layer with weight ``(out, in)``."""
    return LayerCalibration(method, x, weight).thresholds(sparsity)


__all__ = ["METHODS", "LayerCalibration", "Thresholds", "calibrate"]
