"""A compiled CPU kernel that turns activation sparsity into speed: ``y = x_hat Wt + b``.

Activation sparsification (TEAL, CHESS, WINA) zeroes the small entries of a linear layer's input:

    x_hat[b, i] = x[b, i]  if |x[b, i]| * s_i > t_i  else 0      (s_i = 1, t_i = t by default)

The product then needs only the rows ``i`` of ``Wt = W^T`` (stored ``(in, out)``, contiguous)
that some kept entry selects. A batch-1 product is memory-bound (2 FLOP per 4 weight bytes), so
the weight bytes not read are the time saved: the limit is ``1 / (1 - sparsity)``.
``index_select`` + ``matmul`` copies the selected rows first and is several times slower than
the dense product; the C++ kernel in ``sparse_kernel.cpp`` streams the selected rows in place
(design: that file and ``docs/backends/sparse-kernel.md``).

Exactness: every path computes the same ``x_hat`` (same float32 comparisons; NaN inputs are
dropped, as ONNX ``Where(Abs(x) > t, x, 0)`` does) and the same products; they differ only in
the summation order of each dot product (float rounding).

Paths, chosen by :func:`choose_path`:

* ``"kernel"`` -- the C++ extension, built on first use with
  :func:`torch.utils.cpp_extension.load` (``-O3 -march=native -fopenmp``, no fast-math), cached
  under torch's default extensions directory with a name tagged by the CPU (a build for one
  CPU must not be loaded on another). A build prints nothing; a failed build raises one
  :class:`~graphpress.errors.BackendError` line naming the compiler error, and ``backend="auto"``
  then warns once and uses the torch path.
* ``"dense"`` -- ``addmm(b, x_hat, Wt)``: the pure-torch fallback (same semantics) and the
  path above the batch crossover :data:`DENSE_ABOVE_BATCH`, where the union of rows that the
  batch selects approaches all rows and the dense GEMM's compute efficiency wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from graphpress.errors import BackendError

#: Above this many rows (product of the leading dims of ``x``) :func:`sparse_linear` runs the
#: dense product. Measured by ``benchmarks/sparse_kernel.py --crossover-only`` (``crossover`` in
#: ``benchmarks/results/sparse_kernel.json``): 4096 x 4096, sparsity 50% and 70%, weights warm and
#: cold, batch rows selecting their inputs independently; the largest batch up to which the kernel
#: (2 threads, ``batch_mode="auto"``) is nowhere slower than dense ``F.linear`` by more than the
#: 5% run-to-run noise is 16 in all four cases (dense wins by 15-20% at 24 and 2x at 64). Between
#: 2 and 16 the margin follows dense's uneven small-batch GEMM times (0.97x to 2.1x).
DENSE_ABOVE_BATCH = 16

SOURCE = Path(__file__).with_name("sparse_kernel.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp")
BACKENDS = ("auto", "kernel", "torch")
BATCH_MODES = ("auto", "union", "per_row")

_module: ModuleType | None = None
_error: BackendError | None = None
_warned = False


# ---------------------------------------------------------------------------- build
def _cpu_tag() -> str:
    """Short hash of the CPU model and feature flags (``-march=native`` binaries are CPU-specific)."""
    text = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "".join(next((ln for ln in lines if ln.startswith(key)), "") for key in ("model name", "flags"))
    return hashlib.sha1((text or platform.processor() or platform.machine()).encode()).hexdigest()[:8]


def _first_error(log: str) -> str:
    """The compiler's first ``error`` line of a build log (else its last non-empty line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "error:" in ln), None)
    line = hit or (lines[-1] if lines else "no output")
    return line if len(line) <= 300 else line[:297] + "..."


def build(source: Path = SOURCE, name: str | None = None, build_directory: str | None = None) -> ModuleType:
    """Compile (or load the cached build of) a sparse-kernel C++ source; silent on success.

    Parameters
    ----------
    source : Path
        C++ file defining the pybind11 module (default: ``sparse_kernel.cpp`` next to this file).
    name : str, optional
        Extension name; default ``graphpress_sparse_kernel_<cpu tag>``.
    build_directory : str, optional
        Default: torch's extensions directory (``$TORCH_EXTENSIONS_DIR`` or
        ``~/.cache/torch_extensions/<python>_cpu/<name>``); rebuilt when the source or flags change.

    Raises
    ------
    BackendError
        One line with the compiler's first error (missing compiler, ninja, or a compile error).
    """
    from torch.utils import cpp_extension

    name = name or f"graphpress_sparse_kernel_{_cpu_tag()}"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
                                      build_directory=build_directory, verbose=False)
    except Exception as err:  # ninja, compiler and import failures all mean "no kernel"
        raise BackendError(f"sparse kernel: building {source.name} failed: {_first_error(str(err))}") from err


