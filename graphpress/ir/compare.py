"""Numeric comparison of model outputs: allclose with dtype-aware tolerance, SQNR, KL.

Exact passes are held to :func:`tolerance` (relative to the reference's magnitude, so a logit
of 30 and an activation of 0.01 are judged alike); lossy passes to an SQNR floor in dB,
``10 log10(sum(ref^2) / sum((ref - test)^2))``, or a KL budget on logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

# (rtol, atol-relative-to-max|ref|) per dtype: fp32 rounding after a fold or a reassociation of
# sums lands near 1e-6 relative; half precisions near 1e-3.
_TOL = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def tolerance(dtype: torch.dtype, ref_absmax: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing outputs of ``dtype``; atol scales with the reference magnitude."""
    rtol, atol = _TOL.get(dtype, (0.0, 0.0))
    return rtol, atol * max(1.0, ref_absmax)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB; ``inf`` when equal, ``-inf`` when the error is
    not finite (a NaN must never pass an SQNR floor by comparing false)."""
    return sqnr_from_sums(*square_sums(ref, test))


def square_sums(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """``(sum ref^2, sum (test - ref)^2)`` in float64, :data:`CHUNK` elements at a time (no
    float64 copy of a large output is ever whole); add them up over several pairs and hand them
    to :func:`sqnr_from_sums`."""
    rf, tf = ref.detach().reshape(-1), test.detach().reshape(-1)
    signal = noise = 0.0
    for i in range(0, rf.numel(), CHUNK):
        r64 = rf[i:i + CHUNK].double()
        noise += float((tf[i:i + CHUNK].double() - r64).pow(2).sum())
        signal += float(r64.pow(2).sum())
    return signal, noise


def sqnr_from_sums(signal: float, noise: float) -> float:
    """:func:`sqnr_db` from the sums of squares ``signal = sum ref^2`` and ``noise = sum (ref -
    test)^2`` (accumulated in chunks, or over several ranks)."""
    if math.isnan(noise) or math.isinf(noise):
        return -math.inf
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def same_nonfinite(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Where both hold the same non-finite value: both NaN, or the same infinity."""
    return (torch.isnan(ref) & torch.isnan(test)) | (torch.isinf(ref) & (ref == test))


def relative_noise(refs: Sequence[Sequence[torch.Tensor]], outs: Sequence[Sequence[torch.Tensor]]) -> float:
    """Relative output noise power ``sum ||o - r||^2 / sum ||r||^2`` over the floating outputs of
    every input set, in float64; the absolute noise power when every reference is zero.

    Parameters
    ----------
    refs, outs : sequence of sequence of Tensor
        Per input set, the reference outputs and the outputs to judge, in the same order.
    """
    noise = signal = 0.0
    for ref, out in zip(refs, outs):
        for r, o in zip(ref, out):
            if r.is_floating_point():
                s, n = square_sums(r, o)
                signal, noise = signal + s, noise + n
    return noise / signal if signal > 0 else noise


#: Elements a float64 comparison works on at a time: an LLM's logits are millions of values and
#: each float64 temporary of them would be tens of MB.
CHUNK = 1 << 20


