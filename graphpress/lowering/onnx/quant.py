"""ONNX translations of the quantized ops (:mod:`graphpress.ir.ops_quant`): ONNX Runtime runs them as integers.

* ``qlinear``: static -- the QDQ unit ``QuantizeLinear -> DequantizeLinear`` around ``Gemm``
  (+ ``Relu``, + the output ``Q -> DQ`` when ``out_scale > 0``), which ORT fuses into
  ``QLinearMatMul``; dynamic (``in_scale == 0``) -- ``com.microsoft.DynamicQuantizeMatMul``.
* ``qconv2d``: the QDQ unit around ``Conv`` (+ ``Relu``) with the output ``Q -> DQ``
  (ORT: ``QLinearConv``).
* ``wlinear_nbits``: ``com.microsoft.MatMulNBits`` with the bias as its last input
  (``accuracy_level`` from :data:`graphpress.ir.ops_quant.ACCURACY_LEVEL`).
* ``quantize_act``: ``QuantizeLinear -> DequantizeLinear``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from graphpress.ir.ops_quant import ACCURACY_LEVEL
from graphpress.lowering.onnx.common import const, contrib_op


def _static_dims(value, what: str) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    dims = tuple(shape) if shape is not None else ()
    try:
        return tuple(int(d) for d in dims)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: the quantized weight needs a static shape, got {shape}") from None


def _ms_schema(name: str):
    """``onnx.defs.OpSchema`` of the ``com.microsoft`` contrib ops used here (the ``onnx``
    package does not ship them; the exporter needs a schema to bind inputs and attributes)."""
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, at = OpSchema.Attribute, OpSchema.AttrType
    if name == "MatMulNBits":
        return OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            inputs=[fp("A", "T1"), fp("B", "T2"), fp("scales", "T1"), fp("zero_points", "T3", param_option=opt),
                    fp("g_idx", "T4", param_option=opt), fp("bias", "T1", param_option=opt)],
            outputs=[fp("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                              ("T3", ["tensor(uint8)", "tensor(float)"], ""), ("T4", ["tensor(int32)"], "")],
            attributes=[attr("K", at.INT, ""), attr("N", at.INT, ""), attr("bits", at.INT, ""),
                        attr("block_size", at.INT, ""), attr("accuracy_level", at.INT, "")],
        )
    if name == "DynamicQuantizeMatMul":
        return OpSchema(
            "DynamicQuantizeMatMul", "com.microsoft", 1,
            inputs=[fp("A", "T1"), fp("B", "T2"), fp("b_scale", "T1"), fp("b_zero_point", "T2", param_option=opt),
                    fp("bias", "T1", param_option=opt)],
            outputs=[fp("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(int8)", "tensor(uint8)"], "")],
        )
    raise KeyError(name)


def _ms(name: str):
    """A callable ``com.microsoft`` op for onnxscript trace mode."""
    return contrib_op(name, lambda: _ms_schema(name))


def _qdq(x, scale: float, zero_point: int):
    from onnxscript import opset18 as op

    s = const(np.array(scale, dtype=np.float32))
    z = const(np.array(zero_point, dtype=np.uint8))
    return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)


def _dq_weight(w_q, w_scale, out_features: int):
    from onnxscript import opset18 as op

    return op.DequantizeLinear(w_q, w_scale, const(np.zeros(out_features, dtype=np.int8)), axis=0)


def _dq_bias(bias, in_scale: float, w_scale, out_features: int):
    from onnxscript import opset18 as op

    b_scale = op.Mul(const(np.array(in_scale, dtype=np.float32)), w_scale)
    return op.DequantizeLinear(bias, b_scale, const(np.zeros(out_features, dtype=np.int32)), axis=0)


def _onnx_qlinear(x, w_q, w_scale, bias, in_scale: float, in_zero_point: int, out_scale: float, out_zero_point: int, relu: bool):
    """onnxscript (trace mode) translation of ``graphpress::qlinear``."""
    from onnxscript import opset18 as op

    out_f, in_f = _static_dims(w_q, "graphpress::qlinear")
    if in_scale == 0:
        wt = op.Transpose(w_q, perm=[1, 0])  # (in, out): folded at session creation
        args = [x, wt, w_scale, const(np.zeros(out_f, dtype=np.int8))] + ([bias] if bias is not None else [])
        y = _ms("DynamicQuantizeMatMul")(*args)
        return op.Relu(y) if relu else y
    rank = len(x.shape) if getattr(x, "shape", None) is not None else 2
    x2 = x if rank == 2 else op.Reshape(x, const(np.array([-1, in_f], dtype=np.int64)))
    xd = _qdq(x2, in_scale, in_zero_point)
    wd = _dq_weight(w_q, w_scale, out_f)
    if bias is not None:
        y = op.Gemm(xd, wd, _dq_bias(bias, in_scale, w_scale, out_f), transB=1)
    else:
        y = op.Gemm(xd, wd, transB=1)
    if relu:
        y = op.Relu(y)
    if out_scale > 0:
        y = _qdq(y, out_scale, out_zero_point)
    if rank != 2:
        shape = op.Concat(op.Slice(op.Shape(x), const(np.array([0], dtype=np.int64)), const(np.array([-1], dtype=np.int64))),
                          const(np.array([out_f], dtype=np.int64)), axis=0)
        y = op.Reshape(y, shape)
    return y


def _onnx_qconv2d(x, w_q, w_scale, bias, stride, padding, dilation, groups: int, in_scale: float, in_zero_point: int,
                  out_scale: float, out_zero_point: int, relu: bool):
    """onnxscript (trace mode) translation of ``graphpress::qconv2d``: the QDQ unit ORT fuses into ``QLinearConv``."""
    from onnxscript import opset18 as op

    out_c, _in_c, kh, kw = _static_dims(w_q, "graphpress::qconv2d")
    xd = _qdq(x, in_scale, in_zero_point)
    wd = _dq_weight(w_q, w_scale, out_c)
    pads = [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])]
    kwargs = {"strides": [int(s) for s in stride], "pads": pads, "dilations": [int(d) for d in dilation], "group": int(groups), "kernel_shape": [kh, kw]}
    if bias is not None:
        y = op.Conv(xd, wd, _dq_bias(bias, in_scale, w_scale, out_c), **kwargs)
    else:
        y = op.Conv(xd, wd, **kwargs)
    if relu:
        y = op.Relu(y)
    return _qdq(y, out_scale, out_zero_point)


def _onnx_quantize_act(x, scale: float, zero_point: int):
    """onnxscript (trace mode) translation of ``graphpress::quantize_act``: ``Q -> DQ``."""
    return _qdq(x, scale, zero_point)


def _onnx_wlinear_nbits(x, packed, scales, zeros, bias, in_features: int, bits: int, group_size: int, act_bits: int):
    """onnxscript (trace mode) translation of ``graphpress::wlinear_nbits``: ``com.microsoft.MatMulNBits``."""
    out_f, _nb, _bytes = _static_dims(packed, "graphpress::wlinear_nbits")
    attrs = {"K": int(in_features), "N": out_f, "bits": int(bits), "block_size": int(group_size), "accuracy_level": ACCURACY_LEVEL[int(act_bits)]}
    return _ms("MatMulNBits")(x, packed, scales, zeros, None, bias, **attrs)


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the quantized ops."""
    return {
        torch.ops.graphpress.qlinear.default: _onnx_qlinear,
        torch.ops.graphpress.qconv2d.default: _onnx_qconv2d,
        torch.ops.graphpress.wlinear_nbits.default: _onnx_wlinear_nbits,
        torch.ops.graphpress.quantize_act.default: _onnx_quantize_act,
    }
