"""ONNX translations of the block-circulant ops (:mod:`graphpress.ir.ops_circulant`).

The compact ``c`` is what the ``.onnx`` file stores. Lowerings of ``circulant_linear``:

* ``"dense"`` -- ``Gather(c, diagonal_index(b), axis=-1)``, ``Transpose``, ``Reshape`` to the
  dense ``(q*b, p*b)`` matrix, ``MatMul`` (+ ``Add`` bias). The expansion reads only the
  initializer and constants, so ONNX Runtime constant-folds it at session creation: at run
  time it is one dense product.
* ``"dft"`` -- ``DFT`` (onesided) of the input blocks, one real ``MatMul`` per frequency with
  the stacked ``[[Re C, Im C], [-Im C, Re C]]`` spectrum (``DFT`` of the stored ``c``, folded at
  session creation), and the inverse real DFT as a ``MatMul`` with a constant ``(2f, b)`` matrix.
* ``"dft-matmul"`` -- the same, with the forward DFT as a ``MatMul`` with a constant
  ``(b, 2f)`` matrix too (faster than ORT's ``DFT`` kernel at these lengths).
* ``"auto"`` (default, :data:`DEFAULT_LINEAR_LOWERING`) -- the measured rule of
  :func:`linear_lowering_for`: ``"dft-matmul"`` for ``b >= 8`` on matrices above
  512 x 512, else ``"dense"`` (``benchmarks/circulant_speed.py``, ``docs/passes/circulant.md``).

The lowering is an argument of the table, not state: ``translations(linear_lowering="dft")``
(or :func:`graphpress.lowering.onnx.translation_table`) builds a table whose
``circulant_linear`` always lowers that way. The conv always lowers to the dense expansion +
``Conv``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import graphpress.ir.ops_circulant  # noqa: F401 -- registers graphpress::circulant_linear/_conv2d
from graphpress.ir.circulant import diagonal_index
from graphpress.lowering.onnx.common import const

#: The lowerings of ``circulant_linear`` (see module docstring).
LINEAR_LOWERINGS = ("auto", "dense", "dft", "dft-matmul")
DEFAULT_LINEAR_LOWERING = "auto"
#: ``"auto"`` lowers a linear spectrally (``"dft-matmul"``) when ``b >= SPECTRAL_MIN_BLOCK``
#: and the dense matrix has more than :data:`DENSE_MAX_WEIGHTS` weights, else densely.
SPECTRAL_MIN_BLOCK = 8
DENSE_MAX_WEIGHTS = 512 * 512


def _check_mode(mode: str) -> None:
    if mode not in LINEAR_LOWERINGS:
        raise ValueError(f"circulant ONNX lowering must be one of {LINEAR_LOWERINGS}, got {mode!r}")


def _static_shape(value: Any, rank: int, what: str) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    dims = tuple(shape) if shape is not None else ()
    if len(dims) != rank or not all(isinstance(d, int) or (hasattr(d, "__index__") and not isinstance(d, str)) for d in dims):
        raise ValueError(f"{what}: the compact weight needs a static shape of rank {rank}, got {shape}")
    return tuple(int(d) for d in dims)


def _unfoldable_zero(dtype: int):
    """A ``(1,)`` zero made by ``ConstantOfShape``.

    Adding it to a constant hides the constant from the exporter's own constant folder
    (onnxscript's optimizer never folds ``ConstantOfShape``, and folds everything it can reach
    from initializers up to 512 x 512 outputs), so the *compact* ``c`` stays what the file stores
    even for small layers. ONNX Runtime folds the whole chain at session creation.
    """
    import onnx
    from onnxscript import opset18 as op

    return op.ConstantOfShape(const(np.array([1], dtype=np.int64)), value=onnx.helper.make_tensor("zero", dtype, [1], [0]))


def _onnx_dense_blocks(c, p: int, q: int, b: int):
    """``Gather(c, diagonal_index(b), axis=-1)``: ``(..., p, q, b) -> (..., p, q, b, b)``."""
    import onnx
    from onnxscript import opset18 as op

    idx = op.Add(const(diagonal_index(b).numpy().astype(np.int64)), _unfoldable_zero(onnx.TensorProto.INT64))
    return op.Gather(c, idx, axis=-1)


def linear_lowering_for(p: int, q: int, b: int, mode: str = DEFAULT_LINEAR_LOWERING) -> str:
    """The lowering ``circulant_linear`` with ``c (p, q, b)`` gets under ``mode`` (one of
    :data:`LINEAR_LOWERINGS`): ``"dense"``, ``"dft"`` or ``"dft-matmul"``."""
    _check_mode(mode)
    if b <= 1:
        return "dense"
    if mode == "auto":
        return "dft-matmul" if b >= SPECTRAL_MIN_BLOCK and p * q * b * b > DENSE_MAX_WEIGHTS else "dense"
    return mode


def _onnx_circulant_linear(x, c, bias, mode: str):
    """onnxscript (trace mode) translation of ``graphpress::circulant_linear`` under ``mode``."""
    p, q, b = _static_shape(c, 3, "graphpress::circulant_linear")
    kind = linear_lowering_for(p, q, b, mode)
    if kind == "dense":
        return _onnx_linear_dense(x, c, bias, p, q, b)
    return _onnx_linear_spectral(x, c, bias, p, q, b, dft_op=(kind == "dft"))


def _onnx_linear_dense(x, c, bias, p: int, q: int, b: int):
    from onnxscript import opset18 as op

    blocks = _onnx_dense_blocks(c, p, q, b)  # (p, q, b_r, b_s)
    # W^T[j*b + s, i*b + r] = blocks[i, j, r, s]
    wt = op.Reshape(op.Transpose(blocks, perm=[1, 3, 0, 2]), const(np.array([q * b, p * b], dtype=np.int64)))
    y = op.MatMul(x, wt)
    return op.Add(y, bias) if bias is not None else y


def _dft_matrices(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Real DFT of length ``b`` as matrices (``f = b/2 + 1``):

    * forward ``D (b, 2f)``: ``x @ D = [Re X, Im X]`` with ``X = rfft(x)``;
    * inverse ``M (2f, b)``: ``[Re Y, Im Y] @ M = irfft(Y, n=b)`` (the ``f - 2`` inner
      frequencies count twice: they stand for their conjugate mirrors).
    """
    f = b // 2 + 1
    ang = 2.0 * np.pi * np.arange(f)[:, None] * np.arange(b)[None, :] / b  # (f, b)
    fwd = np.concatenate([np.cos(ang), -np.sin(ang)], axis=0).T
    w = np.full((f, 1), 2.0)
    w[0] = 1.0
    if b % 2 == 0:
        w[-1] = 1.0
    inv = np.concatenate([w * np.cos(ang), -w * np.sin(ang)], axis=0) / b
    return fwd, inv  # float64


