"""Mostly-zero weights *stored* as a bitmask plus their nonzero values, rebuilt dense once at load.

A weight ``W`` with ``n`` elements of which ``k`` are nonzero is stored as

* ``bitmask``: uint8 ``(ceil(n / 8),)``; element ``i`` of ``W`` flattened in row-major (C) order
  is bit ``i % 8`` of byte ``i // 8``, least significant bit first (bit set = element kept);
  the unused high bits of the last byte are 0;
* ``values``: the ``k`` kept elements in the same row-major order, in the weight's own dtype
  (float32, float16 or bfloat16).

Bytes: ``n / 8 + k * itemsize``. For float32 at 50% zeros that is ``n * (1/8 + 2) = 0.53x`` of the
dense ``4 n`` (``1/32 + 1/2``); the format wins over dense above 1/32 sparsity (float32; above
1/16 for 16-bit weights). Zeros are compared by value: ``-0.0`` counts as a zero and comes back
as ``+0.0`` (pruning by ``w * mask`` leaves ``-0.0`` for negative weights), which changes no
product's sum except a sum of only zeros' sign.

Op
--
``graphpress::sparse_unpack(Tensor bitmask, Tensor values, int[] shape) -> Tensor``
    The dense tensor of ``shape`` (dtype of ``values``) with ``values`` where the bit is 1 and
    zeros elsewhere. A layer reads it as its weight (``aten.linear(x, sparse_unpack(...), b)``).

    Eager: :func:`unpack_sparse`, cached per ``bitmask`` tensor (identity and version, as
    :mod:`graphpress.ir.ops_circulant` does) so that a graph rebuilds each weight once, not per
    call; the returned tensor is shared between calls and must not be written in place.

    ONNX (:mod:`graphpress.lowering.onnx.sparse_store`): standard ops on the two initializers, evaluated by ONNX Runtime's constant folding
    when it creates the session (the file keeps the packed bytes: the exporter's optimizer
    folds no node that reads a uint8 tensor, see
    ``graphpress.backends.onnxruntime.lower._optimize_keeping_packed_weights``)::

        bits = Reshape(BitwiseAnd(BitShift(Unsqueeze(bitmask, -1), [0..7]), 1), [-1])[:n]
        pos  = CumSum(bits) * bits              # 1-based index of a kept element, 0 for a zero
        W    = Reshape(Gather(Concat([0], values), pos), shape)

    The gathered numbers are the stored ones: the rebuilt weight is bit-identical to the eager
    one, and ORT then runs the plain dense graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from graphpress.ir.fakes import shape_function
from graphpress.ir.ops_circulant import _WeightCache

#: dtypes the values may have (the weights graphpress stores this way).
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_CACHE = _WeightCache()
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def clear_cache() -> None:
    """Forget the cached dense weights."""
    _CACHE.clear()


def packed_bytes(numel: int, kept: int, itemsize: int) -> int:
    """Bytes of the stored form of a weight with ``numel`` elements, ``kept`` of them nonzero."""
    return -(-numel // 8) + kept * itemsize


def pack_sparse(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of ``w``: ``(bitmask, values)`` (format in the module docstring).

    Parameters
    ----------
    w : Tensor
        A float32, float16 or bfloat16 tensor of any shape.

    Returns
    -------
    bitmask : Tensor
        uint8 ``(ceil(w.numel() / 8),)``, bit ``i % 8`` of byte ``i // 8`` set when flat
        element ``i`` is nonzero.
    values : Tensor
        The nonzero elements of ``w`` in row-major order, ``w.dtype``, 1-D.

    Raises
    ------
    ValueError
        When ``w`` has another dtype.
    """
    if w.dtype not in VALUE_DTYPES:
        raise ValueError(f"pack_sparse: weights must be float32, float16 or bfloat16, got {w.dtype}")
    flat = w.detach().reshape(-1)
    keep = flat != 0
    n = flat.numel()
    bits = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=w.device)
    bits[:n] = keep.to(torch.uint8)
    bitmask = (bits.view(-1, 8) << _SHIFTS.to(w.device)).sum(dim=1, dtype=torch.uint8)
    return bitmask.contiguous(), flat[keep].contiguous()


def _check(bitmask: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> int:
    """Validate the stored form against ``shape``; returns the element count."""
    if any(int(d) < 0 for d in shape):
        raise RuntimeError(f"graphpress::sparse_unpack: shape {list(shape)} has a negative dim")
    n = math.prod(int(d) for d in shape)
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.shape[0] != -(-n // 8):
        raise RuntimeError(
            f"graphpress::sparse_unpack: bitmask must be uint8 ({-(-n // 8)},) for shape {list(shape)}, got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    if values.dtype not in VALUE_DTYPES or values.dim() != 1 or values.shape[0] > n:
        raise RuntimeError(
            f"graphpress::sparse_unpack: values must be a 1-D float32/float16/bfloat16 tensor of at most {n} elements, got {values.dtype} {tuple(values.shape)}"
        )
    return n


def unpack_sparse(bitmask: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense tensor of ``shape`` stored as ``(bitmask, values)`` (inverse of :func:`pack_sparse`).

    Parameters
    ----------
    bitmask : Tensor
        uint8 ``(ceil(n / 8),)`` with ``n = prod(shape)``.
    values : Tensor
        1-D, one element per set bit, float32/float16/bfloat16.
    shape : sequence of int
        The dense shape.

    Returns
    -------
    Tensor
        A new tensor of ``shape`` and ``values.dtype``.

    Raises
    ------
    RuntimeError
        When the sizes disagree (the number of set bits must equal ``values.numel()``).
    """
    n = _check(bitmask, values, shape)
    keep = ((bitmask.unsqueeze(-1) >> _SHIFTS.to(bitmask.device)) & 1).reshape(-1)[:n].bool()
    kept = int(keep.sum())
    if kept != values.numel():
        raise RuntimeError(f"graphpress::sparse_unpack: bitmask sets {kept} bits but values holds {values.numel()} elements")
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out.masked_scatter_(keep, values.detach())
    return out.reshape([int(d) for d in shape])


# ---------------------------------------------------------------------------- the op
@torch.library.custom_op("graphpress::sparse_unpack", mutates_args=(), schema="(Tensor bitmask, Tensor values, int[] shape) -> Tensor")
def sparse_unpack(bitmask: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Dense weight from its bitmask-and-values storage, built once per stored tensor (see module docstring)."""
    _check(bitmask, values, shape)
    key = f"sparse:{id(values)}:{values._version}:{values.data_ptr()}:{tuple(int(d) for d in shape)}"
    return _CACHE.get(bitmask, key, lambda: _build(bitmask, values, shape))


def _build(bitmask: torch.Tensor, values: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    # a normal tensor even when the first call runs under inference_mode: the cached weight is
    # reused by later calls that may record autograd (an inference tensor cannot be saved for backward)
    with torch.inference_mode(False):
        return unpack_sparse(bitmask, values, shape)


@shape_function(sparse_unpack)
def _sparse_unpack_fake(bitmask, values, shape):
    _check(bitmask, values, shape)
    return values.new_empty([int(d) for d in shape])


__all__ = ["VALUE_DTYPES", "clear_cache", "pack_sparse", "packed_bytes", "sparse_unpack", "unpack_sparse"]
