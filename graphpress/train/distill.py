"""Recovery fine-tuning by knowledge distillation: train chosen tensors of a compressed graph.

A lossy pass (block-circulant projection, quantization, pruning) leaves a *student* graph ``S``
whose outputs drift from the original *teacher* ``T``. Distillation trains a few tensors
``theta`` of the student -- in place, nothing else -- to bring its outputs back, using only
unlabelled inputs ``x``: the teacher's outputs are the targets.

Loss per floating output, summed over the outputs (``t = T(x)``, ``s = S_theta(x)``):

* ``"kl"`` (logits)::

      L = T^2 * mean_positions KL( softmax(t / T) || softmax(s / T) )
        = T^2 * mean_positions sum_k p_k (log p_k - log q_k),   p = softmax(t/T), q = softmax(s/T)

  The temperature ``T`` softens both distributions so that the student also learns the
  teacher's ranking of the wrong classes ("dark knowledge"); the factor ``T^2`` keeps the
  gradient scale independent of ``T`` (the gradient of the softened KL scales as ``1/T^2``).
* ``"mse"`` (regression outputs, features): ``L = mean (s - t)^2``.
* ``"auto"``: ``"kl"`` for outputs with ``ndim >= 2`` and a last dim > 1, else ``"mse"``.

Optimizer: Adam on ``theta`` only. Every other tensor of the student is bit-identical afterwards.

Which tensors are trained (``DistillConfig.trainable``):

* ``"annotated"`` -- a pass marks a node with ``graph.annotations(node)["trainable_inputs"] =
  [1, 2]``: the tensors feeding those argument positions are trainable. An argument that is a
  ``get_attr`` is that tensor; an argument computed from tensors only (e.g. ``expand(c)``
  inside the graph) stands for every floating ``get_attr`` it is computed from. The compact
  parametrization is therefore what gets trained -- e.g. the ``(p, q, b)`` circulant vectors,
  never a dense ``(p*b, q*b)`` expansion -- and the graph keeps its structure by construction:
  the gradient flows through the same ops the graph runs, and only the compact tensor moves.
* ``"all"`` -- every floating tensor a ``get_attr`` reads (weights, biases, folded BN
  statistics): plain full fine-tuning of a dense graph. A tensor that is at least
  ``ZERO_MASK_FRACTION`` exact zeros (a pruning mask, e.g. after ``prune-weights``) keeps its
  zeros: its gradient is masked and the zeros are re-imposed after every step, so fine-tuning
  never undoes the sparsity a pass bought.
* ``"auto"`` (the default) -- ``"annotated"`` when some node carries ``trainable_inputs``
  (circulant vectors, polynomial coefficients), else ``"all"`` (e.g. after ``prune-channels``,
  whose smaller dense weights are the compressed structure itself).

Early stopping: a seeded split holds out ``val_fraction`` of the rows; after every epoch the
validation loss is measured, the best weights (starting with the untrained ones, epoch 0) are
kept, training stops after ``patience`` epochs without a strict improvement, and the best weights
are restored. So the result is never worse on the held-out rows than the student it started from.

Deterministic: the split and every epoch's shuffle come from a ``torch.Generator`` seeded with
``config.seed``; the global RNG is seeded too, inside :func:`torch.random.fork_rng` so the
caller's RNG state is left as it was.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.graph import ANNOTATION_KEY, Graph, TensorSpec, _flatten_outputs

LOSSES = ("auto", "kl", "mse")
TRAINABLE = ("auto", "annotated", "all")
SCHEDULES = ("constant", "cosine")
NO_ANNOTATION = (
    "nothing to fine-tune: no node is annotated with trainable_inputs; "
    "use trainable='all' or 'auto' (CLI: --finetune-trainable all)"
)
ZERO_MASK_FRACTION = 0.1  # with trainable 'all', a tensor this sparse keeps its zeros


@dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill` (see the module docstring for the math).

    Attributes
    ----------
    epochs : int
        Maximum passes over the training rows (0: only measure, train nothing).
    lr : float
        Adam learning rate.
    batch_size : int
        Rows per optimizer step (a graph exported with a static batch uses its own batch size).
    val_fraction : float
        Share of the rows held out for early stopping, in ``[0, 1)``; 0 validates on the
        training rows.
    patience : int
        Epochs without a strict improvement of the validation loss before stopping.
    temperature : float
        KD temperature ``T`` of the KL loss.
    loss : str
        ``"kl"``, ``"mse"`` or ``"auto"`` (per output: KL when ``ndim >= 2`` and last dim > 1).
    weight_decay : float
        Adam's L2 penalty on the trained tensors.
    seed : int
        Seed of the split, the shuffles and the global RNG during training.
    trainable : str
        ``"auto"`` (annotated tensors when a pass annotated any, else all), ``"annotated"``
        (tensors behind ``trainable_inputs`` annotations) or ``"all"``.
    lr_schedule : str
        ``"constant"``, or ``"cosine"``: the learning rate falls from ``lr`` to 0 along a half
        cosine over ``epochs`` (stepped per epoch). Adam at a constant rate keeps the weights
        jittering around the optimum; the decay lets them settle (ResNet-20 at b = 4: see
        ``benchmarks/he_circulant_distill.py``).
    """

    version: int = 1
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    val_fraction: float = 0.2
    patience: int = 3
    temperature: float = 2.0
    loss: str = "auto"
    weight_decay: float = 0.0
    seed: int = 0
    trainable: str = "auto"
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.lr >= 0, f"lr must be >= 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.trainable in TRAINABLE, f"trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PassError(f"distill: {msg}")