def load_kernel() -> ModuleType:
    """The compiled kernel module, built on first use (the result, or the failure, is remembered).

    Raises
    ------
    BackendError
        When the extension cannot be built (see :func:`build`).
    """
    global _module, _error
    if _module is None:
        if _error is not None:
            raise _error
        try:
            _module = build()
        except BackendError as err:
            _error = err
            raise
    return _module


def kernel_available() -> bool:
    """Whether the C++ kernel builds on this machine (tries once)."""
    try:
        load_kernel()
    except BackendError:
        return False
    return True


# ---------------------------------------------------------------------------- semantics
def check_inputs(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, threshold: float = 0.0,
                 thresholds: torch.Tensor | None = None, scores: torch.Tensor | None = None, *, where: str = "sparse_linear") -> None:
    """Raise a one-line ``ValueError`` (prefixed by ``where``) for inputs the op does not define."""
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{where}: x must be a floating tensor (..., in), got {x.dtype} {tuple(x.shape)}")
    if wt.dim() != 2 or wt.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{where}: wt must be a float32 or bfloat16 (in, out) matrix, got {wt.dtype} {tuple(wt.shape)}")
    if not wt.is_contiguous():
        raise ValueError(f"{where}: wt {tuple(wt.shape)} must be contiguous; store W.t().contiguous() once, not a transposed view")
    if x.shape[-1] != wt.shape[0]:
        raise ValueError(f"{where}: x {tuple(x.shape)} has {x.shape[-1]} features but wt {tuple(wt.shape)} has {wt.shape[0]} rows (wt is W^T, (in, out))")
    if bias is not None and tuple(bias.shape) != (wt.shape[1],):
        raise ValueError(f"{where}: bias {tuple(bias.shape)} is not ({wt.shape[1]},)")
    if not threshold >= 0 or math.isinf(threshold):
        raise ValueError(f"{where}: threshold must be a finite number >= 0, got {threshold}")
    for label, t in (("thresholds", thresholds), ("scores", scores)):
        if t is not None and tuple(t.shape) != (wt.shape[0],):
            raise ValueError(f"{where}: {label} {tuple(t.shape)} is not ({wt.shape[0]},), one value per input feature")


def keep_mask(x: torch.Tensor, threshold: float = 0.0, thresholds: torch.Tensor | None = None,
              scores: torch.Tensor | None = None) -> torch.Tensor:
    """``|x| * scores > thresholds`` (``scores`` 1 and ``thresholds`` ``threshold`` when None), in float32."""
    a = x.float().abs()
    if scores is not None:
        a = a * scores.float()
    return a > (thresholds.float() if thresholds is not None else threshold)


