"""Pruning solvers on one matrix: exact zero counts, masks by definition, objective ordering, refusals."""

import itertools

import pytest
import torch

from graphpress.passes.prune import solvers
from graphpress.passes.prune.solvers import (
    METHODS,
    Pattern,
    prune_matrix,
    reconstruction_error,
)

UNSTRUCTURED = Pattern("unstructured")


def _problem(out_f=32, in_f=64, rows=2048, seed=0):
    """Correlated layer inputs X = Z A (random mixing A), a random weight, H = X^T X."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, in_f, generator=g, dtype=torch.float64)
    a = torch.randn(in_f, in_f, generator=g, dtype=torch.float64)
    x = z @ a
    w = torch.randn(out_f, in_f, generator=g)
    return w, x, x.t() @ x


@pytest.fixture(scope="module")
def problem():
    return _problem()


def _groups_nonzero(weight, m):
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)


# ---------------------------------------------------------------------------- patterns
def test_pattern_parse_and_describe():
    assert Pattern.parse("unstructured") == Pattern("unstructured")
    assert Pattern.parse(" 2:4 ") == Pattern("nm", 2, 4)
    assert Pattern.parse("4:8").describe() == "4:8"
    assert Pattern.parse("Unstructured").describe() == "unstructured"


@pytest.mark.parametrize("text", ["2-4", "4:2", "0:4", "4:4", "dense", ""])
def test_pattern_parse_refuses(text):
    with pytest.raises(ValueError, match="pattern") as e:
        Pattern.parse(text)
    assert repr(text) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------- counts
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "icbs"])
def test_unstructured_exact_zeros_per_row(problem, method, sparsity):
    w, _, h = problem
    r = prune_matrix(w, sparsity=sparsity, method=method, pattern=UNSTRUCTURED, hessian=h)
    k = round(sparsity * 64)  # 32 or 19
    assert ((r.weight == 0).sum(1) == k).all()
    assert torch.equal(r.mask, r.weight != 0)
    assert r.stats["sparsity"] == pytest.approx(k / 64)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsegpt_total_sparsity(problem, sparsity):
    w, _, h = problem
    r = prune_matrix(w, sparsity=sparsity, method="sparsegpt", pattern=UNSTRUCTURED, hessian=h, block_size=16)
    assert int((r.weight == 0).sum()) == round(sparsity * w.numel())  # 1024 or 614 of 2048
    assert abs(r.stats["sparsity"] - sparsity) <= 1 / 64
    assert torch.equal(r.mask, r.weight != 0)
    per_row = (r.weight == 0).sum(1)
    assert per_row.min() < per_row.max()  # the adaptive mask does not force equal rows


@pytest.mark.parametrize("text", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("method", METHODS)
def test_nm_exact_per_group(problem, method, text):
    w, _, h = problem
    p = Pattern.parse(text)
    r = prune_matrix(w, sparsity=0.5, method=method, pattern=p, hessian=h, block_size=10)
    assert (_groups_nonzero(r.weight, p.m) == p.n).all()
    assert r.stats["target"] == pytest.approx(1 - p.n / p.m)
    assert r.stats["sparsity"] == pytest.approx(1 - p.n / p.m)


def test_icbs_from_sparsegpt_keeps_nm(problem):
    w, _, h = problem
    r = prune_matrix(w, sparsity=0.5, method="icbs", pattern=Pattern.parse("2:4"), hessian=h, icbs_start="sparsegpt", icbs_block=6)
    assert r.stats["block"] == 4  # rounded down to a multiple of m
    assert (_groups_nonzero(r.weight, 4) == 2).all()


# ---------------------------------------------------------------------------- masks by definition
def test_magnitude_keeps_largest_per_row_and_values(problem):
    w, _, _ = problem
    r = prune_matrix(w, sparsity=0.5, method="magnitude", pattern=UNSTRUCTURED)
    a = w.abs()
    for row in range(w.shape[0]):
        assert a[row][r.mask[row]].min() > a[row][~r.mask[row]].max()
    assert torch.equal(r.weight[r.mask], w[r.mask])
    assert r.objective == pytest.approx(float((w[~r.mask].double() ** 2).sum()))  # no hessian: ||W - W_hat||^2


def test_wanda_keeps_largest_score_not_largest_weight(problem):
    w, x, h = problem
    r = prune_matrix(w, sparsity=0.5, method="wanda", pattern=UNSTRUCTURED, hessian=h)
    score = w.abs().double() * x.norm(dim=0)
    for row in range(w.shape[0]):
        assert score[row][r.mask[row]].min() > score[row][~r.mask[row]].max()
    assert torch.equal(r.weight[r.mask], w[r.mask])
    mag = prune_matrix(w, sparsity=0.5, method="magnitude", pattern=UNSTRUCTURED)
    assert not torch.equal(r.mask, mag.mask)  # column norms differ, so the masks do


def test_wanda_nm_keeps_top_score_in_each_group(problem):
    w, x, h = problem
    r = prune_matrix(w, sparsity=0.5, method="wanda", pattern=Pattern.parse("2:4"), hessian=h)
    score = (w.abs().double() * x.norm(dim=0)).reshape(32, 16, 4)
    keep = r.mask.reshape(32, 16, 4)
    lo = score.masked_fill(~keep, float("inf")).min(-1).values
    hi = score.masked_fill(keep, -float("inf")).max(-1).values
    assert (lo > hi).all()


@pytest.mark.parametrize("text", ["unstructured", "2:4"])
def test_identity_hessian_makes_wanda_magnitude(problem, text):
    w, _, _ = problem
    p = Pattern.parse(text)
    a = prune_matrix(w, sparsity=0.5, method="wanda", pattern=p, hessian=3.0 * torch.eye(64))
    b = prune_matrix(w, sparsity=0.5, method="magnitude", pattern=p)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


# ---------------------------------------------------------------------------- objective
def test_objective_is_layer_output_error(problem):
    w, x, h = problem
    r = prune_matrix(w, sparsity=0.5, method="sparsegpt", pattern=UNSTRUCTURED, hessian=h)
    direct = float((((w.double() - r.weight.double()) @ x.t()) ** 2).sum())
    assert r.objective == pytest.approx(direct, rel=1e-9)
    assert reconstruction_error(w, r.weight, h) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("text", ["unstructured", "2:4"])
def test_objective_ordering_on_correlated_inputs(problem, text):
    w, _, h = problem
    p = Pattern.parse(text)
    # SparseGPT's saliency counts only the columns right of j as compensation; blocks much narrower
    # than the row (the paper: 128 of >= 4096) keep that bias small, so use 16 of 64 here.
    run = lambda m, **kw: prune_matrix(w, sparsity=0.5, method=m, pattern=p, hessian=h, block_size=16, **kw)
    wanda, sgpt = run("wanda"), run("sparsegpt")
    icbs_w, icbs_s = run("icbs"), run("icbs", icbs_start="sparsegpt")
    assert sgpt.objective < 0.9 * wanda.objective  # measured 0.63 (unstructured), 0.64 (2:4)
    assert icbs_w.stats["objective_start"] == pytest.approx(wanda.objective)
    assert icbs_s.stats["objective_start"] == pytest.approx(sgpt.objective)
    assert icbs_w.objective <= wanda.objective and icbs_s.objective <= sgpt.objective
    assert icbs_w.objective < 0.6 * wanda.objective  # measured 0.39 (unstructured), 0.36 (2:4)
    assert icbs_w.stats["swaps"] > 0


def test_sparsegpt_updates_beat_its_own_mask_unchanged(problem):
    w, _, h = problem
    r = prune_matrix(w, sparsity=0.5, method="sparsegpt", pattern=UNSTRUCTURED, hessian=h, block_size=16)
    assert not torch.equal(r.weight[r.mask], w[r.mask])  # kept weights were updated
    assert r.objective < 0.8 * reconstruction_error(w, w * r.mask, h)


def test_icbs_refit_is_least_squares_on_its_mask():
    # One block spans the row: the kept weights must be the damped least-squares fit on the final mask.
    w, _, h = _problem(out_f=6, in_f=16, rows=256, seed=3)
    damp = 0.01
    r = prune_matrix(w.double(), sparsity=0.5, method="icbs", pattern=UNSTRUCTURED, hessian=h, damp=damp, icbs_block=16)
    hd = h + damp * h.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    wd = w.double()
    for row in range(6):
        keep = r.mask[row]
        fit = wd[row, keep] + torch.linalg.solve(hd[keep][:, keep], hd[keep][:, ~keep] @ wd[row, ~keep])
        assert torch.allclose(r.weight[row, keep], fit, rtol=1e-9, atol=1e-12)


def test_swap_scores_match_recomputation():
    # The rank-one swap formula must equal t_P^T (K_PP)^-1 t_P recomputed for the swapped set.
    _, _, h = _problem(out_f=1, in_f=8, rows=64, seed=5)
    k = torch.linalg.inv(h)
    t = torch.randn(1, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pruned = torch.tensor([[True, False, True, False, True, True, False, False]])
    q, u, err = solvers._obs(k, t, pruned)

    def exact(p):
        p = list(p)
        return float(t[0, p] @ torch.linalg.solve(k[p][:, p], t[0, p]))

    assert float(err) == pytest.approx(exact([0, 2, 4, 5]), rel=1e-10)
    c = t - u @ k
    z = q @ k
    s = k.diagonal() - (k * z[0]).sum(0)
    for i, j in itertools.product([0, 2, 4, 5], [1, 3, 6, 7]):
        cj, sj = float(c[0, j]), float(s[j])
        new = float(err) + cj**2 / sj - (float(u[0, i]) - float(z[0, i, j]) * cj / sj) ** 2 / (float(q[0, i, i]) + float(z[0, i, j]) ** 2 / sj)
        assert new == pytest.approx(exact(sorted({0, 2, 4, 5} - {i} | {j})), rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_icbs_never_above_start_even_with_heavy_damping(dtype):
    # Heavy damping makes the moves optimise a different objective; the per-row guard on the true
    # objective must still keep iCBS at or below its start (and it has to revert some rows here).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    h = (x.t() @ x).float()
    w = torch.randn(16, 64, generator=g).to(dtype)
    for text in ("unstructured", "2:4"):
        r = prune_matrix(w, sparsity=0.5, method="icbs", pattern=Pattern.parse(text), hessian=h, damp=0.5)
        start = prune_matrix(w, sparsity=0.5, method="wanda", pattern=Pattern.parse(text), hessian=h)
        assert r.weight.dtype == dtype
        assert r.objective <= start.objective
        assert r.objective < 0.5 * start.objective
        assert r.stats["rows_reverted"] > 0


def test_dead_inputs_are_pruned_first_and_stay_finite():
    w, x, _ = _problem(out_f=8, in_f=32, rows=512, seed=2)
    x[:, [3, 10, 11]] = 0
    h = x.t() @ x
    for method in ("wanda", "sparsegpt", "icbs"):
        r = prune_matrix(w, sparsity=0.5, method=method, pattern=UNSTRUCTURED, hessian=h, block_size=8)
        assert torch.isfinite(r.weight).all()
        assert not r.mask[:, [3, 10, 11]].any(), method


def test_rank_deficient_hessian_without_damping():
    w, x, _ = _problem(out_f=8, in_f=32, rows=16, seed=4)  # 16 rows: H has rank 16 of 32
    r = prune_matrix(w, sparsity=0.5, method="sparsegpt", pattern=UNSTRUCTURED, hessian=x.t() @ x, damp=0.0)
    assert r.stats["damp"] > 0 and torch.isfinite(r.weight).all()


def test_deterministic(problem):
    w, _, h = problem
    a = prune_matrix(w, sparsity=0.5, method="icbs", pattern=UNSTRUCTURED, hessian=h, seed=7)
    b = prune_matrix(w, sparsity=0.5, method="icbs", pattern=UNSTRUCTURED, hessian=h, seed=7)
    assert torch.equal(a.weight, b.weight) and a.stats == b.stats


# ---------------------------------------------------------------------------- nothing to do / refusals
@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_returns_weight_unchanged(problem, method):
    w, _, h = problem
    r = prune_matrix(w.half(), sparsity=0.0, method=method, pattern=UNSTRUCTURED, hessian=h)
    assert r.weight.dtype == torch.float16 and torch.equal(r.weight, w.half())
    assert r.mask.all() and r.objective == 0.0 and r.stats["sparsity"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "wanda", "pattern": Pattern.parse("2:4"), "w": torch.randn(4, 66)}, "66 inputs per row is not a multiple of 4"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
        ({"method": "wanda", "hessian": None}, "method 'wanda' needs the hessian"),
        ({"method": "sparsegpt", "hessian": None}, "method 'sparsegpt' needs the hessian"),
        ({"method": "icbs", "hessian": None}, "method 'icbs' needs the hessian"),
        ({"method": "obc"}, "method 'obc' is not one of"),
        ({"hessian": torch.eye(8)}, r"hessian has shape \(8, 8\), expected \(16, 16\)"),
        ({"method": "icbs", "icbs_start": "magnitude"}, "icbs_start 'magnitude'"),
        ({"w": torch.randn(16)}, "2-D floating matrix"),
    ],
)
def test_refusals(kwargs, match):
    args = {"w": torch.randn(4, 16), "sparsity": 0.5, "method": "magnitude", "pattern": UNSTRUCTURED, "hessian": torch.eye(16)} | kwargs
    w = args.pop("w")
    with pytest.raises(ValueError, match=match) as e:
        prune_matrix(w, **args)
    assert "\n" not in str(e.value)
