"""Quantized custom ops holding real low-bit weights, which ONNX Runtime runs as integers.

Eager execution is the exact simulation (dequantize, then compute in float32) that accuracy
checks run; the ONNX translations (:mod:`graphpress.lowering.onnx.quant`) store the same integer
weights and let ONNX Runtime run its integer kernels. Quantizer math: :mod:`graphpress.ir.quant`.

Ops
---
``graphpress::qlinear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, float in_scale, int in_zero_point, float out_scale, int out_zero_point, bool relu) -> Tensor``
    ``w_q`` int8 ``(out, in)`` with symmetric per-output-channel scales ``w_scale (out,)``.

    * ``in_scale > 0`` (*static*): ``x`` is fake-quantized to uint8 with the calibrated
      ``(in_scale, in_zero_point)``; ``bias`` is **int32** in units of ``in_scale * w_scale``
      (as the integer kernels add it to the int32 accumulator). ONNX: ``QuantizeLinear`` ->
      ``DequantizeLinear`` on ``x``, ``DequantizeLinear`` (axis 0) on ``w_q`` and on the int32
      bias, ``Gemm(transB=1)`` (inputs of rank != 2 are flattened to 2-D around it), ``Relu``,
      and the output ``QuantizeLinear -> DequantizeLinear`` when ``out_scale > 0``. ONNX
      Runtime fuses the unit into ``QGemm`` (U8S8, int32 accumulation).
    * ``in_scale == 0`` (*dynamic*): ``x`` is quantized per tensor at run time with its own
      range (ONNX ``DynamicQuantizeLinear``'s formula); ``bias`` is float. ONNX:
      ``com.microsoft.DynamicQuantizeMatMul`` (+ ``Relu``), the kernel ORT's own dynamic
      quantization ends in. ``out_scale`` must be 0.

    ``relu`` applies ``max(y, 0)`` before the output quantization (a fused ``linear -> relu``;
    the calibrated output range then starts at 0, zero point 0, which lets ORT drop the Relu).
``graphpress::qconv2d(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, float in_scale, int in_zero_point, float out_scale, int out_zero_point, bool relu) -> Tensor``
    Static only (``in_scale > 0``; ONNX Runtime's dynamic conv, ``ConvInteger``, is several
    times slower than fp32 here). ``w_q`` int8 ``(C_out, C_in / groups, kh, kw)``, int32 bias as
    above. ONNX: the QDQ unit around ``Conv`` (+ ``Relu``) with the output ``Q -> DQ``
    (``out_scale > 0`` is required: ``QLinearConv`` always produces a quantized output).
``graphpress::wlinear_nbits(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int in_features, int bits, int group_size, int act_bits) -> Tensor``
    Group-wise k-bit weights in ``MatMulNBits`` layout (:class:`graphpress.ir.quant.NBitsWeight`:
    ``packed (out, blocks, group * bits / 8)`` uint8, ``scales (out * blocks,)``, packed uint8
    zero points or None for symmetric), ``bits`` the container width 2, 4 or 8. ``act_bits=0``:
    weight-only (float activations; ORT ``accuracy_level=0``, fp32 compute on dequantized
    blocks). ``act_bits=8``: the activations are quantized symmetrically to int8 per
    ``(row, group)`` first, which is exactly what ``accuracy_level=4`` (int8 compute) does.
    ONNX: ``com.microsoft.MatMulNBits`` with the bias as its last input.
``graphpress::quantize_act(Tensor x, float scale, int zero_point) -> Tensor``
    A standalone static uint8 fake-quantization ``DQ(Q(x))`` of an activation. Passes insert it
    where one value feeds both a quantized layer and a float op (a residual shortcut), so that
    both read the *same* quantized value: ONNX Runtime then fuses the sum into ``QLinearAdd``
    and the relu before it into the next ``QuantizeLinear``. A quantized op reading its output on
    the same grid requantizes it exactly (``Q(DQ(q)) = q``). ONNX: ``QuantizeLinear ->
    DequantizeLinear``.

The eager implementations cache the dequantized float weight per weight tensor (keyed on the
tensor's identity and version, like :mod:`graphpress.ir.ops_circulant`). All ops have
``register_fake`` shape functions (``torch.export``) and no autograd (the weights are integers).

Equality with ONNX Runtime: the grids are the same (float32 scales, true division,
round-half-to-even), so one op in ORT and in eager agrees to float rounding (measured: 136 dB
SQNR). Weight-only ops stay that close in whole models. Ops that round their *activations* do
not: a float difference of one ulp upstream (ORT and torch sum in different orders) moves a value
on a rounding tie by a whole grid step, and per-tensor dynamic scales spread that to every value;
over the 36 int8-dynamic linears of stories260K at 64 tokens the two runs part to 26 dB SQNR
(136 dB at 32 tokens) although every single layer agrees to 136 dB. :func:`quantizes_activations`
tells a backend that a graph contains such ops, so that its check uses an SQNR floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from graphpress.ir.fakes import shape_function
from graphpress.ir.ops_circulant import _WeightCache
from graphpress.ir.quant import (
    dequantize_nbits,
    dequantize_per_channel,
    fake_quant_act,
    fake_quant_act_blockwise,
    fake_quant_act_dynamic,
)

#: ``MatMulNBits`` ``accuracy_level`` per ``act_bits``: 0 = fp32 compute (weight-only), 4 = int8 compute.
ACCURACY_LEVEL = {0: 0, 8: 4}

_CACHE = _WeightCache()


def clear_cache() -> None:
    """Forget the cached dequantized weights."""
    _CACHE.clear()


def _dequant_cached(w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    # the cache keys on w_q; its scale is constant alongside it (both written together by a pass)
    return _CACHE.get(w_q, f"dequant:{id(w_scale)}:{w_scale._version}", lambda: dequantize_per_channel(w_q, w_scale, 0).contiguous())


def _bias_float(bias: torch.Tensor | None, in_scale: float, w_scale: torch.Tensor) -> torch.Tensor | None:
    """Static mode: int32 bias times ``in_scale * w_scale`` (float32, as ``DequantizeLinear`` computes it)."""
    if bias is None:
        return None
    return bias.float() * (torch.tensor(in_scale, dtype=torch.float32) * w_scale.float())


def _check_static(op: str, in_scale: float, in_zero_point: int, out_scale: float, out_zero_point: int) -> None:
    if in_scale < 0 or out_scale < 0:
        raise RuntimeError(f"graphpress::{op}: scales must be >= 0, got in_scale={in_scale}, out_scale={out_scale}")
    for name, zp in (("in_zero_point", in_zero_point), ("out_zero_point", out_zero_point)):
        if not 0 <= zp <= 255:
            raise RuntimeError(f"graphpress::{op}: {name} must be a uint8 value, got {zp}")


def static_accumulator(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, in_scale: float, in_zero_point: int,
    conv: tuple[Sequence[int], Sequence[int], Sequence[int], int] | None = None,
) -> torch.Tensor:
    """What a static ``qlinear`` / ``qconv2d`` computes before its relu and output quantization:
    ``Q(x) * w_hat + b`` in float32 (``Q`` the uint8 input grid, ``b`` the int32 bias dequantized);
    ``conv`` = ``(stride, padding, dilation, groups)`` for ``qconv2d``, None for ``qlinear``."""
    w = _dequant_cached(w_q, w_scale)
    xh = fake_quant_act(x, in_scale, in_zero_point).float()
    b = _bias_float(bias, in_scale, w_scale)
    if conv is None:
        return F.linear(xh, w, b)
    stride, padding, dilation, groups = conv
    return F.conv2d(xh, w, b, list(stride), list(padding), list(dilation), groups)


# ---------------------------------------------------------------------------- qlinear
def _check_qlinear(x, w_q, w_scale, bias, in_scale, in_zero_point, out_scale, out_zero_point) -> None:
    _check_static("qlinear", in_scale, in_zero_point, out_scale, out_zero_point)
    if w_q.dim() != 2 or w_q.dtype != torch.int8:
        raise RuntimeError(f"graphpress::qlinear: w_q must be an int8 (out, in) matrix, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.shape[-1] != w_q.shape[1]:
        raise RuntimeError(f"graphpress::qlinear: input {tuple(x.shape)} does not match w_q {tuple(w_q.shape)}")
    if tuple(w_scale.shape) != (w_q.shape[0],):
        raise RuntimeError(f"graphpress::qlinear: w_scale {tuple(w_scale.shape)} is not ({w_q.shape[0]},)")
    if bias is not None:
        want = torch.int32 if in_scale > 0 else x.dtype
        if bias.dtype != want or tuple(bias.shape) != (w_q.shape[0],):
            raise RuntimeError(f"graphpress::qlinear: bias must be {want} ({w_q.shape[0]},), got {bias.dtype} {tuple(bias.shape)}")
    if in_scale == 0 and out_scale != 0:
        raise RuntimeError("graphpress::qlinear: dynamic input quantization (in_scale=0) needs out_scale=0")


@torch.library.custom_op(
    "graphpress::qlinear",
    mutates_args=(),
    schema="(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, float in_scale, int in_zero_point, float out_scale, int out_zero_point, bool relu) -> Tensor",
)
def qlinear(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    in_scale: float, in_zero_point: int, out_scale: float, out_zero_point: int, relu: bool,
) -> torch.Tensor:
    """int8-weight linear with uint8 (static or dynamic) input quantization (see module docstring)."""
    _check_qlinear(x, w_q, w_scale, bias, in_scale, in_zero_point, out_scale, out_zero_point)
    if in_scale > 0:
        y = static_accumulator(x, w_q, w_scale, bias, in_scale, in_zero_point)
    else:
        y = F.linear(fake_quant_act_dynamic(x).float(), _dequant_cached(w_q, w_scale), None if bias is None else bias.float())
    if relu:
        y = y.relu_()
    if out_scale > 0:
        y = fake_quant_act(y, out_scale, out_zero_point)
    return y.to(x.dtype)


@shape_function(qlinear)
def _qlinear_fake(x, w_q, w_scale, bias, in_scale, in_zero_point, out_scale, out_zero_point, relu):
    _check_qlinear(x, w_q, w_scale, bias, in_scale, in_zero_point, out_scale, out_zero_point)
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


# ---------------------------------------------------------------------------- qconv2d
def _conv_out(size, k: int, s: int, pad: int, d: int):
    return (size + 2 * pad - d * (k - 1) - 1) // s + 1


def _check_qconv(x, w_q, w_scale, bias, stride, padding, dilation, groups, in_scale, in_zero_point, out_scale, out_zero_point) -> None:
    _check_static("qconv2d", in_scale, in_zero_point, out_scale, out_zero_point)
    if in_scale <= 0 or out_scale <= 0:
        raise RuntimeError(f"graphpress::qconv2d: needs static input and output quantization (in_scale, out_scale > 0), got {in_scale}, {out_scale}")
    if w_q.dim() != 4 or w_q.dtype != torch.int8:
        raise RuntimeError(f"graphpress::qconv2d: w_q must be an int8 (C_out, C_in/groups, kh, kw) tensor, got {w_q.dtype} {tuple(w_q.shape)}")
    if x.dim() != 4 or x.shape[1] != w_q.shape[1] * groups:
        raise RuntimeError(f"graphpress::qconv2d: input {tuple(x.shape)} does not match w_q {tuple(w_q.shape)} with groups={groups}")
    if tuple(w_scale.shape) != (w_q.shape[0],):
        raise RuntimeError(f"graphpress::qconv2d: w_scale {tuple(w_scale.shape)} is not ({w_q.shape[0]},)")
    if bias is not None and (bias.dtype != torch.int32 or tuple(bias.shape) != (w_q.shape[0],)):
        raise RuntimeError(f"graphpress::qconv2d: bias must be int32 ({w_q.shape[0]},), got {bias.dtype} {tuple(bias.shape)}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            raise RuntimeError(f"graphpress::qconv2d: {name} must have 2 values, got {list(v)}")


@torch.library.custom_op(
    "graphpress::qconv2d",
    mutates_args=(),
    schema=(
        "(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
        "float in_scale, int in_zero_point, float out_scale, int out_zero_point, bool relu) -> Tensor"
    ),
)
def qconv2d(
    x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    in_scale: float, in_zero_point: int, out_scale: float, out_zero_point: int, relu: bool,
) -> torch.Tensor:
    """Static uint8 x int8 conv2d with quantized output (see module docstring)."""
    _check_qconv(x, w_q, w_scale, bias, stride, padding, dilation, groups, in_scale, in_zero_point, out_scale, out_zero_point)
    y = static_accumulator(x, w_q, w_scale, bias, in_scale, in_zero_point, (stride, padding, dilation, groups))
    if relu:
        y = y.relu_()
    return fake_quant_act(y, out_scale, out_zero_point).to(x.dtype)


@shape_function(qconv2d)
def _qconv2d_fake(x, w_q, w_scale, bias, stride, padding, dilation, groups, in_scale, in_zero_point, out_scale, out_zero_point, relu):
    _check_qconv(x, w_q, w_scale, bias, stride, padding, dilation, groups, in_scale, in_zero_point, out_scale, out_zero_point)
    kh, kw = w_q.shape[2], w_q.shape[3]
    h = _conv_out(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[3], kw, stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], w_q.shape[0], h, w))


# ---------------------------------------------------------------------------- wlinear_nbits
def _check_nbits(x, packed, scales, zeros, bias, in_features, bits, group_size, act_bits) -> None:
    if bits not in (2, 4, 8):
        raise RuntimeError(f"graphpress::wlinear_nbits: bits (container width) must be 2, 4 or 8, got {bits}")
    if act_bits not in ACCURACY_LEVEL:
        raise RuntimeError(f"graphpress::wlinear_nbits: act_bits must be one of {sorted(ACCURACY_LEVEL)}, got {act_bits}")
    if packed.dim() != 3 or packed.dtype != torch.uint8:
        raise RuntimeError(f"graphpress::wlinear_nbits: packed must be uint8 (out, blocks, bytes), got {packed.dtype} {tuple(packed.shape)}")
    out_f, nb, nbytes = packed.shape
    if nb * group_size < in_features or (nb - 1) * group_size >= in_features or nbytes * 8 != group_size * bits:
        raise RuntimeError(
            f"graphpress::wlinear_nbits: packed {tuple(packed.shape)} does not hold {in_features} inputs in groups of {group_size} at {bits} bits"
        )
    if x.shape[-1] != in_features:
        raise RuntimeError(f"graphpress::wlinear_nbits: input {tuple(x.shape)} does not have {in_features} features")
    if tuple(scales.shape) != (out_f * nb,):
        raise RuntimeError(f"graphpress::wlinear_nbits: scales {tuple(scales.shape)} is not ({out_f * nb},)")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (out_f * -(-nb * bits // 8),)):
        raise RuntimeError(f"graphpress::wlinear_nbits: zeros must be uint8 ({out_f * -(-nb * bits // 8)},), got {zeros.dtype} {tuple(zeros.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise RuntimeError(f"graphpress::wlinear_nbits: bias {tuple(bias.shape)} is not ({out_f},)")


#: Largest float32 weight :func:`wlinear_nbits` dequantizes in one piece (and may cache); a
#: bigger one runs a chunk of output rows at a time.
DEQUANT_CHUNK_BYTES = 16 * 2**20


@torch.library.custom_op(
    "graphpress::wlinear_nbits",
    mutates_args=(),
    schema="(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, Tensor? bias, int in_features, int bits, int group_size, int act_bits) -> Tensor",
)
def wlinear_nbits(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bias: torch.Tensor | None,
    in_features: int, bits: int, group_size: int, act_bits: int,
) -> torch.Tensor:
    """Group-wise k-bit weight linear (``MatMulNBits`` layout; see module docstring)."""
    _check_nbits(x, packed, scales, zeros, bias, in_features, bits, group_size, act_bits)
    xh = (fake_quant_act_blockwise(x, group_size, act_bits) if act_bits else x).float()
    b = None if bias is None else bias.float()
    out_f = packed.shape[0]
    rows = max(1, DEQUANT_CHUNK_BYTES // (4 * in_features))
    if out_f > rows:
        # a float32 copy of a large weight (an LM head: 100 MB at 32000 x 768, several
        # temporaries while it is built) is never made whole: output rows a chunk at a time
        nb = packed.shape[1]
        sc = scales.reshape(out_f, nb)
        zs = None if zeros is None else zeros.reshape(out_f, -1)
        # written into one output as they come: the chunks and their concatenation would be two
        # copies of the logits at once
        y = xh.new_empty((*xh.shape[:-1], out_f))
        for i in range(0, out_f, rows):
            j = min(out_f, i + rows)
            w = dequantize_nbits(packed[i:j], sc[i:j].reshape(-1), None if zs is None else zs[i:j].reshape(-1), bits, group_size, in_features)
            y[..., i:j] = F.linear(xh, w, None if b is None else b[i:j])
            del w
        return y.to(x.dtype)
    w = _CACHE.get(
        packed,
        f"nbits:{id(scales)}:{scales._version}:{id(zeros)}",
        lambda: dequantize_nbits(packed, scales, zeros, bits, group_size, in_features).contiguous(),
    )
    return F.linear(xh, w, b).to(x.dtype)


@shape_function(wlinear_nbits)
def _wlinear_nbits_fake(x, packed, scales, zeros, bias, in_features, bits, group_size, act_bits):
    _check_nbits(x, packed, scales, zeros, bias, in_features, bits, group_size, act_bits)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ---------------------------------------------------------------------------- helpers for backends

# ---------------------------------------------------------------------------- quantize_act
@torch.library.custom_op("graphpress::quantize_act", mutates_args=(), schema="(Tensor x, float scale, int zero_point) -> Tensor")
def quantize_act(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Static uint8 fake-quantization of an activation (see module docstring)."""
    _check_static("quantize_act", scale, zero_point, 0.0, 0)
    if scale <= 0:
        raise RuntimeError(f"graphpress::quantize_act: scale must be > 0, got {scale}")
    return fake_quant_act(x, scale, zero_point)


@shape_function(quantize_act)
def _quantize_act_fake(x, scale, zero_point):
    return torch.empty_like(x)


QUANT_OPS = ("qlinear", "qconv2d", "wlinear_nbits", "quantize_act")


def quantizes_activations(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` calls an op that rounds its *activations* (``qlinear``, ``qconv2d``,
    ``quantize_act``, ``wlinear_nbits`` with ``act_bits > 0``, ``kv_quant_write``): a discontinuous function of its input, on which
    ONNX Runtime and the eager simulation can part by whole grid steps (see module docstring)."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.graphpress.qlinear.default, torch.ops.graphpress.qconv2d.default,
                           torch.ops.graphpress.quantize_act.default, torch.ops.graphpress.kv_quant_write.default):
            return True
        if node.target is torch.ops.graphpress.wlinear_nbits.default:
            act_bits = node.args[8] if len(node.args) > 8 else node.kwargs.get("act_bits", 0)
            if act_bits:
                return True
    return False


__all__ = [
    "ACCURACY_LEVEL",
    "QUANT_OPS",
    "clear_cache",
    "qconv2d",
    "qlinear",
    "quantize_act",
    "quantizes_activations",
    "static_accumulator",
    "wlinear_nbits",
]