def _onnx_linear_spectral(x, c, bias, p: int, q: int, b: int, *, dft_op: bool):
    """Spectral lowering: real DFT of the input blocks (the ``DFT`` op, onesided, with
    ``dft_op``; else a ``MatMul`` with the constant ``(b, 2f)`` DFT matrix), one real
    ``MatMul`` per frequency with the stacked spectrum ``[[Re C, Im C], [-Im C, Re C]]``
    (computed with ``DFT`` from the stored ``c`` and folded at session creation), and the
    inverse real DFT as a ``MatMul`` with a constant ``(2f, b)`` matrix (ONNX ``DFT``'s onesided
    mode is for real input only)."""
    from onnxscript import opset18 as op

    f = b // 2 + 1
    i64 = lambda *v: const(np.array(v, dtype=np.int64))
    # spectrum of c (initializer-only: folded at session creation)
    c = op.Add(c, op.CastLike(_unfoldable_zero(1), c))  # keep the compact c in the file (see _unfoldable_zero)
    cf = op.DFT(op.Unsqueeze(c, i64(-1)), axis=2, onesided=1)  # (p, q, f, 2)
    cr = op.Transpose(op.Squeeze(op.Slice(cf, i64(0), i64(1), i64(3)), i64(3)), perm=[2, 1, 0])  # (f, q, p)
    ci = op.Transpose(op.Squeeze(op.Slice(cf, i64(1), i64(2), i64(3)), i64(3)), perm=[2, 1, 0])
    top = op.Concat(cr, ci, axis=2)  # (f, q, 2p): X_r rows
    bottom = op.Concat(op.Neg(ci), cr, axis=2)  # (f, q, 2p): X_i rows
    stacked = op.Concat(top, bottom, axis=1)  # (f, 2q, 2p)
    # input blocks
    out_shape = op.Concat(op.Slice(op.Shape(x), i64(0), i64(-1), i64(0)), i64(p * b), axis=0)
    if not dft_op:
        fwd, _inv = _dft_matrices(b)
        xf = op.MatMul(op.Reshape(x, i64(-1, q, b)), op.CastLike(const(fwd.astype(np.float32)), x))  # (R, q, 2f): [re..., im...]
        xs = op.Reshape(op.Transpose(op.Reshape(xf, i64(-1, q, 2, f)), perm=[3, 0, 2, 1]), i64(f, -1, 2 * q))
    else:
        xb = op.Reshape(x, i64(-1, q, b, 1))  # (R, q, b, 1)
        xf = op.DFT(xb, axis=2, onesided=1)  # (R, q, f, 2)
        xs = op.Reshape(op.Transpose(xf, perm=[2, 0, 3, 1]), i64(f, -1, 2 * q))  # (f, R, 2q) = [X_r | X_i]
    yf = op.MatMul(xs, stacked)  # (f, R, 2p) = [Y_r | Y_i]
    # inverse real DFT: (R, p, [f re, f im]) @ (2f, b)
    ys = op.Transpose(op.Reshape(yf, i64(f, -1, 2, p)), perm=[1, 3, 2, 0])  # (R, p, 2, f)
    _fwd, inv = _dft_matrices(b)
    y = op.MatMul(op.Reshape(ys, i64(-1, p, 2 * f)), op.CastLike(const(inv.astype(np.float32)), x))  # (R, p, b)
    y = op.Reshape(y, out_shape)
    return op.Add(y, bias) if bias is not None else y


