"""graphpress custom operators (``torch.ops.graphpress.*``) and their ONNX translations.

Passes that fuse or compress a pattern into one operator write a ``call_function`` on one of
these ops, so every backend sees the same thing:

* the torch backend runs the eager implementation below;
* re-export (:meth:`graphpress.ir.graph.Graph.export_program`) keeps the op as one node thanks
  to its ``register_fake`` shape function;
* the ONNX backend passes :data:`ONNX_TRANSLATIONS` as ``custom_translation_table`` to
  ``torch.onnx.export(ep, dynamo=True, ...)``, which lowers each op to standard ONNX nodes.

Ops
---
``graphpress::linear_act(Tensor x, Tensor weight, Tensor? bias, str act) -> Tensor``
    ``act(x @ weight.T + bias)`` with ``act`` one of :data:`LINEAR_ACTIVATIONS`. The eager
    implementation computes the product with ``torch.addmm`` (2-D input) or ``F.linear`` and
    applies the activation *in place* on that fresh output, saving the intermediate the
    unfused ``linear -> act`` pair allocates. ONNX: ``MatMul(x, W^T) + b`` then the activation
    written with standard ops (``gelu`` as the ``Erf`` formula, ``silu`` as ``y * Sigmoid(y)``),
    patterns ONNX Runtime's graph optimizer fuses back into ``Gemm``/``FusedMatMul`` + ``Gelu``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

#: Activation names accepted by ``graphpress::linear_act``. ``gelu_tanh`` is
#: ``gelu(approximate="tanh")``.
LINEAR_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


def _apply_act_(out: torch.Tensor, act: str) -> torch.Tensor:
    """Apply ``act`` to ``out`` in place and return it."""
    if act == "relu":
        return out.relu_()
    if act == "gelu":
        return torch.ops.aten.gelu_(out)
    if act == "gelu_tanh":
        return torch.ops.aten.gelu_(out, approximate="tanh")
    if act == "silu":
        return F.silu(out, inplace=True)
    if act == "sigmoid":
        return out.sigmoid_()
    if act == "tanh":
        return out.tanh_()
    raise ValueError(f"graphpress::linear_act: unknown activation {act!r}; expected one of {LINEAR_ACTIVATIONS}")


@torch.library.custom_op("graphpress::linear_act", mutates_args=())
def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    """``act(F.linear(x, weight, bias))`` with the activation applied in place on the product."""
    if x.dim() == 2 and bias is not None and bias.dim() == 1:
        out = torch.addmm(bias, x, weight.t())
    else:
        out = F.linear(x, weight, bias)
    return _apply_act_(out, act)


@linear_act.register_fake
def _linear_act_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    if act not in LINEAR_ACTIVATIONS:
        raise ValueError(f"graphpress::linear_act: unknown activation {act!r}; expected one of {LINEAR_ACTIVATIONS}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"graphpress::linear_act: input {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
        )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---------------------------------------------------------------------------- ONNX
def _onnx_linear_act(x, weight, bias, act: str):
    """onnxscript (trace mode) translation of ``graphpress::linear_act``."""
    from onnxscript import opset18 as op

    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)

    def const(v: float):
        return op.CastLike(op.Constant(value_float=v), y)

    if act == "relu":
        return op.Relu(y)
    if act == "sigmoid":
        return op.Sigmoid(y)
    if act == "tanh":
        return op.Tanh(y)
    if act == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if act == "gelu":  # 0.5 * y * (1 + erf(y / sqrt(2)))
        return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Erf(op.Div(y, const(math.sqrt(2.0))))))
    if act == "gelu_tanh":  # 0.5 * y * (1 + tanh(sqrt(2/pi) * (y + 0.044715 y^3)))
        inner = op.Mul(const(math.sqrt(2.0 / math.pi)), op.Add(y, op.Mul(const(0.044715), op.Mul(op.Mul(y, y), y))))
        return op.Mul(op.Mul(const(0.5), y), op.Add(const(1.0), op.Tanh(inner)))
    raise ValueError(f"graphpress::linear_act: unknown activation {act!r}; expected one of {LINEAR_ACTIVATIONS}")


#: Op-to-onnxscript-function table for ``torch.onnx.export(..., custom_translation_table=...)``.
ONNX_TRANSLATIONS: dict[Callable, Callable] = {
    torch.ops.graphpress.linear_act.default: _onnx_linear_act,
}

__all__ = ["linear_act", "LINEAR_ACTIVATIONS", "ONNX_TRANSLATIONS"]
from graphpress.ir import ops_circulant as _ops_circulant  # noqa: E402 -- registers graphpress::circulant_linear/_conv2d
ONNX_TRANSLATIONS.update(_ops_circulant.ONNX_TRANSLATIONS)
from graphpress.ir import ops_quant as _ops_quant  # noqa: E402 -- registers graphpress::qlinear/qconv2d/wlinear_nbits
ONNX_TRANSLATIONS.update(_ops_quant.ONNX_TRANSLATIONS)
from graphpress.ir import ops_load as _ops_load  # noqa: E402 -- registers graphpress::wlinear_load/wembedding_load
ONNX_TRANSLATIONS.update(_ops_load.ONNX_TRANSLATIONS)
from graphpress.ir import ops_sparse as _ops_sparse  # noqa: E402 -- registers graphpress::sparse_linear/sparse_linear_pc
ONNX_TRANSLATIONS.update(_ops_sparse.ONNX_TRANSLATIONS)
from graphpress.ir import ops_sparse_store as _ops_sparse_store  # noqa: E402 -- registers graphpress::sparse_unpack
ONNX_TRANSLATIONS.update(_ops_sparse_store.ONNX_TRANSLATIONS)
