"""Neural-network layer converters: convolutions, pooling, normalization, Dropout, Resize/Upsample.

Padding is the recurring difference between ONNX and torch:

* ONNX ``pads`` are ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` and may be asymmetric;
  torch layers take one symmetric ``padding`` per dim.  Asymmetric pads become an explicit
  ``F.pad`` in front of the layer (``-inf`` for max pooling, so padding never wins).
* ``auto_pad=SAME_UPPER/SAME_LOWER`` is resolved to explicit pads at import time, from the static
  spatial input size (or, with stride 1, independent of it).
* torch pooling refuses padding larger than half the kernel; such pads also go through ``F.pad``.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F

from ..emitter import BUFFER, Emitter
from ..registry import OnnxNode, converter
from ..values import Const, Value
from .shape import torch_pad_list

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _kernel_shape(ctx: Emitter, node: OnnxNode, w: Value | None = None) -> list[int]:
    kernel = node.attr("kernel_shape")
    if kernel is None and w is not None:
        shape = ctx.shape(w)
        if shape is not None and all(isinstance(d, int) for d in shape[2:]):
            kernel = list(shape[2:])
    if not kernel:
        ctx.fail("kernel_shape is unknown (no attribute and no static weight shape)")
    if len(kernel) not in (1, 2, 3):
        ctx.fail(f"{len(kernel)}-D kernels are not supported (1-D to 3-D only)")
    return list(kernel)


def _spatial_pads(
    ctx: Emitter, node: OnnxNode, x: Value, kernel: list[int], strides: list[int], dilations: list[int]
) -> tuple[list[int], list[int]]:
    """Resolve ``pads``/``auto_pad`` into begin and end padding per spatial dim."""
    n = len(kernel)
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = node.attr("pads") or [0] * (2 * n)
        return list(pads[:n]), list(pads[n:])
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        ctx.fail(f"unknown auto_pad {auto_pad!r}")
    shape = ctx.shape(x)
    begins, ends = [], []
    for i in range(n):
        effective = (kernel[i] - 1) * dilations[i] + 1
        size = shape[2 + i] if shape is not None and len(shape) == n + 2 else None
        if isinstance(size, int):
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + effective - size, 0)
        elif strides[i] == 1:
            total = effective - 1  # output size == input size, whatever the input size
        else:
            ctx.fail(f"auto_pad={auto_pad} with stride > 1 needs a static spatial input size")
        small, big = total // 2, total - total // 2
        # SAME_UPPER puts the odd extra pixel at the end, SAME_LOWER at the beginning.
        begins.append(small if auto_pad == "SAME_UPPER" else big)
        ends.append(big if auto_pad == "SAME_UPPER" else small)
    return begins, ends


@converter("Conv")
def conv(ctx: Emitter, node: OnnxNode, x: Value, w: Value, b: Value = None) -> Value:
    """N-d convolution (1-D to 3-D) with groups, strides, dilations, pads and auto_pad."""
    kernel = _kernel_shape(ctx, node, w)
    n = len(kernel)
    strides = node.attr("strides") or [1] * n
    dilations = node.attr("dilations") or [1] * n
    begins, ends = _spatial_pads(ctx, node, x, kernel, strides, dilations)
    if begins != ends:
        x = ctx.call(F.pad, x, torch_pad_list(begins, ends))
        begins = [0] * n
    return ctx.call(
        _CONV[n], x, w, b,
        stride=tuple(strides), padding=tuple(begins), dilation=tuple(dilations), groups=node.attr("group", 1),
    )


@converter("ConvTranspose")
def conv_transpose(ctx: Emitter, node: OnnxNode, x: Value, w: Value, b: Value = None) -> Value:
    """Transposed convolution; ``output_shape``/SAME padding are resolved to explicit pads, and
    asymmetric pads crop the output (transposed-conv padding removes output pixels)."""
    kernel = _kernel_shape(ctx, node, w)
    n = len(kernel)
    strides = node.attr("strides") or [1] * n
    dilations = node.attr("dilations") or [1] * n
    output_padding = list(node.attr("output_padding") or [0] * n)
    auto_pad = node.attr("auto_pad", "NOTSET")
    output_shape = node.attr("output_shape")
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = ctx.shape(x)
        sizes = list(shape[2:]) if shape is not None else []
        if len(sizes) != n or not all(isinstance(s, int) for s in sizes):
            ctx.fail("output_shape/auto_pad=SAME need a static spatial input size")
        targets = list(output_shape[-n:]) if output_shape else [s * st for s, st in zip(sizes, strides)]
        begins, ends = [], []
        for i in range(n):
            total = strides[i] * (sizes[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1 - targets[i]
            if total < 0:  # the requested output is larger than the layer produces: grow output_padding
                output_padding[i] -= total
                total = 0
            if auto_pad == "SAME_UPPER":
                begins.append(total // 2)
                ends.append(total - total // 2)
            else:
                begins.append(total - total // 2)
                ends.append(total // 2)
    elif auto_pad == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = node.attr("pads") or [0] * (2 * n)
        begins, ends = list(pads[:n]), list(pads[n:])
    symmetric = begins == ends
    y = ctx.call(
        _CONV_T[n], x, w, b,
        stride=tuple(strides), padding=tuple(begins if symmetric else [0] * n),
        output_padding=tuple(output_padding), groups=node.attr("group", 1), dilation=tuple(dilations),
    )
    if not symmetric:
        crop = [slice(None), slice(None)] + [slice(bg or None, -e if e else None) for bg, e in zip(begins, ends)]
        y = ctx.call(operator.getitem, y, tuple(crop))
    return y


@converter("BatchNormalization")
def batch_norm(ctx: Emitter, node: OnnxNode, x: Value, scale: Value, bias: Value, mean: Value, var: Value) -> Value:
    """Inference-mode batch norm with running statistics (stored as buffers, not parameters)."""
    if node.attr("training_mode", 0) or any(node.uses_output(i, ctx.consumed) for i in (1, 2, 3, 4)):
        ctx.fail("only inference-mode BatchNormalization is supported (training outputs are used)")
    return ctx.call(
        F.batch_norm, x, ctx.lift(mean, BUFFER), ctx.lift(var, BUFFER), scale, bias,
        training=False, eps=node.attr("epsilon", 1e-5),
    )


@converter("InstanceNormalization", since=6)
def instance_norm(ctx: Emitter, node: OnnxNode, x: Value, scale: Value, bias: Value) -> Value:
    """Per-sample, per-channel normalization with affine scale/bias."""
    return ctx.call(F.instance_norm, x, weight=scale, bias=bias, eps=node.attr("epsilon", 1e-5))


@converter("LayerNormalization", since=17)
def layer_norm(ctx: Emitter, node: OnnxNode, x: Value, scale: Value, bias: Value = None) -> Value:
    """Normalization over dims ``axis..`` (default the last); ``F.layer_norm`` when the scale and
    bias have exactly the normalized shape, else normalize and apply them by broadcasting."""
    if node.uses_output(1, ctx.consumed) or node.uses_output(2, ctx.consumed):
        ctx.fail("the Mean/InvStdDev outputs of LayerNormalization are not supported")
    rank = ctx.rank(x)
    axis = ctx.axis(node.attr("axis", -1), rank)
    normalized = [ctx.dim(x, i) for i in range(axis, rank)]
    eps = node.attr("epsilon", 1e-5)

    def matches(v: Value) -> bool:
        shape = ctx.shape(v)
        return shape is not None and len(shape) == len(normalized) and all(
            isinstance(d, int) and s == d for s, d in zip(shape, normalized)
        )

    if matches(scale) and (bias is None or matches(bias)):
        return ctx.call(F.layer_norm, x, normalized, scale, bias, eps)
    y = ctx.call(F.layer_norm, x, normalized, None, None, eps)
    y = ctx.call(operator.mul, y, scale)
    return y if bias is None else ctx.call(operator.add, y, bias)


def _pool_setup(ctx: Emitter, node: OnnxNode, x: Value):
    kernel = _kernel_shape(ctx, node)
    n = len(kernel)
    strides = node.attr("strides") or [1] * n
    dilations = node.attr("dilations") or [1] * n
    begins, ends = _spatial_pads(ctx, node, x, kernel, strides, dilations)
    return kernel, strides, dilations, begins, ends


@converter("MaxPool")
def max_pool(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Max pooling (1-D to 3-D; dilations, ceil_mode, asymmetric pads)."""
    if node.uses_output(1, ctx.consumed):
        ctx.fail("the Indices output of MaxPool is not supported")
    kernel, strides, dilations, begins, ends = _pool_setup(ctx, node, x)
    n = len(kernel)
    # torch only accepts symmetric pads of at most half the effective kernel.
    fits = begins == ends and all(2 * p <= (k - 1) * d + 1 for p, k, d in zip(begins, kernel, dilations))
    if not fits:
        x = ctx.call(F.pad, x, torch_pad_list(begins, ends), value=float("-inf"))
        begins = [0] * n
    return ctx.call(
        _MAX_POOL[n], x, tuple(kernel), tuple(strides), tuple(begins), tuple(dilations),
        ceil_mode=bool(node.attr("ceil_mode", 0)),
    )


