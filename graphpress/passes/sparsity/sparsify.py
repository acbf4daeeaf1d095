"""``sparsify-activations``: zero the small entries of linear-layer inputs (TEAL, CHESS, WINA).

Each chosen linear ``y = x W^T + b`` becomes ``y = x_hat W^T + b`` with
``x_hat = x ⊙ [ |x| ⊙ s > t ]`` (:mod:`graphpress.passes.sparsity.thresholds` gives ``t`` and ``s``
per method from calibration data), written as ``graphpress::sparse_linear`` (one threshold) or
``graphpress::sparse_linear_pc`` (per-channel thresholds and scores) with the weight stored
transposed, ``Wt = W^T (in, out)``: the layout the CPU kernel streams
(:mod:`graphpress.ir.sparse_kernel`), reading only the rows of kept entries.

**Budget.** ``target_sparsity`` is model-wide, weighted by weights: the share of the chosen
layers' weight reads skipped, ``sum_l p_l n_l / sum_l n_l`` (``n_l`` = the layer's weights).

* ``allocation="uniform"``: every chosen layer at ``p_l = target``.
* ``allocation="greedy"`` (TEAL's): all layers start dense; repeatedly raise by ``step`` the
  sparsity of the layer whose *next* step adds the least output error per weight read skipped,
  until the budget holds. The error of layer ``l`` at ``p`` is measured on the calibration data:
  ``greedy_metric="layer"`` -- the layer's relative output noise ``||(X - X_hat) W^T||^2 /
  ||X W^T||^2`` (cheap, no model runs); ``"model"`` -- the relative noise power of the model's
  first output with only that layer sparsified (``L x steps`` model runs; a first-order,
  additive model like the circulant search's).

**Which layers.** Linears with at least ``min_in_features`` inputs, except the classifier (the
layer whose output is a graph output, up to reshapes: ``include_classifier``) and ``skip``.
``attention`` picks among attention projections found from the graph
(:mod:`graphpress.passes.sparsity.roles`): ``"all"``, ``"output"`` (CHESS's selective mode: the
output projection only, not query/key/value) or ``"none"``; the default is ``"output"`` for
``chess`` and ``"all"`` otherwise.

Lossy (``exact = False``); the pipeline checks ``min_sqnr_db`` (default 10 dB) / ``max_kl``.
``on_budget="adapt"`` (default): on a miss the pipeline backs off (:mod:`graphpress.passes.budget`)
-- the layers whose sparsity costs the most output noise (measured: the model's first output
with only that layer sparsified at its allocated level, on the calibration batches) lose one
sparsity step at a time (a grid step of the greedy allocation, ``step`` for uniform), reusing the
calibration statistics; ``stats`` then give ``asked_sparsity``, ``achieved_sparsity`` and
``backed_off_layers``. ``"fail"``: a miss is an error.
Stats: per layer the role, target and achieved sparsity on the calibration data, thresholds, and
output noise; model-wide the achieved sparsity and the *activated-parameter fraction* (the share
of all graph parameters a batch-1 call still reads). :func:`measure_sparsity` measures the
achieved sparsity on held-out inputs.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.*
import graphpress.ir.ops_sparse  # noqa: F401 -- registers graphpress::sparse_linear(_pc)
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.names import layer_name
from graphpress.ir.opsets import RESHAPE_OR_COPY
from graphpress.ir.rewrite import Skips, add_constant, arg, erase_dead, insert_call, is_op
from graphpress.passes.base import PassResult, progress_iter, register
from graphpress.passes.budget import SteppedBackOff, check_on_budget, ladder, notches_at
from graphpress.passes.layers import QLayer, find_layers, observe, record, rows
from graphpress.passes.select import Selector, check_selector
from graphpress.passes.sparsity import thresholds as th
from graphpress.passes.sparsity.roles import role

NAME = "sparsify-activations"
SPARSE_LINEAR = torch.ops.graphpress.sparse_linear.default
SPARSE_LINEAR_PC = torch.ops.graphpress.sparse_linear_pc.default


def _err(option: str, msg: str) -> PassError:
    return PassError(f"pass '{NAME}': option '{option}': {msg}")


@dataclass(frozen=True)
class SparsifyActivationsConfig:
    """Options of ``sparsify-activations`` (see ``docs/passes/sparsify-activations.md``).

    Attributes
    ----------
    method : "teal", "chess" or "wina"
    target_sparsity : float
        Model-wide share of the chosen layers' weight reads to skip, in [0, 0.99].
    allocation : "uniform" or "greedy"
    greedy_metric : "layer" or "model"
    step : float
        Sparsity step of the greedy allocation.
    max_layer_sparsity : float
        No layer goes above this.
    attention : "all", "output" or "none", optional
        Attention projections to sparsify (None: "output" for chess, "all" otherwise).
    include_classifier : bool
        Also sparsify the layer that produces a graph output.
    min_in_features : int
        Layers with fewer inputs stay dense.
    targets, ignore : tuple of str
        Which eligible layers the pass touches: exact names, ``re:`` full-match regexes or op families
        (:mod:`graphpress.passes.select`); empty ``targets`` means all; ``ignore`` wins.
    skip : tuple of str
        Exact layer names left dense (the older spelling of ``ignore``).
    max_rows : int
        Calibration rows per layer used for thresholds and errors (evenly strided subsample).
    min_sqnr_db, max_kl : float, optional
        The pipeline's budget for this pass (10 dB SQNR by default).
    on_budget : "adapt" or "fail"
        On a budget miss, back off on the most sensitive layers until it holds (``adapt``), or
        fail (:mod:`graphpress.passes.budget`).
    """

    version: int = 1
    method: Literal["teal", "chess", "wina"] = "teal"
    target_sparsity: float = 0.5
    allocation: Literal["uniform", "greedy"] = "greedy"
    greedy_metric: Literal["layer", "model"] = "layer"
    step: float = 0.05
    max_layer_sparsity: float = 0.9
    attention: Literal["all", "output", "none"] | None = None
    include_classifier: bool = False
    min_in_features: int = 16
    skip: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    max_rows: int = 16384
    min_sqnr_db: float | None = 10.0
    max_kl: float | None = None
    on_budget: Literal["adapt", "fail"] = "adapt"

    def __post_init__(self) -> None:
        check_on_budget(NAME, self.on_budget)
        check_selector(NAME, self)
        for option, allowed in (("method", th.METHODS), ("allocation", ("uniform", "greedy")), ("greedy_metric", ("layer", "model"))):
            value = getattr(self, option)
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _err(option, f"{value!r} is not one of {', '.join(allowed)}{hint}")
        if self.attention not in (None, "all", "output", "none"):
            raise _err("attention", f"{self.attention!r} is not one of all, output, none")
        if not (isinstance(self.target_sparsity, (int, float)) and 0.0 <= self.target_sparsity <= 0.99):
            raise _err("target_sparsity", f"must be a number in [0, 0.99], got {self.target_sparsity!r}")
        if not (isinstance(self.step, (int, float)) and 0.0 < self.step <= 0.5):
            raise _err("step", f"must be in (0, 0.5], got {self.step!r}")
        if not (isinstance(self.max_layer_sparsity, (int, float)) and 0.0 < self.max_layer_sparsity <= 0.99):
            raise _err("max_layer_sparsity", f"must be in (0, 0.99], got {self.max_layer_sparsity!r}")
        if self.max_layer_sparsity < self.target_sparsity:
            raise _err("max_layer_sparsity", f"{self.max_layer_sparsity} is below target_sparsity {self.target_sparsity}: the budget cannot be met")
        if not isinstance(self.min_in_features, int) or self.min_in_features < 1:
            raise _err("min_in_features", f"must be an integer >= 1, got {self.min_in_features!r}")
        if not isinstance(self.max_rows, int) or self.max_rows < 16:
            raise _err("max_rows", f"must be an integer >= 16, got {self.max_rows!r}")

    @property
    def attention_mode(self) -> str:
        return self.attention if self.attention is not None else ("output" if self.method == "chess" else "all")


def _feeds_output(node: fx.Node) -> bool:
    """Whether ``node``'s value is a graph output, up to reshapes."""
    frontier = [node]
    for _ in range(8):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "output":
                    return True
                if is_op(u, *RESHAPE_OR_COPY):
                    nxt.append(u)
        frontier = nxt
    return False


