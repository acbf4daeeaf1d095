"""Cost models for the block-size search: what one layer costs at block size b.

A cost model is a function ``cost(layer, b, **options) -> float`` (``layer`` a
:class:`~graphpress.passes.circulant.layers.Layer`) registered in :data:`COST_MODELS` under a
name the ``circulant-search`` config selects, with a one-line ``describe`` and a ``unit``. The
search only needs costs that add up over layers; the numbers below are graphpress's own analytic
models, derived from first principles (formulas below and in ``docs/passes/circulant-search.md``),
not measurements of an HE library. The HE issue adds a *measured* HE cost model with
:func:`register_cost_model`.

Notation: a layer is an ``m x n`` matrix (``m = out_features``, ``n = in_features``); a conv has
``C_out = m``, ``C_in = n``, a ``k_h x k_w`` kernel and ``HW`` output positions; a linear layer is
applied to ``T`` tokens (``out_positions``, 1 for an MLP at batch 1). ``N`` is the polynomial
degree (``poly_degree``), ``S = N / 2`` the slot count of a batched (slot-encoded) ciphertext.

``he-analytic`` -- coefficient encoding (Cheetah, USENIX Security 2022; PrivCirNet's CirEncode,
NeurIPS 2024). A plaintext-ciphertext product in ``Z_q[X]/(X^N + 1)`` multiplies polynomials, i.e.
computes a (nega)cyclic convolution of the coefficient vectors, so a whole convolution or a
whole ``n_o x n_i`` sub-matrix product (``n_o * n_i <= N``) costs one product and no rotation::

    dense linear:   P(1) = T * ceil(m * n / N)                (ideal packing of W into polynomials)
    dense conv:     P(1) = C_out * ceil(C_in * HW / N)         (Cheetah: one product per output
                                                                channel per input ciphertext; the
                                                                k x k kernel is absorbed in it)

A ``b x b`` circulant block *is* a length-b cyclic convolution, which coefficient encoding does
for the price of one length-b vector, so CirEncode packs the compact weights (b times fewer
numbers)::

    block-circulant linear:  P(b) = T * ceil(m * n / (b * N))
    block-circulant conv:    P(b) = max(C_out / b * ceil(C_in * HW / N),  ceil(C_out * HW / N))

(the second term: at least one product per output ciphertext). Rotations / key switches: 0 for
the products. What remains per output ciphertext -- coefficient extraction (free), the
secret-share conversion (one masking addition and one ciphertext sent), and Cheetah's optional
PackLWEs re-packing (automorphisms) -- does not depend on b and is not counted.
Cost = ``P(b) + ROTATION_WEIGHT * R(b)`` with ``R(b) = 0``; non-increasing in b.

``he-slots-bsgs`` -- slot (SIMD) encoding with the diagonal method and baby-step/giant-step
rotations (Halevi-Shoup; GAZELLE's hybrid variant). An ``m x n`` matrix has ``D = min(m, n)``
generalized diagonals of length ``L = max(m, n)``; each costs one product, and BSGS reaches all
rotations of the input with ``n1 - 1`` baby and ``n2 - 1`` giant rotations,
``n1 = 2^ceil(log2(D) / 2)``, ``n2 = ceil(D / n1)``::

    linear:  P = T * D * ceil(L / S)
             R = T * (ceil(L / S) * (n1 - 1 + n2 - 1) + ceil(log2(L / D)))      (+ rotate-and-sum)
    conv:    g = max(1, S // HW) channels per ciphertext, t = ceil(HW / S) spatial tiles,
             c_in = ceil(C_in / g), c_out = ceil(C_out / g) ciphertexts,
             D = min(g, C_in, C_out) channel diagonals per (input, output) ciphertext pair,
             n1, n2 from D
             P = t * k_h k_w * c_in * c_out * D
             R = t * ((k_h k_w - 1) * c_in + k_h k_w * c_in * (n1 - 1) + c_out * (n2 - 1))

(GAZELLE-style: the ``k_h k_w - 1`` spatial rotations of each input ciphertext, then per kernel
offset the diagonal method over the channels packed in a ciphertext.)

Block-circulance does *not* reduce these: diagonal ``d`` of a block-circulant ``W`` is
``W[r, r + d] = c[r // b, (r + d) // b][(-d) mod b]`` -- the block index changes along the
diagonal, so every diagonal is a generic, non-zero vector; none vanishes and none repeats. The
cost is flat in b, which is why the encoding matters (coefficient encoding is what turns the
b-fold parameter saving into a b-fold HE saving).

``ROTATION_WEIGHT`` (10) converts rotations into product-equivalents: a plaintext-ciphertext
product in NTT form is ``2 L N`` modular multiplications for ``L`` RNS limbs, a rotation is a key
switch -- a digit decomposition, ``(dnum + 2) L``-ish NTTs of ``N/2 log2 N`` butterflies and
``2 dnum L N`` multiplications -- roughly an order of magnitude more for small ``L``.

``he-measured`` -- predicted milliseconds of the layer's encrypted execution under coefficient
encoding on *this machine*: the exact operation counts of the kernels' plans
(:mod:`graphpress.lowering.he.counts`, ``coeff-circulant`` at ``b > 1``, ``coeff-dense`` at ``b = 1``;
one input vector per output position of a linear, one image for a conv) times the per-operation
seconds the HE backend measured and cached (:mod:`graphpress.lowering.he.op_costs`: encrypt + send,
NTTs, products, additions, receive + decrypt, coefficients read), at ``poly_degree`` with the
reference parameter chain (a 24-bit plaintext modulus). Unlike ``he-analytic`` it prices the
ciphertexts sent and received (which do not shrink with ``b`` as fast as the products do) in
the machine's own proportions. Needs ``compress he-calibrate`` first (a one-line error says so).

``he-secure`` -- predicted milliseconds of the layer in the secure two-party protocol
(:mod:`graphpress.backends.he.secure`, the HE backend's default) on *this machine*: its exact
ciphertext counts (:func:`graphpress.lowering.he.counts.secure_counts` on the protocol's own
tiling, ``SECURE_PLAN_WEIGHTS``: input ciphertexts, products, responses and the coefficients
read from each) times the per-operation seconds measured through the protocol's real client and
server steps (:func:`graphpress.lowering.he.op_costs.secure_layer_seconds`: an input costs its
encryption, upload, the server's share and NTT; a response its inverse NTT, masked flooded zero,
switch, packing and decryption; plus every byte on the channel), at ``poly_degree`` with two
data primes. What it predicts is what the benchmark measures (``benchmarks/he_resnet20.py``):
per-ciphertext costs, not products, dominate, so it falls with ``b`` far slower than
``he-analytic``. Needs ``compress he-calibrate --secure`` first (a one-line error says so).

``params`` -- compact parameters ``dense_params / b``.

``latency`` -- measured plaintext latency (microseconds, batch 1, this machine) of the layer's op:
``graphpress.ir.circulant.fft_matmul`` for a block-circulant linear (``F.linear`` at b = 1);
``F.conv2d`` on the dense expansion for a conv -- circulant convs run dense in torch, so the
conv cost is flat in b. Median of a few milliseconds of repetitions, cached per (kind, shape, b).
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from graphpress.errors import PassError
from graphpress.lowering.he import counts as he_counts, op_costs as he_op_costs
from graphpress.ir.circulant import fft_matmul
from graphpress.passes.circulant.layers import Layer

#: Product-equivalents of one rotation (key switch); see the module docstring.
ROTATION_WEIGHT = 10.0
DEFAULT_POLY_DEGREE = 8192


@dataclass(frozen=True)
class CostModel:
    """A registered cost model: ``model(layer, b, **options) -> float``.

    ``options`` names the keyword options the model reads (e.g. ``poly_degree``); others passed
    by the search are ignored, so every model can be called the same way.
    """

    name: str
    fn: Callable[..., float]
    describe: str
    unit: str
    options: tuple[str, ...] = ()

    def __call__(self, layer: Layer, b: int, **options: Any) -> float:
        kw = {k: v for k, v in options.items() if k in self.options}
        return float(self.fn(layer, b, **kw))


COST_MODELS: dict[str, CostModel] = {}


def register_cost_model(name: str, fn: Callable[..., float], describe: str, unit: str, options: tuple[str, ...] = ()) -> CostModel:
    """Register ``fn(layer, b, **options) -> float`` under ``name`` (e.g. a measured HE model)."""
    if name in COST_MODELS and COST_MODELS[name].fn is not fn:
        raise ValueError(f"cost model {name!r} registered twice")
    model = CostModel(name, fn, describe, unit, tuple(options))
    COST_MODELS[name] = model
    return model


def get_cost_model(name: str, *, owner: str = "circulant-search") -> CostModel:
    """The cost model registered as ``name``; an unknown name is a one-line error with a suggestion."""
    if name not in COST_MODELS:
        close = difflib.get_close_matches(name, COST_MODELS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise PassError(f"pass '{owner}': option 'cost_model': unknown cost model '{name}': {hint}known: {', '.join(sorted(COST_MODELS))}")
    return COST_MODELS[name]


def _check_b(layer: Layer, b: int) -> None:
    if not layer.fits(b):
        raise ValueError(f"layer {layer.name}: block size {b} does not fit {layer.out_features}x{layer.in_features}")


def _check_degree(poly_degree: int) -> int:
    n = int(poly_degree)
    if n < 2 or n & (n - 1):
        raise PassError(f"option 'poly_degree': {poly_degree!r} is not a power of two >= 2")
    return n


# ---------------------------------------------------------------------------- he-analytic
def he_coefficient_counts(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> dict[str, int]:
    """Plaintext-ciphertext products and rotations under coefficient encoding (see module docstring).

    Returns
    -------
    dict
        ``{"products": P(b), "rotations": 0}``.
    """
    _check_b(layer, b)
    n_deg = _check_degree(poly_degree)
    m, n = layer.out_features, layer.in_features
    if layer.kind == "linear":
        products = layer.out_positions * max(1, math.ceil(m * n / (b * n_deg)))
    else:
        hw = layer.out_positions
        products = max((m // b) * math.ceil(n * hw / n_deg), math.ceil(m * hw / n_deg), 1)
    return {"products": int(products), "rotations": 0}


def he_analytic_cost(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> float:
    """Coefficient-encoding HE cost: ``P(b) + ROTATION_WEIGHT * 0`` (product-equivalents)."""
    c = he_coefficient_counts(layer, b, poly_degree)
    return c["products"] + ROTATION_WEIGHT * c["rotations"]


# ---------------------------------------------------------------------------- he-slots-bsgs
def _bsgs(d: int) -> tuple[int, int]:
    """Baby and giant step counts for ``d`` diagonals: ``n1 = 2^ceil(log2(d)/2)``, ``n2 = ceil(d/n1)``."""
    n1 = 1 << math.ceil(math.log2(d) / 2) if d > 1 else 1
    return n1, math.ceil(d / n1)


def he_slots_counts(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> dict[str, int]:
    """Products and rotations of the slot-encoded diagonal method with BSGS; independent of ``b``."""
    _check_b(layer, b)
    slots = _check_degree(poly_degree) // 2
    m, n = layer.out_features, layer.in_features
    if layer.kind == "linear":
        t = layer.out_positions
        d, length = min(m, n), max(m, n)
        cts = math.ceil(length / slots)
        n1, n2 = _bsgs(d)
        products = t * d * cts
        rotations = t * (cts * (n1 - 1 + n2 - 1) + math.ceil(math.log2(length / d)))
    else:
        hw = layer.out_positions
        kk = layer.kernel[0] * layer.kernel[1]
        g = max(1, slots // hw)
        tiles = math.ceil(hw / slots)
        c_in, c_out = math.ceil(n / g), math.ceil(m / g)
        d = min(g, n, m)
        n1, n2 = _bsgs(d)
        products = tiles * kk * c_in * c_out * d
        rotations = tiles * ((kk - 1) * c_in + kk * c_in * (n1 - 1) + c_out * (n2 - 1))
    return {"products": int(products), "rotations": int(rotations)}


def he_slots_cost(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> float:
    """Slot-encoding HE cost ``P + ROTATION_WEIGHT * R`` (product-equivalents); flat in ``b``."""
    c = he_slots_counts(layer, b, poly_degree)
    return c["products"] + ROTATION_WEIGHT * c["rotations"]


# ---------------------------------------------------------------------------- he-measured
def _pair(v: Any) -> tuple[int, int]:
    v = [int(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _conv_dims(layer: Layer) -> tuple[int, int, int, int, tuple[int, int], tuple[int, int]]:
    """``(H, W, kh, kw, stride, padding)`` of a conv layer's input and kernel, as the HE plans take them."""
    shape, stride, padding, _dilation = _conv_geometry(layer.node, layer)
    kh, kw = layer.kernel
    return shape[2], shape[3], kh, kw, _pair(stride), _pair(padding)


