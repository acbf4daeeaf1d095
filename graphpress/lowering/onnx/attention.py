"""ONNX translation of ``graphpress::gqa_cached``: one ``com.microsoft.GroupQueryAttention``.

The op's tensors are head-major (``(b, H, s, d)``, what transformers hands an attention
function); GroupQueryAttention takes the step's queries, keys and values as ``(b, s, H*d)`` and the
caches as ``(b, Hkv, P, d)``, plus ``seqlens_k = sum(mask, 1) - 1`` (int32, per row) and
``total_sequence_length = mask.shape[1]`` (int32 scalar), from which it derives the causal window
of each row. It returns ``(b, s, H*d)`` and the presents ``concat(past, new)``: the caches are
not shared buffers (``past_present_share_buffer`` stays off in ``genai_config.json``), so ORT
appends. With rotary tables the kernel rotates the queries and new keys itself (``do_rotary=1``,
halves convention) at the positions it derives from ``seqlens_k``; without, they come rotated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import graphpress.ir.ops_attention  # noqa: F401 -- registers the op
from graphpress.lowering.onnx.common import const, contrib_op


def _gqa_schema():
    """``com.microsoft.GroupQueryAttention``'s schema, the inputs and attributes used here."""
    from onnx.defs import OpSchema

    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, at = OpSchema.Attribute, OpSchema.AttrType
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[fp("query", "T"), fp("key", "T", param_option=opt), fp("value", "T", param_option=opt),
                fp("past_key", "T", param_option=opt), fp("past_value", "T", param_option=opt),
                fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
                fp("cos_cache", "T", param_option=opt), fp("sin_cache", "T", param_option=opt)],
        outputs=[fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attr("num_heads", at.INT, ""), attr("kv_num_heads", at.INT, ""), attr("scale", at.FLOAT, ""),
                    attr("do_rotary", at.INT, ""), attr("rotary_interleaved", at.INT, "")],
    )


def _static(value, axis: int, what: str) -> int:
    try:
        return int(value.shape[axis])
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"graphpress::gqa_cached: {what} must be static, got shape {getattr(value, 'shape', None)}") from None


def _onnx_gqa_cached(q, k, v, past_k, past_v, mask, scale: float, cos=None, sin=None):
    """onnxscript (trace mode) translation of ``graphpress::gqa_cached`` (module docstring)."""
    from onnxscript import opset18 as op

    heads, kv_heads, dim = _static(q, 1, "query heads"), _static(k, 1, "key/value heads"), _static(q, 3, "head_dim")

    def tokens_major(x, n):  # (b, n, s, d) -> (b, s, n*d)
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), const(np.array([0, 0, n * dim], dtype=np.int64)))

    seqlens = op.Cast(op.Sub(op.ReduceSum(mask, const(np.array([1], dtype=np.int64)), keepdims=0), const(np.array(1, dtype=np.int64))),
                      to=6)  # int32
    total = op.Cast(op.Gather(op.Shape(mask), const(np.array(1, dtype=np.int64)), axis=0), to=6)
    rotary = {"do_rotary": 1, "rotary_interleaved": 0} if cos is not None else {"do_rotary": 0}
    tables = (cos, sin) if cos is not None else ()
    out, present_k, present_v = contrib_op("GroupQueryAttention", _gqa_schema)(tokens_major(q, heads), tokens_major(k, kv_heads), tokens_major(v, kv_heads), past_k, past_v,
                                       seqlens, total, *tables, num_heads=heads, kv_num_heads=kv_heads, scale=float(scale), **rotary)
    return op.Reshape(out, const(np.array([0, 0, heads, dim], dtype=np.int64))), present_k, present_v


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table of the attention ops."""
    return {torch.ops.graphpress.gqa_cached.default: _onnx_gqa_cached}


__all__ = ["translations"]
