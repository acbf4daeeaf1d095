"""graphpress custom operators (``torch.ops.graphpress.*``): schemas, eager and fake kernels.

Passes that fuse or compress a pattern into one operator write a ``call_function`` on one of
these ops, so every backend sees the same thing:

* the torch backend runs the eager implementation below;
* re-export (:meth:`graphpress.ir.graph.Graph.export_program`) keeps the op as one node thanks
  to its ``register_fake`` shape function;
* the ONNX backend passes :data:`graphpress.lowering.onnx.ONNX_TRANSLATIONS` (the op's ONNX
  translations live in the lowering layer, not here) as ``custom_translation_table`` to
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

from typing import Optional

import torch
import torch.nn.functional as F

from graphpress.ir.fakes import shape_function

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


@shape_function(linear_act)
def _linear_act_fake(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: str) -> torch.Tensor:
    if act not in LINEAR_ACTIVATIONS:
        raise ValueError(f"graphpress::linear_act: unknown activation {act!r}; expected one of {LINEAR_ACTIVATIONS}")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"graphpress::linear_act: input {tuple(x.shape)} does not match weight {tuple(weight.shape)}"
        )
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


__all__ = ["linear_act", "LINEAR_ACTIVATIONS"]

# Importing this module registers every graphpress:: op (the modules below define them).
from graphpress.ir import ops_circulant as _ops_circulant  # noqa: E402,F401 -- graphpress::circulant_linear/_conv2d
from graphpress.ir import ops_quant as _ops_quant  # noqa: E402,F401 -- graphpress::qlinear/qconv2d/wlinear_nbits/quantize_act
from graphpress.ir import ops_load as _ops_load  # noqa: E402,F401 -- graphpress::wlinear_load/wembedding_load
from graphpress.ir import ops_sparse as _ops_sparse  # noqa: E402,F401 -- graphpress::sparse_linear/sparse_linear_pc
from graphpress.ir import ops_sparse_store as _ops_sparse_store  # noqa: E402,F401 -- graphpress::sparse_unpack