@converter("AveragePool")
def average_pool(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Average pooling; ``count_include_pad`` decides whether padded zeros count in the mean."""
    kernel, strides, dilations, begins, ends = _pool_setup(ctx, node, x)
    if any(d != 1 for d in dilations):
        ctx.fail("dilated AveragePool is not supported")
    n = len(kernel)
    ceil_mode = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))
    pool = _AVG_POOL[n]
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return ctx.call(
            pool, x, tuple(kernel), tuple(strides), tuple(begins), ceil_mode=ceil_mode, count_include_pad=include_pad
        )
    pads = torch_pad_list(begins, ends)
    padded = ctx.call(pool, ctx.call(F.pad, x, pads), tuple(kernel), tuple(strides), 0, ceil_mode=ceil_mode)
    if include_pad:
        return padded
    # Mean over real pixels only: (window sum of x) / (window count of real pixels).
    weight = ctx.call(F.pad, ctx.call(torch.ones_like, x), pads)
    count = ctx.call(pool, weight, tuple(kernel), tuple(strides), 0, ceil_mode=ceil_mode)
    return ctx.call(operator.truediv, padded, count)


@converter("GlobalAveragePool")
def global_average_pool(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Mean over all spatial dims, kept as size-1 dims."""
    return ctx.call(torch.mean, x, dim=tuple(range(2, ctx.rank(x))), keepdim=True)


@converter("GlobalMaxPool")
def global_max_pool(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Max over all spatial dims, kept as size-1 dims."""
    return ctx.call(torch.amax, x, dim=tuple(range(2, ctx.rank(x))), keepdim=True)


@converter("LRN")
def lrn(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Local response normalization across channels (AlexNet, GoogLeNet).

    ``y = x / (bias + alpha / size * sum(x^2 over the channel window)) ** beta``, the window
    running from ``c - floor((size-1)/2)`` to ``c + ceil((size-1)/2)``. Written out rather than
    as ``F.local_response_norm``, which centres an even-sized window the other way.
    """
    size = node.attr("size")
    if not isinstance(size, int) or size < 1:
        ctx.fail("attribute 'size' (a positive int) is required")
    alpha, beta, bias = float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75)), float(node.attr("bias", 1.0))
    rank = ctx.rank(x)
    if rank < 2:
        ctx.fail(f"expected an input of rank >= 2 (N x C x ...), got rank {rank}")
    before = (size - 1) // 2
    after = size - 1 - before
    square = ctx.call(operator.mul, x, x)
    # (N, 1, C, L): the channel window becomes a (size x 1) average pool with zero padding,
    # i.e. the window sum / size, whatever the spatial rank.
    flat = ctx.method("unsqueeze", ctx.method("reshape", square, [ctx.dim(x, 0), ctx.dim(x, 1), -1]), 1)
    padded = ctx.call(F.pad, flat, [0, 0, before, after])
    mean = ctx.call(F.avg_pool2d, padded, (size, 1), (1, 1))
    mean = ctx.method("view_as", ctx.method("squeeze", mean, 1), x)
    scale = ctx.call(operator.add, ctx.call(operator.mul, mean, alpha), bias)
    return ctx.call(operator.truediv, x, ctx.call(torch.pow, scale, beta))


