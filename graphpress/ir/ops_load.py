"""Ops whose weights are *stored* in k bits but dequantized once, when the runtime loads the model.

Integer kernels only pay off when the matrices are large enough for memory traffic or MACs to
dominate. On small layers (stories260K: 64 x 64 to 172 x 64 matrices at 64 tokens) ONNX Runtime's
``MatMulNBits`` is slower than a float ``MatMul`` (measured 0.63x for the whole model), and
ORT fuses a ``DequantizeLinear -> MatMul`` pair into the same ``MatMulNBits``. These ops keep the
compressed weight in the artifact and express its dequantization with plain ONNX ops on
initializers (``Cast``, ``BitShift``, ``BitwiseAnd``, ``Sub``, ``Mul``, ``Reshape``) that ORT's
constant folding evaluates at session creation: the file is small, the computation is exactly
the float model with the dequantized weights, and the speed is the float model's.

Ops
---
``graphpress::wlinear_load(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int in_features, int bits, int group_size) -> Tensor``
    ``y = x W^T + b`` with ``W`` the ``MatMulNBits``-layout group-wise weight
    (:class:`graphpress.ir.quant.NBitsWeight`), i.e. the same numbers as ``wlinear_nbits`` with
    ``act_bits=0``. ONNX: the dequantization subgraph, ``MatMul`` with its transpose, ``Add``.
``graphpress::wembedding_load(Tensor ids, Tensor packed, Tensor scales, Tensor? zeros, int dim, int bits, int group_size) -> Tensor``
    ``table[ids]`` with the ``(vocab, dim)`` table stored group-wise along ``dim`` (rows are
    quantized like a linear weight's output rows). ONNX: ``Gather`` of the ids' codes, scales and
    zero points, then those rows dequantized (the table stays in k bits in the session).

Exact: eager runs dequantize-then-float exactly like the ONNX graph; the only difference from
``wlinear_nbits`` in ORT is the kernel's summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphpress.ir.fakes import shape_function
from graphpress.ir.ops_circulant import _WeightCache
from graphpress.ir.quant import dequantize_nbits

_CACHE = _WeightCache()


def clear_cache() -> None:
    """Forget the cached dequantized weights."""
    _CACHE.clear()


def _check(op: str, packed, scales, zeros, n_in: int, bits: int, group_size: int) -> None:
    if bits not in (2, 4, 8):
        raise RuntimeError(f"graphpress::{op}: bits (container width) must be 2, 4 or 8, got {bits}")
    if packed.dim() != 3 or packed.dtype != torch.uint8:
        raise RuntimeError(f"graphpress::{op}: packed must be uint8 (rows, blocks, bytes), got {packed.dtype} {tuple(packed.shape)}")
    rows, nb, nbytes = packed.shape
    if nb * group_size < n_in or (nb - 1) * group_size >= n_in or nbytes * 8 != group_size * bits:
        raise RuntimeError(f"graphpress::{op}: packed {tuple(packed.shape)} does not hold {n_in} values in groups of {group_size} at {bits} bits")
    if tuple(scales.shape) != (rows * nb,):
        raise RuntimeError(f"graphpress::{op}: scales {tuple(scales.shape)} is not ({rows * nb},)")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (rows * -(-nb * bits // 8),)):
        raise RuntimeError(f"graphpress::{op}: zeros must be uint8 ({rows * -(-nb * bits // 8)},), got {zeros.dtype} {tuple(zeros.shape)}")


def _weight(packed, scales, zeros, n_in: int, bits: int, group_size: int) -> torch.Tensor:
    return _CACHE.get(
        packed,
        f"load:{id(scales)}:{scales._version}:{id(zeros)}",
        lambda: dequantize_nbits(packed, scales, zeros, bits, group_size, n_in).contiguous(),
    )


# ---------------------------------------------------------------------------- wlinear_load
@torch.library.custom_op(
    "graphpress::wlinear_load",
    mutates_args=(),
    schema="(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int in_features, int bits, int group_size) -> Tensor",
)
def wlinear_load(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
                 in_features: int, bits: int, group_size: int) -> torch.Tensor:
    """Linear with a k-bit stored weight, dequantized once (see module docstring)."""
    _check("wlinear_load", packed, scales, zeros, in_features, bits, group_size)
    if x.shape[-1] != in_features:
        raise RuntimeError(f"graphpress::wlinear_load: input {tuple(x.shape)} does not have {in_features} features")
    w = _weight(packed, scales, zeros, in_features, bits, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


@shape_function(wlinear_load)
def _wlinear_load_fake(x, packed, scales, zeros, bias, in_features, bits, group_size):
    _check("wlinear_load", packed, scales, zeros, in_features, bits, group_size)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ---------------------------------------------------------------------------- wembedding_load
@torch.library.custom_op(
    "graphpress::wembedding_load",
    mutates_args=(),
    schema="(Tensor ids, Tensor packed, Tensor scales, Tensor? zeros, int dim, int bits, int group_size) -> Tensor",
)
def wembedding_load(ids: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    dim: int, bits: int, group_size: int) -> torch.Tensor:
    """Embedding lookup in a k-bit stored table, dequantized once (see module docstring)."""
    _check("wembedding_load", packed, scales, zeros, dim, bits, group_size)
    if ids.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"graphpress::wembedding_load: ids must be int32/int64, got {ids.dtype}")
    return F.embedding(ids, _weight(packed, scales, zeros, dim, bits, group_size))


@shape_function(wembedding_load)
def _wembedding_load_fake(ids, packed, scales, zeros, dim, bits, group_size):
    _check("wembedding_load", packed, scales, zeros, dim, bits, group_size)
    return torch.empty((*ids.shape, dim), dtype=torch.float32, device=ids.device)


__all__ = ["clear_cache", "wembedding_load", "wlinear_load"]