def _row_chunks(x: torch.Tensor) -> int:
    """Rows of ``x.reshape(-1, x.shape[-1])`` per chunk of about :data:`CHUNK` elements."""
    return max(1, CHUNK // max(1, x.shape[-1] if x.dim() else 1))


def kl_divergence(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Mean KL(P_ref || P_test) in nats over all positions (softmax over the last dim)."""
    r = ref_logits.reshape(-1, ref_logits.shape[-1])
    t = test_logits.reshape(-1, test_logits.shape[-1])
    # a quarter of the usual chunk: five float64 temporaries of it are alive at once
    step, total = max(1, _row_chunks(r) // 4), 0.0
    for i in range(0, r.shape[0], step):
        p = torch.log_softmax(r[i:i + step].double(), -1)
        q = torch.log_softmax(t[i:i + step].double(), -1)
        total += float((p.exp() * (p - q)).sum())
    return total / r.shape[0] if r.shape[0] else math.nan


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Share of positions whose argmax over the last dim agrees."""
    return float((ref_logits.argmax(-1) == test_logits.argmax(-1)).double().mean())


@dataclass
class OutputDiff:
    """How one output differs from its reference."""

    name: str
    max_abs: float
    max_rel: float
    sqnr_db: float
    within_tol: bool
    atol: float
    rtol: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sqnr_db"] = _json_float(self.sqnr_db)
        return d


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _finite_diff(name: str, r: torch.Tensor, t: torch.Tensor) -> OutputDiff:
    """:func:`compare_outputs` for one pair with only finite values, in chunks of
    :data:`CHUNK` elements (an LLM's logits are millions of values, compared after every pass).

    The difference and the tolerance test are computed in float32 (float64 for float64 outputs)
    and the sums of squares accumulate in float64: a float32 difference of two float32 values is
    correctly rounded, and this took a third of the time of converting every value to float64.
    Values whose squares would leave float32's range are squared in float64."""
    absmax = _absmax(r)
    rtol, atol = tolerance(r.dtype, absmax)
    work = torch.float64 if r.dtype == torch.float64 else torch.float32
    rf, tf = r.reshape(-1), t.reshape(-1)
    max_abs = noise = signal = 0.0
    ok = True
    for i in range(0, rf.numel(), CHUNK):
        rc = rf[i:i + CHUNK].to(work)
        d = rc - tf[i:i + CHUNK].to(work)
        ad = d.abs()
        chunk_max = float(ad.max())
        max_abs = max(max_abs, chunk_max)
        ok = ok and bool(torch.all(ad <= atol + rtol * rc.abs()))
        if work == torch.float32 and max(chunk_max, absmax) > _SQUARE_SAFE:
            d, rc = d.double(), rc.double()
        noise += float(torch.sum(d * d, dtype=torch.float64))
        signal += float(torch.sum(rc * rc, dtype=torch.float64))
    max_rel = max_abs / absmax if absmax else (0.0 if max_abs == 0 else math.inf)
    return OutputDiff(name, max_abs, max_rel, sqnr_from_sums(signal, noise), ok, atol, rtol)


# Largest magnitude whose square stays a normal float32 (3.4e38): 1e18 leaves room to spare.
_SQUARE_SAFE = 1e18


def _absmax(r: torch.Tensor) -> float:
    """``max |r|`` of a finite tensor, without an ``|r|`` temporary."""
    return max(float(r.max()), -float(r.min())) if r.numel() else 0.0


def _finite(r: torch.Tensor, t: torch.Tensor) -> bool:
    return bool(torch.isfinite(r).all()) and bool(torch.isfinite(t).all())


def _diverged(name: str, r: torch.Tensor, t: torch.Tensor) -> OutputDiff:
    """The figures of a pair with a NaN or Inf on one side only: it fails, and its error is as
    large as the values say (infinite for a NaN)."""
    r64, t64 = r.double(), t.double()
    finite_ref = r64[torch.isfinite(r64)]
    absmax = float(finite_ref.abs().max()) if finite_ref.numel() else 0.0
    rtol, atol = tolerance(r.dtype, absmax)
    err = (r64 - t64).abs()
    max_abs = math.inf if bool(torch.isnan(err).any()) else float(err.max())
    max_rel = max_abs / absmax if absmax else (0.0 if max_abs == 0 else math.inf)
    return OutputDiff(name, max_abs, max_rel, sqnr_db(r64, t64), False, atol, rtol)


def identical(refs: Sequence[torch.Tensor], tests: Sequence[torch.Tensor]) -> bool:
    """Whether ``tests`` are bitwise the ``refs`` (shape, dtype, values; a NaN anywhere is
    not identical)."""
    return len(refs) == len(tests) and all(
        r.shape == t.shape and r.dtype == t.dtype and torch.equal(r, t) for r, t in zip(refs, tests))


def self_diffs(refs: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> list[OutputDiff]:
    """``compare_outputs(refs, refs, names)``: what an identical result scores, without the
    float64 arithmetic on every value (an exact pass that left the outputs bitwise unchanged)."""
    names = list(names or [f"output_{i}" for i in range(len(refs))])
    out = []
    for name, r in zip(names, refs):
        if r.dtype.is_floating_point and r.numel():
            # one pass for both: min and max propagate a NaN, and are infinite if any value is
            lo, hi = (float(v) for v in torch.aminmax(r))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                out.extend(compare_outputs([r], [r], [name]))
                continue
            rtol, atol = tolerance(r.dtype, max(hi, -lo))
        else:
            rtol, atol = tolerance(r.dtype, 0.0) if r.dtype.is_floating_point else (0.0, 0.0)
        out.append(OutputDiff(name, 0.0, 0.0, math.inf, True, atol, rtol))
    return out


def compare_outputs(
    refs: Sequence[torch.Tensor], tests: Sequence[torch.Tensor], names: Sequence[str] | None = None
) -> list[OutputDiff]:
    """Compare paired outputs; integer/bool outputs must be equal exactly.

    Positions where the reference and the test hold the same non-finite value (both NaN, or the
    same infinity) count as equal and are left out of the error and SQNR figures; a NaN or Inf
    on one side only makes the output fail.
    """
    if len(refs) != len(tests):
        raise ValueError(f"{len(tests)} outputs, expected {len(refs)}")
    names = list(names or [f"output_{i}" for i in range(len(refs))])
    diffs = []
    for name, r, t in zip(names, refs, tests):
        if r.shape != t.shape:
            diffs.append(OutputDiff(name, math.inf, math.inf, -math.inf, False, 0.0, 0.0))
            continue
        if not r.dtype.is_floating_point:
            bad = float((r != t).sum())
            diffs.append(OutputDiff(name, bad, bad, math.inf if bad == 0 else -math.inf, bad == 0, 0.0, 0.0))
            continue
        if not _finite(r, t):
            # Where the reference itself is NaN (or +-Inf) the test agrees by being the same
            # non-finite value there: e.g. log of a negative input in both graphs. Those positions
            # are left out of every figure; a non-finite value anywhere else is a divergence.
            same = same_nonfinite(r, t)
            if bool(same.any()):
                r, t = r[~same], t[~same]
            if not _finite(r, t):
                diffs.append(_diverged(name, r, t))
                continue
        diffs.append(_finite_diff(name, r, t))
    return diffs