def _subsample(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    return x if x.shape[0] <= max_rows else x[:: -(-x.shape[0] // max_rows)][:max_rows]


class _Masking(fx.Interpreter):
    """Runs a graph with chosen linear inputs masked (greedy_metric="model")."""

    def __init__(self, gm: fx.GraphModule, masks: dict[str, th.Thresholds]):
        super().__init__(gm)
        self.masks = masks

    def run_node(self, n: fx.Node):
        if n.name in self.masks:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = args[0]
            x = torch.where(self.masks[n.name].mask(x), x, torch.zeros((), dtype=x.dtype))
            return n.target(x, *args[1:], **kwargs)
        return super().run_node(n)


@torch.no_grad()
def _model_noise(graph: Graph, refs: Sequence[torch.Tensor], masks: dict[str, th.Thresholds]) -> float:
    num = den = 0.0
    for batch, ref in zip(graph.calibration_batches(), refs, strict=True):
        out = _Masking(graph.gm, masks).run(*batch)
        out = out[0] if isinstance(out, (tuple, list)) else out
        num += float((out.double() - ref.double()).pow(2).sum())
        den += float(ref.double().pow(2).sum())
    return num / den if den > 0 else 0.0


def greedy(curves: dict[str, list[float]], weights: dict[str, int], grid: Sequence[float], target: float) -> dict[str, int]:
    """Grid index per layer: raise the layer whose next step costs the least error per weight
    read skipped, until ``sum p_l n_l / sum n_l >= target`` (``curves[l][i]`` = error at ``grid[i]``,
    ``grid[0] = 0``)."""
    level = {name: 0 for name in curves}
    total = sum(weights.values())
    skipped = 0.0
    while skipped < target * total - 1e-9:
        best, best_cost = None, float("inf")
        for name, i in level.items():
            if i + 1 >= len(grid):
                continue
            cost = (curves[name][i + 1] - curves[name][i]) / ((grid[i + 1] - grid[i]) * weights[name])
            if cost < best_cost:
                best, best_cost = name, cost
        if best is None:
            break
        i = level[best]
        skipped += (grid[i + 1] - grid[i]) * weights[best]
        level[best] = i + 1
    return level


@register(NAME)
class SparsifyActivations(SteppedBackOff):
    """TEAL / CHESS / WINA activation sparsity on linear layers (see module docstring)."""

    exact = False
    Config = SparsifyActivationsConfig

    def __init__(self, config: SparsifyActivationsConfig = SparsifyActivationsConfig()):
        self.config = config
        # What the last full run measured, shared with the back-off copies (budget.py): the
        # calibration per layer, the allocated sparsity and its softer steps, and the ladder.
        self._state: dict[str, Any] | None = None
        self._level = 0

    # ------------------------------------------------------------------ backing off
    def achieved(self, stats: dict[str, Any]) -> str:
        return f"sparsity {stats.get('achieved_sparsity', 0.0):.3f} (target_sparsity {self.config.target_sparsity:g})"

    def advice(self) -> str:
        return "lower target_sparsity"

    def _backed_off_plan(self, graph: Graph, chosen: list[QLayer]) -> dict[str, th.Thresholds]:
        state = self._state
        if "moves" not in state:
            # each layer's cost: the model's output noise with it alone sparsified at its allocated
            # level (measured), scaled along its steps by its own layer-noise curve (cheap)
            refs = [graph.run(*b)[0] for b in graph.calibration_batches()]
            nodes = {layer.name: layer.node.name for layer in chosen}
            costs: dict[str, list[float]] = {}
            for name, steps in state["steps"].items():
                if name not in nodes or len(steps) < 2:
                    continue
                measured = _model_noise(graph, refs, {nodes[name]: steps[0]})
                curve = [state["cal"][name].noise(t) for t in steps]
                costs[name] = [measured * (v / curve[0]) if curve[0] > 0 else measured * (t.sparsity / steps[0].sparsity) ** 2
                               for v, t in zip(curve, steps)]
            state["moves"] = ladder(costs, state["sizes"])
        taken = notches_at(state["moves"], self._level)
        return {name: steps[taken.get(name, 0)] for name, steps in state["steps"].items()}

    def _choose(self, graph: Graph) -> tuple[list[QLayer], dict[str, str], Skips]:
        cfg = self.config
        layers, rejected = find_layers(graph, convs=False)
        selection = Selector.of(NAME, cfg).resolve({l.name: l.node for l in layers}, rejected)
        skipped = Skips()
        for reason in rejected.values():
            skipped.add(reason)
        chosen, roles = [], {}
        mode = cfg.attention_mode
        for layer in layers:
            r = role(layer.node)
            roles[layer.name] = r
            why = selection.reason(layer.name, layer.node)
            if why is not None:
                pass  # left out by targets / ignore / skip: that reason wins over the pass's own
            elif layer.in_features < cfg.min_in_features:
                why = f"fewer than min_in_features={cfg.min_in_features} inputs"
            elif not cfg.include_classifier and _feeds_output(layer.node):
                why = "classifier (produces a graph output; include_classifier: true to sparsify it)"
            elif r == "attention-input" and mode != "all":
                why = f"attention query/key/value projection (attention: {mode})"
            elif r == "attention-output" and mode == "none":
                why = "attention output projection (attention: none)"
            if why:
                skipped.add(why)
            else:
                chosen.append(layer)
        return chosen, roles, skipped

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        chosen, roles, skipped = self._choose(graph)
        if not chosen:
            return PassResult(graph, changed=False, stats={"layers": {}, "skipped": dict(skipped), "roles": roles})
        weights = {layer.name: graph.get_tensor(layer.weight_target) for layer in chosen}
        sizes = {layer.name: layer.params for layer in chosen}

        curves = None
        if self._level > 0 and self._state is not None:
            cal = self._state["cal"]
            plan = self._backed_off_plan(graph, chosen)
        else:
            values = record(graph, [layer.input_node for layer in chosen])
            xs = {layer.name: _subsample(rows(values[layer.input_node.name], "linear"), cfg.max_rows) for layer in chosen}
            cal = {name: th.LayerCalibration(cfg.method, xs[name], weights[name]) for name in xs}
            if cfg.allocation == "uniform" or cfg.target_sparsity == 0:
                plan = {name: c.thresholds(cfg.target_sparsity) for name, c in cal.items()}
                m = max(1, round(cfg.target_sparsity / cfg.step))
                steps = {name: [plan[name]] + [c.thresholds(cfg.target_sparsity * (1 - j / m)) for j in range(1, m + 1)] for name, c in cal.items()}
            else:
                n = int(round(cfg.max_layer_sparsity / cfg.step))
                grid = [0.0] + [min(cfg.step * i, cfg.max_layer_sparsity) for i in range(1, n + 1)]
                options = {name: [c.thresholds(p) for p in grid] for name, c in cal.items()}
                if cfg.greedy_metric == "layer":
                    curves = {name: [cal[name].noise(t) for t in opts] for name, opts in progress_iter(options.items(), lambda kv: kv[0])}
                else:
                    refs = [graph.run(*b)[0] for b in graph.calibration_batches()]
                    by_name = {layer.name: layer.node.name for layer in chosen}
                    curves = {name: [0.0] + [_model_noise(graph, refs, {by_name[name]: t}) for t in opts[1:]] for name, opts in progress_iter(options.items(), lambda kv: kv[0])}
                level = greedy(curves, sizes, grid, cfg.target_sparsity)
                plan = {name: options[name][i] for name, i in level.items()}
                steps = {name: [options[name][j] for j in range(i, -1, -1)] for name, i in level.items()}
            self._state = {"cal": cal, "steps": steps, "sizes": sizes}

        per_layer: dict[str, dict[str, Any]] = {}
        dead = []
        for layer in chosen:
            t = plan[layer.name]
            if t.sparsity <= 0:
                skipped.add("allocated no sparsity")
                continue
            node = layer.node
            w = weights[layer.name]
            wt = add_constant(graph, f"{layer.weight_target}_t", w.detach().float().t().contiguous(), before=node, parameter=False)
            bias = arg(node, 2, "bias")
            if t.per_channel:
                thr = add_constant(graph, f"{layer.weight_target}_thresholds", t.thresholds.float().contiguous(), before=node, parameter=False)
                sc = add_constant(graph, f"{layer.weight_target}_scores", t.scores.float(), before=node, parameter=False) if t.scores is not None else None
                new = insert_call(graph, SPARSE_LINEAR_PC, (node.args[0], wt, bias, thr, sc), before=node, like=node)
            else:
                new = insert_call(graph, SPARSE_LINEAR, (node.args[0], wt, bias, float(t.threshold)), before=node, like=node)
            node.replace_all_uses_with(new)
            dead.append(node)
            per_layer[layer.name] = {
                "role": roles[layer.name], "weights": sizes[layer.name], "target": round(t.sparsity, 4),
                "calibration_sparsity": round(cal[layer.name].achieved(t), 4),
                "output_noise": cal[layer.name].noise(t), **t.summary(),
            }
        erase_dead(graph, dead)
        graph.remove_unused_tensors()
        graph.recompile()
        all_params = max(graph.parameter_count(), 1)
        done = sum(v["weights"] for v in per_layer.values())
        skipped_reads = sum(v["weights"] * v["calibration_sparsity"] for v in per_layer.values())
        chosen_weights = sum(sizes.values())
        stats = {
            "method": cfg.method, "allocation": cfg.allocation, "target_sparsity": cfg.target_sparsity,
            "asked_sparsity": cfg.target_sparsity,
            "achieved_sparsity": skipped_reads / chosen_weights if chosen_weights else 0.0,
            "sparsified_layers": len(per_layer), "sparsified_weights": done,
            "activated_parameter_fraction": 1.0 - skipped_reads / all_params,
            "layers": per_layer, "roles": roles, "skipped": dict(skipped),
        }
        if curves is not None:
            stats["greedy_metric"] = cfg.greedy_metric
        if self._level > 0 and self._state is not None:
            asked = {name: steps[0].sparsity for name, steps in self._state["steps"].items()}
            stats["backed_off_layers"] = {name: {"asked": round(asked[name], 4), "got": round(plan[name].sparsity, 4)}
                                          for name in asked if plan[name].sparsity < asked[name] - 1e-12}
        else:
            stats["backed_off_layers"] = {}
        return PassResult(graph, changed=bool(per_layer), stats=stats)


def measure_sparsity(graph: Graph, batches: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """Achieved sparsity of every ``sparse_linear(_pc)`` node of ``graph`` on ``batches``
    (e.g. held-out inputs), keyed by layer name (:func:`graphpress.ir.names.layer_name`)."""
    readers: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.call_nodes(SPARSE_LINEAR, SPARSE_LINEAR_PC):
        readers.setdefault(n.args[0], []).append(n)

    def value(a: Any) -> Any:  # thresholds / scores are constants the rewrite stored
        return graph.tensor_of(a) if isinstance(a, fx.Node) else a

    kept: dict[str, list[float]] = {}

    def count(x_node: fx.Node, x: torch.Tensor) -> None:
        for n in readers[x_node]:
            if n.target is SPARSE_LINEAR:
                mask = th.Thresholds(1.0, threshold=float(value(n.args[3]))).mask(x)
            else:
                mask = th.Thresholds(1.0, thresholds=value(n.args[3]), scores=value(n.args[4])).mask(x)
            kept.setdefault(n.name, []).append(float(mask.double().mean()))

    observe(graph, readers, count, batches)
    names = {n.name: layer_name(graph, n) for n in graph.gm.graph.nodes}
    return {names[k]: 1.0 - sum(v) / len(v) for k, v in kept.items()}


__all__ = ["SparsifyActivations", "SparsifyActivationsConfig", "greedy", "measure_sparsity"]
