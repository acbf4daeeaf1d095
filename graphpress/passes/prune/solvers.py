"""Pruning solvers on one weight matrix: magnitude, Wanda, SparseGPT and iCBS (pure tensor code).

A layer with weight ``W`` (``out x in``; a conv's flattened to ``out x in/groups*kh*kw``) and
calibration inputs ``X`` (``rows x in``: a linear's input rows, a conv's im2col rows) is pruned to
``W_hat`` against the squared error of its output on the calibration data,

    E(W_hat) = ||(W - W_hat) X^T||_F^2 = tr((W - W_hat) H (W - W_hat)^T),   H = X^T X,

which decouples over output rows: ``E = sum_r (w_r - what_r)^T H (w_r - what_r)``. Removing the
pruned set ``P`` of a row and re-fitting the kept weights optimally costs (Optimal Brain Surgeon)

    E_r(P) = w_P^T ([H^-1]_PP)^-1 w_P,   what_r = w_r - [H^-1]_{:,P} ([H^-1]_PP)^-1 w_P,

and ``E_r({j}) = w_j^2 / [H^-1]_jj`` for one weight.

* ``magnitude``: keep the largest ``|W_rj|`` of each row (no data); kept weights unchanged.
* ``wanda``: keep the largest ``|W_rj| * ||X_j||`` of each row (``||X_j||^2 = H_jj``: the cost of
  a pruned weight when ``H`` is diagonal); kept weights unchanged. With ``H = I`` it is magnitude.
* ``sparsegpt``: columns are processed left to right in blocks of ``block_size``. At the start
  of a block the mask is chosen over the whole block (all rows at once, unstructured) by the
  saliency ``W_rj^2 / U_jj^2``, where ``U`` is the upper Cholesky factor of ``H_d^-1``
  (``H_d = H + damp * mean(diag H) * I``), so ``U_jj^2`` is ``[H^-1]_jj`` after the columns left
  of ``j`` have been eliminated. Each column ``j`` is then frozen (pruned entries to 0) and its
  error ``(W_rj - Q_rj) / U_jj`` is pushed onto the columns right of it through row ``j`` of
  ``U``: the OBS update restricted to the columns not yet processed. N:M picks the ``n`` kept of
  each group of ``m`` when the sweep reaches the group. Inputs that are always zero
  (``H_jj = 0``) cost nothing: they are pruned first and take no part in the updates. The
  saliency only counts the columns right of ``j`` as compensation, so a block as wide as the row
  (``in <= block_size``) prunes the left columns too eagerly; the paper's blocks are narrow (128
  of >= 4096). Measured on a 32x64 layer at 50 %: ``E`` is 0.99x Wanda's with one block, 0.63x
  with ``block_size=16``.
* ``icbs`` (iterative Combinatorial Brain Surgeon, Rosenberg et al.): start from the result of
  ``icbs_start`` (Wanda or SparseGPT), then block coordinate descent on ``E``. For a row and a
  block ``B`` of ``icbs_block`` columns, with the other columns fixed, ``E`` is
  ``(t - v_B)^T H_BB (t - v_B) + const`` with ``t = w_B + H_BB^-1 H_{B,R} (w_R - v_R)``: a small
  pruning problem solved by OBS with ``K = H_BB^-1``. Swaps (keep one pruned weight, prune one
  kept, within the block; within one N:M group for N:M) are scored exactly by two rank-one
  updates of ``([K]_PP)^-1`` and the best one is taken while it lowers the block error; then the
  kept weights of the block are re-fitted. Every row is processed at once (batched tensors).
  Rounds alternate the block boundaries by half a block so that unstructured rows can move kept
  weights between blocks; rounds after the first visit blocks in a seeded random order. Moves
  use the damped ``H`` (a pull towards the original weights, as in SparseGPT), except that dead
  inputs stay (almost) free to prune.

Patterns: ``unstructured`` (every row of magnitude / Wanda loses exactly ``round(sparsity * in)``
weights; SparseGPT's total is ``round(sparsity * out * in)``, the rows differ; iCBS keeps its
start's count in every row and block) or ``N:M`` (every
``m`` consecutive inputs of a row keep exactly ``n``, for every method; the pattern fixes the
sparsity at ``1 - n/m``).

Claims. Lossy: the objective reported is ``E`` (the layer's output squared error summed over the
calibration rows). iCBS never ends above its start: each block step is monotone on the damped
objective, and after every round a row whose *undamped* ``E`` (of the weights rounded to the
output dtype) went up is put back, so ``E(icbs) <= E(icbs_start)`` holds on the returned weights.
All math is float64; the result is cast back to ``w.dtype``; nothing is random except iCBS's
block order, drawn from ``seed``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

METHODS = ("magnitude", "wanda", "sparsegpt", "icbs")
ICBS_STARTS = ("wanda", "sparsegpt")
_DATA_METHODS = ("wanda", "sparsegpt", "icbs")


@dataclass(frozen=True)
class Pattern:
    """Where zeros may go: ``unstructured`` or ``nm`` (keep ``n`` of every ``m`` consecutive inputs of a row).

    Attributes
    ----------
    kind : str
        ``"unstructured"`` or ``"nm"``.
    n, m : int
        For ``"nm"``: ``0 < n < m``; unused (0) otherwise.
    """

    kind: str
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind == "nm":
            if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
                raise ValueError(f"pattern {self.n}:{self.m}: N:M needs integers 0 < N < M (e.g. 2:4, 4:8)")
        elif self.kind != "unstructured":
            raise ValueError(f"pattern kind {self.kind!r}: allowed are 'unstructured' and 'nm'")

    @staticmethod
    def parse(text: str) -> Pattern:
        """Read ``"unstructured"`` or ``"N:M"`` (``"2:4"``, ``"4:8"``).

        Raises
        ------
        ValueError
            One line naming ``text`` and the allowed forms.
        """
        s = str(text).strip().lower()
        if s == "unstructured":
            return Pattern("unstructured")
        match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", s)
        if match is None:
            raise ValueError(f"pattern {text!r} is not allowed: use 'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4', '4:8')")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r} is not allowed: N:M needs 0 < N < M (e.g. '2:4', '4:8')")
        return Pattern("nm", n, m)

    def describe(self) -> str:
        """``"unstructured"`` or ``"N:M"``."""
        return "unstructured" if self.kind == "unstructured" else f"{self.n}:{self.m}"


@dataclass
class PruneResult:
    """Output of :func:`prune_matrix`.

    Attributes
    ----------
    weight : torch.Tensor
        Pruned (and for SparseGPT / iCBS re-fitted) weight, shape and dtype of the input.
    mask : torch.Tensor
        Bool, ``True`` where the weight is kept.
    objective : float
        ``reconstruction_error(w, weight, hessian)``, or ``||w - weight||_F^2`` without a hessian.
    stats : dict
        JSON-able: ``sparsity`` (achieved fraction of zeros of ``weight``), ``target``, and per method
        ``damp`` (absolute damping used), ``objective_start``, ``swaps``, ``rows_reverted``, ``rounds``.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    objective: float
    stats: dict[str, Any] = field(default_factory=dict)


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """Layer-output squared error on the calibration data, ``tr((W - W_hat) H (W - W_hat)^T)``.

    Parameters
    ----------
    w, w_hat : torch.Tensor
        ``(out, in)`` original and pruned weights.
    hessian : torch.Tensor or None
        ``(in, in)``, ``H = X^T X`` of the layer input rows; ``None`` gives ``||W - W_hat||_F^2``.

    Returns
    -------
    float
        Computed in float64.
    """
    d = w.double() - w_hat.double()
    if hessian is None:
        return float((d * d).sum())
    return float(_row_errors(d, hessian.double()).sum())


