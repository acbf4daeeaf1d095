"""Op families: the one vocabulary of ATen ops that passes and backends share.

Every pass or backend that asks "is this node a conv / a batch norm / a reshape ...?" imports the
family from here instead of spelling its own set, so two passes can no longer disagree about what
counts as, say, a batch norm (``tests/ir/test_opsets.py`` fails on a module-level literal holding
two or more ``torch.ops.aten`` ops anywhere under ``graphpress/passes`` or ``graphpress/backends``).

Members are ``OpOverloadPacket`` objects (``aten.conv2d``), matched against a node with
``graphpress.ir.rewrite.packet(node) in FAMILY`` or ``is_op(node, *FAMILY)``; the few families whose
name ends in ``_OVERLOADS`` hold ``OpOverload`` objects (``aten.view.default``) and are matched on
``node.target`` because the pass that uses them accepts those overloads only.

Families are ``frozenset`` objects so that no importer can widen one for everybody by accident.
A pass that deliberately needs a narrower set gets a named family below (documented with its
user), never a private copy.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten

__all__ = [
    "ACTIVATION", "ACTIVATION_PRODUCTS", "ADD", "ADDITIVE_JOIN", "AFFINE_IN_FIRST_ARG", "ALIAS", "ATTENTION",
    "BATCH_NORM", "BATCHED_MATMUL", "CHANNEL_PRESERVING", "CONV", "CONV_ANY", "CONV_TRANSPOSED", "COPY", "JOIN",
    "LAST_DIM_NORM", "LINEAR", "LINEAR_LIKE", "MATMUL_LIKE", "MAX_POOL_2D", "MOVEMENT", "NON_KERNEL", "NON_POLYNOMIAL",
    "NONZERO_UNARY", "POOLING", "POOLING_TUPLE", "QUANT_PASSTHROUGH", "QUANT_SHORTCUT_OVERLOADS", "REDUCTION",
    "RELU", "RESHAPE", "RESHAPE_OR_COPY", "ROLE_BOUNDARY", "SHAPE_QUERY", "SHORTCUT_SLICE", "SIZED_RESHAPE",
    "SOFTMAX", "SPLIT", "TRAINING_STAT_NORM", "ZERO_SAFE_UNARY",
]

# ---------------------------------------------------------------------------- convolutions
#: Dimension-specific convolutions, as ``torch.export`` emits them from ``nn.Conv{1,2,3}d``.
CONV = frozenset({aten.conv1d, aten.conv2d, aten.conv3d})
#: ``CONV`` plus the generic ``aten.convolution`` (weight at arg 1, ``groups`` at arg 8), which
#: decompositions and some exporters produce; passes that read only weight/bias accept both.
CONV_ANY = CONV | frozenset({aten.convolution})
#: Transposed convolutions: the weight's output channels are dim 1, not dim 0.
CONV_TRANSPOSED = frozenset({aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d})

# ---------------------------------------------------------------------------- linear / matmul
#: ``aten.linear`` alone: weight ``[out, in]`` at arg 1.
LINEAR = frozenset({aten.linear})
#: Linear layers in any of their exported spellings: ``linear``, ``addmm`` (GPT-2's Conv1D,
#: weight ``[in, out]`` at arg 2) and ``mm``.
LINEAR_LIKE = LINEAR | frozenset({aten.addmm, aten.mm})
#: Batched products of two tensors (either may be an activation).
BATCHED_MATMUL = frozenset({aten.matmul, aten.bmm, aten.baddbmm})
#: Everything that costs a matrix product (FLOP counting).
MATMUL_LIKE = LINEAR_LIKE | BATCHED_MATMUL

# ---------------------------------------------------------------------------- attention
#: Fused attention kernels as exported on CPU.
ATTENTION = frozenset({aten.scaled_dot_product_attention, aten._scaled_dot_product_flash_attention_for_cpu})
#: Products of two activations: where a value stops being "the input of one weight layer"
#: (sparsify-activations role detection walks back to these).
ACTIVATION_PRODUCTS = BATCHED_MATMUL | ATTENTION | frozenset({aten.einsum})
#: Layers that end sparsify-activations' role walk: a weight layer or an embedding lookup.
ROLE_BOUNDARY = frozenset({aten.linear, aten.conv2d, aten.embedding})

# ---------------------------------------------------------------------------- normalization
#: Batch norm in every exported form. ``_native_batch_norm_legit`` (training-mode export) has the
#: same argument layout as ``native_batch_norm``; the pruning dependency graph used to omit it,
#: which pinned channels of training-mode exports for no reason.
BATCH_NORM = frozenset({
    aten.batch_norm, aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.native_batch_norm,
})
#: Norms that update running statistics in training mode without a ``Tensor(a!)`` in their schema
#: (so purity analysis must be told); ``_native_batch_norm_legit_no_training`` never does.
TRAINING_STAT_NORM = frozenset({
    aten.batch_norm, aten.native_batch_norm, aten._native_batch_norm_legit, aten.instance_norm,
})
#: Norms over the trailing ``normalized_shape`` (layer norm, RMS norm): arg 1 is that shape.
LAST_DIM_NORM = frozenset({aten.layer_norm, aten.rms_norm})

# ---------------------------------------------------------------------------- element-wise activations
#: ReLU, out-of-place and in-place: positively homogeneous (``relu(s*x) = s*relu(x)`` for ``s > 0``).
RELU = frozenset({aten.relu, aten.relu_})
#: Element-wise activations that end a conv / linear block (fuse-blocks).
ACTIVATION = RELU | frozenset({
    aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_,
    aten.hardtanh, aten.hardtanh_,
})
#: Element-wise ops with ``f(0) == 0`` (plus value copies): a zero channel stays zero through them.
ZERO_SAFE_UNARY = frozenset({
    aten.relu, aten.relu_, aten.gelu, aten.silu, aten.tanh, aten.hardtanh, aten.leaky_relu, aten.hardswish,
    aten.elu, aten.mish, aten.dropout, aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy,
    aten.to, aten.neg, aten.abs, aten.lift_fresh_copy,
})
#: Element-wise ops that map zero to a non-zero value (a pruned channel becomes a constant).
NONZERO_UNARY = frozenset({
    aten.sigmoid, aten.hardsigmoid, aten.exp, aten.rsqrt, aten.reciprocal, aten.softplus, aten.log, aten.cos,
    aten.clamp, aten.clamp_min, aten.clamp_max, aten.sqrt, aten.erf, aten.sin,
})
#: Softmax and log-softmax, public and internal spellings.
SOFTMAX = frozenset({aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax})
#: Ops no polynomial computes exactly: homomorphic evaluation rejects them and the
#: polynomial-activations pass must replace them first. The HE backend's copy (by name) and the
#: pass's copy differed only in which in-place spellings and pooling ranks they listed; the union is
#: right for both, since an in-place or 3-d variant is no more polynomial than the out-of-place one.
NON_POLYNOMIAL = frozenset({
    aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_, aten.tanh,
    aten.tanh_, aten.hardtanh, aten.hardtanh_, aten.leaky_relu, aten.elu, aten.softmax, aten._softmax,
    aten.log_softmax, aten.max_pool1d, aten.max_pool2d, aten.max_pool2d_with_indices, aten.max_pool3d,
    aten.adaptive_max_pool2d,
})

# ---------------------------------------------------------------------------- joins
#: Element-wise binary ops whose tensor operands must agree channel for channel.
JOIN = frozenset({aten.add, aten.sub, aten.mul, aten.div, aten.maximum, aten.minimum})
#: Joins that are linear in each operand, so channel maps can be pushed through them.
ADDITIVE_JOIN = frozenset({aten.add, aten.sub})
#: Residual additions, out-of-place and in-place.
ADD = frozenset({aten.add, aten.add_})

# ---------------------------------------------------------------------------- pooling / reductions
#: Pooling and resampling ops that act per channel and return one tensor.
POOLING = frozenset({
    aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d,
    aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten.upsample_nearest2d,
    aten.upsample_bilinear2d,
})
#: 2-d max pooling, plain and with indices (polynomial-activations turns these into average pooling).
MAX_POOL_2D = frozenset({aten.max_pool2d, aten.max_pool2d_with_indices})
#: Per-channel pooling ops that return ``(values, indices)``.
POOLING_TUPLE = frozenset({aten.max_pool2d_with_indices, aten.adaptive_max_pool2d})
#: Reductions over chosen dims.
REDUCTION = frozenset({aten.mean, aten.sum, aten.amax, aten.amin, aten.var, aten.std})

# ---------------------------------------------------------------------------- movement / reshape
#: Reshapes that take an explicit target size (arg 1 is the new shape).
SIZED_RESHAPE = frozenset({aten.view, aten.reshape, aten._unsafe_view})
#: Every reshape: element order unchanged, only the shape differs.
RESHAPE = SIZED_RESHAPE | frozenset({aten.flatten, aten.unflatten, aten.squeeze, aten.unsqueeze})
#: Value copies: same values, maybe a fresh or contiguous buffer.
COPY = frozenset({aten.contiguous, aten.clone})
#: Views that alias their input without changing anything visible.
ALIAS = frozenset({aten.alias, aten.detach})
#: Reshapes and copies: the ops a value flows through unchanged. sparsify-activations used
#: ``view/reshape/_unsafe_view/squeeze/unsqueeze`` plus ``contiguous``/``clone``; ``flatten`` and
#: ``unflatten`` belong here for the same reason (values are untouched), so this is the union.
RESHAPE_OR_COPY = RESHAPE | COPY
#: Movement ops: reshapes plus permutations, broadcasts and slicing views.
MOVEMENT = RESHAPE | frozenset({
    aten.expand, aten.t, aten.transpose, aten.permute, aten.slice, aten.select, aten.narrow,
})
#: Splits of one tensor into several.
SPLIT = frozenset({aten.split, aten.split_with_sizes, aten.chunk})
#: Shape bookkeeping that reads no tensor data.
SHAPE_QUERY = frozenset({aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset})
#: Ops that launch no kernel: views, aliases, shape queries and runtime assertions (kernel counts).
NON_KERNEL = MOVEMENT | ALIAS | frozenset({
    aten.sym_size, aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size,
})
#: Slicing / padding on a residual shortcut (fuse-blocks walks through them to find the block input).
SHORTCUT_SLICE = frozenset({aten.slice, aten.pad, aten.constant_pad_nd})

# ---------------------------------------------------------------------------- channel flow
#: Ops that keep each channel's identity (pruning's networkx view: channels flow through them).
CHANNEL_PRESERVING = frozenset({
    aten.batch_norm, aten.relu, aten.relu_, aten.gelu, aten.silu, aten.sigmoid, aten.tanh, aten.hardtanh,
    aten.dropout, aten.max_pool2d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.clone, aten.contiguous,
    aten.leaky_relu, aten.hardswish, aten.layer_norm,
})

# ---------------------------------------------------------------------------- backend / pass specific
#: Ops that are affine in their first argument when every other argument is a constant (the HE
#: backend traces these as one dense affine map).
AFFINE_IN_FIRST_ARG = frozenset({
    aten.conv1d, aten.conv2d, aten.linear, aten.avg_pool1d, aten.avg_pool2d, aten.adaptive_avg_pool2d, aten.flatten,
    aten.view, aten.reshape, aten._unsafe_view, aten.batch_norm, aten.mean, aten.sum, aten.permute, aten.transpose,
    aten.contiguous, aten.clone, aten.dropout, aten.neg, aten.unsqueeze, aten.squeeze, aten.alias, aten.detach,
    aten.constant_pad_nd, aten.pad,
})
#: Ops quantize-layerwise walks back through from a layer input to find the layer that produced it:
#: value-preserving for its integer grid (``max`` and ``relu`` keep grid points on the grid). Kept exactly
#: as that pass had it (narrower than ``RESHAPE_OR_COPY | RELU``): widening it would change which layers
#: are treated as reading the same input grid, and so the bit allocation.
QUANT_PASSTHROUGH = frozenset({
    aten.max_pool2d, aten.flatten, aten.view, aten.reshape, aten._unsafe_view, aten.relu, aten.relu_, aten.clone,
    aten.contiguous, aten.dropout,
})
#: Exact overloads that static activation quantization looks through on a shortcut: only these
#: overloads keep the values, hence the quantized grid (``view.dtype`` would reinterpret bits and is
#: excluded, which a packet-level family could not express).
QUANT_SHORTCUT_OVERLOADS = frozenset({
    aten.slice.Tensor, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default,
})