@dataclass
class DistillResult:
    """What :func:`distill` did.

    Attributes
    ----------
    graph : Graph
        The student, trained in place (the same object that was passed in).
    history : list of dict
        One record per epoch run: ``epoch`` (1-based), ``train_loss`` (mean over the epoch's
        steps, before each step), ``val_loss`` (after the epoch), ``seconds``.
    best_epoch : int
        Epoch whose weights were kept; 0 when no epoch beat the untrained student.
    stopped_early : bool
        Training ended before ``config.epochs`` (patience ran out, or the loss diverged).
    trained : list of str
        Targets of the trained tensors (one name per tensor; tied names count once).
    params_trained : int
        Elements in the trained tensors.
    initial_val_loss, best_val_loss : float
        Validation loss before training and of the kept weights.
    stop_reason : str
        ``"completed"``, ``"patience"`` or ``"diverged"`` (a non-finite training loss).
    losses : dict of str to str
        Output name -> loss kind used (``"kl"`` / ``"mse"``); outputs not listed were ignored
        (not floating, or without a batch dimension).
    train_rows, val_rows : int
        Rows in each split (a static-batch graph drops the rows that do not fill a batch).
    trainable : str
        The selection used (``"annotated"`` or ``"all"``; ``"auto"`` resolved).
    masked : list of str
        Trained tensors whose zeros were kept (``"all"`` on a pruned tensor).
    """

    graph: Graph
    history: list[dict[str, Any]]
    best_epoch: int
    stopped_early: bool
    trained: list[str]
    params_trained: int
    initial_val_loss: float = math.nan
    best_val_loss: float = math.nan
    stop_reason: str = "completed"
    losses: dict[str, str] = field(default_factory=dict)
    train_rows: int = 0
    val_rows: int = 0
    trainable: str = "annotated"
    masked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the graph; non-finite floats as strings)."""
        return {
            "history": [{k: _json_float(v) for k, v in rec.items()} for rec in self.history],
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "trained": list(self.trained),
            "params_trained": self.params_trained,
            "initial_val_loss": _json_float(self.initial_val_loss),
            "best_val_loss": _json_float(self.best_val_loss),
            "losses": dict(self.losses),
            "train_rows": self.train_rows,
            "val_rows": self.val_rows,
            "trainable": self.trainable,
            "masked": list(self.masked),
        }


def _json_float(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


# ---------------------------------------------------------------------------- trainable tensors
def _arg_at(node: fx.Node, pos: Any) -> Any:
    """Argument ``pos`` of ``node``: an int position (positional, else the schema's kwarg of that
    position) or a kwarg name."""
    if isinstance(pos, str):
        return node.kwargs.get(pos)
    if not isinstance(pos, int) or isinstance(pos, bool):
        raise PassError(f"distill: node {node.name}: trainable_inputs holds {pos!r}, expected argument positions (int)")
    if pos < len(node.args):
        return node.args[pos]
    schema = getattr(node.target, "_schema", None)
    if schema is not None and pos < len(schema.arguments):
        return node.kwargs.get(schema.arguments[pos].name)
    return None


def _constant_sources(graph: Graph, node: fx.Node, arg: fx.Node, pos: Any) -> list[str]:
    """Floating ``get_attr`` targets that ``arg`` is computed from; it must not depend on an input.

    A direct ``get_attr`` is the common case; a small constant sub-graph (``expand(c)``,
    a transpose of a weight) stands for the tensors it reads, so the compact tensor is trained.
    """
    found, seen, stack = [], set(), [arg]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            t = graph.tensor_of(n)
            if t is not None and t.dtype.is_floating_point:
                found.append(str(n.target))
        elif n.op == "placeholder":
            raise PassError(
                f"distill: node {node.name}: trainable input {pos} depends on the model input {n.name}, not only on tensors"
            )
        else:
            stack.extend(n.all_input_nodes)
    return sorted(found)


def resolve_trainable(graph: Graph, mode: str) -> str:
    """``"auto"`` -> ``"annotated"`` when some node of ``graph`` has ``trainable_inputs``, else ``"all"``."""
    if mode != "auto":
        return mode
    annotated = any(n.meta.get(ANNOTATION_KEY, {}).get("trainable_inputs") for n in graph.nodes)
    return "annotated" if annotated else "all"


def trainable_targets(graph: Graph, mode: str = "annotated") -> list[str]:
    """Targets of the tensors :func:`distill` trains (nodes in graph order, then argument order), one name per tensor.

    Parameters
    ----------
    graph : Graph
        The student.
    mode : str
        ``"annotated"``: tensors behind the positions listed in
        ``graph.annotations(node)["trainable_inputs"]``; ``"all"``: every floating tensor a
        ``get_attr`` reads; ``"auto"``: :func:`resolve_trainable`.

    Raises
    ------
    PassError
        ``"annotated"`` with no annotated node, or annotations that name no floating tensor.
    """
    if mode not in TRAINABLE:
        raise PassError(f"distill: trainable must be one of {', '.join(TRAINABLE)}, got {mode!r}")
    mode = resolve_trainable(graph, mode)
    targets: list[str] = []
    if mode == "all":
        for n in graph.nodes:
            t = graph.tensor_of(n) if n.op == "get_attr" else None
            if t is not None and t.dtype.is_floating_point:
                targets.append(str(n.target))
    else:
        annotated = 0
        for n in graph.nodes:
            positions = n.meta.get(ANNOTATION_KEY, {}).get("trainable_inputs")
            if not positions:
                continue
            annotated += 1
            for pos in positions:
                arg = _arg_at(n, pos)
                if isinstance(arg, fx.Node):  # None (e.g. no bias) and constants are skipped
                    targets.extend(_constant_sources(graph, n, arg, pos))
        if not annotated:
            raise PassError(NO_ANNOTATION)
        if not targets:
            raise PassError(f"nothing to fine-tune: the {annotated} annotated node(s) read no floating tensor at their trainable_inputs")
    # one name per tensor: tied weights (two names, one tensor) must reach Adam once
    unique, seen = [], set()
    for target in targets:
        key = id(graph.get_tensor(target))
        if key not in seen:
            seen.add(key)
            unique.append(target)
    return unique


# ---------------------------------------------------------------------------- inputs
def _spec_str(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name}: ({', '.join(map(str, s.shape))}) {s.dtype}" for s in specs)


def _columns(graph: Graph, inputs: Any) -> tuple[torch.Tensor, ...]:
    """Normalize ``inputs`` to one tensor per graph input, rows along dim 0, checked and cast."""
    specs = graph.input_specs
    expected = f"expected {len(specs)} input(s) {_spec_str(specs)}"
    if isinstance(inputs, torch.Tensor):
        cols: Sequence[Any] = (inputs,)
    elif isinstance(inputs, Mapping):
        names = [s.name for s in specs]
        cols = [inputs[n] for n in names] if set(names) <= set(inputs) else list(inputs.values())
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        items = list(inputs)
        if not items:
            raise PassError(f"distill: no fine-tuning inputs; {expected}")
        if all(isinstance(x, torch.Tensor) for x in items):
            # a tuple is one tensor per input; a list, for a single-input graph, is a list of batches
            batches_of_one = isinstance(inputs, list) and len(specs) == 1
            cols = [_cat(items, specs[0], expected)] if batches_of_one else items
        elif all(isinstance(x, (tuple, list)) for x in items):
            if any(len(b) != len(specs) for b in items):
                raise PassError(f"distill: a batch holds {sorted({len(b) for b in items})} tensors; {expected}")
            cols = [_cat([b[i] for b in items], specs[i], expected) for i in range(len(specs))]
        else:
            raise PassError(f"distill: inputs must be tensors or tuples of tensors; {expected}")
    else:
        raise PassError(f"distill: inputs of type {type(inputs).__name__}; {expected}")
    if len(cols) != len(specs):
        raise PassError(f"distill: got {len(cols)} input tensor(s); {expected}")
    out = []
    for spec, x in zip(specs, cols):
        if not isinstance(x, torch.Tensor):
            raise PassError(f"distill: input {spec.name} is a {type(x).__name__}; {expected}")
        want = spec.torch_dtype
        if want.is_floating_point != x.dtype.is_floating_point or (want == torch.bool) != (x.dtype == torch.bool):
            raise PassError(f"distill: input {spec.name} has dtype {x.dtype}; {expected}")
        shape_ok = x.dim() == len(spec.shape) and x.dim() > 0 and all(
            isinstance(s, str) or d == 0 or s == n for d, (s, n) in enumerate(zip(spec.shape, x.shape))
        )
        if not shape_ok:
            raise PassError(f"distill: input {spec.name} has shape {tuple(x.shape)}; {expected}")
        # .npy data is float64 more often than not: cast to what the graph was captured with
        out.append(x.detach().to(device="cpu", dtype=want))
    rows = {x.shape[0] for x in out}
    if len(rows) != 1:
        raise PassError(f"distill: inputs have different row counts {sorted(rows)}; every input needs one row per sample")
    if rows == {0}:
        raise PassError(f"distill: no fine-tuning inputs (0 rows); {expected}")
    return tuple(out)


def _cat(parts: list[Any], spec: TensorSpec, expected: str) -> torch.Tensor:
    try:
        return torch.cat([p if p.dim() else p.reshape(1) for p in parts])
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PassError(f"distill: batches of input {spec.name} do not stack ({first}); {expected}") from None


# ---------------------------------------------------------------------------- loss
def _loss_kind(config_loss: str, t: torch.Tensor) -> str:
    if config_loss != "auto":
        return config_loss
    return "kl" if t.dim() >= 2 and t.shape[-1] > 1 else "mse"


def distill_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """One output's distillation loss (mean over positions).

    Parameters
    ----------
    student_out, teacher_out : Tensor
        Same shape; logits over the last dim for ``"kl"``.
    kind : str
        ``"kl"``: ``T^2 * mean KL(softmax(t/T) || softmax(s/T))``; ``"mse"``: ``mean (s - t)^2``.
    temperature : float
        ``T`` of the KL loss.
    """
    s, t = student_out.float(), teacher_out.float()
    if kind == "kl":
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl.mean() * temperature**2
    if kind == "mse":
        return F.mse_loss(s, t)
    raise PassError(f"distill: unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


# ---------------------------------------------------------------------------- training
def distill(
    student: Graph,
    teacher: Graph,
    inputs: torch.Tensor | Sequence[torch.Tensor] | Sequence[tuple[torch.Tensor, ...]],
    config: DistillConfig = DistillConfig(),
    *,
    on_epoch: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> DistillResult:
    """Fine-tune chosen tensors of ``student`` in place so its outputs match ``teacher``'s.

    Parameters
    ----------
    student : Graph
        The compressed graph; only the tensors selected by ``config.trainable`` change: each is
        replaced by a trained copy under the same name and shape (the untrained tensor may be
        shared with the teacher, which must not move), ``requires_grad`` off again afterwards.
    teacher : Graph
        The reference (usually the original graph); only run, under ``no_grad``.
    inputs : Tensor, tuple of Tensor, or list of tuples
        Unlabelled samples: one tensor ``(N, ...)`` for a single-input graph, one tensor per
        graph input (each with ``N`` rows), a dict keyed by input name, or a list of per-batch
        input tuples (concatenated). Floating data is cast to the graph's input dtype.
    config : DistillConfig
        Epochs, learning rate, batch size, split, early stopping, loss and trainable selection.
    on_epoch : callable, optional
        ``on_epoch(epoch, total_epochs, record)`` after every epoch (drives a progress bar);
        ``record`` is the epoch's history entry.

    Returns
    -------
    DistillResult
        ``graph`` is ``student``; the kept weights are those of ``best_epoch``.

    Raises
    ------
    PassError
        No trainable tensor, inputs that do not match ``student.input_specs``, a teacher/student
        output mismatch, or a student whose outputs do not depend differentiably on the tensors.
    """
    cols = _columns(student, inputs)
    mode = resolve_trainable(student, config.trainable)
    targets = trainable_targets(student, mode)
    n_rows = cols[0].shape[0]

    # A graph exported with a static batch only runs at its captured batch size.
    fixed = None if student.dynamic_batch else int(student.input_specs[0].shape[0])
    unit = fixed or 1
    batch = fixed or config.batch_size
    n_val = max(unit, round(n_rows * config.val_fraction / unit) * unit) if config.val_fraction > 0 else 0
    n_train = (n_rows - n_val) // unit * unit
    if n_train < unit:
        need = unit * (2 if config.val_fraction > 0 else 1)
        raise PassError(
            f"distill: {n_rows} row(s) are too few: need at least {need} for a batch of {unit}"
            + (f" plus a validation split of {config.val_fraction}" if config.val_fraction > 0 else "")
        )

    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n_rows, generator=gen)
    train_idx, val_idx = perm[n_val : n_val + n_train], perm[:n_val]
    if n_val == 0:  # no held-out rows: select and stop on the training rows
        val_idx = train_idx

    targets_out, kinds = _teacher_targets(teacher, cols, config.batch_size, config.loss)
    tensors = [student.get_tensor(t) for t in targets]
    tensors = _prepare_leaves(student, targets, tensors)
    # pruned tensors keep their zeros under 'all' (annotated tensors are compact by construction)
    masks: list[torch.Tensor | None] = [
        (t != 0) if mode == "all" and t.numel() and float((t == 0).float().mean()) >= ZERO_MASK_FRACTION else None
        for t in tensors
    ]

    # Only the trained tensors may require grad: autograd then skips every other weight (no
    # wasted backward work, no stray .grad on tensors we promise not to touch).
    trained_ids = {id(t) for t in tensors}
    others = [t for t in _module_tensors(student.gm) if id(t) not in trained_ids and t.requires_grad]
    flags = [t.requires_grad for t in tensors]

    def batches(idx: torch.Tensor):
        for i in range(0, len(idx) - (len(idx) % unit if fixed else 0), batch):
            rows = idx[i : i + batch]
            yield rows, tuple(c[rows] for c in cols)

    def step_loss(rows: torch.Tensor, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outs = _flatten_outputs(student.gm(*xs))
        total = None
        for k, kind in kinds.items():
            if k >= len(outs) or outs[k].shape != targets_out[k][rows].shape:
                got = tuple(outs[k].shape) if k < len(outs) else "missing"
                raise PassError(
                    f"distill: student output {k} is {got}, teacher's is {tuple(targets_out[k][rows].shape)}; "
                    "student and teacher must have the same outputs"
                )
            term = distill_loss(outs[k], targets_out[k][rows], kind, config.temperature)
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def evaluate(idx: torch.Tensor) -> float:
        total = 0.0
        for rows, xs in batches(idx):
            total += float(step_loss(rows, xs)) * len(rows)
        return total / len(idx)

    history: list[dict[str, Any]] = []
    stop_reason = "completed"
    best_state: list[torch.Tensor] | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            for t in others:
                t.requires_grad_(False)
            # epoch 0 = the untrained student: training never returns weights worse than it on val
            initial = best = evaluate(val_idx)
            best_epoch, best_state, bad = 0, [t.detach().clone() for t in tensors], 0
            for t in tensors:
                t.requires_grad_(True)
            opt = torch.optim.Adam(tensors, lr=config.lr, weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs, 1)) if config.lr_schedule == "cosine" else None
            checked = False
            for epoch in range(1, config.epochs + 1):
                start = time.perf_counter()
                order = train_idx[torch.randperm(len(train_idx), generator=gen)]
                run_sum, run_rows = 0.0, 0
                with torch.enable_grad():
                    for rows, xs in batches(order):
                        loss = step_loss(rows, xs)
                        grads = torch.autograd.grad(loss, tensors, allow_unused=True) if loss.requires_grad else None
                        if not checked:
                            _check_differentiable(grads, targets)
                            checked = True
                        for t, g, m in zip(tensors, grads, masks):
                            t.grad = g if m is None or g is None else g * m
                        opt.step()
                        with torch.no_grad():
                            for t, m in zip(tensors, masks):
                                if m is not None:
                                    t.mul_(m)
                        run_sum += float(loss.detach()) * len(rows)
                        run_rows += len(rows)
                train_loss = run_sum / max(run_rows, 1)
                if not math.isfinite(train_loss):
                    # lr too high: the weights are garbage now; the best ones are restored below
                    stop_reason = "diverged"
                    history.append(_record(epoch, train_loss, math.nan, start))
                    if on_epoch is not None:
                        on_epoch(epoch, config.epochs, history[-1])
                    break
                if sched is not None:
                    sched.step()
                val = evaluate(val_idx)
                history.append(_record(epoch, train_loss, val, start))
                if on_epoch is not None:
                    on_epoch(epoch, config.epochs, history[-1])
                if val < best:
                    best, best_epoch, bad = val, epoch, 0
                    best_state = [t.detach().clone() for t in tensors]
                else:
                    bad += 1
                    if bad >= config.patience and epoch < config.epochs:
                        stop_reason = "patience"
                        break
        finally:
            # In place (copy_ bumps the version counter, which invalidates op caches keyed on it,
            # e.g. the circulant spectrum cache); same tensor objects, so get_attr still reads them.
            # Also on an error or Ctrl-C: the student is left with its best weights so far.
            if best_state is not None:
                with torch.no_grad():
                    for t, b in zip(tensors, best_state):
                        t.copy_(b)
            for t, f in zip(tensors, flags):
                t.grad = None
                t.requires_grad_(f)
            for t in others:
                t.requires_grad_(True)

    return DistillResult(
        graph=student,
        history=history,
        best_epoch=best_epoch,
        stopped_early=stop_reason != "completed",
        trained=list(targets),
        params_trained=sum(t.numel() for t in tensors),
        initial_val_loss=initial,
        best_val_loss=best,
        stop_reason=stop_reason,
        losses={student.output_names[k] if k < len(student.output_names) else f"output_{k}": kind for k, kind in kinds.items()},
        train_rows=len(train_idx),
        val_rows=int(n_val),
        trainable=mode,
        masked=[t for t, m in zip(targets, masks) if m is not None],
    )


def _record(epoch: int, train_loss: float, val_loss: float, start: float) -> dict[str, Any]:
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": time.perf_counter() - start}


def _module_tensors(gm: torch.nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(gm.parameters()) + list(gm.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _prepare_leaves(student: Graph, targets: list[str], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors autograd and Adam can train: the student's own leaves.

    Each is a copy registered under the same name: a pipeline's result shares every tensor a
    pass did not replace with the graph it started from (usually the teacher), and training
    the shared object would move the teacher too. A copy is also what an inference tensor
    (made under ``inference_mode`` by some pass) needs, as ``requires_grad_`` refuses those."""
    out = []
    for target, t in zip(targets, tensors):
        student.set_tensor(target, t.detach().clone())  # a detached copy: always a leaf
        out.append(student.get_tensor(target))
    return out