def prune_matrix(
    w: torch.Tensor,
    *,
    sparsity: float,
    method: str,
    pattern: Pattern,
    hessian: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    icbs_start: str = "wanda",
    icbs_rounds: int = 3,
    icbs_block: int = 16,
    seed: int = 0,
) -> PruneResult:
    """Prune one ``(out, in)`` weight matrix (see the module docstring for the math).

    Parameters
    ----------
    w : torch.Tensor
        ``(out, in)`` floating weight.
    sparsity : float
        Fraction of zeros in ``[0, 1)`` for ``unstructured``. ``0`` returns ``w`` unchanged for any
        pattern; otherwise an N:M pattern fixes the sparsity at ``1 - n/m`` and this is ignored.
    method : {"magnitude", "wanda", "sparsegpt", "icbs"}
    pattern : Pattern
    hessian : torch.Tensor, optional
        ``(in, in)``, ``X^T X`` summed over calibration rows; required except for magnitude.
    damp : float
        ``H + damp * mean(diag H) * I`` for SparseGPT and iCBS (raised tenfold, up to 4 times, when
        the Cholesky factorisation still fails; the value used is in ``stats["damp"]``).
    block_size : int
        SparseGPT column block (rounded down to a multiple of ``m`` for N:M).
    icbs_start : {"wanda", "sparsegpt"}
        Solver whose result iCBS refines.
    icbs_rounds : int
        iCBS sweeps over all blocks (stops early once a sweep changes nothing).
    icbs_block : int
        iCBS block of columns (rounded down to a multiple of ``m`` for N:M, at least ``m``).
    seed : int
        Seeds iCBS's block order in rounds after the first.

    Returns
    -------
    PruneResult

    Raises
    ------
    ValueError
        One line naming the bad option: unknown method / start, sparsity outside ``[0, 1)``, ``in``
        not a multiple of ``m``, missing or mis-shaped hessian, non-2-D weight.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern (Pattern.parse('2:4')), got {type(pattern).__name__}")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating matrix (out, in), got shape {tuple(w.shape)} dtype {w.dtype}")
    in_f = w.shape[1]
    if pattern.kind == "nm" and in_f % pattern.m:
        raise ValueError(f"pattern {pattern.describe()}: {in_f} inputs per row is not a multiple of {pattern.m}")
    if method in _DATA_METHODS and hessian is None:
        raise ValueError(f"method {method!r} needs the hessian X^T X of the layer input (only 'magnitude' works without)")
    if hessian is not None and tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected ({in_f}, {in_f}) for a weight with {in_f} inputs")
    if method == "icbs" and icbs_start not in ICBS_STARTS:
        raise ValueError(f"icbs_start {icbs_start!r} is not one of {', '.join(ICBS_STARTS)}")
    if block_size < 1 or icbs_block < 1 or icbs_rounds < 1:
        raise ValueError("block_size, icbs_block and icbs_rounds must be >= 1")
    if not 0.0 <= damp < 1.0:
        raise ValueError(f"damp must be in [0, 1), got {damp!r}")

    h = None if hessian is None else _symmetric(hessian.double())
    wd = w.detach().double()
    target = 0.0 if sparsity == 0 else (1.0 - pattern.n / pattern.m if pattern.kind == "nm" else float(sparsity))
    stats: dict[str, Any] = {"method": method, "pattern": pattern.describe(), "target": target}
    if sparsity == 0:
        new, mask = wd.clone(), torch.ones_like(wd, dtype=torch.bool)
    elif method == "magnitude":
        mask = _keep_top(wd.abs(), target, pattern)
        new = wd * mask
    elif method == "wanda":
        new, mask = _wanda(wd, h, target, pattern)
    elif method == "sparsegpt":
        new, mask = _sparsegpt(wd, h, target, pattern, damp, block_size, stats)
    else:
        new, mask = _icbs(wd, h, target, pattern, damp, block_size, icbs_start, icbs_rounds, icbs_block, seed, w.dtype, stats)
    weight = new.to(w.dtype)
    stats["sparsity"] = float((weight == 0).sum()) / max(weight.numel(), 1)
    return PruneResult(weight, mask, reconstruction_error(w, weight, h), stats)


# ---------------------------------------------------------------------------- masks
def _symmetric(h: torch.Tensor) -> torch.Tensor:
    return (h + h.t()) / 2


def _row_errors(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``d_r^T H d_r`` per row."""
    return ((d @ h) * d).sum(1)