def he_measured_cost(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> float:
    """Predicted milliseconds of the coefficient-encoded layer at block size ``b`` (module docstring)."""
    _check_b(layer, b)
    n_deg = _check_degree(poly_degree)
    entry = he_op_costs.find_entry(n_deg)
    if entry is None:
        raise PassError(
            f"cost model 'he-measured': no measured HE op costs for N={n_deg} on this machine in {he_op_costs.cache_path()}; "
            f"run `compress he-calibrate -N {n_deg}` (or graphpress.backends.he.costmodel.calibrate([{n_deg}]))"
        )
    encoding = "coeff-circulant" if b > 1 else "coeff-dense"
    m, n = layer.out_features, layer.in_features
    try:
        if layer.kind == "linear":
            counts = he_counts.counts_linear(encoding, m, n, n_deg, b=b, vectors=layer.out_positions)
            values = he_op_costs.values_read("linear", m, layer.out_positions)
        else:
            h, w, kh, kw, stride, pad = _conv_dims(layer)
            counts = he_counts.counts_conv(encoding, m, n, h, w, kh, kw, n_deg, b, stride, pad, 1)
            values = he_op_costs.values_read("conv2d", m, 1, {"h": h, "w": w, "kh": kh, "kw": kw, "padding": pad})
        terms = he_op_costs.layer_terms(encoding, counts, entry["seconds"], values=values)
    except (ValueError, KeyError) as err:
        raise PassError(f"cost model 'he-measured': layer {layer.name} at b={b}: {str(err).strip(chr(34))}") from None
    return 1e3 * he_op_costs.total_seconds(terms)


# ---------------------------------------------------------------------------- he-secure
def he_secure_cost(layer: Layer, b: int, poly_degree: int = DEFAULT_POLY_DEGREE) -> float:
    """Predicted milliseconds of the layer in the secure protocol at block size ``b`` (module docstring)."""
    _check_b(layer, b)
    n_deg = _check_degree(poly_degree)
    cost = he_op_costs.secure_entry(n_deg)
    if cost is None:
        raise PassError(
            f"cost model 'he-secure': no secure-protocol costs for N={n_deg} on this machine in {he_op_costs.cache_path()}; "
            f"run `compress he-calibrate --secure -N {n_deg}`"
        )
    m, n = layer.out_features, layer.in_features
    weights = he_counts.SECURE_PLAN_WEIGHTS
    try:
        if layer.kind == "linear":
            plan = he_counts.plan_coeff_linear(m, n, n_deg, b, layer.name, weights)
            counts = he_counts.secure_counts(plan, layer.out_positions)
        else:
            h, w, kh, kw, stride, pad = _conv_dims(layer)
            plan = he_counts.plan_coeff_conv(m, n, h, w, kh, kw, n_deg, b, stride, pad, layer.name, weights)
            counts = he_counts.secure_counts(plan)
    except ValueError as err:
        raise PassError(f"cost model 'he-secure': layer {layer.name} at b={b}: {str(err).strip(chr(34))}") from None
    return 1e3 * he_op_costs.secure_layer_seconds(counts, n_deg, cost)[0]


# ---------------------------------------------------------------------------- params
def params_cost(layer: Layer, b: int) -> float:
    """Compact parameter count ``dense_params / b``."""
    _check_b(layer, b)
    return layer.dense_params / b


# ---------------------------------------------------------------------------- latency
_LATENCY_CACHE: dict[tuple, float] = {}
_TARGET_S = 0.002  # time spent per measurement: cheap, yet many repetitions of small ops
_MAX_REPS = 200


def _median_us(fn: Callable[[], Any]) -> float:
    fn()  # warm-up (allocator, FFT plans)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < _MAX_REPS and (time.perf_counter() - start < _TARGET_S or len(times) < 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def _conv_geometry(node: fx.Node | None, layer: Layer) -> tuple[tuple[int, ...], Any, Any, Any]:
    """Input shape at batch 1 and (stride, padding, dilation) of a conv node; a square 'same'
    conv over ``out_positions`` when the node carries no shape metadata."""
    try:
        args = list(node.args) + [None] * 7
        val = node.args[0].meta["val"]
        shape = (1, *(int(d) for d in val.shape[1:]))
        if len(shape) != 4:
            raise ValueError(shape)
        return shape, args[3] or 1, args[4] or 0, args[5] or 1
    except Exception:  # noqa: BLE001 -- no usable metadata
        side = max(1, math.isqrt(layer.out_positions))
        return (1, layer.in_features, side, side), 1, layer.kernel[0] // 2, 1


def latency_cost(layer: Layer, b: int) -> float:
    """Measured plaintext latency in microseconds at batch 1 (see module docstring); cached."""
    _check_b(layer, b)
    m, n = layer.out_features, layer.in_features
    if layer.kind == "linear":
        key = ("linear", m, n, layer.out_positions, b)
        if key not in _LATENCY_CACHE:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(layer.out_positions, n, generator=gen)
            with torch.no_grad():
                if b == 1:
                    w = torch.randn(m, n, generator=gen)
                    _LATENCY_CACHE[key] = _median_us(lambda: F.linear(x, w))
                else:
                    c = torch.randn(m // b, n // b, b, generator=gen)
                    _LATENCY_CACHE[key] = _median_us(lambda: fft_matmul(x, c))
        return _LATENCY_CACHE[key]
    shape, stride, padding, dilation = _conv_geometry(layer.node, layer)
    # no b in the key: a circulant conv runs as a dense conv on the expanded weight
    key = ("conv2d", m, n, layer.kernel, shape, str(stride), str(padding), str(dilation))
    if key not in _LATENCY_CACHE:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(*shape, generator=gen)
        w = torch.randn(m, n, *layer.kernel, generator=gen)
        with torch.no_grad():
            _LATENCY_CACHE[key] = _median_us(lambda: F.conv2d(x, w, None, stride, padding, dilation))
    return _LATENCY_CACHE[key]


register_cost_model(
    "he-analytic",
    he_analytic_cost,
    "coefficient-encoded HE (Cheetah/PrivCirNet CirEncode): plaintext-ciphertext products, linear T*ceil(mn/(bN)), "
    "conv max(C_out/b*ceil(C_in*HW/N), ceil(C_out*HW/N)); no rotations",
    "HE product-equivalents",
    ("poly_degree",),
)
register_cost_model(
    "he-slots-bsgs",
    he_slots_cost,
    "slot-encoded HE, diagonal method + baby-step/giant-step rotations: products + 10*rotations, flat in b",
    "HE product-equivalents",
    ("poly_degree",),
)
register_cost_model(
    "he-measured",
    he_measured_cost,
    "coefficient-encoded HE priced on this machine: exact kernel op counts x per-op seconds cached by `compress he-calibrate`",
    "milliseconds (predicted, this machine)",
    ("poly_degree",),
)
register_cost_model(
    "he-secure",
    he_secure_cost,
    "the secure two-party protocol priced on this machine: its exact ciphertext counts x per-op seconds measured "
    "through its steps (`compress he-calibrate --secure`)",
    "milliseconds (predicted, this machine)",
    ("poly_degree",),
)
register_cost_model("params", params_cost, "compact parameters dense_params / b", "parameters")
register_cost_model(
    "latency",
    latency_cost,
    "measured plaintext latency at batch 1: fft_matmul for linear (F.linear at b=1), dense F.conv2d for conv (flat in b)",
    "microseconds",
)

__all__ = [
    "COST_MODELS",
    "DEFAULT_POLY_DEGREE",
    "ROTATION_WEIGHT",
    "CostModel",
    "get_cost_model",
    "he_analytic_cost",
    "he_coefficient_counts",
    "he_measured_cost",
    "he_secure_cost",
    "he_slots_cost",
    "he_slots_counts",
    "latency_cost",
    "params_cost",
    "register_cost_model",
]
