"""The verified pass pipeline.

Contract (see docs/pipeline.md):

* ``verify()`` the input graph, then record reference outputs on the example inputs plus
  ``random_inputs`` seeded random inputs (at another batch size when the batch is dynamic).
* After every pass: structural ``verify()``; numeric comparison with the *previous* graph --
  exact passes must be allclose with dtype-aware tolerance (:func:`graphpress.ir.compare.tolerance`),
  lossy passes must meet the budget their config declares (``min_sqnr_db``, ``max_kl``) -- and a
  cumulative comparison with the original, recorded for the report.
* A failure raises one :class:`VerificationError` naming the pass, its step, the passes before
  it, the output that diverged and the first graph node whose value diverged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphpress.errors import GraphpressError, PassError, VerificationError
from graphpress.ir.compare import OutputDiff, compare_outputs, kl_divergence, sqnr_db, tolerance
from graphpress.ir.graph import Graph
from graphpress.passes.base import Pass, config_to_dict, make_pass

DEFAULT_MIN_SQNR_DB = 20.0  # budget for a lossy pass that declares none


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

    Examples
    --------
    >>> pipe = Pipeline(["fold-batchnorm", ("eliminate-dead-code", {})])
    >>> report = pipe.run(graph)          # doctest: +SKIP
    >>> report.graph, report.steps[0].stats  # doctest: +SKIP
    """

    def __init__(self, passes: Sequence[Pass | str | tuple[str, dict]], *, random_inputs: int = 2, seed: int = 0, name: str = "custom"):
        self.passes: list[Pass] = []
        for p in passes:
            if isinstance(p, str):
                p = make_pass(p)
            elif isinstance(p, tuple):
                p = make_pass(p[0], p[1])
            self.passes.append(p)
        self.random_inputs = random_inputs
        self.seed = seed
        self.name = name

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
        """Run every pass on a clone of ``graph``; the input graph is never modified.

        ``on_event(kind, index, total, record)`` is called with kind ``"start"`` before and
        ``"end"`` after each pass (the CLI drives its progress bar with it).
        """
        t_all = time.perf_counter()
        try:
            graph.verify()
        except VerificationError as err:
            raise VerificationError(f"input graph failed verification before any pass: {err}") from None
        inputs = self.check_inputs(graph)
        original = [graph.run(*x) for x in inputs]
        previous_outputs = original
        current = graph.clone()
        steps: list[StepRecord] = []
        params0 = graph.parameter_count()
        total = len(self.passes)
        for i, p in enumerate(self.passes):
            record = StepRecord(p.name, config_to_dict(p.config), bool(p.exact), params_before=current.parameter_count())
            if on_event:
                on_event("start", i, total, record)
            where = _where(p.name, i, total, [s.name for s in steps])
            before = current.clone()
            t0 = time.perf_counter()
            try:
                result = p(current)
            except GraphpressError as err:
                raise type(err)(f"{where} failed: {err}") from err
            except Exception as err:  # noqa: BLE001 -- a bug in a pass must still name the pass
                msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise PassError(f"{where} failed: {type(err).__name__}: {msg[:300]}") from err
            record.time_s = time.perf_counter() - t0
            current = result.graph
            record.changed, record.stats = bool(result.changed), dict(result.stats)
            try:
                current.verify()
            except VerificationError as err:
                raise VerificationError(f"{where} produced an invalid graph: {err}") from None
            outputs = [current.run(*x) for x in inputs]
            record.step = _merge_diffs([compare_outputs(r, o, current.output_names) for r, o in zip(previous_outputs, outputs)])
            record.cumulative = _merge_diffs([compare_outputs(r, o, current.output_names) for r, o in zip(original, outputs)])
            record.params_after = current.parameter_count()
            if not p.exact:
                record.kl = _logits_kl(previous_outputs, outputs)
            problem = self._judge(p, record)
            if problem:
                record.error = problem
                node = first_divergence(before, current, inputs[0])
                at = f"; first diverging node: '{node}'" if node else ""
                raise VerificationError(f"{where} broke the model: {problem}{at}")
            previous_outputs = outputs
            steps.append(record)
            if on_event:
                on_event("end", i, total, record)
        return PipelineReport(current, steps, params0, current.parameter_count(), time.perf_counter() - t_all)

    @staticmethod
    def _judge(p: Pass, record: StepRecord) -> str | None:
        if p.exact:
            for d in record.step:
                if not d.within_tol:
                    return (
                        f"output '{d.name}' max abs error {d.max_abs:.3g} exceeds the exact-pass tolerance "
                        f"(atol {d.atol:.3g}, rtol {d.rtol:.3g})"
                    )
            return None
        floor = getattr(p.config, "min_sqnr_db", None)
        floor = DEFAULT_MIN_SQNR_DB if floor is None and getattr(p.config, "max_kl", None) is None else floor
        if floor is not None:
            for d in record.step:
                if d.sqnr_db < floor:
                    return f"output '{d.name}' SQNR {d.sqnr_db:.1f} dB is below the pass budget min_sqnr_db={floor}"
        max_kl = getattr(p.config, "max_kl", None)
        if max_kl is not None and record.kl is not None and record.kl > max_kl:
            return f"KL divergence {record.kl:.4g} nats exceeds the pass budget max_kl={max_kl}"
        return None


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
    """KL on the first floating output with a last dim > 1 (treated as logits), worst over sets."""
    kls = []
    for r, o in zip(refs, outs):
        if r and r[0].dtype.is_floating_point and r[0].dim() >= 2 and r[0].shape[-1] > 1:
            kls.append(kl_divergence(r[0], o[0]))
    return max(kls) if kls else None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op == "call_function":
            self.values[n.name] = out.detach()
        return out


@torch.no_grad()
def first_divergence(before: Graph, after: Graph, inputs: Sequence[torch.Tensor]) -> str | None:
    """Name of the first node (in ``after``'s order) whose value differs from the same-named
    node in ``before`` beyond the exact tolerance; None when nodes cannot be paired."""
    a, b = _Recorder(before.gm), _Recorder(after.gm)
    try:
        a.run(*inputs)
        b.run(*inputs)
    except Exception:  # noqa: BLE001 -- diagnosis is best-effort
        return None
    for name, val in b.values.items():
        ref = a.values.get(name)
        if ref is None or ref.shape != val.shape or ref.dtype != val.dtype or not ref.dtype.is_floating_point:
            continue
        rtol, atol = tolerance(ref.dtype, float(ref.abs().max()) if ref.numel() else 1.0)
        if not torch.allclose(val.double(), ref.double(), rtol=rtol, atol=atol, equal_nan=True):
            return name
    return None


__all__ = ["Pipeline", "PipelineReport", "StepRecord", "first_divergence", "sqnr_db"]
