"""Budgeted allocation: choose one option per item, minimising total value under a total cost budget.

The multiple-choice knapsack shared by the search passes (block sizes per layer, bit widths per
layer, sparsity per layer)::

    minimise    sum_i sum_k  v[i][k] * x[i][k]
    subject to  sum_k x[i][k] = 1                     for every item i   (exactly one option)
                sum_i sum_k c[i][k] * x[i][k] <= B                       (the budget)
                x[i][k] in {0, 1}

solved exactly as a 0/1 integer program with ``scipy.optimize.milp`` (the HiGHS branch-and-cut
solver) with a zero relative MIP gap. Values are scaled so the largest is 1e5 and costs so the
largest is 1 before solving (the optimum does not change; HiGHS' tolerances and its 1e-6
absolute MIP gap are absolute, so badly scaled rows -- costs in the millions next to values of
1e-9 -- would otherwise blur it). The answer is then polished in exact float64 arithmetic
(single and pairwise option changes that improve it; they never make it worse) and the totals
are recomputed from the chosen options.

Among assignments with the optimal value the cheapest is returned (a second, lexicographic
solve: minimise cost subject to value <= optimum), so ties -- e.g. layers whose sensitivity is
zero at every option -- resolve deterministically towards the smaller cost.

An infeasible budget (below the cost of taking every item's cheapest option) is a one-line
:class:`~graphpress.errors.PassError` that states the minimum achievable cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphpress.errors import PassError

# Relative slack when checking the budget after solving: the chosen costs are summed in float64
# in another order than the budget was, so an assignment whose cost *equals* the budget (the
# uniform reference of a search) must not be rejected for a rounding difference.
_REL_TOL = 1e-9
_VALUE_SCALE = 1e5


@dataclass
class Allocation:
    """The solver's choice.

    Attributes
    ----------
    choice : list
        The chosen option of each item (the first element of its ``(option, value, cost)`` triple).
    index : list of int
        Position of the chosen triple in each item's list.
    value, cost : float
        Totals of the chosen options (float64 sums of the given numbers, not the scaled ones).
    budget : float
        The budget the allocation was solved for.
    status : str
        ``"optimal"``, ``"trivial"`` (no choice to make) or ``"time limit (best found)"``.
    time_s : float
        Wall time of the solve(s).
    """

    choice: list[Any]
    index: list[int]
    value: float
    cost: float
    budget: float
    status: str
    time_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


def min_cost(items: Sequence[Sequence[tuple[Any, float, float]]]) -> float:
    """The least total cost any allocation can have (every item at its cheapest option)."""
    return float(sum(min(float(c) for _o, _v, c in opts) for opts in items))


def _check(items: Sequence[Sequence[tuple[Any, float, float]]]) -> None:
    for i, opts in enumerate(items):
        if not opts:
            raise PassError(f"allocate: item {i} has no options")
        for o, v, c in opts:
            if not (math.isfinite(float(v)) and math.isfinite(float(c))):
                raise PassError(f"allocate: item {i} option {o!r} has a non-finite value or cost ({v}, {c})")


def allocate(
    items: Sequence[Sequence[tuple[Any, float, float]]],
    budget: float,
    *,
    time_limit: float | None = 60.0,
    what: str = "budget",
) -> Allocation:
    """Choose one ``(option, value, cost)`` per item minimising the total value with total cost <= ``budget``.

    Parameters
    ----------
    items : sequence of sequences of ``(option, value, cost)``
        The options of each item; ``option`` is any label (returned in ``choice``), ``value`` is
        what is minimised (e.g. a sensitivity), ``cost`` what the budget bounds.
    budget : float
        Upper bound on the total cost (inclusive, with a 1e-9 relative slack for rounding).
    time_limit : float, optional
        Seconds HiGHS may spend; on timeout the best assignment found is returned with status
        ``"time limit (best found)"`` (an error when it found none).
    what : str
        How the budget is named in the error message (e.g. ``"option 'budget' of pass 'x'"``).

    Returns
    -------
    Allocation

    Raises
    ------
    PassError
        One line, when the budget is below the minimum achievable cost (stated in the message)
        or the solver fails.

    Examples
    --------
    >>> a = allocate([[("dense", 0.0, 4), ("small", 1.0, 1)], [("dense", 0.0, 4), ("small", 5.0, 1)]], 5)
    >>> a.choice, a.value, a.cost
    (['small', 'dense'], 1.0, 5.0)
    """
    t0 = time.perf_counter()
    _check(items)
    budget = float(budget)
    floor = min_cost(items)
    slack = _REL_TOL * max(abs(budget), abs(floor), 1e-300)
    if not math.isfinite(budget) or floor > budget + slack:
        raise PassError(
            f"{what} {budget:.6g} is infeasible: the minimum achievable cost is {floor:.6g} (every item at its cheapest option)"
        )
    n = len(items)
    if n == 0:
        return Allocation([], [], 0.0, 0.0, budget, "trivial", time.perf_counter() - t0)

    values = np.array([float(v) for opts in items for _o, v, _c in opts], dtype=np.float64)
    costs = np.array([float(c) for opts in items for _o, _v, c in opts], dtype=np.float64)
    sizes = [len(opts) for opts in items]
    starts = np.cumsum([0, *sizes[:-1]])

    # Trivial cases first: one option each, or the value-optimal choice already fits the budget.
    greedy = [int(min(range(s), key=lambda k, a=a: (values[a + k], costs[a + k]))) for a, s in zip(starts, sizes)]
    g_cost = float(sum(costs[a + k] for a, k in zip(starts, greedy)))
    if all(s == 1 for s in sizes) or g_cost <= budget + slack:
        return _result(items, greedy, budget, "trivial", t0, {"variables": int(values.size)})

    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    # HiGHS' MIP gap is also bounded *absolutely* (1e-6, not settable through scipy): scale the
    # largest value to _VALUE_SCALE so that absolute gap is 1e-11 of it; costs to at most 1.
    v_scale = (float(np.abs(values).max()) or 1.0) / _VALUE_SCALE
    c_scale = float(np.abs(costs).max()) or 1.0
    vn, cn = values / v_scale, costs / c_scale
    rows = np.repeat(np.arange(n), sizes)
    one_hot = csr_matrix((np.ones(values.size), (rows, np.arange(values.size))), shape=(n, values.size))
    choose_one = LinearConstraint(one_hot, 1, 1)
    options = {"mip_rel_gap": 0.0, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)

    status_note = "optimal"
    limit = budget
    x = None
    # A solution may violate the (scaled) budget row by HiGHS' feasibility tolerance (1e-7
    # scaled); tighten the row by the violation and re-solve in that rare case.
    for _attempt in range(4):
        within = LinearConstraint(cn[None, :], -np.inf, limit / c_scale)
        res = milp(vn, constraints=[choose_one, within], integrality=np.ones_like(vn), bounds=Bounds(0, 1), options=options)
        if res.x is None:
            if res.status == 2:
                raise PassError(f"{what} {budget:.6g} is infeasible: the minimum achievable cost is {floor:.6g}")
            raise PassError(f"allocate: HiGHS failed: {res.message}")
        if res.status == 1:
            status_note = "time limit (best found)"
        x = np.rint(res.x)
        over = float(costs @ x) - budget
        if over <= slack:
            break
        limit -= over + slack
    else:
        raise PassError(f"allocate: HiGHS could not meet {what} {budget:.6g} within rounding")

    # Lexicographic tie-break: among the value-optimal assignments, the cheapest.
    best = float(vn @ x)
    tie = LinearConstraint(vn[None, :], -np.inf, best + 1e-9 * max(1.0, abs(best)))
    res2 = milp(cn, constraints=[choose_one, LinearConstraint(cn[None, :], -np.inf, limit / c_scale), tie],
                integrality=np.ones_like(cn), bounds=Bounds(0, 1), options=options)
    if res2.x is not None:
        x2 = np.rint(res2.x)
        if float(costs @ x2) <= float(costs @ x) and float(values @ x2) <= float(values @ x) + 1e-12 * max(1.0, abs(float(values @ x))):
            x = x2
    index = [int(np.argmax(x[a : a + s])) for a, s in zip(starts, sizes)]
    index = _polish(values, costs, starts, sizes, index, budget + slack)
    return _result(items, index, budget, status_note, t0, {"variables": int(values.size)})


def _polish(values, costs, starts, sizes, index: list[int], limit: float) -> list[int]:
    """Exact float64 local improvement of a solver answer: single and pairwise option changes that
    lower (value, cost) lexicographically while staying within ``limit``.

    HiGHS works to tolerances; this removes near-ties it could not resolve (differences below
    1e-11 of the largest value). It never makes the answer worse.
    """
    idx = list(index)

    def pos(i: int, k: int) -> int:
        return int(starts[i]) + k

    total = float(sum(costs[pos(i, k)] for i, k in enumerate(idx)))
    improved, rounds = True, 0
    while improved and rounds < 1000:  # each round strictly improves; the cap guards float noise
        improved, rounds = False, rounds + 1
        best = (0.0, 0.0, None)
        for i, s in enumerate(sizes):
            a = pos(i, idx[i])
            for k in range(s):
                dv, dc = values[pos(i, k)] - values[a], costs[pos(i, k)] - costs[a]
                if total + dc <= limit and (dv, dc) < best[:2]:
                    best = (dv, dc, ((i, k),))
        n = len(sizes)
        if n * max(sizes) <= 400:  # pairwise moves: cheap for search-sized problems
            for i in range(n):
                ai = pos(i, idx[i])
                for j in range(i + 1, n):
                    aj = pos(j, idx[j])
                    for k in range(sizes[i]):
                        for q in range(sizes[j]):
                            dv = values[pos(i, k)] - values[ai] + values[pos(j, q)] - values[aj]
                            dc = costs[pos(i, k)] - costs[ai] + costs[pos(j, q)] - costs[aj]
                            if total + dc <= limit and (dv, dc) < best[:2]:
                                best = (dv, dc, ((i, k), (j, q)))
        if best[2] is not None:
            for i, k in best[2]:
                idx[i] = k
            total += best[1]
            improved = True
    return idx


def _result(items, index: list[int], budget: float, status: str, t0: float, stats: dict[str, Any]) -> Allocation:
    chosen = [items[i][k] for i, k in enumerate(index)]
    value = float(math.fsum(float(v) for _o, v, _c in chosen))
    cost = float(math.fsum(float(c) for _o, _v, c in chosen))
    return Allocation([o for o, _v, _c in chosen], index, value, cost, budget, status, time.perf_counter() - t0, stats)


__all__ = ["Allocation", "allocate", "min_cost"]
