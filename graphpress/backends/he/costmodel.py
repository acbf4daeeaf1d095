"""Measured HE cost model: time each BFV operation once per machine, predict layers from counts.

Claim: a layer's encrypted wall time is its operation counts (exact, from
:mod:`graphpress.lowering.he.counts`, the plans the kernels execute) times the per-operation seconds
measured here, within 30% per layer on the machine that measured them (checked by
``tests/backends/he/test_costmodel.py`` loosely and by ``benchmarks/he_digits.py`` on every
layer of the digits CNN).

:func:`measure_entry` times the operations listed in :mod:`graphpress.lowering.he.op_costs` for one
parameter set through a real :class:`~graphpress.backends.he.bfv.BFVContext` -- the same calls
the kernels make, so serialization, seeded encryption and NTT form are priced as used. Each
operation is timed ``repeat`` times (after a warm-up) and the median is kept; the operations
are interleaved round by round so that a burst of load on the shared machine hits all of them
alike, and every sample cycles through several distinct operands, as a layer does, rather than
one that stays in the CPU caches. Uploads use polynomials with half of their coefficients non-zero (encoding time grows with the non-zero count; inputs after a ReLU are
sparse, padded images are partly empty, so half is the middle of what layers send).

:func:`calibrate` measures the default grid (``N`` in 4096/8192/16384, plaintext bits
16..32, with and without a rotation chain) and writes the cache; :func:`ensure_costs` measures
only the parameter sets a program uses and are missing. :func:`predict_step` prices one step.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from typing import Any, Callable, Iterable

import numpy as np

from graphpress.errors import BackendError
from graphpress.lowering.he import counts as he_counts, op_costs as he_op_costs

#: Timed rounds per operation (medians), after one warm-up round.
DEFAULT_REPEAT = 7
#: Distinct operands per timed sample (see :func:`measure_entry`).
DEFAULT_POOL = 8


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def measure_entry(
    params: Any,
    *,
    plain_bits: int | None = None,
    batching: bool = False,
    repeat: int = DEFAULT_REPEAT,
    pool: int = DEFAULT_POOL,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of every operation of :data:`graphpress.lowering.he.op_costs.OPS` at ``params``.

    Each timed sample runs the operation on ``pool`` distinct operands in a row and divides by
    ``pool``: a layer touches tens to hundreds of different ciphertexts, and an operation timed
    on one operand that stays in the CPU caches runs faster than in a layer (measured: about
    1.2x on the digits CNN: pred/meas 0.74-0.81 with one operand, 0.88-0.97 with 8).

    Parameters
    ----------
    params : BFVParams
    plain_bits, batching : optional
        Recorded in the entry (what ``choose_params`` was asked for).
    repeat : int
        Timed rounds (after one warm-up round); the entry keeps medians.
    pool : int
        Distinct operands per timed sample.

    Returns
    -------
    dict
        A cache entry: the parameters, ``measured`` (UTC time), ``repeat``, ``pool`` and ``seconds``.
    """
    from graphpress.backends.he.bfv import BFVContext

    ctx = BFVContext(params, what="cost calibration")
    n, t = ctx.poly_degree, ctx.t
    rng = np.random.default_rng(seed)
    k = max(1, int(pool))

    def half_poly() -> np.ndarray:
        poly = np.zeros(n, dtype=np.int64)
        idx = rng.choice(n, n // 2, replace=False)
        poly[idx] = rng.integers(1, 256, idx.size)
        return poly

    weights = [ctx.plain_coeffs(rng.integers(0, t, n), ntt=True) for _ in range(k)]
    add_pt = ctx.plain_coeffs(rng.integers(0, t, n))
    polys = [half_poly() for _ in range(k)]
    cts = [ctx.upload_coeffs(p) for p in polys]
    cts_ntt = [ctx.to_ntt(c) for c in cts]
    results = [ctx.from_ntt_inplace(ctx.mul_plain(c, w)) for c, w in zip(cts_ntt, weights)]
    slot_vals = [rng.integers(0, 256, n) for _ in range(k)]
    slot_cts = [ctx.upload_slots(v) for v in slot_vals]
    none, half = np.arange(0), np.arange(0, n, 2)
    if params.key_switching:
        ctx.ensure_rotations([1], what="cost calibration")
    ops: dict[str, Callable[[int], Any]] = {
        "upload_coeffs": lambda j: ctx.upload_coeffs(polys[j]),
        "upload_slots": lambda j: ctx.upload_slots(slot_vals[j]),
        "download": lambda j: ctx.decrypt_coeffs(ctx.download(results[j]), none),
        "download_slots": lambda j: ctx.decrypt_slots(ctx.download(slot_cts[j])),
        "read_half": lambda j: ctx.decrypt_coeffs(results[j], half),
        "decrypt": lambda j: ctx.decrypt_coeffs(results[j], none),
        "ntt": lambda j: ctx.to_ntt(cts[j]),
        "product_intt": lambda j: ctx.from_ntt_inplace(ctx.mul_plain(cts_ntt[j], weights[j])),
        "mul_plain": lambda j: ctx.mul_plain(cts_ntt[j], weights[j]),
        "add": lambda j: ctx.add(results[j], results[j - 1]),
        "add_plain": lambda j: ctx.add_plain(results[j], add_pt),
    }
    if params.key_switching:
        ops["rotate"] = lambda j: ctx.rotate_rows(results[j], 1)
    times: dict[str, list[float]] = {name: [] for name in ops}
    for r in range(repeat + 1):
        polys[:] = [half_poly() for _ in range(k)]  # fresh operands: encoding time depends on the values
        for name, fn in ops.items():
            t0 = time.perf_counter()
            for j in range(k):
                fn(j)
            if r:  # round 0 is the warm-up
                times[name].append((time.perf_counter() - t0) / k)
    med = {name: statistics.median(v) for name, v in times.items()}
    # derived: an inverse NTT is timed after a fresh product; reading a value is the difference
    # between decrypting with half the coefficients read and with none, per value
    med["intt"] = max(med.pop("product_intt") - med["mul_plain"], 0.0)
    med["decode_coeff"] = max(med.pop("read_half") - med.pop("decrypt"), 0.0) / half.size
    return {
        "poly_degree": int(params.poly_degree),
        "coeff_modulus_bits": [int(b) for b in params.coeff_modulus_bits],
        "plain_modulus": int(params.plain_modulus),
        "plain_bits": plain_bits,
        "batching": bool(batching),
        "measured": _now(),
        "repeat": int(repeat),
        "pool": k,
        "seconds": med,
    }


def default_grid(degrees: Iterable[int] = he_op_costs.DEFAULT_DEGREES, plain_bits: Iterable[int] = he_op_costs.DEFAULT_PLAIN_BITS) -> list[tuple[Any, int, bool]]:
    """``(params, plain_bits, batching)`` for every distinct chain ``choose_params`` picks on the grid."""
    from graphpress.backends.he.bfv import choose_params

    out, seen = [], set()
    for n in degrees:
        for bits in plain_bits:
            for batching in (False, True):
                try:
                    params = choose_params(bits, n, batching=batching)
                except BackendError:
                    continue  # e.g. 32-bit t with rotations does not fit N = 4096
                key = he_op_costs.entry_key(params.poly_degree, params.coeff_modulus_bits)
                if key not in seen:
                    seen.add(key)
                    out.append((params, bits, batching))
    return out


def calibrate(
    degrees: Iterable[int] = he_op_costs.DEFAULT_DEGREES,
    plain_bits: Iterable[int] = he_op_costs.DEFAULT_PLAIN_BITS,
    *,
    repeat: int = DEFAULT_REPEAT,
    path: Any = None,
    on_entry: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Measure the default grid and write it to the cache (``he_op_costs.cache_path()``).

    Returns
    -------
    dict
        The new entries by :func:`graphpress.lowering.he.op_costs.entry_key`.
    """
    grid = default_grid(degrees, plain_bits)
    entries = {}
    for i, (params, bits, batching) in enumerate(grid):
        e = measure_entry(params, plain_bits=bits, batching=batching, repeat=repeat)
        entries[he_op_costs.entry_key(params.poly_degree, params.coeff_modulus_bits)] = e
        if on_entry is not None:
            on_entry(i + 1, len(grid), e)
    he_op_costs.write_entries(entries, path)
    return entries


def ensure_costs(steps: Iterable[Any], *, repeat: int = DEFAULT_REPEAT, path: Any = None) -> list[str]:
    """Measure (and cache) the parameter sets of ``steps`` that are not cached yet; returns their keys."""
    from graphpress.backends.he.bfv import BFVParams

    have = he_op_costs.machine_entries(path)
    todo: dict[str, Any] = {}
    for s in steps:
        key = he_op_costs.entry_key(s.params["poly_degree"], s.params["coeff_modulus_bits"])
        if key not in have and key not in todo:
            todo[key] = (BFVParams.from_dict(s.params), s.plain_bits, s.encoding == "slot-dense")
    entries = {k: measure_entry(p, plain_bits=b, batching=bt, repeat=repeat) for k, (p, b, bt) in todo.items()}
    if entries:
        he_op_costs.write_entries(entries, path)
    return list(entries)


def step_counts(step: Any, rows: int) -> dict[str, int]:
    """Analytic op counts of ``step`` on ``rows`` input vectors (images for a conv)."""
    n_deg = int(step.params["poly_degree"])
    b = step.b if step.encoding == "coeff-circulant" else 1
    try:
        if step.kind == "linear":
            return he_counts.counts_linear(step.encoding, step.out_features, step.in_features, n_deg, b=b, vectors=rows)
        c_in, h, w = step.in_shape
        kh, kw = step.kernel_size
        return he_counts.counts_conv(step.encoding, step.out_features, c_in, h, w, kh, kw, n_deg, b, tuple(step.stride), tuple(step.padding), rows)
    except ValueError as err:
        raise BackendError(f"he: layer {step.name!r}: {err}") from None


def predict_step(step: Any, rows: int, *, path: Any = None) -> dict[str, Any] | None:
    """Predicted seconds of one call of ``step`` on ``rows`` inputs, or None when its parameter
    set has no cached costs. Returns ``{"seconds", "counts", "terms"}`` (terms: per operation)."""
    entry = he_op_costs.find_entry(step.params["poly_degree"], step.params["coeff_modulus_bits"], path=path)
    if entry is None:
        return None
    counts = step_counts(step, rows)
    if step.encoding == "slot-dense":
        n_eff = step.in_features if step.kind == "linear" else step.in_features * step.kernel_size[0] * step.kernel_size[1]
        inv = he_op_costs.slot_inverse_ntts(step.out_features, n_eff, int(step.params["poly_degree"]), counts["decryptions"])
        terms = he_op_costs.layer_terms(step.encoding, counts, entry["seconds"], inverse_ntts=inv)
    else:
        conv = None
        if step.kind == "conv2d":
            conv = {"h": step.in_shape[1], "w": step.in_shape[2], "kh": step.kernel_size[0], "kw": step.kernel_size[1], "padding": step.padding}
        vals = he_op_costs.values_read(step.kind, step.out_features, rows, conv)
        terms = he_op_costs.layer_terms(step.encoding, counts, entry["seconds"], values=vals)
    return {"seconds": he_op_costs.total_seconds(terms), "counts": counts, "terms": terms}


__all__ = ["DEFAULT_REPEAT", "calibrate", "default_grid", "ensure_costs", "measure_entry", "predict_step", "step_counts"]
