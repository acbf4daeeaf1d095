"""Pass budgets and backing off to meet them (``on_budget: adapt | fail``).

Every lossy pass declares its budget in its config (``min_sqnr_db`` and/or ``max_kl``) with an
explicit default; the pipeline checks it against the previous graph after the pass
(:mod:`graphpress.passes.pipeline`). A pass whose main knob is a *target* (``target_bits``,
``target_sparsity``, ``sparsity``, a block-size cost budget) also has ``on_budget``:

* ``"fail"``: a miss is one :class:`~graphpress.errors.VerificationError` line;
* ``"adapt"`` (default): the pipeline backs the pass off on its most sensitive layers until the
  budget holds, and the pass's stats say what it achieved against what was asked.

How backing off works. After a run that misses its budget, an adaptive pass (the
:class:`Adaptive` protocol) offers ``levels = adapt_levels()`` ways to be softer, ordered: level
``k`` applies the first ``k`` *moves* of a ladder, each move softening one layer (or channel
group) by one notch -- a width step up, a sparsity step down, a block size halved.
:func:`ladder` orders the moves by sensitivity: each unit has an estimated cost to the budget per
notch (measured output noise where the pass measures it, scaled along the notches by the pass's
own per-layer error curve or a convex prior), and the next move is the one that removes the
most cost per weight given back -- the most sensitive layer first, and the next one as soon as
its next notch buys more. ``back_off(k)`` returns a pass that runs with ``k`` moves applied, reusing what the
first run measured (calibration statistics, sensitivities), and the pipeline re-runs it on the
graph from before the pass. It gallops up ``k = 1, 4, 16, ...`` (then ``levels``: everything
softened) to the first level that meets the budget, then bisects below it, and keeps the
smallest ``k`` found that met the budget: a target a little too ambitious costs one or two
re-runs, a far one about ``2 log2(levels)``. (The error shrinks with more moves almost always;
the search does not need it to, it only returns a ``k`` that passed.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from graphpress.errors import PassError

ON_BUDGET = ("adapt", "fail")


def check_on_budget(owner: str, value: Any) -> None:
    """One-line error when ``value`` is not ``"adapt"`` or ``"fail"``."""
    if value not in ON_BUDGET:
        raise PassError(f"pass '{owner}': option 'on_budget': {value!r} is not one of adapt, fail")


@runtime_checkable
class Adaptive(Protocol):
    """A pass that can back off to meet its budget (see module docstring)."""

    def adapt_levels(self) -> int:
        """Moves available after the last run (0: nothing to soften)."""
        ...

    def back_off(self, level: int) -> Any:
        """A pass like this one with the first ``level`` moves of its ladder applied."""
        ...

    def achieved(self, stats: dict[str, Any]) -> str:
        """What a run with ``stats`` achieved, in the knob's terms (``"target_sparsity 0.2"``)."""
        ...

    def advice(self) -> str:
        """The option to change when even the softest run misses (``"lower target_sparsity"``)."""
        ...


class SteppedBackOff:
    """The back-off half of :class:`Adaptive` for passes whose last full run leaves
    ``self._state["steps"]``: per layer, its allocated value followed by its softer steps.

    Back-off copies share that state (nothing is measured again) and differ only in ``_level``,
    the number of ladder moves they apply.
    """

    _state: dict[str, Any] | None
    _level: int

    def adapt_levels(self) -> int:
        """Softer steps the last run's layers can give back (0 before a run)."""
        return sum(len(v) - 1 for v in self._state["steps"].values()) if self._state else 0

    def back_off(self, level: int) -> Any:
        """This pass with the first ``level`` moves of its ladder applied (state shared)."""
        copy = type(self)(self.config)  # type: ignore[attr-defined]
        copy._state, copy._level = self._state, int(level)
        return copy


