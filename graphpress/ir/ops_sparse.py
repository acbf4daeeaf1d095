"""Activation-sparse linear ops: ``graphpress::sparse_linear`` and ``graphpress::sparse_linear_pc``.

Both compute ``y = x_hat Wt + b`` with the weight stored transposed, ``Wt = W^T`` of shape
``(in, out)`` (float32, or bfloat16 storage), and

    x_hat = where(keep, x, 0),   keep = |x| * s > t

so that the product reads only the rows of ``Wt`` that a kept entry selects
(:mod:`graphpress.ir.sparse_kernel`: a C++ kernel on CPU, dense ``addmm`` above the batch
crossover, on other devices, or when the kernel cannot be built).

Ops
---
``graphpress::sparse_linear(Tensor x, Tensor wt, Tensor? bias, float threshold) -> Tensor``
    One threshold ``t >= 0`` for all inputs, ``s = 1`` (TEAL). ``threshold=0`` keeps every
    non-zero entry (exact: it only skips the zeros already there, e.g. after a ReLU).
``graphpress::sparse_linear_pc(Tensor x, Tensor wt, Tensor? bias, Tensor thresholds, Tensor? scores) -> Tensor``
    Per-input-feature thresholds ``t_i`` (CHESS) and optional scores ``s_i`` (WINA: the column
    norms ``||W[:, i]||``; None = 1), both ``(in,)``.

The comparison is in float32 on both sides (a NaN input is dropped, a value equal to its
threshold is dropped). Eager, fake (``torch.export``) and ONNX agree on these semantics.

ONNX (:mod:`graphpress.lowering.onnx.sparse`): ``Where(Abs(x) [* s] > t, x, 0)`` then ``MatMul`` with the
stored ``Wt`` (``Cast`` to float first when it is bfloat16; ORT folds that at load) and ``Add``
of the bias. Correct, but dense: ONNX Runtime has no kernel that skips the unselected rows, so
the speed of these ops exists only in the torch backend.
"""

from __future__ import annotations

import torch

from graphpress.ir import sparse_kernel as _sk
from graphpress.ir.fakes import shape_function


# ---------------------------------------------------------------------------- sparse_linear
@torch.library.custom_op("graphpress::sparse_linear", mutates_args=(),
                         schema="(Tensor x, Tensor wt, Tensor? bias, float threshold) -> Tensor")
def sparse_linear(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """``where(|x| > threshold, x, 0) @ wt + bias`` (see module docstring)."""
    _sk.check_inputs(x, wt, bias, threshold, where="graphpress::sparse_linear")
    return _sk.run_checked(x, wt, bias, threshold)


@shape_function(sparse_linear)
def _sparse_linear_fake(x, wt, bias, threshold):
    _sk.check_inputs(x, wt, bias, threshold, where="graphpress::sparse_linear")
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


# ---------------------------------------------------------------------------- sparse_linear_pc
@torch.library.custom_op("graphpress::sparse_linear_pc", mutates_args=(),
                         schema="(Tensor x, Tensor wt, Tensor? bias, Tensor thresholds, Tensor? scores) -> Tensor")
def sparse_linear_pc(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, thresholds: torch.Tensor,
                     scores: torch.Tensor | None) -> torch.Tensor:
    """``where(|x| * scores > thresholds, x, 0) @ wt + bias`` with per-input-feature thresholds."""
    _sk.check_inputs(x, wt, bias, 0.0, thresholds, scores, where="graphpress::sparse_linear_pc")
    return _sk.run_checked(x, wt, bias, 0.0, thresholds, scores)


@shape_function(sparse_linear_pc)
def _sparse_linear_pc_fake(x, wt, bias, thresholds, scores):
    _sk.check_inputs(x, wt, bias, 0.0, thresholds, scores, where="graphpress::sparse_linear_pc")
    return x.new_empty((*x.shape[:-1], wt.shape[1]))


__all__ = ["sparse_linear", "sparse_linear_pc"]
