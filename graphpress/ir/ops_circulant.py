"""Block-circulant custom ops: ``graphpress::circulant_linear`` and ``graphpress::circulant_conv2d``.

Both store the weight *compactly*: one length-``b`` vector per ``b x b`` circulant block (see
:mod:`graphpress.ir.circulant`), ``b`` times fewer numbers than the dense matrix::

    W[i*b + r, j*b + s] = c[i, j, (r - s) mod b]          c: (p, q, b),  W: (p*b, q*b)

Ops
---
``graphpress::circulant_linear(Tensor x, Tensor c, Tensor? bias) -> Tensor``
    ``x @ expand(c).T + bias`` for ``x (..., q*b)``, ``c (p, q, b)``, ``bias (p*b,)``.

    *FFT path* (default): ``rfft`` of each length-``b`` input block, one complex ``(p x q)``
    product per frequency (``torch.bmm`` with the frequency dim leading, contiguous operands),
    ``irfft`` back. The spectrum ``rfft(c)`` is computed once per weight and cached (the weights
    are constants at inference; the cache is keyed on the tensor's identity and its version
    counter, so an in-place update such as an optimizer step invalidates it). For large
    products the two real frequencies (0 and b/2) run as real matmuls (a quarter of the work of
    a complex one): see :data:`SPLIT_REAL_MIN_WORK`.

    *Dense path*: ``F.linear(x, expand(c), bias)`` with the expansion cached the same way.
    Chosen by :func:`use_dense_path` -- the measured rule: ``b <= 2`` (no arithmetic saving
    and the FFT's fixed per-call cost), matrices of at most :data:`DENSE_MAX_WEIGHTS` dense
    weights (512 x 512: there the FFT path's ~6 small kernels cost more than the product),
    and dtypes ``torch.fft`` does not handle on CPU (float16/bfloat16).

``graphpress::circulant_conv2d(Tensor x, Tensor c, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor``
    ``F.conv2d(x, W, bias, stride, padding, dilation)`` (``groups = 1``) with
    ``W = expand(c).permute(2, 3, 0, 1)`` for ``c (kh, kw, p, q, b)``: circulant over
    ``(C_out, C_in)`` at every kernel position. Eager: the cached dense expansion + ``F.conv2d``
    (the product is im2col + GEMM in any case; an FFT over channels would only pay off for large
    1x1 convs, which the supported models do not have).

Both ops have a ``register_fake`` shape function (``torch.export``, fake-tensor verification)
and ``register_autograd`` (fine-tuning trains ``c`` and ``bias``): the backward recomputes the
forward with differentiable torch ops (FFT product without caches for the linear, dense
expansion for the conv) on detached inputs and calls :func:`torch.autograd.grad`.

ONNX: :mod:`graphpress.lowering.onnx.circulant` (the compact ``c`` is what the ``.onnx`` file
stores; dense or spectral lowerings of the linear, dense expansion + ``Conv`` for the conv).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from graphpress.errors import GraphpressError
from graphpress.ir.circulant import expand, fft_matmul
from graphpress.ir.fakes import shape_function

#: Dense path when the dense matrix has at most this many weights. Measured (2 cores, float32):
#: up to 512 x 512 the FFT path's fixed cost (~6 small kernels, ~25 us) exceeds the dense
#: product at batch 1 and it wins only at b >= 8 and batch 64; from 1024 x 1024 it wins at
#: every b >= 4 and batch.
DENSE_MAX_WEIGHTS = 512 * 512
#: Run frequencies 0 and b/2 (real for real inputs) as real matmuls when the complex work
#: ``rows * p * q * (b/2 + 1)`` is at least this (measured: saves up to 2x at b=4, batch 64;
#: the extra kernels cost more than they save on small products).
SPLIT_REAL_MIN_WORK = 1 << 21

_FFT_DTYPES = (torch.float32, torch.float64)
#: Bytes all weight caches together may hold (see :class:`_WeightCache`).
#: None: read ``GRAPHPRESS_WEIGHT_CACHE_MB`` (MiB, default 16) at first use.
CACHE_BYTES: int | None = None


def _cache_bytes() -> int:
    global CACHE_BYTES
    if CACHE_BYTES is None:
        raw = os.environ.get("GRAPHPRESS_WEIGHT_CACHE_MB", "16")
        try:
            mib = float(raw)
        except ValueError:
            mib = -1.0
        if not mib >= 0:  # also NaN
            raise GraphpressError(f"GRAPHPRESS_WEIGHT_CACHE_MB={raw!r}: expected a size in MiB >= 0 (e.g. 16; 0 caches nothing)")
        CACHE_BYTES = int(mib * 2**20)
    return CACHE_BYTES


# ---------------------------------------------------------------------------- weight caches
class _WeightCache:
    """Tensors derived from a constant weight (its spectrum, its dense expansion), computed once.

    Keyed on the weight tensor's identity; an entry is valid while the tensor is alive and its
    version counter (bumped by every in-place write), data pointer, shape, stride and dtype are
    unchanged. Holds only a weak reference to the weight, so the entry goes when the weight does.
    Never cached: weights that require grad (training: they change every step, and writes
    through ``.data`` do not bump the version counter) and inference tensors (no version
    counter). Writing a frozen weight through ``.data`` needs :func:`clear_cache`.

    Bounded: all caches together hold at most :data:`CACHE_BYTES` (``GRAPHPRESS_WEIGHT_CACHE_MB``,
    16 MiB by default: every model of the tests and benchmarks below 4M weights fits). Once full, new tensors are computed on every call and not kept -- a
    model bigger than the bound then keeps the hits it has instead of evicting in a cycle (a
    graph runs its layers in the same order every time, so LRU eviction would miss every time).
    A dense fp32 copy of every weight of a large model would otherwise stay in memory next to
    its compact form.
    """

    _held = 0  # bytes held by all caches (a class total: the bound is per process)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple, dict[str, torch.Tensor]]] = {}
        # re-entrant: a weakref callback (_drop) may run from a garbage collection triggered
        # while this thread holds the lock inside get()
        self._lock = threading.RLock()

    @staticmethod
    def _state(t: torch.Tensor) -> tuple | None:
        if t.requires_grad or t.is_inference() or t.device.type == "meta":
            return None
        try:
            return (t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
        except RuntimeError:  # tensors without storage or version counter
            return None

    def get(self, weight: torch.Tensor, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        state = self._state(weight)
        if state is None:
            return make()
        wid = id(weight)
        with self._lock:
            entry = self._entries.get(wid)
            if entry is not None and (entry[0]() is not weight or entry[1] != state):
                self._release(entry[2])
                entry = None
            if entry is None:
                ref = weakref.ref(weight, lambda _r, wid=wid: self._drop(wid, _r))
                entry = (ref, state, {})
                self._entries[wid] = entry
            cached = entry[2].get(key)
        if cached is None:
            cached = make()
            size = cached.untyped_storage().nbytes() if isinstance(cached, torch.Tensor) else 0
            with self._lock:
                if _WeightCache._held + size <= _cache_bytes() and key not in entry[2]:
                    entry[2][key] = cached
                    _WeightCache._held += size
        return cached

    @staticmethod
    def _release(values: dict[str, torch.Tensor]) -> None:
        _WeightCache._held -= sum(v.untyped_storage().nbytes() for v in values.values() if isinstance(v, torch.Tensor))

    def _drop(self, wid: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._entries.get(wid)
            if entry is not None and entry[0] is ref:
                del self._entries[wid]
                self._release(entry[2])

    def clear(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                self._release(entry[2])
            self._entries.clear()

    def nbytes(self) -> int:
        """Bytes this cache holds."""
        with self._lock:
            return sum(v.untyped_storage().nbytes() for e in self._entries.values() for v in e[2].values() if isinstance(v, torch.Tensor))

    def __len__(self) -> int:
        return len(self._entries)


_CACHE = _WeightCache()


def clear_cache() -> None:
    """Forget every cached spectrum / dense expansion (they are rebuilt on the next call)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------- linear: eager