def ladder(costs: dict[str, Sequence[float]], sizes: dict[str, float] | None = None) -> list[str]:
    """The back-off moves, in order: each entry names the unit softened by one more notch.

    Parameters
    ----------
    costs : dict of str to sequence of float
        Per unit, its estimated cost to the budget (e.g. the relative output noise it causes)
        after ``j`` notches, ``j = 0 .. n_u``: ``costs[u][0]`` as the first run compressed it,
        ``costs[u][n_u]`` at its softest. A unit with one entry never moves. Non-finite values
        count as the most costly.
    sizes : dict of str to float, optional
        What a notch of the unit gives back (its weights, say); the next move is the one that
        removes the most cost per size given back. Equal sizes by default.

    Returns
    -------
    list of str
        ``sum(n_u)`` unit names; the first ``k`` are the moves of level ``k``.

    Examples
    --------
    >>> ladder({"a": [4.0, 1.0, 0.0], "b": [2.0, 0.0]})
    ['a', 'b', 'a']
    """
    # Every notch of a unit costs its one size: priced_ladder with constant prices.
    sizes = sizes or {}
    return priced_ladder(costs, {u: [float(sizes.get(u, 1.0))] * (len(v) - 1) for u, v in costs.items() if len(v) > 1})


def priced_ladder(costs: dict[str, Sequence[float]], prices: dict[str, Sequence[float]]) -> list[str]:
    """:func:`ladder` where each notch has its own price instead of one size per unit.

    Parameters
    ----------
    costs : dict of str to sequence of float
        As for :func:`ladder`: per unit, its cost to the budget after ``j`` notches.
    prices : dict of str to sequence of float
        Per unit, what each notch gives back, ``prices[u][j]`` for the move from notch ``j`` to
        ``j + 1`` (``len(costs[u]) - 1`` entries): e.g. the HE cost a layer adds when its block
        size is halved. A notch that gives back nothing (or less than nothing: it is cheaper
        too) is priced at a tiny positive amount, so a free notch that lowers the cost comes first.

    Returns
    -------
    list of str
        The moves, in order (the first ``k`` are the moves of level ``k``); the next move is the
        one that removes the most cost per price paid, ties to the unit named first.

    Examples
    --------
    >>> priced_ladder({"a": [4.0, 1.0, 0.0], "b": [2.0, 0.0]}, {"a": [4.0, 1.0], "b": [1.0]})
    ['b', 'a', 'a']
    """
    def finite(v: float) -> float:
        return float(v) if math.isfinite(float(v)) else 1e300

    units = [u for u in costs if len(costs[u]) > 1]
    for u in units:
        if len(prices.get(u, ())) != len(costs[u]) - 1:
            raise ValueError(f"unit {u!r}: {len(costs[u]) - 1} notches but {len(prices.get(u, ()))} prices")
    order = {u: i for i, u in enumerate(units)}
    c = {u: [finite(v) for v in costs[u]] for u in units}
    price = {u: [max(float(p), 1e-30) if math.isfinite(float(p)) else 1e300 for p in prices[u]] for u in units}
    taken = dict.fromkeys(units, 0)
    moves: list[str] = []
    for _ in range(sum(len(c[u]) - 1 for u in units)):
        open_units = [u for u in units if taken[u] < len(c[u]) - 1]

        def gain(u: str) -> tuple[float, int]:
            j = taken[u]
            return ((c[u][j] - c[u][j + 1]) / price[u][j], -order[u])

        best = max(open_units, key=gain)
        taken[best] += 1
        moves.append(best)
    return moves


def convex_costs(sensitivity: float, levels: Sequence[float]) -> list[float]:
    """Costs for :func:`ladder` of a unit measured once: ``sensitivity * (x_j / x_0)^2`` for its
    notch settings ``levels`` (``x_0`` the first run's sparsity, say; the error of zeroing a share
    ``x`` of a layer grows faster than ``x``)."""
    x0 = float(levels[0]) if levels and levels[0] else 1.0
    return [float(sensitivity) * (float(x) / x0) ** 2 for x in levels]


def notches_at(moves: list[str], level: int) -> dict[str, int]:
    """Notches taken per unit after the first ``level`` moves."""
    out: dict[str, int] = {}
    for u in moves[: max(0, level)]:
        out[u] = out.get(u, 0) + 1
    return out


__all__ = ["ON_BUDGET", "Adaptive", "check_on_budget", "convex_costs", "ladder", "notches_at", "priced_ladder"]