def _check_differentiable(grads: Sequence[torch.Tensor | None] | None, targets: list[str]) -> None:
    """The first step must reach at least one trained tensor, else training would silently do nothing."""
    if grads is None or all(g is None for g in grads):
        raise PassError(
            f"distill: the student's outputs do not depend differentiably on {', '.join(targets)} "
            "(not used by the outputs, or an op on the path has no autograd support)"
        )


@torch.no_grad()
def _teacher_targets(
    teacher: Graph, cols: tuple[torch.Tensor, ...], batch: int, loss: str
) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Teacher outputs for every row (computed once), and the loss kind per used output.

    Used: floating outputs with one row per input row (an output without the batch dim cannot
    be sliced per batch, so it is left out).
    """
    n_rows = cols[0].shape[0]
    # the teacher may have been exported with a static batch of its own
    fixed = None if teacher.dynamic_batch else int(teacher.input_specs[0].shape[0])
    batch = fixed or batch
    chunks: list[tuple[torch.Tensor, ...]] = []
    for i in range(0, n_rows, batch):
        xs = tuple(c[i : i + batch] for c in cols)
        n = xs[0].shape[0]
        pad = batch - n if fixed else 0
        if pad:  # static batch: fill the last chunk by repeating a row, then drop the filler
            xs = tuple(torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) for x in xs)
        try:
            outs = teacher.run(*xs)
        except Exception as err:  # noqa: BLE001 -- user models raise anything
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PassError(f"distill: the teacher failed on the inputs: {first[:300]}") from None
        if pad:
            outs = tuple(o[:n] if o.dim() and o.shape[0] == batch else o for o in outs)
        chunks.append(outs)
    n_out = len(chunks[0])
    used = [
        k
        for k in range(n_out)
        if all(
            len(ch) == n_out and ch[k].dtype.is_floating_point and ch[k].dim() >= 1 and ch[k].shape[0] == min(batch, n_rows - i * batch)
            for i, ch in enumerate(chunks)
        )
    ]
    if not used:
        raise PassError("distill: the teacher has no floating output with one row per input row; nothing to distill against")
    targets = {k: torch.cat([ch[k] for ch in chunks]) for k in used}
    return targets, {k: _loss_kind(loss, targets[k]) for k in used}


# ---------------------------------------------------------------------------- data files
SUPPORTED = (".pt", ".pth", ".npy", ".npz", ".safetensors")


def _natural_key(name: str) -> list[Any]:
    """``arr_2`` before ``arr_10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_inputs(path: str | Path, *, label: str = "fine-tuning data") -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Read fine-tuning inputs from a file: one tensor, or one tensor per graph input.

    Parameters
    ----------
    path : str or Path
        ``.pt``/``.pth`` (``torch.load(weights_only=True)``: a tensor, a tuple/list/dict of
        tensors, or a list of per-batch tuples, concatenated per position), ``.npy`` (one
        array), ``.npz`` (arrays in file order), ``.safetensors`` (tensors in natural name order:
        ``x_2`` before ``x_10``).
    label : str
        What the file is, first in every error (``"--calibration"`` from the CLI).

    Returns
    -------
    Tensor or tuple of Tensor
        A single tensor when the file holds one, else a tuple in the order above.

    Raises
    ------
    PassError
        Missing file, unsupported extension, unreadable or empty content, non-tensor entries.
    """
    p = Path(path)
    if not p.is_file():
        raise PassError(
            f"{label} {p}: no such file; give a {'/'.join(SUPPORTED)} file of model inputs (e.g. written by 'compress samples')"
        )
    ext = p.suffix.lower()
    if ext not in SUPPORTED:
        raise PassError(f"{label} {p}: unsupported extension {ext or '(none)'}; use one of {', '.join(SUPPORTED)}")
    try:
        if ext in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
        elif ext == ".npy":
            import numpy as np

            obj = _from_numpy(np.load(p, allow_pickle=False))
        elif ext == ".npz":
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                obj = {k: _from_numpy(z[k]) for k in z.files}
        else:
            from safetensors.torch import load_file

            loaded = load_file(str(p))
            obj = {k: loaded[k] for k in sorted(loaded, key=_natural_key)}
    except PassError:
        raise
    except Exception as err:  # noqa: BLE001 -- every reader fails its own way on a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PassError(f"{label} {p}: cannot read it as {ext}: {first[:200]}") from None
    tensors = _to_tensors(obj, p, label)
    return tensors[0] if len(tensors) == 1 else tensors


def _from_numpy(a: Any) -> torch.Tensor:
    import numpy as np

    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise PassError(f"array of dtype {a.dtype} is not numeric")
    return torch.from_numpy(np.ascontiguousarray(a).copy())


def _to_tensors(obj: Any, p: Path, label: str = "fine-tuning data") -> tuple[torch.Tensor, ...]:
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)) and obj:
        if all(isinstance(x, torch.Tensor) for x in obj):
            return tuple(obj)
        if all(isinstance(x, (tuple, list)) and x and all(isinstance(y, torch.Tensor) for y in x) for x in obj):
            widths = {len(x) for x in obj}
            if len(widths) != 1:
                raise PassError(f"{label} {p}: batches hold different numbers of tensors {sorted(widths)}")
            try:
                return tuple(torch.cat([b[i] for b in obj]) for i in range(widths.pop()))
            except RuntimeError as err:
                raise PassError(f"{label} {p}: batches do not stack: {str(err).splitlines()[0][:200]}") from None
    if isinstance(obj, (tuple, list, Mapping)) and not obj:
        raise PassError(f"{label} {p}: holds no tensors")
    raise PassError(
        f"{label} {p}: holds a {type(obj).__name__}; expected a tensor, a tuple/list/dict of tensors, or a list of batch tuples"
    )


__all__ = ["DistillConfig", "DistillResult", "distill", "distill_loss", "load_inputs", "resolve_trainable", "trainable_targets"]
