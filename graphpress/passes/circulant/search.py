"""Layer-wise block-size search: minimise sum_l Omega_l(b_l) subject to sum_l cost_l(b_l) <= budget.

PrivCirNet's observation: layers differ in how much block-circulance hurts them and in how
much it saves, so one block size for all layers wastes budget. For every eligible layer ``l``
(see :mod:`graphpress.passes.circulant.layers`) and every candidate block size ``b`` it fits:

* **Sensitivity** -- the second-order (diagonal Fisher) estimate of the loss increase of
  replacing ``W`` by its block-circulant projection ``W_b``::

      Omega_l(b) = sum F ⊙ (W - W_b)^2,        Omega_l(1) = 0

  ``F`` is the diagonal empirical Fisher of the weight on the graph's calibration batches
  (:func:`graphpress.passes.fisher.fisher_diagonal`; ``sensitivity="frobenius"`` uses ``F = 1``).
  ``W_b`` is the projection the ``block-circulant`` pass will apply (``method="fisher"``: the
  Fisher-weighted mean along each wrapped diagonal, which minimises exactly this quantity;
  ``"mean"``: the plain mean). Conv weights ``(C_out, C_in, kh, kw)`` are circulant over the
  channel dims at each kernel position: computed on ``W.permute(2, 3, 0, 1)``. Because Omega is an
  estimate of the loss increase (in the same units for every layer) the sum over layers is
  meaningful; no per-layer normalisation is applied.
* **Cost** -- ``cost_l(b)`` from a registered cost model (:mod:`graphpress.passes.circulant.cost`:
  ``he-analytic``, ``he-slots-bsgs``, ``params``, ``latency``).

Then one 0/1 integer program (multiple-choice knapsack, :func:`graphpress.passes.ilp.allocate`,
HiGHS through ``scipy.optimize.milp``)::

    minimise  sum_{l,b} Omega_l(b) x_{l,b}   s.t.  sum_b x_{l,b} = 1 per layer,
              sum_{l,b} cost_l(b) x_{l,b} <= budget,   x_{l,b} in {0, 1}

Budgets: ``uniform:K`` -- the cost of the assignment ``block-circulant`` makes with
``block_size=K`` (a layer takes K when it fits, else stays dense: ``cost_l(K if fits(K) else 1)``);
``fraction:F`` -- ``F * sum_l cost_l(1)`` (a fraction of the dense cost); ``absolute:X``.

Verification (``verify=True``, ``uniform:K`` budgets): the sum over layers is a first-order
model -- it ignores how the layers' errors interact. Before applying the ILP's choice the pass
measures the relative output noise of that choice and of the uniform assignment with all their
layers projected *at once* on the calibration batches, and keeps the quieter one
(``stats["verified"]``). Two forward passes over the calibration data; the cost never exceeds
the budget either way.

Guarantee: at a ``uniform:K`` budget the uniform assignment is feasible (K is added to the
candidates of every layer it fits), so the optimum's ``sum Omega`` is <= the uniform one's.

The decision is applied by the ``block-circulant`` projection pass (``blocks`` = the chosen size
of every layer). Lossy: ``exact = False``; the pipeline holds it to ``min_sqnr_db`` (default
0 dB: projection changes the model by design and fine-tuning recovers it) / ``max_kl``.

Budget misses (``on_budget``, :mod:`graphpress.passes.budget`). With ``"adapt"`` (default) the
pipeline backs a run that misses that budget off: each converted layer can halve its block size
one feasible size at a time down to dense, and the halvings are taken in the order that removes
the most sensitivity ``Omega`` (the plan's own per-layer, per-size values, not re-measured) per
unit of cost added -- the most sensitive layers first. A backed-off run reuses the first run's
plan (no Fisher, sensitivity or ILP again) and only re-projects. ``stats`` give
``asked_budget`` (spec and cost), ``achieved_cost``, ``blocks`` and ``backed_off_layers``
(``{layer: {"asked": b, "got": b'}}``); the achieved cost is then above the asked budget.
``"fail"``: a miss is an error.
"""