@converter("Dropout")
def dropout(ctx: Emitter, node: OnnxNode, x: Value, ratio: Value = None, training_mode: Value = None):
    """Inference: identity.  The optional mask output is all ``True``."""
    if node.uses_output(1, ctx.consumed):
        return x, ctx.call(torch.ones_like, x, dtype=torch.bool)
    return x


# ---------------------------------------------------------------------- Resize / Upsample


def _interpolate(
    ctx: Emitter,
    node: OnnxNode,
    x: Value,
    scales: list[float] | None,
    sizes: list | None,
    mode: str,
    transform: str,
    nearest_mode: str,
) -> Value:
    """Map ONNX resize semantics onto ``F.interpolate`` (only exact equivalences are accepted)."""
    rank = ctx.rank(x)
    n = rank - 2
    if n not in (1, 2, 3):
        ctx.fail(f"resizing a rank-{rank} tensor is not supported (N, C plus 1-3 spatial dims only)")
    axes = node.attr("axes")
    if axes is not None:  # opset 18: scales/sizes only for the listed axes
        axes = [ctx.axis(a, rank) for a in axes]
        full_scales = [1.0] * rank if scales is not None else None
        full_sizes = [ctx.dim(x, i) for i in range(rank)] if sizes is not None else None
        for j, a in enumerate(axes):
            if full_scales is not None:
                full_scales[a] = scales[j]
            if full_sizes is not None:
                full_sizes[a] = sizes[j]
        scales, sizes = full_scales, full_sizes
    kwargs: dict = {}
    if sizes is not None:
        if len(sizes) != rank:
            ctx.fail(f"sizes has {len(sizes)} entries for a rank-{rank} input")
        if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
            ctx.fail("keep_aspect_ratio_policy other than 'stretch' is not supported")
        kwargs["size"] = list(sizes[2:])
    elif scales is not None:
        if len(scales) != rank or scales[0] != 1.0 or scales[1] != 1.0:
            ctx.fail("only spatial dims (after N and C) can be resized")
        kwargs["scale_factor"] = [float(s) for s in scales[2:]]
    else:
        ctx.fail("neither scales nor sizes is given")

    if node.attr("antialias", 0):
        ctx.fail("antialiased resize is not supported (its filter differs from torch's)")
    if mode == "nearest":
        if transform == "asymmetric" and nearest_mode == "floor":
            kwargs["mode"] = "nearest"  # torch's legacy nearest: src = floor(dst / scale)
        elif transform == "half_pixel" and nearest_mode == "round_prefer_ceil":
            # src = round_half_up((dst + 0.5) / scale - 0.5) = floor((dst + 0.5) / scale)
            kwargs["mode"] = "nearest-exact"
        else:
            return _nearest_by_index(ctx, x, scales, sizes, transform, nearest_mode)
    elif mode in ("linear", "cubic"):
        if mode == "cubic":
            if n != 2 or node.attr("cubic_coeff_a", -0.75) != -0.75 or node.attr("exclude_outside", 0):
                ctx.fail("only 2-D cubic resize with cubic_coeff_a=-0.75 (torch's bicubic) is supported")
            kwargs["mode"] = "bicubic"
        else:
            kwargs["mode"] = {1: "linear", 2: "bilinear", 3: "trilinear"}[n]
        if transform in ("half_pixel", "pytorch_half_pixel"):
            kwargs["align_corners"] = False
        elif transform == "align_corners":
            kwargs["align_corners"] = True
        else:
            ctx.fail(f"{mode} resize with coordinate_transformation_mode={transform!r} is not supported")
    else:
        ctx.fail(f"resize mode {mode!r} is not supported")
    return ctx.call(F.interpolate, x, **kwargs)