def _onnx_circulant_conv2d(x, c, bias, stride, padding, dilation):
    """onnxscript (trace mode) translation of ``graphpress::circulant_conv2d``: the dense
    expansion (folded at session creation) and ``Conv``."""
    from onnxscript import opset18 as op

    kh, kw, p, q, b = _static_shape(c, 5, "graphpress::circulant_conv2d")
    blocks = _onnx_dense_blocks(c, p, q, b)  # (kh, kw, p, q, b_r, b_s)
    # W[i*b + r, j*b + s, y, x] = blocks[y, x, i, j, r, s]
    w = op.Reshape(op.Transpose(blocks, perm=[2, 4, 3, 5, 0, 1]), const(np.array([p * b, q * b, kh, kw], dtype=np.int64)))
    pads = [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]
    kwargs = {"strides": [int(s) for s in stride], "pads": pads, "dilations": [int(d) for d in dilation], "group": 1, "kernel_shape": [kh, kw]}
    if bias is not None:
        return op.Conv(x, w, bias, **kwargs)
    return op.Conv(x, w, **kwargs)


def translations(linear_lowering: str = DEFAULT_LINEAR_LOWERING) -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the circulant ops, lowering ``circulant_linear`` as
    ``linear_lowering`` (one of :data:`LINEAR_LOWERINGS`).

    Raises
    ------
    ValueError
        For an unknown lowering.
    """
    _check_mode(linear_lowering)

    def circulant_linear(x, c, bias):
        return _onnx_circulant_linear(x, c, bias, linear_lowering)

    circulant_linear.__doc__ = f"``graphpress::circulant_linear`` lowered as {linear_lowering!r}."
    return {
        torch.ops.graphpress.circulant_linear.default: circulant_linear,
        torch.ops.graphpress.circulant_conv2d.default: _onnx_circulant_conv2d,
    }
