"""The verified pass pipeline.

Contract (see docs/pipeline.md):

* ``verify()`` the input graph, then record reference outputs on the example inputs plus
  ``random_inputs`` seeded random inputs (at another batch size when the batch is dynamic).
* After every pass: structural ``verify()``; numeric comparison with the *previous* graph --
  exact passes must be allclose with dtype-aware tolerance (:func:`graphpress.ir.compare.tolerance`),
  lossy passes must meet the budget their config declares (``min_sqnr_db``, ``max_kl``; every
  lossy pass has an explicit default, there is no hidden one) -- and a cumulative comparison with
  the original, recorded for the report.
* A lossy pass that misses its budget and whose config says ``on_budget: adapt`` is backed off on
  its most sensitive layers and re-run on the graph from before it, bisecting how far
  (:mod:`graphpress.passes.budget`); its stats then say what it achieved against what was asked.
* A failure raises one :class:`VerificationError` naming the pass, its step, the passes before
  it, the output that diverged and the first graph node whose value diverged; a budget miss also
  names the best value reached and the option to change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from graphpress.errors import GraphpressError, PassError, VerificationError
from graphpress.ir.compare import OutputDiff, compare_outputs, identical, kl_divergence, same_nonfinite, self_diffs, sqnr_db
from graphpress.ir.cone import cone_key
from graphpress.ir.graph import Graph
from graphpress.ir.memory import trim
from graphpress.passes.base import Pass, config_to_dict, make_pass
from graphpress.passes.budget import Adaptive
from graphpress.passes.instruments import PassInstrument, Progress, default_instruments, first_divergence



@dataclass
class StepRecord:
    """What one pass did, how long it took and what it cost in accuracy."""

    name: str
    config: dict[str, Any]
    exact: bool
    changed: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0
    params_before: int = 0
    params_after: int = 0
    step: list[OutputDiff] = field(default_factory=list)
    cumulative: list[OutputDiff] = field(default_factory=list)
    kl: float | None = None
    error: str | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    # "run": the outputs were computed and compared; "same computation": the pass left every
    # call the outputs depend on as it was (ir.cone), so they are the graph before's, bit for bit
    verified_by: str = "run"

    @property
    def worst_step_sqnr_db(self) -> float:
        return min((d.sqnr_db for d in self.step), default=math.inf)

    @property
    def worst_cumulative_max_abs(self) -> float:
        return max((d.max_abs for d in self.cumulative), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "exact": self.exact,
            "changed": self.changed,
            "stats": self.stats,
            "time_s": round(self.time_s, 4),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "step": [d.to_dict() for d in self.step],
            "cumulative": [d.to_dict() for d in self.cumulative],
            "kl": self.kl,
            "error": self.error,
            "memory": self.memory,
            "verified_by": self.verified_by,
        }


@dataclass
class PipelineReport:
    """The final graph plus a record per pass."""

    graph: Graph
    steps: list[StepRecord]
    params_before: int
    params_after: int
    time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "time_s": round(self.time_s, 4),
            "passes": [s.to_dict() for s in self.steps],
        }


Event = Callable[[str, int, int, "StepRecord | None"], None]


class Pipeline:
    """Run passes in order with verification after each.

    Parameters
    ----------
    passes : sequence
        Pass instances, names, or ``(name, config_dict)`` pairs.
    random_inputs : int
        Seeded random input sets checked besides the example inputs.
    seed : int
        Seed of the random inputs.
    name : str
        Recipe name for the report.
    instruments : sequence of PassInstrument
        Run around every pass after the default ones (timing, memory, failure diagnosis); see
        :mod:`graphpress.passes.instruments`.

    Examples
    --------
    >>> pipe = Pipeline(["fold-batchnorm", ("eliminate-dead-code", {})])
    >>> report = pipe.run(graph)          # doctest: +SKIP
    >>> report.graph, report.steps[0].stats  # doctest: +SKIP
    """

    def __init__(self, passes: Sequence[Pass | str | tuple[str, dict]], *, random_inputs: int = 2, seed: int = 0, name: str = "custom",
                 instruments: Sequence[PassInstrument] = ()):
        self.passes: list[Pass] = []
        for p in passes:
            if isinstance(p, str):
                p = make_pass(p)
            elif isinstance(p, tuple):
                p = make_pass(p[0], p[1])
            if not p.exact:
                budget_of(p)  # a lossy pass without a budget is refused before any work
            self.passes.append(p)
        self.random_inputs = random_inputs
        self.seed = seed
        self.name = name
        self.instruments = list(instruments)

    @classmethod
    def from_recipe(cls, recipe) -> "Pipeline":
        """Build from a :class:`~graphpress.passes.recipes.Recipe`, a recipe dict, a YAML path or a built-in name."""
        from graphpress.passes.recipes import Recipe, load_recipe

        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
        return cls(
            [(name, cfg) for name, cfg in recipe.passes],
            random_inputs=recipe.random_inputs,
            seed=recipe.seed,
            name=recipe.name,
        )

    def to_recipe_dict(self) -> dict[str, Any]:
        """The recipe as run, with every config option spelled out."""
        return {
            "name": self.name,
            "passes": [{p.name: config_to_dict(p.config)} for p in self.passes],
            "verify": {"random_inputs": self.random_inputs, "seed": self.seed},
        }

    # ------------------------------------------------------------------ run
    def check_inputs(self, graph: Graph) -> list[tuple[torch.Tensor, ...]]:
        """Example inputs plus seeded random ones (another batch size when it is dynamic)."""
        sets = [graph.example_inputs]
        batch = graph.example_inputs[0].shape[0] if graph.example_inputs and graph.example_inputs[0].dim() else None
        for i in range(self.random_inputs):
            other = (batch + 1 + i) if (graph.dynamic_batch and batch) else None
            sets.append(graph.random_inputs(self.seed + i, batch=other))
        return sets

    def run(self, graph: Graph, *, on_event: Event | None = None) -> PipelineReport:
        """Run every pass; the input graph is never modified.

        Memory: a pass runs on a :meth:`~graphpress.ir.graph.Graph.snapshot` of the graph before
        it (the structure copied, every tensor shared), so a pass that replaces a weight keeps
        the old one alive only until it is verified, and an exact pass copies no weight at all.
        A pass must *replace* tensors, never write into them, unless it declares
        ``writes_in_place = True`` (it then runs on a deep copy); a pass that wrote into a shared
        tensor without declaring it is stopped with an error naming the tensor.

        ``on_event(kind, index, total, record)`` is called with kind ``"start"`` before and
        ``"end"`` after each pass (the CLI drives its progress bar with it).
        """
        t_all = time.perf_counter()
        try:
            graph.verify()
        except VerificationError as err:
            raise VerificationError(f"input graph failed verification before any pass: {err}") from None
        inputs = self.check_inputs(graph)
        instruments = default_instruments() + self.instruments + ([Progress(on_event)] if on_event else [])
        for ins in instruments:
            ins.run_start(graph, self.passes)
        original = run_sets(graph, inputs)
        previous_outputs = original
        current_cone = cone_key(graph)
        current = graph  # each pass runs on a copy (_work_copy): the caller's graph is never changed
        steps: list[StepRecord] = []
        params0 = graph.parameter_count()
        total = len(self.passes)
        for i, p in enumerate(self.passes):
            record = StepRecord(p.name, config_to_dict(p.config), bool(p.exact), params_before=current.parameter_count())
            for ins in instruments:
                ins.pass_start(i, p, current, record)
            where = _where(p.name, i, total, [s.name for s in steps])
            previous_cumulative = steps[-1].cumulative if steps else None
            first = self._attempt(p, current, where, inputs, previous_outputs, original, previous_cumulative, current_cone)
            chosen = first
            if first.problem and not p.exact and _adapts(p):
                chosen = self._back_off(p, current, where, inputs, previous_outputs, original, first, previous_cumulative,
                                        current_cone)
            record.changed, record.stats = chosen.changed, chosen.stats
            record.step, record.cumulative, record.kl = chosen.step, chosen.cumulative, chosen.kl
            record.verified_by = chosen.verified_by
            record.params_after = chosen.graph.parameter_count()
            if chosen.problem:
                record.error = chosen.problem
                notes = [n for ins in instruments if (n := ins.pass_failed(i, p, current, chosen.graph, record))]
                at = "".join(f"; {n}" for n in notes)
                # the first try's miss (at what was asked), then what backing off reached
                raise VerificationError(f"{where} broke the model: {first.problem}{_advice(p, first, chosen)}{at}")
            for a in chosen.siblings:
                a.graph.release()
            if current is not graph:
                current.release()  # a snapshot: the tensors the pass replaced go now, not at the next gc
            trim()
            current, current_cone = chosen.graph, chosen.cone
            previous_outputs = chosen.outputs
            steps.append(record)
            for ins in instruments:
                ins.pass_end(i, p, current, record)
        if current is graph:  # no pass ran: the report's graph is still not the caller's object
            current = graph.snapshot()
        report = PipelineReport(current, steps, params0, current.parameter_count(), time.perf_counter() - t_all)
        for ins in instruments:
            ins.run_end(report)
        return report

    @staticmethod
    def _work_copy(p: Pass, graph: Graph) -> Graph:
        """What pass ``p`` runs on: a snapshot sharing the tensors of ``graph``, or a deep copy
        for a pass that declares it writes tensors in place."""
        return graph.clone() if getattr(p, "writes_in_place", False) else graph.snapshot()

    def _attempt(self, p: Pass, before: Graph, where: str, inputs: list, previous: list, original: list,
                 previous_cumulative: list[OutputDiff] | None = None, before_cone: tuple | None = None) -> "_Attempt":
        """Run ``p`` on a work copy of ``before`` (:meth:`_work_copy`), check that ``before``
        is intact, verify the structure, compare the outputs with the previous graph and the
        original (``previous_cumulative``: the previous step's figures against the original,
        None before the first pass), and judge the budget. ``before_cone`` is
        :func:`~graphpress.ir.cone.cone_key` of ``before`` (None: cannot tell)."""
        graph = self._work_copy(p, before)
        try:
            result = p(graph)
        except GraphpressError as err:
            raise type(err)(f"{where} failed: {err}") from err
        except Exception as err:  # noqa: BLE001 -- a bug in a pass must still name the pass
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise PassError(f"{where} failed: {type(err).__name__}: {msg[:300]}") from err
        trim()  # the pass's temporaries, before the verification runs allocate theirs
        written = graph.written_in_place(forget=True)
        if written:
            more = f" and {len(written) - 1} more" if len(written) > 1 else ""
            raise PassError(
                f"{where} wrote into tensor '{written[0]}'{more} in place, which the graph before it shares: replace tensors "
                f"with graph.set_tensor / measure with graph.swap_tensors, or declare writes_in_place = True on the pass class"
            )
        out = result.graph
        # a pass that left the computation of the outputs as it was (dead code removed, nodes
        # renamed) is proven exact by structure: the graph before's outputs are its own, and
        # the nodes they depend on are the verified graph's, so only lint and specs are checked
        key = cone_key(out)
        same = key is not None and key == before_cone
        try:
            out.verify(propagate=not same)
        except VerificationError as err:
            raise VerificationError(f"{where} produced an invalid graph: {err}") from None
        outputs = previous if same else run_sets(out, inputs)
        if not same:
            trim()  # the forward's activations and dequantized weights, before the comparisons allocate theirs
        if same or all(identical(r, o) for r, o in zip(previous, outputs)):
            # bitwise what the graph before gave (an exact rewrite usually): its outputs and its
            # cumulative figures stand, and the new copies go at once
            outputs = previous
            step = _merge_diffs([self_diffs(r, out.output_names) for r in previous])
            cumulative = previous_cumulative if previous_cumulative is not None else step
            kl = None if p.exact else 0.0
        else:
            step = _merge_diffs([compare_outputs(r, o, out.output_names) for r, o in zip(previous, outputs)])
            # while every pass so far left the outputs bitwise as they were, the graph before
            # this pass gave the original's outputs: the step is the cumulative figure
            cumulative = step if previous is original else _merge_diffs(
                [compare_outputs(r, o, out.output_names) for r, o in zip(original, outputs)])
            kl = None if p.exact else _logits_kl(previous, outputs)
        attempt = _Attempt(out, bool(result.changed), dict(result.stats), step, cumulative, kl, outputs,
                           verified_by="same computation" if same else "run", cone=key)
        attempt.problem = self._judge(p, step, kl)
        return attempt

    def _back_off(self, p: Pass, before: Graph, where: str, inputs: list, previous: list, original: list, first: "_Attempt",
                  previous_cumulative: list[OutputDiff] | None = None, before_cone: tuple | None = None) -> "_Attempt":
        """Bisect the pass's back-off level (see :mod:`graphpress.passes.budget`) on clones of
        ``before``; the passing attempt with the fewest moves, or the best failing one."""
        levels = int(p.adapt_levels())
        tries = [first]
        first.level = 0
        if levels <= 0:
            return first

        def run(level: int) -> _Attempt:
            a = self._attempt(p.back_off(level), before, where, inputs, previous, original, previous_cumulative, before_cone)
            a.level = level
            tries.append(a)
            return a

        # Gallop up (1, 4, 16, ... moves, then all of them) to the first level that passes -- a
        # target only a little too ambitious is met in one or two tries -- then bisect below it.
        lo, level, hi = 0, 1, None
        while hi is None:
            a = run(min(level, levels))
            if a.problem is None:
                hi = a
            elif a.level >= levels:
                break
            else:
                lo, level = a.level, a.level * 4
        if hi is not None:
            while hi.level - lo > 1:
                a = run((lo + hi.level) // 2)
                if a.problem is None:
                    hi = a
                else:
                    lo = a.level
            chosen = hi
        else:
            chosen = max(tries, key=lambda a: a.quality(p))
        chosen.stats["on_budget"] = {
            "mode": "adapt",
            "met": chosen.problem is None,
            "backed_off_moves": chosen.level,
            "moves_available": levels,
            "first_try": first.problem,
            "tries": [{"moves": a.level, "sqnr_db": _round(a.worst_sqnr), "kl": _round(a.kl)} for a in tries],
        }
        chosen.tried = len(tries)
        chosen.siblings = [a for a in tries if a is not chosen]
        return chosen

    @staticmethod
    def _judge(p: Pass, step: list[OutputDiff], kl: float | None) -> str | None:
        if p.exact:
            for d in step:
                if not d.within_tol:
                    return (
                        f"output '{d.name}' max abs error {d.max_abs:.3g} exceeds the exact-pass tolerance "
                        f"(atol {d.atol:.3g}, rtol {d.rtol:.3g})"
                    )
            return None
        floor, max_kl = budget_of(p)
        if floor is not None:
            for d in step:
                if d.sqnr_db < floor:
                    return f"output '{d.name}' SQNR {d.sqnr_db:.1f} dB is below the pass budget min_sqnr_db={floor}"
        if max_kl is not None and kl is not None:
            # NaN compares false with everything: it must fail the budget, not pass it
            if math.isnan(kl):
                return f"KL divergence is NaN (the logits have a NaN or Inf the graph before the pass does not) and fails the pass budget max_kl={max_kl}"
            if kl > max_kl:
                return f"KL divergence {kl:.4g} nats exceeds the pass budget max_kl={max_kl}"
        return None


@dataclass
class _Attempt:
    """One run of a pass (the first, or a backed-off one) and how it measured."""

    graph: Graph
    changed: bool
    stats: dict[str, Any]
    step: list[OutputDiff]
    cumulative: list[OutputDiff]
    kl: float | None
    outputs: list[tuple[torch.Tensor, ...]]
    problem: str | None = None
    verified_by: str = "run"
    cone: tuple | None = None  # cone_key of graph
    level: int = 0
    tried: int = 1
    siblings: list["_Attempt"] = field(default_factory=list)  # the other tries, released once one is kept

    @property
    def worst_sqnr(self) -> float:
        return min((d.sqnr_db for d in self.step), default=math.inf)

    def quality(self, p: Pass) -> tuple[float, float]:
        """Higher is closer to the budget: SQNR first when the pass has a floor, else -KL (a NaN
        KL is the worst)."""
        floor, _ = budget_of(p)
        kl = (-math.inf if math.isnan(self.kl) else -self.kl) if self.kl is not None else 0.0
        return (self.worst_sqnr, kl) if floor is not None else (kl, self.worst_sqnr)


def run_sets(graph: Graph, sets: Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """The graph's outputs on each input set, from one run on the sets stacked along the batch
    when that is possible: the batch is dynamic, every input and every output is batch-major,
    and the sets agree on every other dimension. One forward of a large model reads its
    weights once instead of once per set. Otherwise one run per set."""
    batch = graph.dynamic_dims.get(0)
    stackable = (
        len(sets) > 1 and batch is not None
        and all(spec.shape and spec.shape[0] == batch for spec in graph.input_specs + graph.output_specs)
        and all(len(s) == len(sets[0]) for s in sets)
        and all(isinstance(x, torch.Tensor) and x.dim() and x.dtype == sets[0][i].dtype and x.shape[1:] == sets[0][i].shape[1:]
                for s in sets for i, x in enumerate(s))
    )
    if not stackable:
        return [graph.run(*x) for x in sets]
    sizes = [int(s[0].shape[0]) for s in sets]
    outs = graph.run(*(torch.cat([s[i] for s in sets]) for i in range(len(sets[0]))))
    if any(o.dim() == 0 or o.shape[0] != sum(sizes) for o in outs):
        return [graph.run(*x) for x in sets]
    parts = [o.split(sizes) for o in outs]
    return [tuple(p[k] for p in parts) for k in range(len(sets))]


def budget_of(p: Pass) -> tuple[float | None, float | None]:
    """``(min_sqnr_db, max_kl)`` a lossy pass is held to: what its config declares.

    Every lossy pass in graphpress declares an explicit default; both None (set so by the user)
    means no budget. A config without either field is refused: there is no hidden default.
    """
    cfg = p.config
    if not (hasattr(cfg, "min_sqnr_db") or hasattr(cfg, "max_kl")):
        raise PassError(f"pass '{p.name}' is lossy but its config declares no budget: give it a min_sqnr_db and/or max_kl option")
    return getattr(cfg, "min_sqnr_db", None), getattr(cfg, "max_kl", None)


def _adapts(p: Pass) -> bool:
    return getattr(p.config, "on_budget", None) == "adapt" and isinstance(p, Adaptive)


def _round(v: float | None) -> float | None:
    if v is None:
        return None
    return round(v, 3) if math.isfinite(v) else v


def _advice(p: Pass, first: _Attempt, chosen: _Attempt) -> str:
    """The tail of a budget failure: what was reached and the option to change."""
    if not isinstance(p, Adaptive):
        return ""
    floor, _ = budget_of(p)
    budget_opt = "min_sqnr_db" if floor is not None else "max_kl"
    asked = p.achieved(first.stats)
    if not _adapts(p):
        return f" at {asked}; {p.advice()}, set on_budget: adapt, or change {budget_opt}"
    measure = f"SQNR {chosen.worst_sqnr:.1f} dB" if floor is not None else f"KL {chosen.kl:.4g} nats"
    if chosen is first or chosen.level == 0:
        return f" at {asked} (nothing to back off); {p.advice()} or change {budget_opt}"
    return (f" at {asked}; backing off ({chosen.tried - 1} more tries, up to {p.adapt_levels()} moves) reached at best {measure} "
            f"at {p.achieved(chosen.stats)}; {p.advice()} or change {budget_opt}")


def _where(name: str, i: int, total: int, before: list[str]) -> str:
    after = f", after {' -> '.join(before)}" if before else ", the first pass"
    return f"pass '{name}' (step {i + 1} of {total}{after})"


def _merge_diffs(per_set: list[list[OutputDiff]]) -> list[OutputDiff]:
    """Worst case over input sets, per output."""
    merged: list[OutputDiff] = []
    for diffs in zip(*per_set):
        worst = max(diffs, key=lambda d: (not d.within_tol, d.max_abs))
        merged.append(
            OutputDiff(
                worst.name,
                max(d.max_abs for d in diffs),
                max(d.max_rel for d in diffs),
                min(d.sqnr_db for d in diffs),
                all(d.within_tol for d in diffs),
                worst.atol,
                worst.rtol,
            )
        )
    return merged


def _logits_kl(refs: list[tuple[torch.Tensor, ...]], outs: list[tuple[torch.Tensor, ...]]) -> float | None:
    """KL on the first floating output with a last dim > 1 (treated as logits), worst over sets.

    Rows (positions) where the reference logits are not finite and the pass's are the same
    non-finite values are left out, as :func:`~graphpress.ir.compare.compare_outputs` does: the
    graph before the pass gave them already. A non-finite logit anywhere else makes the KL NaN,
    which fails any ``max_kl`` (:meth:`Pipeline._judge`); so does a NaN in any set (``max``
    would hide it)."""
    kls = []
    for r, o in zip(refs, outs):
        if r and r[0].dtype.is_floating_point and r[0].dim() >= 2 and r[0].shape[-1] > 1:
            if not o or o[0].shape != r[0].shape:
                kls.append(math.nan)  # compare_outputs fails the shape too
                continue
            ref, out = r[0].reshape(-1, r[0].shape[-1]), o[0].reshape(-1, r[0].shape[-1])
            if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(out).all())):
                agree = same_nonfinite(ref, out) | (torch.isfinite(ref) & torch.isfinite(out))
                inherited = agree.all(-1) & ~torch.isfinite(ref).all(-1)
                if bool(inherited.any()):
                    ref, out = ref[~inherited], out[~inherited]
            if ref.shape[0]:
                kls.append(kl_divergence(ref, out))
    if any(math.isnan(k) for k in kls):
        return math.nan
    return max(kls) if kls else None


__all__ = ["Pipeline", "PipelineReport", "StepRecord", "budget_of", "first_divergence", "sqnr_db"]
