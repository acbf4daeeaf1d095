"""Activation converters (Relu ... Softmax), emitted as ``torch.nn.functional`` calls.

Parametrized activations map to the torch function with the same parameters when the ONNX
attributes are the defaults torch hard-codes (``HardSigmoid`` with alpha=1/6 is ``hardsigmoid``),
and to the explicit formula otherwise.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from ..emitter import Emitter
from ..registry import OnnxNode, converter
from ..values import Value


@converter("Relu")
def relu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``max(x, 0)``."""
    return ctx.call(torch.relu, x)


@converter("Sigmoid")
def sigmoid(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``1 / (1 + exp(-x))``."""
    return ctx.call(torch.sigmoid, x)


@converter("Tanh")
def tanh(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Hyperbolic tangent."""
    return ctx.call(torch.tanh, x)


@converter("LeakyRelu")
def leaky_relu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x if x >= 0 else alpha * x`` (alpha defaults to 0.01 as in torch)."""
    return ctx.call(F.leaky_relu, x, node.attr("alpha", 0.01))


@converter("PRelu")
def prelu(ctx: Emitter, node: OnnxNode, x: Value, slope: Value) -> Value:
    """Leaky ReLU with a (broadcast) learned slope tensor.

    ONNX broadcasts ``slope`` numpy-style (usually shape ``[C, 1, 1]``), while ``F.prelu`` wants
    a 1-d per-channel weight; the ``where`` formulation is exact for any slope shape.
    """
    static = ctx.static(slope)
    if static is not None and static.numel() == 1:
        return ctx.call(F.leaky_relu, x, float(static.reshape(-1)[0]))
    slope = _legacy_channel_slope(ctx, node, x, slope)
    negative = ctx.call(operator.mul, x, slope)
    return ctx.call(torch.where, ctx.call(operator.ge, x, 0), x, negative)


def _legacy_channel_slope(ctx: Emitter, node: OnnxNode, x: Value, slope: Value) -> Value:
    """Before opset 7 a PRelu slope that is not a single value is per channel (dim 1 of NCHW
    input), whatever its own shape: ``[C]`` or ``[C, 1, 1]``. Reshaped to ``[C, 1, ..., 1]`` so
    numpy broadcasting (which would align ``[C]`` with the last dim) applies it to the channels."""
    if node.opset >= 7:
        return slope
    rank = ctx.rank(x)
    shape = ctx.shape(slope)
    if rank < 2 or shape is None:
        return slope
    channels = ctx.dim(x, 1)
    sizes = [d for d in shape if d != 1]
    if len(sizes) != 1 or (isinstance(channels, int) and isinstance(sizes[0], int) and sizes[0] != channels):
        return slope  # not one value per channel: numpy broadcasting is the only reading left
    return ctx.method("reshape", slope, [-1, *([1] * (rank - 2))])


@converter("Gelu", since=20)
def gelu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """GELU, exact (``approximate="none"``) or tanh approximation."""
    approximate = node.attr("approximate", "none")
    if approximate == "none":
        return ctx.call(F.gelu, x)
    return ctx.call(F.gelu, x, approximate=approximate)


@converter("Elu")
def elu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x if x > 0 else alpha * (exp(x) - 1)``."""
    return ctx.call(F.elu, x, node.attr("alpha", 1.0))


@converter("Celu", since=12)
def celu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Continuously differentiable ELU."""
    return ctx.call(F.celu, x, node.attr("alpha", 1.0))


# ONNX spells out the float32 values of SELU's constants; torch uses the same ones.
_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


@converter("Selu")
def selu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Scaled ELU; torch's ``selu`` when alpha/gamma are the standard constants."""
    alpha, gamma = node.attr("alpha", _SELU_ALPHA), node.attr("gamma", _SELU_GAMMA)
    if math.isclose(alpha, _SELU_ALPHA, rel_tol=1e-6) and math.isclose(gamma, _SELU_GAMMA, rel_tol=1e-6):
        return ctx.call(F.selu, x)
    return ctx.call(operator.mul, ctx.call(F.elu, x, alpha), gamma)


@converter("HardSigmoid")
def hard_sigmoid(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``clamp(alpha * x + beta, 0, 1)``; ONNX's default alpha is 0.2, torch's 1/6."""
    alpha, beta = node.attr("alpha", 0.2), node.attr("beta", 0.5)
    if math.isclose(alpha, 1.0 / 6.0, rel_tol=1e-6) and beta == 0.5:
        return ctx.call(F.hardsigmoid, x)
    scaled = ctx.call(operator.add, ctx.call(operator.mul, x, alpha), beta)
    return ctx.call(torch.clamp, scaled, 0.0, 1.0)


@converter("HardSwish", since=14)
def hard_swish(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x * hardsigmoid(x)`` with alpha=1/6, beta=0.5."""
    return ctx.call(F.hardswish, x)


@converter("Softplus")
def softplus(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``log(1 + exp(x))``."""
    return ctx.call(F.softplus, x)


@converter("Softsign")
def softsign(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x / (1 + |x|)``."""
    return ctx.call(F.softsign, x)


@converter("ThresholdedRelu", since=10)
def thresholded_relu(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x if x > alpha else 0``."""
    return ctx.call(F.threshold, x, node.attr("alpha", 1.0), 0.0)


@converter("Mish", since=18)
def mish(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """``x * tanh(softplus(x))``."""
    return ctx.call(F.mish, x)


_SOFTMAX = {"Softmax": F.softmax, "LogSoftmax": F.log_softmax}


@converter("Softmax", "LogSoftmax", since=1)
def softmax_v1(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Softmax before opset 13: the input is viewed as 2-D ``[prod(shape[:axis]), prod(shape[axis:])]``
    and normalized over the second dimension (default axis 1)."""
    fn = _SOFTMAX[node.op_type]
    axis = node.attr("axis", 1)
    if axis == -1:
        return ctx.call(fn, x, dim=-1)
    rank = ctx.rank(x)
    axis = ctx.axis(axis, rank)
    if axis == rank - 1:
        return ctx.call(fn, x, dim=-1)
    flat = ctx.call(torch.flatten, x, axis)  # merge dims axis.. into one
    if axis == 0:
        flat = ctx.call(torch.unsqueeze, flat, 0)
    elif axis > 1:
        flat = ctx.call(torch.flatten, flat, 0, axis - 1)
    return ctx.call(torch.reshape, ctx.call(fn, flat, dim=-1), ctx.sizes(x))


@converter("Softmax", "LogSoftmax", since=13)
def softmax_v13(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Softmax over one axis (default -1) from opset 13 on."""
    return ctx.call(_SOFTMAX[node.op_type], x, dim=node.attr("axis", -1))
