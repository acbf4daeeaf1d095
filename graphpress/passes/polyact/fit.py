"""Least-squares polynomial fits of activations: p(x) = sum_k a_k x^k minimizing E[(p(x) - f(x))^2].

Given samples ``x_1..x_n`` of an activation's input (its observed distribution on calibration
data), the degree-``d`` polynomial closest to ``f`` in the mean-square sense *under that
distribution* solves the linear least-squares problem

    min_a || V a - f(x) ||_2,      V[i, k] = x_i^k   (k = 0..d, a Vandermonde matrix)

whose normal equations are ``(V^T V) a = V^T f(x)`` -- the k-th row says that the residual is
orthogonal to ``x^k`` under the empirical distribution. Samples are weighted by how often they
occur, so the fit is tight where activations actually fall and loose in the tails.

Conditioning: ``V`` is badly scaled when ``|x|`` is far from 1, so the fit is solved in
``t = x / s`` with ``s = max |x_i|`` (all columns of the scaled ``V`` lie in ``[-1, 1]``) by an
SVD-based solver (``numpy.linalg.lstsq``) in float64, and mapped back with ``a_k = c_k / s^k``.

``mode="range"`` fits on a uniform grid over ``[lo, hi]`` instead (the classic "approximate on
an interval" fit, equal weight everywhere in the range); ``lo``/``hi`` are the observed
quantiles ``q`` and ``1 - q``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from graphpress.errors import PassError

ACTIVATIONS = ("relu", "gelu", "silu")
FIT_MODES = ("samples", "range")


def activation_fn(name: str):
    """The float64 numpy reference of activation ``name`` (``gelu``: exact erf form; ``gelu_tanh``: tanh form)."""
    if name == "relu":
        return lambda x: np.maximum(x, 0.0)
    if name == "gelu":
        return lambda x: torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    if name == "gelu_tanh":
        return lambda x: torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    if name == "silu":
        return lambda x: x / (1.0 + np.exp(-x))
    raise PassError(f"polynomial fit: unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class PolyFit:
    """A fitted polynomial and how well it matches the activation.

    Attributes
    ----------
    coefficients : tuple of float
        ``(a_0, a_1, ..., a_d)``, lowest degree first.
    lo, hi : float
        The fitted range (observed quantiles of the samples).
    mean, std : float
        Of the samples.
    samples : int
        Samples used.
    rmse : float
        Root-mean-square error ``sqrt(mean (p(x_i) - f(x_i))^2)`` over the samples.
    max_abs_error : float
        ``max |p(x) - f(x)|`` over the samples inside ``[lo, hi]``.
    relative_rmse : float
        ``rmse / rms(f(x_i))``: the error relative to the activation's own magnitude.
    """

    coefficients: tuple[float, ...]
    lo: float
    hi: float
    mean: float
    std: float
    samples: int
    rmse: float
    max_abs_error: float
    relative_rmse: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.polynomial.polynomial.polyval(x, self.coefficients)

    def to_dict(self) -> dict:
        r = lambda v: float(f"{v:.6g}")
        return {
            "coefficients": [r(c) for c in self.coefficients],
            "range": [r(self.lo), r(self.hi)],
            "mean": r(self.mean),
            "std": r(self.std),
            "samples": self.samples,
            "fit_rmse": r(self.rmse),
            "fit_max_abs_error": r(self.max_abs_error),
            "fit_relative_rmse": r(self.relative_rmse),
        }


def fit_activation(
    samples: np.ndarray | torch.Tensor,
    activation: str,
    degree: int,
    *,
    mode: str = "samples",
    quantile: float = 0.0,
    grid: int = 2001,
) -> PolyFit:
    """Fit ``activation`` by a degree-``degree`` polynomial on ``samples`` (see module docstring).

    Parameters
    ----------
    samples : array or Tensor
        Observed inputs of the activation (any shape; flattened).
    activation : str
        ``relu``, ``gelu``, ``gelu_tanh`` or ``silu``.
    degree : int
        Polynomial degree (>= 1).
    mode : str
        ``"samples"``: least squares over the samples inside ``[lo, hi]``; ``"range"``:
        least squares over ``grid`` equally spaced points of ``[lo, hi]``.
    quantile : float
        ``lo``/``hi`` are the ``quantile`` and ``1 - quantile`` quantiles of the samples
        (0: min and max); samples outside are left out of the fit.

    Returns
    -------
    PolyFit
    """
    if mode not in FIT_MODES:
        raise PassError(f"polynomial fit: mode must be one of {', '.join(FIT_MODES)}, got {mode!r}")
    x = samples.detach().double().reshape(-1).numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise PassError(f"polynomial fit of {activation}: no finite samples of the activation input")
    lo, hi = (float(np.quantile(x, quantile)), float(np.quantile(x, 1 - quantile))) if quantile > 0 else (float(x.min()), float(x.max()))
    inside = x[(x >= lo) & (x <= hi)]
    f = activation_fn(activation)
    points = np.linspace(lo, hi, grid) if mode == "range" and hi > lo else inside
    scale = max(abs(lo), abs(hi), 1e-12)
    t = points / scale
    vander = np.vander(t, degree + 1, increasing=True)
    c, *_ = np.linalg.lstsq(vander, f(points), rcond=None)
    coefficients = tuple(float(ck / scale**k) for k, ck in enumerate(c))
    fit = np.polynomial.polynomial.polyval(inside, coefficients)
    target = f(inside)
    err = fit - target
    rmse = float(math.sqrt(np.mean(err**2)))
    rms_f = float(math.sqrt(np.mean(target**2)))
    return PolyFit(
        coefficients=coefficients,
        lo=lo,
        hi=hi,
        mean=float(x.mean()),
        std=float(x.std()),
        samples=int(inside.size),
        rmse=rmse,
        max_abs_error=float(np.abs(err).max()),
        relative_rmse=rmse / rms_f if rms_f > 0 else math.inf,
    )


__all__ = ["ACTIVATIONS", "FIT_MODES", "PolyFit", "activation_fn", "fit_activation"]