def sparse_linear_torch(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *, threshold: float = 0.0,
                        thresholds: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch ``x_hat Wt + b`` (the fallback, and the dense path above the batch crossover).

    ``x_hat`` is masked with ``torch.where`` and multiplied densely: on CPU that is faster than
    gathering the selected rows (``index_select`` copies them; measured 0.2x of dense).
    """
    check_inputs(x, wt, bias, threshold, thresholds, scores, where="sparse_linear_torch")
    xf = x.float()
    xh = torch.where(keep_mask(xf, threshold, thresholds, scores), xf, 0.0).reshape(-1, wt.shape[0])
    w = wt.float()
    y = xh @ w if bias is None else torch.addmm(bias.float(), xh, w)
    return y.reshape(*x.shape[:-1], wt.shape[1]).to(x.dtype)


def choose_path(x: torch.Tensor, dense_above_batch: int | None = DENSE_ABOVE_BATCH, backend: str = "auto") -> str:
    """``"kernel"`` or ``"dense"`` for input ``x`` (see the module docstring).

    ``backend="torch"`` always gives ``"dense"``; ``"kernel"`` raises :class:`BackendError` when the
    extension cannot be built; ``"auto"`` falls back to ``"dense"`` with one warning. Inputs that
    are not on the CPU, and batches above ``dense_above_batch`` (None: no limit), take ``"dense"``.
    """
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"sparse_linear: backend must be one of {BACKENDS}, got {backend!r}")
    batch = math.prod(x.shape[:-1])
    if backend == "torch" or x.device.type != "cpu" or (dense_above_batch is not None and batch > dense_above_batch):
        return "dense"
    if backend == "kernel":
        load_kernel()
        return "kernel"
    if kernel_available():
        return "kernel"
    if not _warned:
        _warned = True
        warnings.warn(f"{_error}; using the dense torch path", RuntimeWarning, stacklevel=3)
    return "dense"


def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None, *, threshold: float = 0.0,
                  thresholds: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                  dense_above_batch: int | None = DENSE_ABOVE_BATCH, num_threads: int | None = None,
                  batch_mode: str = "auto", simd: bool = True, backend: str = "auto") -> torch.Tensor:
    """``y = x_hat Wt + b`` with ``x_hat = where(|x| * scores > thresholds, x, 0)``.

    Parameters
    ----------
    x : Tensor
        ``(..., in)``, floating (computed in float32, returned in ``x.dtype``).
    wt : Tensor
        ``W^T``, ``(in, out)``, contiguous, float32 or bfloat16 (bf16 storage halves the bytes
        the kernel streams; accumulation stays float32).
    bias : Tensor, optional
        ``(out,)``.
    threshold : float
        Scalar threshold ``t >= 0``; 0 keeps every non-zero entry.
    thresholds, scores : Tensor, optional
        Per-input-feature ``(in,)`` thresholds (replace ``threshold``; CHESS) and scores (WINA: the
        column norms of ``W``).
    dense_above_batch : int or None
        Batch (product of leading dims) above which the dense product runs.
    num_threads : int, optional
        Kernel threads (split over output columns); default ``torch.get_num_threads()``.
    batch_mode : {"auto", "union", "per_row"}
        Batch > 1: ``"union"`` reads each row any batch row keeps once and updates all batch
        rows from it; ``"per_row"`` runs the batch-1 loop per batch row; ``"auto"`` takes per-row
        iff ``9 S < (8 + B) U`` (``S``: the rows' own selection counts summed, ``U``: the union's
        count; a cost model fitted on the benchmark: per-row wins at high sparsity).
    simd : bool
        Use the AVX-512 inner loop when the build has one (False: the portable loop).
    backend : {"auto", "kernel", "torch"}
        See :func:`choose_path`.

    Returns
    -------
    Tensor
        ``(..., out)``.
    """
    check_inputs(x, wt, bias, threshold, thresholds, scores)
    return run_checked(x, wt, bias, threshold, thresholds, scores, dense_above_batch=dense_above_batch,
                       num_threads=num_threads, batch_mode=batch_mode, simd=simd, backend=backend)


def run_checked(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, threshold: float = 0.0,
                thresholds: torch.Tensor | None = None, scores: torch.Tensor | None = None, *,
                dense_above_batch: int | None = DENSE_ABOVE_BATCH, num_threads: int | None = None,
                batch_mode: str = "auto", simd: bool = True, backend: str = "auto") -> torch.Tensor:
    """:func:`sparse_linear` on inputs that :func:`check_inputs` accepted (the ops check them once)."""
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"sparse_linear: batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
    if choose_path(x, dense_above_batch, backend) == "dense":
        return sparse_linear_torch(x, wt, bias, threshold=threshold, thresholds=thresholds, scores=scores)
    # batch 1 costs ~25 us at 1024 x 1024: skip the no-op conversions (a few us each)
    plain = x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous()
    x2 = x if plain else x.reshape(-1, wt.shape[0]).float().contiguous()

    def vec(t):
        if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
            return t
        return t.float().contiguous()

    y = load_kernel().sparse_linear(x2, wt, vec(bias), float(threshold), vec(thresholds), vec(scores),
                                    torch.get_num_threads() if num_threads is None else int(num_threads),
                                    BATCH_MODES.index(batch_mode), simd)
    return y if plain else y.reshape(*x.shape[:-1], wt.shape[1]).to(x.dtype)

__all__ = [
    "BACKENDS", "BATCH_MODES", "DENSE_ABOVE_BATCH", "FLAGS", "SOURCE", "build", "check_inputs", "choose_path", "keep_mask",
    "kernel_available", "load_kernel", "run_checked", "sparse_linear", "sparse_linear_torch",
]
