"""Replace ReLU/GELU/SiLU by fitted low-degree polynomials and max-pool by average-pool, for encrypted inference.

Homomorphic encryption (CKKS) evaluates additions and multiplications only, so a fully
encrypted ("polynomial protocol") model must be a polynomial of its input. This pass makes it one:

* every ``aten.relu`` / ``relu_`` (and ``gelu``, ``silu`` when enabled) becomes

      y = a2 * (x * x) + a1 * x + a0                         (degree 2, the default)
      y = a3 * ((x * x) * x) + a2 * (x * x) + a1 * x + a0    (degree 3)

  written as plain ``aten.mul`` / ``aten.add`` nodes whose coefficients ``a_k`` are 0-d
  parameters of the graph. ``a`` is the least-squares fit of the activation on the values its
  input actually takes on the calibration batches (``graph.calibration``, else the example
  inputs), see :mod:`graphpress.passes.polyact.fit`. With ``sequential=True`` (default) the
  activations are fitted in graph order, each on the inputs it sees *after* the earlier ones
  were replaced, so later fits absorb the drift of earlier ones.
* every ``aten.max_pool2d`` becomes ``aten.avg_pool2d`` with the same kernel, stride, padding
  and ceil mode (``count_include_pad=False``, so a padded window averages its real elements):
  the maximum is not a polynomial, the mean is linear.

Why degree 2: CKKS pays for multiplicative *depth*. ``x*x`` costs one ciphertext level,
``x^3`` two; each level is one ~40-bit prime of the coefficient modulus, and 128-bit security
caps the modulus at 218/438/881 bits for ring degree 8192/16384/32768. A degree-2 activation
is one level (the HE backend folds ``a2``/``a1``/``a0`` into the neighbouring linear layers by
completing the square, so only the square remains), which keeps e.g. the digits CNN (4 linear
layers + 3 activations = 7 levels) inside ring degree 16384; degree 3 would need 10 levels and
ring degree 32768 (ciphertexts twice as large, every operation at least twice as slow).

Every coefficient multiply/add node is annotated with ``trainable_inputs = [1]`` so
:func:`graphpress.train.distill.distill` with ``trainable="annotated"`` trains only the
coefficients; the recommended recovery is ``trainable="all"`` (every weight and coefficient,
the polynomial network fine-tuned against the original).

Lossy (``exact = False``): a quadratic is a poor ReLU away from its fitted range, and an
average is not a maximum. No exactness claim is made; the default budget ``min_sqnr_db = 0``
only rejects a rewrite that destroys the output (the digits CNN lands at ~5 dB SQNR on its
check inputs before fine-tuning, yet 98.7% test accuracy vs 99.3%); set a real budget in a
recipe, fine-tune, and judge the task metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.opsets import MAX_POOL_2D, NON_POLYNOMIAL
from graphpress.ir.rewrite import Skips, add_constant, arg, insert_call, packet
from graphpress.passes.base import PassResult, register
from graphpress.passes.layers import record
from graphpress.passes.polyact.fit import ACTIVATIONS, FIT_MODES, fit_activation

aten = torch.ops.aten
_NAME = "polynomial-activations"

_ACTS = {aten.relu: "relu", aten.relu_: "relu", aten.gelu: "gelu", aten.gelu_: "gelu", aten.silu: "silu", aten.silu_: "silu"}
# What this pass cannot replace: everything non-polynomial except the activations above and 2-d max
# pooling (turned into average pooling); each is counted as a skip.
_NOT_POLYNOMIAL = NON_POLYNOMIAL - frozenset(_ACTS) - MAX_POOL_2D


@dataclass(frozen=True)
class PolynomialActivationsConfig:
    """Options of ``polynomial-activations``.

    Attributes
    ----------
    degree : int
        2 (one HE level per activation) or 3 (two levels).
    activations : tuple of str
        Which activations to replace (subset of relu, gelu, silu).
    replace_max_pool : bool
        Turn ``max_pool2d`` into ``avg_pool2d`` (same kernel/stride/padding).
    fit : str
        ``"samples"``: least squares under the observed input distribution; ``"range"``: uniform
        least squares over the observed range.
    quantile : float
        The fitted range is the ``[quantile, 1 - quantile]`` quantile interval of the observed
        inputs (0: min to max); outliers beyond it do not pull the fit.
    sequential : bool
        Fit each activation on its inputs after the earlier ones were replaced.
    max_samples : int
        Observed inputs kept per activation (a seeded random subset beyond that).
    seed : int
        Seed of that subset.
    min_sqnr_db, max_kl : float, optional
        Budget the pipeline checks against the previous graph (see the module docstring).
    """

    version: int = 1
    degree: int = 2
    activations: tuple[str, ...] = ACTIVATIONS
    replace_max_pool: bool = True
    fit: str = "samples"
    quantile: float = 0.0
    sequential: bool = True
    max_samples: int = 200_000
    seed: int = 0
    min_sqnr_db: float | None = 0.0
    max_kl: float | None = None

    def __post_init__(self) -> None:
        if self.degree not in (2, 3):
            raise PassError(f"pass '{_NAME}': degree must be 2 or 3, got {self.degree!r}")
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if bad:
            raise PassError(f"pass '{_NAME}': unknown activation(s) {', '.join(map(repr, bad))}; supported: {', '.join(ACTIVATIONS)}")
        if self.fit not in FIT_MODES:
            raise PassError(f"pass '{_NAME}': fit must be one of {', '.join(FIT_MODES)}, got {self.fit!r}")
        if not 0.0 <= self.quantile < 0.5:
            raise PassError(f"pass '{_NAME}': quantile must be in [0, 0.5), got {self.quantile!r}")
        if self.max_samples < 16:
            raise PassError(f"pass '{_NAME}': max_samples must be >= 16, got {self.max_samples!r}")


@register(_NAME)
class PolynomialActivations:
    """Replace activations by fitted polynomials and max-pool by avg-pool (see module docstring)."""

    exact = False
    Config = PolynomialActivationsConfig

    def __init__(self, config: PolynomialActivationsConfig = PolynomialActivationsConfig()):
        self.config = config

    def __call__(self, graph: Graph) -> PassResult:
        cfg = self.config
        skipped = Skips()
        pools = self._replace_pools(graph, skipped) if cfg.replace_max_pool else []
        if not cfg.replace_max_pool:
            n = sum(1 for _ in graph.call_nodes(*MAX_POOL_2D))
            if n:
                skipped.add("max_pool2d kept (replace_max_pool=false)", n)
        targets = []
        for node in graph.call_nodes(*_ACTS):
            name = _act_name(node)
            if name is None:
                skipped.add("activation with unsupported options")
            elif name.removesuffix("_tanh") not in cfg.activations:
                skipped.add(f"activation '{name.removesuffix('_tanh')}' not enabled in config")
            else:
                targets.append((node, name))
        for node in graph.call_nodes(*_NOT_POLYNOMIAL):
            skipped.add(f"{packet(node)._qualified_op_name.split('::')[-1]} has no polynomial replacement here")

        fits: list[dict] = []
        if targets:
            observed = {} if cfg.sequential else _observe(graph, [n.args[0] for n, _ in targets], cfg)
            for node, name in targets:
                x = node.args[0]
                samples = _observe(graph, [x], cfg)[x] if cfg.sequential else observed[x]
                fit = fit_activation(samples, name, cfg.degree, mode=cfg.fit, quantile=cfg.quantile)
                record = {"node": node.name, "module": graph.source_module(node), "activation": name, **fit.to_dict()}
                _rewrite(graph, node, fit.coefficients)
                fits.append(record)
                if cfg.sequential:
                    graph.recompile()
        if pools or fits:
            graph.recompile()
        return PassResult(
            graph,
            changed=bool(pools or fits),
            stats={
                "replaced_activations": len(fits),
                "replaced_max_pools": len(pools),
                "degree": cfg.degree,
                "he_levels_per_activation": 1 if cfg.degree == 2 else 2,
                "activations": fits,
                "pools": pools,
                "skipped": dict(skipped),
            },
        )

    # ------------------------------------------------------------------ max-pool
    @staticmethod
    def _replace_pools(graph: Graph, skipped: Skips) -> list[dict]:
        done = []
        for node in graph.call_nodes(*MAX_POOL_2D):
            if packet(node) is aten.max_pool2d_with_indices:
                skipped.add("max_pool2d_with_indices (its indices are used)")
                continue
            kernel = list(arg(node, 1, "kernel_size"))
            stride = list(arg(node, 2, "stride", []) or kernel)
            padding = list(arg(node, 3, "padding", [0, 0]))
            dilation = list(arg(node, 4, "dilation", [1, 1]))
            ceil_mode = bool(arg(node, 5, "ceil_mode", False))
            if any(d != 1 for d in dilation):
                skipped.add("max_pool2d with dilation != 1 (avg_pool2d has none)")
                continue
            avg = insert_call(
                graph, aten.avg_pool2d.default, (node.args[0], kernel, stride, padding, ceil_mode, False), before=node, like=node
            )
            graph.annotations(avg)["polyact"] = {"replaced": "max_pool2d"}
            node.replace_all_uses_with(avg)
            graph.gm.graph.erase_node(node)
            done.append({"node": node.name, "module": graph.source_module(avg), "kernel": kernel, "stride": stride, "padding": padding,
                         "replacement": "avg_pool2d"})
        return done


def _act_name(node: fx.Node) -> str | None:
    """``relu``/``gelu``/``gelu_tanh``/``silu`` for a supported activation node, else None."""
    name = _ACTS[packet(node)]
    if name == "gelu":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(arg(node, 1, "approximate", "none"))
    return name if len(node.args) == 1 and not node.kwargs else None


def _observe(graph: Graph, nodes: list[fx.Node], cfg: PolynomialActivationsConfig) -> dict[fx.Node, torch.Tensor]:
    """Values each of ``nodes`` takes on the calibration batches (a seeded subset of at most ``max_samples``)."""
    seen = record(graph, nodes)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for n in nodes:
        if not seen[n.name]:
            raise PassError(f"pass '{_NAME}': node '{n.name}' produced no tensor on the calibration batches")
        x = torch.cat([v.reshape(-1).double() for v in seen[n.name]])
        if x.numel() > cfg.max_samples:
            x = x[torch.randperm(x.numel(), generator=gen)[: cfg.max_samples]]
        out[n] = x
    return out


def _rewrite(graph: Graph, act: fx.Node, coefficients: tuple[float, ...]) -> None:
    """Replace ``act`` by ``sum_k a_k x^k`` built from aten mul/add and 0-d coefficient parameters."""
    x = act.args[0]
    module = graph.source_module(act)
    val = x.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    mul, add = aten.mul.Tensor, aten.add.Tensor
    stem = act.name

    def coef(k: int) -> fx.Node:
        return add_constant(graph, f"{stem}_poly_a{k}", torch.tensor(coefficients[k], dtype=dtype), before=act, module=module)

    def call(target, args, role: str, trainable: bool = False) -> fx.Node:
        node = insert_call(graph, target, args, before=act, like=act)
        ann = graph.annotations(node)
        ann.pop("trainable_inputs", None)
        ann["polyact"] = {"activation": _ACTS[packet(act)], "term": role}
        if trainable:
            ann["trainable_inputs"] = [1]
        return node

    powers = {1: x, 2: call(mul, (x, x), "x^2")}
    if len(coefficients) > 3:
        powers[3] = call(mul, (powers[2], x), "x^3")
    terms = [call(mul, (powers[k], coef(k)), f"a{k}*x^{k}", trainable=True) for k in sorted(powers, reverse=True)]
    total = terms[0]
    for t in terms[1:]:
        total = call(add, (total, t), "sum")
    out = call(add, (total, coef(0)), "+a0", trainable=True)
    act.replace_all_uses_with(out)
    graph.gm.graph.erase_node(act)  # in-place forms are impure: erase explicitly


def polynomial_of(coefficients: np.ndarray | list[float], x: torch.Tensor) -> torch.Tensor:
    """``sum_k a_k x^k`` in the same order of operations the rewritten graph uses (for tests)."""
    a = [float(c) for c in coefficients]
    out = a[-1] * x ** (len(a) - 1)
    for k in range(len(a) - 2, 0, -1):
        out = out + a[k] * x**k
    return out + a[0]


__all__ = ["PolynomialActivations", "PolynomialActivationsConfig", "polynomial_of"]