def use_dense_path(p: int, q: int, b: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether the eager ``circulant_linear`` multiplies by the dense expansion (see module doc)."""
    return b <= 2 or p * q * b * b <= DENSE_MAX_WEIGHTS or dtype not in _FFT_DTYPES


def _dense_weight(c: torch.Tensor) -> torch.Tensor:
    return _CACHE.get(c, "dense", lambda: expand(c.detach()).contiguous())


def _spectrum(c: torch.Tensor) -> torch.Tensor:
    """``rfft(c)`` laid out ``(f, q, p)``, contiguous: the right operand of the per-frequency bmm."""
    return _CACHE.get(c, "spectrum", lambda: torch.fft.rfft(c.detach(), dim=-1).permute(2, 1, 0).contiguous())


def _spectrum_split(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectrum split into its two real frequencies ``(2, q, p)`` and the complex rest ``(f-2, q, p)``."""
    cf = _spectrum(c)
    real = _CACHE.get(c, "spectrum_real", lambda: torch.stack([cf[0].real, cf[-1].real]).contiguous())
    mid = _CACHE.get(c, "spectrum_mid", lambda: cf[1:-1].contiguous())
    return real, mid


def _fft_product(x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``x2 (R, q*b) -> (R, p, b)``: ``rfft`` of the input blocks, per-frequency complex ``bmm``
    with the cached spectrum of ``c`` (frequency dim leading, contiguous operands), ``irfft``."""
    p, q, b = c.shape
    rows = x2.shape[0]
    f = b // 2 + 1
    xf = torch.fft.rfft(x2.reshape(rows, q, b), dim=-1).permute(2, 0, 1).contiguous()  # (f, R, q)
    if rows * p * q * f >= SPLIT_REAL_MIN_WORK:
        real, mid = _spectrum_split(c)
        y_real = torch.bmm(torch.stack([xf[0].real, xf[-1].real]), real)  # (2, R, p)
        y_mid = torch.bmm(xf[1:-1], mid)  # (f-2, R, p)
        yf = torch.cat([y_real[:1].to(y_mid.dtype), y_mid, y_real[1:].to(y_mid.dtype)])
    else:
        yf = torch.bmm(xf, _spectrum(c))  # (f, R, p)
    return torch.fft.irfft(yf.permute(1, 2, 0).contiguous(), n=b, dim=-1)  # (R, p, b)


def _check_linear(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> None:
    if c.dim() != 3:
        raise RuntimeError(f"graphpress::circulant_linear: c must be (p, q, b), got {tuple(c.shape)}")
    p, q, b = c.shape
    if x.dim() < 1 or x.shape[-1] != q * b:
        raise RuntimeError(f"graphpress::circulant_linear: input {tuple(x.shape)} does not match c {tuple(c.shape)} (in features {q * b})")
    if bias is not None and tuple(bias.shape) != (p * b,):
        raise RuntimeError(f"graphpress::circulant_linear: bias {tuple(bias.shape)} is not ({p * b},)")


@torch.library.custom_op("graphpress::circulant_linear", mutates_args=())
def circulant_linear(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ expand(c).T + bias`` with ``c (p, q, b)`` the compact block-circulant weight."""
    _check_linear(x, c, bias)
    p, q, b = c.shape
    if use_dense_path(p, q, b, x.dtype):
        return F.linear(x, _dense_weight(c), bias)
    lead = x.shape[:-1]
    y = _fft_product(x.reshape(-1, q * b), c).reshape(*lead, p * b)
    if bias is not None:
        y.add_(bias)
    return y


@shape_function(circulant_linear)
def _circulant_linear_fake(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check_linear(x, c, bias)
    p, _q, b = c.shape
    return x.new_empty((*x.shape[:-1], p * b))


def circulant_linear_reference(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None = None, *, path: str = "fft") -> torch.Tensor:
    """Uncached, differentiable ``circulant_linear``: ``path="fft"`` (rfft -> einsum -> irfft) or
    ``"dense"`` (``F.linear`` with ``expand(c)``). Used by the backward and by tests."""
    if path == "dense":
        return F.linear(x, expand(c), bias)
    if path != "fft":
        raise ValueError(f"path must be 'fft' or 'dense', got {path!r}")
    y = fft_matmul(x, c)
    return y + bias if bias is not None else y


def _setup_linear(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, c, bias = inputs
    ctx.save_for_backward(x, c, bias)


def _grads(fn: Callable[..., torch.Tensor], tensors: Sequence[torch.Tensor | None], needs: Sequence[bool], grad: torch.Tensor) -> list:
    """Gradients of ``fn(*tensors)`` w.r.t. the tensors ``needs`` marks, recomputing the forward."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(tensors, needs)]
        out = fn(*inputs)
        wanted = [t for t, n in zip(inputs, needs) if t is not None and n]
        got = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
    return [next(got) if (t is not None and n) else None for t, n in zip(inputs, needs)]


def _backward_linear(ctx: Any, grad: torch.Tensor):
    x, c, bias = ctx.saved_tensors
    p, q, b = c.shape
    path = "dense" if use_dense_path(p, q, b, x.dtype) else "fft"
    return tuple(_grads(lambda a, w, bb: circulant_linear_reference(a, w, bb, path=path), (x, c, bias), ctx.needs_input_grad, grad))


circulant_linear.register_autograd(_backward_linear, setup_context=_setup_linear)


# ---------------------------------------------------------------------------- conv2d: eager
def conv_weight(c: torch.Tensor) -> torch.Tensor:
    """Dense ``(C_out, C_in, kh, kw)`` conv weight of compact ``c (kh, kw, p, q, b)``."""
    return expand(c).permute(2, 3, 0, 1)


def _conv_out(size: Any, k: int, s: int, pad: int, d: int) -> Any:
    return (size + 2 * pad - d * (k - 1) - 1) // s + 1


def _check_conv(x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation) -> None:
    if c.dim() != 5:
        raise RuntimeError(f"graphpress::circulant_conv2d: c must be (kh, kw, p, q, b), got {tuple(c.shape)}")
    _kh, _kw, p, q, b = c.shape
    if x.dim() != 4 or x.shape[1] != q * b:
        raise RuntimeError(f"graphpress::circulant_conv2d: input {tuple(x.shape)} does not match c {tuple(c.shape)} (in channels {q * b})")
    if bias is not None and tuple(bias.shape) != (p * b,):
        raise RuntimeError(f"graphpress::circulant_conv2d: bias {tuple(bias.shape)} is not ({p * b},)")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            raise RuntimeError(f"graphpress::circulant_conv2d: {name} must have 2 values, got {list(v)}")


@torch.library.custom_op(
    "graphpress::circulant_conv2d",
    mutates_args=(),
    schema="(Tensor x, Tensor c, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
)
def circulant_conv2d(
    x: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> torch.Tensor:
    """``F.conv2d(x, expand(c).permute(2, 3, 0, 1), bias, stride, padding, dilation)``."""
    _check_conv(x, c, bias, stride, padding, dilation)
    w = _CACHE.get(c, "conv_weight", lambda: conv_weight(c.detach()).contiguous())
    return F.conv2d(x, w, bias, list(stride), list(padding), list(dilation))


@shape_function(circulant_conv2d)
def _circulant_conv2d_fake(x, c, bias, stride, padding, dilation):
    _check_conv(x, c, bias, stride, padding, dilation)
    kh, kw, p, _q, b = c.shape
    h = _conv_out(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], p * b, h, w))


def circulant_conv2d_reference(x, c, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """Uncached, differentiable ``circulant_conv2d`` (dense expansion + ``F.conv2d``)."""
    return F.conv2d(x, conv_weight(c), bias, list(stride), list(padding), list(dilation))


def _setup_conv(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, c, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, c, bias)
    ctx.conv_args = (list(stride), list(padding), list(dilation))


def _backward_conv(ctx: Any, grad: torch.Tensor):
    x, c, bias = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    gx, gc, gb = _grads(
        lambda a, w, bb: circulant_conv2d_reference(a, w, bb, stride, padding, dilation), (x, c, bias), ctx.needs_input_grad[:3], grad
    )
    return gx, gc, gb, None, None, None


circulant_conv2d.register_autograd(_backward_conv, setup_context=_setup_conv)


__all__ = [
    "DENSE_MAX_WEIGHTS",
    "SPLIT_REAL_MIN_WORK",
    "circulant_conv2d",
    "circulant_conv2d_reference",
    "circulant_linear",
    "circulant_linear_reference",
    "clear_cache",
    "conv_weight",
    "use_dense_path",
]