from __future__ import annotations

import copy
import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from graphpress.errors import PassError
from graphpress.ir.circulant import expand, project
from graphpress.ir.compare import relative_noise
from graphpress.ir.graph import Graph
from graphpress.passes.base import PassResult, make_pass, progress_iter, register
from graphpress.passes.budget import check_on_budget, notches_at, priced_ladder
from graphpress.passes.circulant.cost import get_cost_model
from graphpress.passes.circulant.layers import Layer, find_layers
from graphpress.passes.circulant.reconstruct import (
    DEFAULT_DAMP,
    input_moments,
    project_reconstruct,
)
from graphpress.passes.fisher import fisher_diagonal
from graphpress.passes.ilp import allocate
from graphpress.passes.select import Selector, check_selector

NAME = "circulant-search"
_BUDGET_HELP = "expected 'uniform:K' (K a power of two), 'fraction:F' (F > 0) or 'absolute:X' (X >= 0)"


@dataclass(frozen=True)
class Budget:
    """A parsed ``budget`` option: ``kind`` in ``uniform | fraction | absolute`` and its number."""

    kind: str
    amount: float

    @property
    def spec(self) -> str:
        return f"{self.kind}:{int(self.amount) if self.kind == 'uniform' else self.amount:g}"


def parse_budget(spec: str) -> Budget:
    """Parse ``"uniform:K"``, ``"fraction:F"`` or ``"absolute:X"``; anything else is a one-line PassError.

    Examples
    --------
    >>> parse_budget("uniform:4"), parse_budget("fraction:0.25"), parse_budget("absolute:1e6")
    (Budget(kind='uniform', amount=4.0), Budget(kind='fraction', amount=0.25), Budget(kind='absolute', amount=1000000.0))
    """
    where = f"pass '{NAME}': option 'budget'"
    if not isinstance(spec, str) or ":" not in spec:
        raise PassError(f"{where}: {spec!r} is not a budget; {_BUDGET_HELP}")
    kind, _, num = (s.strip() for s in spec.partition(":"))
    kind = kind.lower()
    if kind not in ("uniform", "fraction", "absolute"):
        close = difflib.get_close_matches(kind, ["uniform", "fraction", "absolute"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise PassError(f"{where}: unknown budget kind '{kind}' in {spec!r}{hint}; {_BUDGET_HELP}")
    try:
        value = float(num)
    except ValueError:
        raise PassError(f"{where}: {num!r} in {spec!r} is not a number; {_BUDGET_HELP}") from None
    if not math.isfinite(value):
        raise PassError(f"{where}: {spec!r} is not finite; {_BUDGET_HELP}")
    if kind == "uniform" and (value != int(value) or value < 1 or int(value) & (int(value) - 1)):
        raise PassError(f"{where}: block size in {spec!r} must be a power of two >= 1; {_BUDGET_HELP}")
    if kind == "fraction" and value <= 0:
        raise PassError(f"{where}: fraction in {spec!r} must be > 0; {_BUDGET_HELP}")
    if kind == "absolute" and value < 0:
        raise PassError(f"{where}: cost in {spec!r} must be >= 0; {_BUDGET_HELP}")
    return Budget(kind, value)


@dataclass
class SearchPlan:
    """What :meth:`CirculantSearch.plan` decided: the layers, ``{layer: b}`` and the stats."""

    layers: list[Layer]
    blocks: dict[str, int]
    stats: dict[str, Any]


@dataclass(frozen=True)
class CirculantSearchConfig:
    """Options of ``circulant-search`` (see ``docs/passes/circulant-search.md``).

    Attributes
    ----------
    budget : str
        ``"uniform:K"``, ``"fraction:F"`` or ``"absolute:X"`` (cost-model units).
    candidates : tuple of int
        Block sizes to consider (powers of two); each layer gets those it fits, plus 1.
    cost_model : str
        A name in :data:`graphpress.passes.circulant.cost.COST_MODELS`.
    poly_degree : int
        Polynomial degree N of the HE cost models.
    sensitivity : ``"fisher"`` | ``"frobenius"`` | ``"output"``
        ``"fisher"``/``"frobenius"``: the squared projection error weighted by the Fisher
        diagonal or by 1. ``"output"``: measured -- the relative output noise power on the
        calibration batches with only that layer projected (see module docstring).
    method : ``"fisher"`` | ``"mean"`` | ``"reconstruct"``
        Projection method, passed on to ``block-circulant`` and used for ``W_b``.
    damp : float
        Ridge of ``method="reconstruct"`` (passed on).
    verify : bool
        With a ``uniform:K`` budget, measure the ILP's assignment and the uniform one jointly on
        the calibration batches and keep the one with less output noise (see module docstring).
    fisher_micro_batch : int
        Samples per squared gradient of the Fisher (passed on too).
    targets, ignore : tuple of str
        Which eligible layers the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
        Layers left out are forced dense (passed on to ``block-circulant`` as given).
    skip : tuple of str
        Exact layer names forced dense (the older spelling of ``ignore``).
    min_sqnr_db, max_kl : float or None
        Pipeline budget of this lossy pass; 0 dB by default (see module docstring).
    on_budget : ``"adapt"`` | ``"fail"``
        On a miss of that budget, back the most sensitive layers off to smaller block sizes
        until it holds (``adapt``), or fail (see module docstring and
        :mod:`graphpress.passes.budget`).
    """

    version: int = 1
    budget: str = "uniform:4"
    candidates: tuple[int, ...] = (1, 2, 4, 8, 16)
    cost_model: str = "he-analytic"
    poly_degree: int = 8192
    sensitivity: Literal["fisher", "frobenius", "output"] = "fisher"
    method: Literal["fisher", "mean", "reconstruct"] = "fisher"
    fisher_micro_batch: int = 1
    damp: float = DEFAULT_DAMP
    verify: bool = True
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    min_sqnr_db: float | None = 0.0
    max_kl: float | None = None
    on_budget: Literal["adapt", "fail"] = "adapt"

    def __post_init__(self) -> None:
        check_on_budget(NAME, self.on_budget)
        check_selector(NAME, self)


def layer_sensitivity(
    w: torch.Tensor,
    b: int,
    *,
    projection_weights: torch.Tensor | None = None,
    score_weights: torch.Tensor | None = None,
) -> float:
    """``sum S ⊙ (W - W_b)^2`` with ``W_b`` the projection weighted by ``projection_weights``.

    Parameters
    ----------
    w : Tensor ``(..., m, n)``
        The weight as matrices (conv weights already permuted to ``(kh, kw, C_out, C_in)``).
    b : int
        Block size (1 gives 0).
    projection_weights : Tensor, optional
        ``F`` of a Fisher-weighted projection; None for the plain mean.
    score_weights : Tensor, optional
        ``S``; None for 1 (Frobenius). With ``S = F = projection_weights`` this is
        :func:`graphpress.ir.circulant.sensitivity`.
    """
    if b == 1:
        return 0.0
    wb = expand(project(w, b, projection_weights)).double()
    err = (w.double() - wb).pow(2)
    return float((err if score_weights is None else score_weights.double() * err).sum())


def _as_matrices(layer: Layer, t: torch.Tensor) -> torch.Tensor:
    return t.permute(2, 3, 0, 1) if layer.kind == "conv2d" else t


def _from_matrices(layer: Layer, t: torch.Tensor) -> torch.Tensor:
    return t.permute(2, 3, 0, 1) if layer.kind == "conv2d" else t


def output_sensitivities(
    graph: Graph,
    layers: list[Layer],
    feasible: dict[str, list[int]],
    projected: Callable[[Layer, int], torch.Tensor],
) -> dict[str, dict[int, float]]:
    """Measured ``Omega_l(b)``: relative output noise power with only layer ``l`` projected.

    ``Omega_l(b) = sum ||y_b - y||^2 / sum ||y||^2`` over the calibration batches and the
    graph's floating outputs, where ``y_b`` are the outputs with ``W_l`` replaced by
    ``projected(l, b)`` (the dense block-circulant weight of the configured projection method) and
    every other weight untouched. Small independent perturbations add in output noise power to
    first order, which is what makes the ILP's sum over layers meaningful. The projection is
    swapped in for the weight (:meth:`~graphpress.ir.graph.Graph.swap_tensors`): the weight
    itself, which the pipeline's snapshot shares, is never written.
    """
    batches = graph.calibration_batches()
    with torch.no_grad():
        refs = [graph.run(*batch) for batch in batches]
        out: dict[str, dict[int, float]] = {}
        for layer in progress_iter(layers):
            out[layer.name] = {1: 0.0}
            sizes = [b for b in feasible[layer.name] if b > 1]
            if not sizes:
                continue
            for b in sizes:
                with graph.swap_tensors({layer.weight_target: projected(layer, b)}):
                    out[layer.name][b] = relative_noise(refs, [graph.run(*batch) for batch in batches])
    return out


def joint_output_noise(
    graph: Graph, layers: list[Layer], blocks: dict[str, int], projected: Callable[[Layer, int], torch.Tensor]
) -> float:
    """Relative output noise power ``sum ||y_B - y||^2 / sum ||y||^2`` on the calibration batches
    with *every* layer at its block size in ``blocks`` at once (weights restored afterwards)."""
    batches = graph.calibration_batches()
    todo = [(l, blocks[l.name]) for l in layers if blocks.get(l.name, 1) > 1]
    with torch.no_grad():
        refs = [graph.run(*batch) for batch in batches]
        swapped: dict[str, torch.Tensor] = {}
        for layer, b in todo:
            swapped.setdefault(layer.weight_target, projected(layer, b))
        with graph.swap_tensors(swapped):
            noise = relative_noise(refs, [graph.run(*batch) for batch in batches])
    return noise


@register(NAME)
class CirculantSearch:
    """Choose a block size per layer by ILP, then apply ``block-circulant`` (see module docstring)."""

    exact = False
    Config = CirculantSearchConfig

    def __init__(self, config: CirculantSearchConfig = CirculantSearchConfig()):
        self.config = config
        # layers forced dense: the skip names until plan() resolves targets / ignore on a graph
        self._left_out: frozenset[str] = frozenset(config.skip)
        # configuration errors surface when the pass is built (recipe load), not mid-pipeline
        self.budget = parse_budget(config.budget)
        self.cost_model = get_cost_model(config.cost_model, owner=NAME)
        bad = [b for b in config.candidates if not isinstance(b, int) or b < 1 or b & (b - 1)]
        if bad or not config.candidates:
            raise PassError(f"pass '{NAME}': option 'candidates': {list(config.candidates)!r} must be powers of two >= 1")
        if not isinstance(config.damp, (int, float)) or not config.damp > 0:
            raise PassError(f"pass '{NAME}': option 'damp' must be > 0, got {config.damp!r}")
        if config.fisher_micro_batch < 1:
            raise PassError(f"pass '{NAME}': option 'fisher_micro_batch' must be >= 1, got {config.fisher_micro_batch}")
        if config.poly_degree < 2 or config.poly_degree & (config.poly_degree - 1):
            raise PassError(f"pass '{NAME}': option 'poly_degree': {config.poly_degree} is not a power of two >= 2")
        # The last full run's plan and back-off ladder, shared with its back-off copies (budget.py).
        self._state: dict[str, Any] | None = None
        self._level = 0

    # ------------------------------------------------------------------ backing off
    def adapt_levels(self) -> int:
        """Block-size halvings the last run's converted layers can give back (0 before a run)."""
        return len(self._state["moves"]) if self._state else 0

    def back_off(self, level: int) -> "CirculantSearch":
        """This pass with the first ``level`` halvings of its ladder applied (the plan is reused)."""
        other = CirculantSearch(self.config)
        other._state, other._level = self._state, int(level)
        return other

    def achieved(self, stats: dict[str, Any]) -> str:
        asked = stats.get("asked_budget") or {"spec": self.budget.spec, "cost": stats.get("budget", {}).get("value", math.nan)}
        cost = stats.get("achieved_cost", stats.get("cost", math.nan))
        return f"cost {cost:.4g} (budget {asked['spec']} = {asked['cost']:.4g} {self.cost_model.unit})"

    def advice(self) -> str:
        b = self.budget
        if b.kind == "uniform":
            return f"lower K in budget '{b.spec}'"
        return f"raise the {'fraction' if b.kind == 'fraction' else 'cost'} in budget '{b.spec}'"

    def _ladder(self, plan_stats: dict[str, Any], applied: dict[str, int]) -> dict[str, Any]:
        """The back-off ladder of a first run: each converted layer halves its block size one
        feasible size at a time down to dense; a halving's cost to the budget is the drop in the
        layer's sensitivity Ω (the plan's own, not re-measured) and its price the HE cost it adds,
        so the most sensitive layers per unit of cost go first (:func:`~graphpress.passes.budget.priced_ladder`)."""
        rows = plan_stats["layers"]
        notches: dict[str, list[int]] = {}
        omegas: dict[str, list[float]] = {}
        prices: dict[str, list[float]] = {}
        for name, b0 in applied.items():
            steps = [b for b in sorted(rows[name]["feasible"], reverse=True) if b <= b0]
            if b0 <= 1 or len(steps) < 2:
                continue
            notches[name] = steps
            omegas[name] = [rows[name]["sensitivities"][b] for b in steps]
            prices[name] = [rows[name]["costs"][lo] - rows[name]["costs"][hi] for hi, lo in zip(steps, steps[1:])]
        return {"blocks": dict(applied), "notches": notches, "moves": priced_ladder(omegas, prices), "stats": plan_stats}

    def _backed_off_blocks(self) -> dict[str, int]:
        state = self._state
        taken = notches_at(state["moves"], self._level)
        return {n: (state["notches"][n][taken.get(n, 0)] if n in state["notches"] else b) for n, b in state["blocks"].items()}

    # ------------------------------------------------------------------ pieces
    def candidates_for(self, layer: Layer) -> list[int]:
        """Feasible block sizes of ``layer`` (1 only when skipped; K added for a uniform:K budget)."""
        if layer.name in self._left_out:
            return [1]
        cands = tuple(self.config.candidates)
        if self.budget.kind == "uniform":
            cands = cands + (int(self.budget.amount),)
        return layer.feasible(cands)

    def uniform_block(self, layer: Layer, k: int) -> int:
        """Block size ``block-circulant`` with ``block_size=k`` gives ``layer``: k if it fits, else 1."""
        return k if layer.name not in self._left_out and layer.fits(k) else 1

    def cost(self, layer: Layer, b: int) -> float:
        """``cost_l(b)`` under the configured cost model (HE models read ``poly_degree``)."""
        return self.cost_model(layer, b, poly_degree=self.config.poly_degree)

    def sensitivities(
        self, graph: Graph, layers: list[Layer], feasible: dict[str, list[int]]
    ) -> tuple[dict[str, dict[int, float]], float, Callable[[Layer, int], torch.Tensor]]:
        """``{layer: {b: Omega_l(b)}}``, the seconds spent on the Fisher, and the projector
        ``(layer, b) -> dense W_b`` the sensitivities used."""
        cfg = self.config
        searched = [l for l in layers if len(feasible[l.name]) > 1]
        fisher: dict[str, torch.Tensor] = {}
        t0 = time.perf_counter()
        if searched and (cfg.sensitivity == "fisher" or cfg.method == "fisher"):
            targets = sorted({l.weight_target for l in searched})
            fisher = fisher_diagonal(graph, targets, micro_batch=cfg.fisher_micro_batch)
        t_fisher = time.perf_counter() - t0
        moments = input_moments(graph, searched) if searched and cfg.method == "reconstruct" else {}

        def projected(layer: Layer, b: int) -> torch.Tensor:
            """Dense ``W_b`` (in the layer's own weight layout) of the configured projection."""
            w = graph.get_tensor(layer.weight_target).detach()
            if cfg.method == "reconstruct":
                c = project_reconstruct(layer, w, b, moments[layer.weight_target], cfg.damp)
            else:
                f = fisher.get(layer.weight_target) if cfg.method == "fisher" else None
                c = project(_as_matrices(layer, w), b, None if f is None else _as_matrices(layer, f))
            return _from_matrices(layer, expand(c)).to(w.dtype)

        if cfg.sensitivity == "output":
            return output_sensitivities(graph, layers, feasible, projected), t_fisher, projected
        out: dict[str, dict[int, float]] = {}
        for layer in layers:
            w = graph.get_tensor(layer.weight_target).detach().double()
            f = fisher.get(layer.weight_target) if cfg.sensitivity == "fisher" else None
            out[layer.name] = {}
            for b in feasible[layer.name]:
                err = (w - projected(layer, b).double()).pow(2) if b > 1 else None
                out[layer.name][b] = 0.0 if err is None else float((err if f is None else f.double() * err).sum())
        return out, t_fisher, projected

    def budget_value(self, layers: list[Layer], costs: dict[str, dict[int, float]]) -> tuple[float, float, float | None]:
        """``(budget, dense cost, uniform cost or None)`` in cost-model units."""
        dense = math.fsum(costs[l.name][1] for l in layers)
        kind, amount = self.budget.kind, self.budget.amount
        if kind == "uniform":
            k = int(amount)
            uniform = math.fsum(costs[l.name][self.uniform_block(l, k)] for l in layers)
            return uniform, dense, uniform
        if kind == "fraction":
            return amount * dense, dense, None
        return amount, dense, None

    # ------------------------------------------------------------------ run
    def plan(self, graph: Graph) -> SearchPlan:
        """Layers, Fisher, sensitivities, costs, budget and the ILP's choice -- without applying it.

        The graph is not modified (the Fisher's gradient flags are restored).
        """
        cfg = self.config
        t_all = time.perf_counter()
        layers, rejected = find_layers(graph)
        selection = Selector.of(NAME, cfg).resolve({l.name: l.node for l in layers}, rejected)
        self._left_out = frozenset(l.name for l in layers if not selection.selects(l.name, l.node))

        feasible = {l.name: self.candidates_for(l) for l in layers}
        t0 = time.perf_counter()
        costs = {l.name: {b: self.cost(l, b) for b in feasible[l.name]} for l in layers}
        t_cost = time.perf_counter() - t0
        t0 = time.perf_counter()
        omegas, t_fisher, projected = self.sensitivities(graph, layers, feasible)
        t_sens = time.perf_counter() - t0 - t_fisher
        budget, dense_cost, uniform_cost = self.budget_value(layers, costs)

        items = [[(b, omegas[l.name][b], costs[l.name][b]) for b in feasible[l.name]] for l in layers]
        alloc = allocate(items, budget, what=f"pass '{NAME}': option 'budget': '{self.budget.spec}' =")
        chosen = {l.name: int(b) for l, b in zip(layers, alloc.choice)}
        total_cost = alloc.cost
        verified: dict[str, Any] | None = None
        if cfg.verify and uniform_cost is not None:
            # The ILP adds per-layer sensitivities, a first-order model; before trusting it, measure
            # the ILP's choice and the uniform assignment *jointly* on the calibration batches and
            # keep the one with less output noise (same or lower cost either way).
            ub = {l.name: self.uniform_block(l, int(self.budget.amount)) for l in layers}
            if ub != chosen:
                t0 = time.perf_counter()
                noise = {key: joint_output_noise(graph, layers, blocks, projected) for key, blocks in (("ilp", chosen), ("uniform", ub))}
                keep = "uniform" if noise["uniform"] < noise["ilp"] else "ilp"
                verified = {"output_noise": noise, "kept": keep, "time_s": round(time.perf_counter() - t0, 4)}
                if keep == "uniform":
                    chosen, total_cost = ub, uniform_cost

        table: dict[str, dict[str, Any]] = {}
        for layer in layers:
            b = chosen[layer.name]
            table[layer.name] = {
                "kind": layer.kind,
                "shape": [layer.out_features, layer.in_features, *layer.kernel],
                "b": b,
                "cost": costs[layer.name][b],
                "sensitivity": omegas[layer.name][b],
                "feasible": feasible[layer.name],
                "costs": dict(costs[layer.name]),
                "sensitivities": dict(omegas[layer.name]),
                **({"skipped": True} if layer.name in self._left_out else {}),
            }
        stats: dict[str, Any] = {
            "budget": {"spec": self.budget.spec, "value": budget},
            "cost_model": {"name": self.cost_model.name, "unit": self.cost_model.unit, "describe": self.cost_model.describe},
            "cost": total_cost,
            "dense_cost": dense_cost,
            "objective": math.fsum(omegas[l.name][chosen[l.name]] for l in layers),
            "ilp_objective": alloc.value,
            "ilp_blocks": {l.name: int(b) for l, b in zip(layers, alloc.choice)},
            "blocks": chosen,
            "converted": sum(1 for b in chosen.values() if b > 1),
            "solver": {"status": alloc.status, "time_s": round(alloc.time_s, 4), **alloc.stats},
            "layers": table,
            "rejected": dict(rejected),
        }
        if uniform_cost is not None:
            k = int(self.budget.amount)
            ub = {l.name: self.uniform_block(l, k) for l in layers}
            stats["uniform_cost"] = uniform_cost
            stats["uniform_objective"] = math.fsum(omegas[n][b] for n, b in ub.items())
            stats["uniform_blocks"] = ub
        if verified is not None:
            stats["verified"] = verified
        stats["time_s"] = {
            "fisher": round(t_fisher, 4),
            "sensitivity": round(t_sens, 4),
            "cost": round(t_cost, 4),
            "solve": round(alloc.time_s, 4),
            "search": round(time.perf_counter() - t_all, 4),
        }
        return SearchPlan(layers, chosen, stats)

    def __call__(self, graph: Graph) -> PassResult:
        if self._level > 0 and self._state is not None:
            return self._run_backed_off(graph)
        plan = self.plan(graph)
        first = copy.deepcopy(plan.stats)  # before the projection adds to it
        result = self._apply(graph, plan)
        stats = result.stats
        stats["asked_budget"] = {"spec": self.budget.spec, "cost": stats["budget"]["value"]}
        stats["achieved_cost"] = stats.get("applied_cost", stats["cost"])
        stats["backed_off_layers"] = {}
        applied = {n: (1 if n in stats.get("not_applied", {}) else b) for n, b in plan.blocks.items()}
        self._state = self._ladder(first, applied)
        return result

    def _run_backed_off(self, graph: Graph) -> PassResult:
        """Apply the first run's assignment with ``self._level`` halvings of the ladder, on the
        graph from before the pass (the pipeline's clone): no sensitivity or ILP is re-run."""
        state = self._state
        blocks = self._backed_off_blocks()
        stats = copy.deepcopy(state["stats"])
        layers, _ = find_layers(graph)
        missing = sorted(set(blocks) - {l.name for l in layers})
        if missing:
            raise PassError(f"pass '{NAME}': backing off: layer '{missing[0]}' of the first run is not in this graph; run the pass on the graph it planned")
        layers = [l for l in layers if l.name in blocks]
        for name, b in blocks.items():
            row = stats["layers"][name]
            row.update(b=b, cost=row["costs"][b], sensitivity=row["sensitivities"][b])
        stats["blocks"] = dict(blocks)
        stats["cost"] = math.fsum(stats["layers"][n]["cost"] for n in blocks)
        stats["objective"] = math.fsum(stats["layers"][n]["sensitivity"] for n in blocks)
        stats["converted"] = sum(1 for b in blocks.values() if b > 1)
        result = self._apply(graph, SearchPlan(layers, blocks, stats))
        stats = result.stats
        asked = state["blocks"]
        stats["asked_budget"] = {"spec": self.budget.spec, "cost": stats["budget"]["value"]}
        stats["achieved_cost"] = stats.get("applied_cost", stats["cost"])
        stats["backed_off_layers"] = {n: {"asked": asked[n], "got": b} for n, b in blocks.items() if b < asked[n]}
        return result

    def _apply(self, graph: Graph, plan: SearchPlan) -> PassResult:
        """Project ``plan.blocks`` with ``block-circulant``, complete the stats, annotate the nodes."""
        t0 = time.perf_counter()
        projection = self._project(graph, plan.blocks)
        graph = projection.graph
        stats = plan.stats
        stats["time_s"]["projection"] = round(time.perf_counter() - t0, 4)
        stats["projection"] = dict(projection.stats)
        # The projection may refuse a layer the search chose (e.g. an asymmetric 'same' padding):
        # say so, and report the cost of what was actually applied.
        applied = projection.stats.get("blocks")
        if isinstance(applied, dict):
            kept = projection.stats.get("kept_dense", {})
            missed = {n: kept.get(n, "kept dense by block-circulant") for n, b in plan.blocks.items() if b > 1 and applied.get(n, b) != b}
            if missed:
                stats["not_applied"] = missed
                stats["applied_cost"] = math.fsum(
                    row["costs"][1] if n in missed else row["cost"] for n, row in stats["layers"].items()
                )
        self._annotate(graph, plan.layers, stats["layers"], stats)
        return PassResult(graph, changed=bool(projection.changed), stats=stats)

    def _project(self, graph: Graph, chosen: dict[str, int]) -> PassResult:
        """Apply the decision with the ``block-circulant`` pass (every layer listed, 1 = dense)."""
        import graphpress.passes.circulant.projection  # noqa: F401 -- registers block-circulant

        cfg = self.config
        return make_pass(
            "block-circulant",
            {"blocks": dict(chosen), "method": cfg.method, "fisher_micro_batch": cfg.fisher_micro_batch, "damp": cfg.damp,
             "skip": list(cfg.skip), "targets": list(cfg.targets), "ignore": list(cfg.ignore)},
        )(graph)

    def _annotate(self, graph: Graph, layers: list[Layer], table: dict[str, dict[str, Any]], stats: dict[str, Any]) -> None:
        """``annotations(node)["circulant_search"]`` on each layer's node in the result graph."""
        by_name = {l.name: l for l in layers}

        def info(name: str) -> dict[str, Any]:
            row = table[name]
            return {
                "b": row["b"],
                "cost": row["cost"],
                "sensitivity": row["sensitivity"],
                "budget": stats["budget"]["spec"],
                "cost_model": stats["cost_model"]["name"],
            }

        done: set[str] = set()
        # converted layers: the projection's graphpress::circulant_* nodes (annotated with their
        # layer name by block-circulant; the source module name as a fallback)
        for node in graph.call_nodes():
            if "circulant" not in str(node.target) and "circulant" not in graph.annotations(node):
                continue
            name = _layer_name_of(graph, node, by_name)
            if name is not None and name not in done:
                graph.annotations(node)["circulant_search"] = info(name)
                done.add(name)
        # dense layers whose node is still in the graph
        for layer in layers:
            if layer.name not in done and layer.node.graph is graph.gm.graph and not getattr(layer.node, "_erased", False):
                graph.annotations(layer.node)["circulant_search"] = info(layer.name)


def _layer_name_of(graph: Graph, node, by_name: dict[str, Layer]) -> str | None:
    ann = graph.annotations(node)
    entry = ann.get("circulant")
    if isinstance(entry, dict) and entry.get("layer") in by_name:
        return entry["layer"]
    module = graph.source_module(node)
    return module if module in by_name else None


__all__ = [
    "Budget",
    "CirculantSearch",
    "CirculantSearchConfig",
    "SearchPlan",
    "joint_output_noise",
    "layer_sensitivity",
    "output_sensitivities",
    "parse_budget",
]