def _source_index(out_pos: int, in_len: int, out_len: int, scale: float, transform: str, nearest_mode: str) -> int:
    """ONNX nearest-neighbour source index for output position ``out_pos`` of one axis.

    Computed in float32 like onnxruntime, so rounding ties fall the same way.
    """
    f = np.float32
    x, s = f(out_pos), f(scale)
    if transform == "half_pixel":
        orig = (x + f(0.5)) / s - f(0.5)
    elif transform == "pytorch_half_pixel":
        orig = (x + f(0.5)) / s - f(0.5) if out_len > 1 else f(0.0)
    elif transform == "align_corners":
        orig = x * f(in_len - 1) / f(out_len - 1) if out_len > 1 else f(0.0)
    elif transform == "asymmetric":
        orig = x / s
    elif transform == "tf_half_pixel_for_nn":
        orig = (x + f(0.5)) / s
    else:
        raise ValueError(f"coordinate_transformation_mode={transform!r} is not supported for nearest resize")
    orig = float(orig)
    if nearest_mode == "floor":
        index = math.floor(orig)
    elif nearest_mode == "ceil":
        index = math.ceil(orig)
    elif nearest_mode in ("round_prefer_floor", "round_prefer_ceil"):
        tie = orig - math.floor(orig) == 0.5
        index = (math.floor(orig) if nearest_mode == "round_prefer_floor" else math.ceil(orig)) if tie else round(orig)
    else:
        raise ValueError(f"nearest_mode={nearest_mode!r} is not supported")
    return min(max(index, 0), in_len - 1)


