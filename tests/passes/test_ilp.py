import itertools
import math
import random

import pytest

from graphpress.errors import PassError
from graphpress.passes.ilp import allocate, min_cost


def brute_force(items, budget):
    """Least value, then least cost, over every assignment within budget (None if none)."""
    best = None
    for combo in itertools.product(*[range(len(opts)) for opts in items]):
        cost = math.fsum(items[i][k][2] for i, k in enumerate(combo))
        if cost > budget * (1 + 1e-12):
            continue
        value = math.fsum(items[i][k][1] for i, k in enumerate(combo))
        if best is None or (value, cost) < (best[0], best[1]):
            best = (value, cost, combo)
    return best


def test_known_optimum_hand_made():
    # two layers: dense costs 4, compressed costs 1; compressing the first hurts less
    items = [[("dense", 0.0, 4), ("small", 1.0, 1)], [("dense", 0.0, 4), ("small", 5.0, 1)]]
    a = allocate(items, 5)
    assert a.choice == ["small", "dense"] and a.index == [1, 0]
    assert a.value == 1.0 and a.cost == 5.0 and a.status == "optimal"
    # a budget that fits everything dense: the value-optimal choice, no solve needed
    a = allocate(items, 8)
    assert a.choice == ["dense", "dense"] and a.value == 0.0 and a.status == "trivial"
    # the tightest budget: both small
    a = allocate(items, 2)
    assert a.choice == ["small", "small"] and a.value == 6.0 and a.cost == 2.0


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    items = []
    for _ in range(rng.randint(1, 5)):
        k = rng.randint(1, 4)
        # values spanning many orders of magnitude exercise the normalisation
        scale = 10 ** rng.uniform(-9, 3)
        items.append([(f"o{j}", rng.random() * scale, rng.choice([rng.randint(1, 50), rng.random() * 1e6])) for j in range(k)])
    lo = min_cost(items)
    hi = sum(max(c for _o, _v, c in opts) for opts in items)
    budget = lo + rng.random() * (hi - lo)
    a = allocate(items, budget)
    want = brute_force(items, budget)
    assert want is not None
    assert a.cost <= budget * (1 + 1e-9)
    assert a.value == pytest.approx(want[0], rel=1e-9, abs=1e-300)
    assert a.choice == [items[i][k][0] for i, k in enumerate(a.index)]
    assert a.cost == pytest.approx(math.fsum(items[i][k][2] for i, k in enumerate(a.index)))


def test_infeasible_budget_is_one_line_error_with_min_cost():
    items = [[(1, 0.0, 10.0), (2, 1.0, 6.0)], [(1, 0.0, 3.0), (4, 2.0, 2.5)]]
    assert min_cost(items) == 8.5
    with pytest.raises(PassError) as err:
        allocate(items, 8.0, what="option 'budget' =")
    msg = str(err.value)
    assert "\n" not in msg and "8.5" in msg and "minimum achievable cost" in msg and "option 'budget'" in msg
    # exactly the minimum is feasible
    a = allocate(items, 8.5)
    assert a.choice == [2, 4] and a.cost == 8.5


def test_equal_cost_tie_and_budget_equal_to_cost():
    # options with equal cost: the smaller value wins regardless of order
    items = [[("a", 3.0, 2.0), ("b", 1.0, 2.0), ("c", 0.0, 5.0)], [("x", 0.0, 1.0), ("y", 0.5, 1.0)]]
    a = allocate(items, 3.0)
    assert a.choice == ["b", "x"] and a.value == 1.0 and a.cost == 3.0
    # equal values: the cheaper option wins (lexicographic tie-break), also inside a real solve
    items = [[("big", 0.0, 10.0), ("small", 0.0, 1.0)], [("d", 0.0, 4.0), ("c", 2.0, 1.0)]]
    a = allocate(items, 100.0)
    assert a.choice == ["small", "d"] and a.cost == 5.0
    items = [[("p", 1.0, 3.0), ("q", 1.0, 2.0), ("r", 4.0, 1.0)], [("d", 0.0, 4.0), ("c", 2.0, 1.0)]]
    a = allocate(items, 6.0)  # value 1 at cost 6 (q + d), not 7
    assert a.choice == ["q", "d"] and a.value == 1.0 and a.cost == 6.0


def test_budget_hit_exactly_with_float_costs():
    # a uniform reference whose cost equals the budget up to summation order stays feasible
    costs = [0.1, 0.2, 0.3, 1e6 / 3, 7.7]
    items = [[("dense", 0.0, 3 * c), ("b4", 1.0 + i, c)] for i, c in enumerate(costs)]
    budget = sum(reversed(costs))
    a = allocate(items, budget)
    assert a.choice == ["b4"] * 5 and a.value == 15.0


def test_empty_and_single_option_items():
    assert allocate([], 0.0).choice == []
    a = allocate([[("only", 2.0, 3.0)], [("x", 1.0, 1.0)]], 4.0)
    assert a.choice == ["only", "x"] and a.value == 3.0 and a.status == "trivial"
    with pytest.raises(PassError, match="no options"):
        allocate([[]], 1.0)
    with pytest.raises(PassError, match="non-finite"):
        allocate([[("a", float("nan"), 1.0)]], 1.0)