def _keep_top(score: torch.Tensor, target: float, pattern: Pattern) -> torch.Tensor:
    """Bool mask keeping the highest scores: per row (``round(target * in)`` pruned) or per N:M group.

    Ties go to the lower column index (stable sort), so the mask is deterministic.
    """
    out_f, in_f = score.shape
    if pattern.kind == "nm":
        groups = score.reshape(out_f, in_f // pattern.m, pattern.m)
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., : pattern.n], True)
        return keep.reshape(out_f, in_f)
    k = round(target * in_f)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, : in_f - k], True)


def _wanda(w: torch.Tensor, h: torch.Tensor, target: float, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.diagonal(h).clamp_min(0).sqrt()
    mask = _keep_top(w.abs() * norms, target, pattern)
    return w * mask, mask


def _damped(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``H + lam * I`` with ``lam = damp * mean(diag H)`` (a tiny floor when that is 0).

    A dead input (``H_jj = 0``) has no cross terms; its diagonal gets only a tiny value so that
    pruning it stays (almost) free, as it is in the true objective, instead of costing ``lam * w_j^2``.
    """
    diag = torch.diagonal(h)
    dead = diag <= 0
    mean = float(diag.clamp_min(0).mean()) if diag.numel() else 0.0
    lam = damp * mean if damp * mean > 0 else (1e-8 * mean if mean > 0 else 1.0)
    hd = h + lam * torch.eye(h.shape[0], dtype=h.dtype)
    idx = dead.nonzero().squeeze(1)
    hd[idx, idx] = 1e-9 * mean if mean > 0 else 1.0
    return hd, lam


# ---------------------------------------------------------------------------- SparseGPT
def _sparsegpt(w: torch.Tensor, h: torch.Tensor, target: float, pattern: Pattern, damp: float, block_size: int,
               stats: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT sweep (module docstring); returns the updated weight and the kept mask."""
    out_f, in_f = w.shape
    diag = torch.diagonal(h)
    dead = diag <= 0
    hd = h.clone()
    # A dead input never reaches the output: decouple it (unit diagonal, no cross terms) so that it
    # neither receives nor sends OBS updates; its saliency is forced to 0 below.
    hd[dead, :] = 0
    hd[:, dead] = 0
    hd[dead, dead] = 1
    mean = float(diag.clamp_min(0).mean())
    lam = damp * mean
    u = None
    for _ in range(5):
        try:
            lower = torch.linalg.cholesky(hd + lam * torch.eye(in_f, dtype=h.dtype))
            u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
            break
        except torch.linalg.LinAlgError:
            lam = max(lam * 10, 1e-6 * max(mean, 1e-30))
    if u is None:
        raise ValueError(f"sparsegpt: hessian is not positive definite even with damping {lam:.3g}; check the calibration data (NaN/inf?)")
    stats["damp"] = lam

    if pattern.kind == "nm":
        block_size = max(pattern.m, block_size // pattern.m * pattern.m)
    wk = w.clone()
    mask = torch.ones_like(w, dtype=torch.bool)
    total_pruned = round(target * out_f * in_f)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = wk[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        dead1 = dead[i1:i2]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if pattern.kind == "unstructured":
            # Spread the exact total over blocks so the matrix ends at round(target * out * in).
            k = round(total_pruned * i2 / in_f) - round(total_pruned * i1 / in_f)
            score = (w1 * w1 / (d1 * d1)).masked_fill(dead1, 0.0).flatten()
            order = torch.argsort(score, stable=True)
            prune1.view(-1)[order[:k]] = True
        for i in range(i2 - i1):
            if pattern.kind == "nm" and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                score = (w1[:, g] ** 2 / d1[g] ** 2).masked_fill(dead1[g], 0.0)
                order = torch.argsort(score, dim=1, stable=True)
                prune1[:, g] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, : pattern.m - pattern.n], True)
            col = w1[:, i]
            q = col.masked_fill(prune1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wk[:, i1:i2] = q1
        mask[:, i1:i2] = ~prune1
        wk[:, i2:] -= err1 @ u[i1:i2, i2:]
    return wk, mask


# ---------------------------------------------------------------------------- iCBS
def _icbs(w: torch.Tensor, h: torch.Tensor, target: float, pattern: Pattern, damp: float, block_size: int, start: str,
          rounds: int, block: int, seed: int, dtype: torch.dtype, stats: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """iCBS rounds from ``start``'s result (module docstring); returns the weight and the kept mask."""
    in_f = w.shape[1]
    if start == "wanda":
        v, mask = _wanda(w, h, target, pattern)
    else:
        v, mask = _sparsegpt(w, h, target, pattern, damp, block_size, {})
    v = v.to(dtype).double()  # the start exactly as its own solver would return it
    best = _row_errors(w - v, h)
    stats["objective_start"] = float(best.sum())
    hd, lam = _damped(h, damp)
    stats["damp"] = lam
    step = pattern.m if pattern.kind == "nm" else 1
    block = max(step, block // step * step)
    gen = torch.Generator().manual_seed(seed)
    swaps = reverted = rounds_run = 0
    for r in range(rounds):
        shift = (block // 2) // step * step if r % 2 else 0
        edges = sorted({0, in_f, *range(shift, in_f, block)})
        spans = list(itertools.pairwise(edges))
        if r > 0:
            spans = [spans[i] for i in torch.randperm(len(spans), generator=gen).tolist()]
        v_new, mask_new = v.clone(), mask.clone()
        made = 0
        for b0, b1 in spans:
            made += _icbs_block(w, v_new, mask_new, hd, b0, b1, pattern)
        # Guard on the true (undamped) objective of the weights as returned: keep a row's new
        # weights only if they do not raise its error, so iCBS never ends above its start.
        v_new = v_new.to(dtype).double()
        err = _row_errors(w - v_new, h)
        better = err <= best
        reverted += int((~better).sum())
        v = torch.where(better.unsqueeze(1), v_new, v)
        mask = torch.where(better.unsqueeze(1), mask_new, mask)
        gained = float((best - torch.minimum(err, best)).sum())
        best = torch.minimum(err, best)
        swaps += made
        rounds_run += 1
        if made == 0 and gained <= 1e-12 * max(float(best.sum()), 1e-300):
            break
    stats.update({"swaps": swaps, "rows_reverted": reverted, "rounds": rounds_run, "block": block})
    return v, mask


def _icbs_block(w: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, hd: torch.Tensor, b0: int, b1: int, pattern: Pattern) -> int:
    """Improve columns ``b0:b1`` of every row in place (mask by swaps, kept weights re-fitted); returns swaps made."""
    cols = slice(b0, b1)
    size = b1 - b0
    h_bb = hd[cols, cols]
    k_inv = torch.cholesky_inverse(torch.linalg.cholesky(h_bb))
    d = w - v
    # g = H_{B,R} d_R for every row, from the full product minus the block's own part.
    g = d @ hd[:, cols] - d[:, cols] @ h_bb
    t = w[:, cols] + g @ k_inv
    pruned = ~mask[:, cols]
    if pattern.kind == "nm":
        gid = torch.arange(size) // pattern.m
        allowed = gid.unsqueeze(0) == gid.unsqueeze(1)
    else:
        allowed = torch.ones(size, size, dtype=torch.bool)
    made = 0
    for _ in range(size):
        q, u, err = _obs(k_inv, t, pruned)
        c = t - u @ k_inv
        z = q @ k_inv  # z[r, i, j] = (Q K)_ij
        s = (torch.diagonal(k_inv) - (k_inv.unsqueeze(0) * z).sum(1)).clamp_min(1e-300)  # Schur complement of adding j
        qd = torch.diagonal(q, dim1=1, dim2=2)
        cj = (c / s).unsqueeze(1)  # (rows, 1, j)
        num = u.unsqueeze(2) - z * cj
        den = qd.unsqueeze(2) + z * z / s.unsqueeze(1)
        new = err.view(-1, 1, 1) + (c * c / s).unsqueeze(1) - num * num / den.clamp_min(1e-300)
        valid = pruned.unsqueeze(2) & ~pruned.unsqueeze(1) & allowed.unsqueeze(0)
        new = new.masked_fill(~valid, float("inf")).flatten(1)
        best, idx = new.min(1)
        take = best < err - 1e-12 * err.abs().clamp_min(1e-300)
        if not bool(take.any()):
            break
        rows = take.nonzero().squeeze(1)
        i, j = idx[rows] // size, idx[rows] % size
        pruned[rows, i] = False
        pruned[rows, j] = True
        made += int(rows.numel())
    _, u, _ = _obs(k_inv, t, pruned)
    v[:, cols] = (t - u @ k_inv).masked_fill(pruned, 0.0)
    mask[:, cols] = ~pruned
    return made


def _obs(k_inv: torch.Tensor, t: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: ``Q = ([K]_PP)^-1`` embedded (zero off ``P``), ``u = Q t``, error ``t_P^T Q t_P``.

    Rows have different pruned sets; inverting ``K`` on ``P`` and the identity elsewhere gives
    ``([K]_PP)^-1`` on ``P`` for all rows in one batched call.
    """
    p = pruned.to(t.dtype)
    outer = p.unsqueeze(2) * p.unsqueeze(1)
    a = k_inv.unsqueeze(0) * outer + torch.diag_embed(1.0 - p)
    q = torch.cholesky_inverse(torch.linalg.cholesky(a)) * outer
    u = (q @ t.unsqueeze(2)).squeeze(2)
    return q, u, (u * t).sum(1)


__all__ = ["METHODS", "Pattern", "PruneResult", "prune_matrix", "reconstruction_error"]
