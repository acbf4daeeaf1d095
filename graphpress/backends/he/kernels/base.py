"""What every HE layer kernel provides, and the checks they share.

A kernel runs one linear or conv layer on integers under BFV, client and server in one process:
``prepare_*`` is the server's offline work (encode the weights into plaintexts, NTT form, once),
``run_*`` is one online round -- the client encrypts and sends its input, the server multiplies,
adds and rotates, sends the result back, the client decrypts -- and returns ``W x (+ bias)``
exactly, as integers centered modulo ``t``. Every operation lands in ``ctx.counter``.

Exactness: BFV computes modulo ``t``, so the result is the true integer only when
``|W x + bias| < t/2``. ``run_*`` checks the worst case of the actual input,
``max_row sum |w| * max |x| + max |bias|``, and refuses (naming the layer) before encrypting;
:meth:`Kernel.max_abs_output` gives the same bound for any ``|x| <= x_bound`` to size ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphpress.errors import BackendError
from graphpress.lowering.he import counts as he_counts


def where(what: str) -> str:
    return f"he: layer {what!r}: " if what else "he: "


def as_int(a: Any, name: str, what: str, ndim: tuple[int, ...]) -> np.ndarray:
    """``a`` as an int64 array of one of the ranks ``ndim``; floats must be integral."""
    arr = np.asarray(a)
    if arr.ndim not in ndim:
        raise BackendError(f"{where(what)}{name} must have {' or '.join(map(str, ndim))} dims, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise BackendError(f"{where(what)}{name} must hold integers (quantize first)")
    elif arr.dtype.kind not in "iub":
        raise BackendError(f"{where(what)}{name} has dtype {arr.dtype}, expected integers")
    return arr.astype(np.int64)


def check_fits(values: np.ndarray, t: int, name: str, what: str) -> None:
    """Every ``|value| < t/2`` (else it would wrap modulo ``t``)."""
    if values.size and int(np.abs(values).max()) * 2 >= t:
        raise BackendError(f"{where(what)}{name} value {int(np.abs(values).max())} does not fit the plain modulus t={t} (|v| < t/2)")


def row_abs_max(w: np.ndarray, row_axis: int) -> int:
    """``max_row sum |w|`` with the output index on ``row_axis`` (all other axes summed)."""
    a = np.abs(w.astype(np.int64))
    axes = tuple(i for i in range(a.ndim) if i != row_axis)
    sums = a.sum(axis=axes) if axes else a
    return int(sums.max()) if sums.size else 0


@dataclass
class Prepared:
    """A layer's server-side state: the weights as plaintexts and what the kernel needs to run."""

    kind: str  # "linear" or "conv2d"
    what: str
    weight: np.ndarray
    bias: np.ndarray | None
    out_features: int
    in_features: int
    row_bound: int  # max_row sum |w|
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    kernel: tuple[int, int] = (1, 1)
    layouts: dict[Any, Any] = field(default_factory=dict)  # plan key -> encoded plaintexts
    skipped_products: int = 0  # all-zero weight plaintexts left out (per run of one group/tile)


class Kernel:
    """Base class: the API the HE program codes against (see :mod:`graphpress.backends.he.kernels`)."""

    name = ""
    #: compact circulant weights (``(p, q, b)`` / ``(kh, kw, p, q, b)``) instead of dense ones
    compact = False

    # ------------------------------------------------------------------ bounds
    def row_axis(self, w_int: np.ndarray) -> int:
        if self.compact:
            return 0 if w_int.ndim == 3 else 2
        return 0

    def max_abs_output(self, w_int: Any, x_bound: int, bias_int: Any = None) -> int:
        """Largest ``|W x + bias|`` over all inputs with ``|x| <= x_bound`` (size ``t`` above twice this)."""
        w = np.asarray(w_int, dtype=np.int64)
        bias = 0 if bias_int is None else int(np.abs(np.asarray(bias_int, dtype=np.int64)).max(initial=0))
        return row_abs_max(w, self.row_axis(w)) * int(x_bound) + bias

    def check_output(self, ctx: Any, prep: Prepared, x: np.ndarray) -> None:
        """Refuse an input whose worst-case output would wrap modulo ``t``."""
        check_fits(x, ctx.t, "input", prep.what)
        xb = int(np.abs(x).max(initial=0))
        bb = 0 if prep.bias is None else int(np.abs(prep.bias).max(initial=0))
        bound = prep.row_bound * xb + bb
        if 2 * bound >= ctx.t:
            need = (2 * bound).bit_length()
            raise BackendError(
                f"{where(prep.what)}accumulator bound {bound} (max row |w| sum {prep.row_bound} x max |x| {xb}) does not fit "
                f"t={ctx.t} (|y| < t/2): lower the fixed-point bits or use choose_params(plain_bits={need})"
            )

    # ------------------------------------------------------------------ counts
    def counts_linear(self, m: int, n: int, poly_degree: int, b: int = 1, vectors: int = 1, bias: bool = False) -> dict[str, int]:
        """Analytic counts (:func:`graphpress.lowering.he.counts.counts_linear`) for this encoding."""
        try:
            return he_counts.counts_linear(self.name, m, n, poly_degree, b=b, vectors=vectors, bias=bias)
        except ValueError as err:
            raise BackendError(f"he: {err}") from None

    def counts_conv(
        self,
        c_out: int,
        c_in: int,
        h: int,
        w: int,
        kh: int,
        kw: int,
        poly_degree: int,
        b: int = 1,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        batch: int = 1,
        bias: bool = False,
    ) -> dict[str, int]:
        """Analytic counts (:func:`graphpress.lowering.he.counts.counts_conv`) for this encoding."""
        try:
            return he_counts.counts_conv(self.name, c_out, c_in, h, w, kh, kw, poly_degree, b, stride, padding, batch, bias)
        except ValueError as err:
            raise BackendError(f"he: {err}") from None

    # ------------------------------------------------------------------ API (subclasses)
    def prepare_linear(self, ctx: Any, w_int: Any, bias_int: Any = None, what: str = "") -> Prepared:  # pragma: no cover
        raise NotImplementedError

    def run_linear(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def prepare_conv(
        self,
        ctx: Any,
        w_int: Any,
        bias_int: Any = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        what: str = "",
        input_hw: tuple[int, int] | None = None,
    ) -> Prepared:  # pragma: no cover
        raise NotImplementedError

    def run_conv(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


def pair(v: Any, name: str, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise BackendError(f"{where(what)}{name} must have 2 values, got {list(v)}")
    return t  # type: ignore[return-value]


def plan_error(err: ValueError, what: str) -> BackendError:
    """A planner's ``ValueError`` as the one-line backend error naming the layer."""
    msg = str(err)
    return BackendError(msg if msg.startswith("he:") else f"he: {msg}" if what and repr(what) in msg else f"{where(what)}{msg}")


__all__ = ["Kernel", "Prepared", "as_int", "check_fits", "pair", "plan_error", "row_abs_max", "where"]