def _nearest_by_index(ctx: Emitter, x: Value, scales, sizes, transform: str, nearest_mode: str) -> Value:
    """Nearest resize as one ``index_select`` per resized axis, with source indices computed at
    import time -- exact for every ONNX coordinate/rounding mode, but needs static spatial sizes."""
    shape = ctx.shape(x)
    for axis in range(2, len(shape)):
        in_len = shape[axis]
        if sizes is not None:
            out_len = sizes[axis]
            if not (isinstance(in_len, int) and isinstance(out_len, int)):
                ctx.fail("nearest resize in this mode needs static spatial sizes")
            scale = out_len / in_len
        else:
            scale = scales[axis]
            if not isinstance(in_len, int):
                ctx.fail("nearest resize in this mode needs static spatial sizes")
            out_len = int(math.floor(in_len * scale))
        if out_len == in_len and scale == 1.0:
            continue
        try:
            index = [_source_index(i, in_len, out_len, scale, transform, nearest_mode) for i in range(out_len)]
        except ValueError as err:
            ctx.fail(str(err))
        x = ctx.call(torch.index_select, x, axis, Const(torch.tensor(index, dtype=torch.int64)))
    return x


def _float_list(ctx: Emitter, value: Value, what: str) -> list[float] | None:
    if value is None:
        return None
    static = ctx.static(value)
    if static is None:
        ctx.fail(f"{what} must be a constant")
    return [float(v) for v in static.reshape(-1).tolist()] or None


@converter("Upsample", since=7)
def upsample_v7(ctx: Emitter, node: OnnxNode, x: Value) -> Value:
    """Upsample with a ``scales`` attribute (opset 7/8)."""
    return _interpolate(ctx, node, x, node.attr("scales"), None, node.attr("mode", "nearest"), "asymmetric", "floor")


@converter("Upsample", since=9)
def upsample_v9(ctx: Emitter, node: OnnxNode, x: Value, scales: Value) -> Value:
    """Upsample with a ``scales`` input (opset 9); asymmetric coordinates, floor rounding."""
    return _interpolate(ctx, node, x, _float_list(ctx, scales, "scales"), None, node.attr("mode", "nearest"), "asymmetric", "floor")


@converter("Resize", since=10)
def resize_v10(ctx: Emitter, node: OnnxNode, x: Value, scales: Value) -> Value:
    """Resize-10: scales only, Upsample semantics."""
    return _interpolate(ctx, node, x, _float_list(ctx, scales, "scales"), None, node.attr("mode", "nearest"), "asymmetric", "floor")


@converter("Resize", since=11)
def resize_v11(ctx: Emitter, node: OnnxNode, x: Value, roi: Value = None, scales: Value = None, sizes: Value = None) -> Value:
    """Resize-11+: scales or sizes, coordinate transformation and nearest rounding modes."""
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    scale_list = _float_list(ctx, scales, "scales")
    size_list = None
    if sizes is not None and not (ctx.static(sizes) is not None and ctx.static(sizes).numel() == 0):
        size_list = ctx.ints(sizes, "sizes")
    return _interpolate(
        ctx, node, x, scale_list, size_list, node.attr("mode", "nearest"), transform,
        node.attr("nearest_mode", "round_prefer_floor"),
    )
