"""HE layer kernels: one linear/conv layer on integers under BFV, one file per encoding.

================== ============================================== =====================================
name               weight it takes                                products (rotations)
================== ============================================== =====================================
``slot-dense``     dense ``(m, n)`` / ``(C_out, C_in, kh, kw)``   ``D`` per chunk, BSGS rotations
``coeff-dense``    dense ``(m, n)`` / ``(C_out, C_in, kh, kw)``   ``~ceil(m n / N)`` (none)
``coeff-circulant`` compact ``(p, q, b)`` / ``(kh, kw, p, q, b)`` ``~ceil(m n / (b N))`` (none)
================== ============================================== =====================================

API (every kernel)::

    k = get_kernel("coeff-circulant")
    prep = k.prepare_linear(ctx, w_int, bias_int=None, what="fc1")      # server, offline
    y = k.run_linear(ctx, prep, x_int)              # (batch, n) -> (batch, m) int64, exact
    prep = k.prepare_conv(ctx, w_int, bias_int=None, stride=(1, 1), padding=(1, 1), what="conv1", input_hw=(32, 32))
    y = k.run_conv(ctx, prep, x_int)                # (batch, C_in, H, W) -> (batch, C_out, H_out, W_out)
    k.counts_linear(m, n, N, b=1, vectors=1, bias=False)    # == graphpress.lowering.he.counts
    k.counts_conv(c_out, c_in, h, w, kh, kw, N, b=1, stride=(1, 1), padding=(0, 0), batch=1, bias=False)
    k.max_abs_output(w_int, x_bound)                # worst |W x| for |x| <= x_bound: t must exceed twice it

Encodings, layouts, counts and measured costs: ``docs/backends/he-encodings.md``.
"""

from __future__ import annotations

import difflib

from graphpress.backends.he.kernels.base import Kernel, Prepared
from graphpress.backends.he.kernels.coeff_circulant import CoeffCirculant
from graphpress.backends.he.kernels.coeff_dense import CoeffDense
from graphpress.backends.he.kernels.slot_dense import SlotDense
from graphpress.errors import BackendError

KERNELS: dict[str, Kernel] = {k.name: k for k in (SlotDense(), CoeffDense(), CoeffCirculant())}


def get_kernel(name: str) -> Kernel:
    """The kernel registered as ``name``; an unknown name is a one-line error with a suggestion."""
    if name not in KERNELS:
        close = difflib.get_close_matches(name, KERNELS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BackendError(f"he: unknown kernel {name!r}: {hint}known: {', '.join(KERNELS)}")
    return KERNELS[name]


__all__ = ["KERNELS", "CoeffCirculant", "CoeffDense", "Kernel", "Prepared", "SlotDense", "get_kernel"]
