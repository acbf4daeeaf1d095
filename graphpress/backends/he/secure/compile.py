"""Graph -> :class:`~.program.SecureProgram`: every value in fixed point, every scale folded into
server-private integer multipliers.

The HE program (:func:`graphpress.backends.he.program.build_program`: layers, calibrated input
quantizers, integer weights) gives the linear steps; its client graph gives what lies between
them, translated op by op:

* an encrypted step reads its input quantized with the step's calibrated quantizer. An integer
  accumulator ``A`` (scale ``s_A``, per channel) becomes ``clamp(shift(A * M, k), lo, hi)``
  with ``M = round(s_A / s_q * 2^k)`` (``k`` chosen so ``M`` has 16 significant bits); the
  network input is quantized by the client. The step's output ``W x + round(bias / (s_q s_w))``
  has scale ``s_q s_w`` per output channel;
* ``relu``: on the integers; ``add``: both operands to a common scale ``min(s_a, s_b) / 2^8``
  (multipliers >= 256, relative rounding below 2^-9);
* mean over ``H, W`` / adaptive average pooling to 1x1 / average pooling with stride = kernel:
  a sum, the divisor goes into the scale; max pooling with stride = kernel: a max;
* flatten / view / reshape; clone, contiguous, dropout, alias: nothing;
* the outputs are brought to one scalar scale (``max s``, multipliers with 16 bits) and
  revealed to the client with that scale.

Anything else is refused with one line naming the node (the protocol evaluates only what SPU
computes exactly on integers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphpress.backends.he.program import HEProgram
from graphpress.backends.he.quant import plain_bits_for
from graphpress.backends.he.secure.hestep import PLAN_WEIGHTS, StepShape, noise_bound_bits
from graphpress.backends.he.secure.params import STAT_BITS, secure_params
from graphpress.backends.he.secure.program import SecureProgram
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph

aten = torch.ops.aten
MULT_BITS = 16
ADD_BITS = 8

_IDENTITY = {"clone", "contiguous", "alias", "dropout", "detach", "lift_fresh_copy"}
_RESHAPE = {"view", "reshape", "flatten", "_unsafe_view", "squeeze", "unsqueeze"}


class _Value:
    def __init__(self, name: str, shape: tuple[int, ...], scale: np.ndarray | None, kind: str, nonneg: bool = False):
        self.name, self.shape, self.kind, self.nonneg = name, tuple(int(s) for s in shape), kind, nonneg
        self.scale = None if scale is None else np.broadcast_to(np.asarray(scale, dtype=np.float64), self.shape).copy()
        self.quantized: dict[tuple[float, int, int], str] = {}
        self.qkey: tuple[float, int, int] | None = None


class _Compiler:
    def __init__(self, program: HEProgram, weights: dict[str, np.ndarray], client: Graph, stat_bits: int, poly_degree: int | None):
        self.hp, self.weights, self.client = program, weights, client
        self.stat_bits, self.poly_degree = stat_bits, poly_degree
        self.ops: list[dict[str, Any]] = []
        self.shapes: dict[str, list[int]] = {}
        self.arrays: dict[str, np.ndarray] = {}
        self.steps: list[dict[str, Any]] = []
        self.count = 0
        self.input_shape: list[int] | None = None

    def new(self, shape: tuple[int, ...], scale: Any, kind: str = "acc", nonneg: bool = False) -> _Value:
        self.count += 1
        v = _Value(f"v{self.count}", shape, scale, kind, nonneg)
        self.shapes[v.name] = list(v.shape)
        return v

    def emit(self, op: str, ins: list[_Value], out: _Value, **kw: Any) -> _Value:
        self.ops.append({"op": op, "in": [v.name for v in ins], "out": out.name, **kw})
        return out

    def const(self, key: str, value: np.ndarray) -> str:
        self.arrays[key] = np.asarray(value, dtype=np.int64)
        return key

    # ------------------------------------------------------------------ conversions
    def rescale(self, v: _Value, target: np.ndarray, what: str) -> _Value:
        """``v`` times ``s_v / target`` as ``shift(v * M, k)`` (scale ``target``)."""
        ratio = v.scale / np.broadcast_to(target, v.shape)
        top = float(ratio.max())
        k = int(min(48, max(0, MULT_BITS - 1 - math.floor(math.log2(top))))) if top > 0 else 0
        m = np.rint(ratio * (1 << k)).astype(np.int64)
        key = self.const(f"m{len(self.arrays)}", _compact(m))
        target = np.broadcast_to(target, v.shape)
        x = self.emit("mul", [v], self.new(v.shape, target / (1 << k), nonneg=v.nonneg), const=key)
        if k:
            x = self.emit("shift", [x], self.new(v.shape, target, nonneg=v.nonneg), bits=k)
        return x

    def quantized(self, v: _Value, act: dict[str, Any], what: str) -> _Value:
        key = (float(act["scale"]), int(act["lo"]), int(act["hi"]))
        if v.kind == "q" and v.qkey == key:
            return v
        if key in v.quantized:
            return self._by_name[v.quantized[key]]
        if v.kind == "float":
            out = self.new(v.shape, act["scale"], "q", nonneg=key[1] >= 0)
            self.ops.append({"op": "input", "in": [], "out": out.name, "scale": key[0], "lo": key[1], "hi": key[2]})
            if self.input_shape is not None:
                raise BackendError(f"he secure: the input feeds layers with different quantizers ({what!r}); the protocol quantizes it once")
            self.input_shape = list(v.shape)
        else:
            x = self.rescale(v, np.full(v.shape, key[0]), what)
            out = self.new(v.shape, key[0], "q", nonneg=key[1] >= 0)
            lo = None if (v.nonneg and key[1] <= 0) else key[1]  # after a relu: only the top can clip
            self.ops.append({"op": "clamp", "in": [x.name], "out": out.name, "lo": lo, "hi": key[2]})
        out.qkey = key
        v.quantized[key] = out.name
        self._by_name[out.name] = out
        return out

    # ------------------------------------------------------------------ graph walk
    def run(self) -> SecureProgram:
        self._by_name: dict[str, _Value] = {}
        env: dict[fx.Node, Any] = {}
        gm = self.client.gm
        outputs: list[str] = []
        # An activation that an encrypted layer reads is quantized as soon as it is computed, and
        # every other reader (a residual connection, a shortcut) takes the quantized tensor too:
        # integer-only inference, and scales that do not shrink from one residual block to the next.
        want = {
            n.args[0].name: self.hp.steps[int(n.args[2])].act
            for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.graphpress_he.step.default and isinstance(n.args[0], fx.Node)
        }
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                if val is None or not hasattr(val, "shape"):
                    raise BackendError(f"he secure: input {node.name!r} has no shape; capture the model with example inputs")
                env[node] = self.new(tuple(val.shape[1:]), None, "float")
            elif node.op == "get_attr":
                env[node] = getattr(gm, node.target) if hasattr(gm, node.target) else self.client.tensor_of(node)
            elif node.op == "call_function":
                env[node] = self.call(node, env)
                v = env[node]
                if node.name in want and isinstance(v, _Value) and v.kind == "acc":
                    env[node] = self.quantized(v, want[node.name], node.name)
            elif node.op == "output":
                names = list(self.hp.output_names) or ["output"]
                for i, arg in enumerate(fx.node.map_arg(node.args[0], lambda n: n) if isinstance(node.args[0], (list, tuple)) else [node.args[0]]):
                    v = env[arg]
                    if not isinstance(v, _Value) or v.kind == "float":
                        raise BackendError(f"he secure: output {i} is not computed from an encrypted layer")
                    s_out = float(v.scale.max())
                    x = self.rescale(v, np.full(v.shape, s_out), f"output {i}")
                    name = names[i] if i < len(names) else f"output{i}"
                    self.ops.append({"op": "output", "in": [x.name], "name": name, "scale": s_out})
                    outputs.append(name)
        if self.input_shape is None:
            raise BackendError("he secure: the input reaches no encrypted layer")
        return SecureProgram(self.steps, self.ops, self.shapes, self.input_shape, outputs, self.stat_bits)

    def call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        target = node.target
        name = getattr(getattr(target, "overloadpacket", None), "__name__", str(target))
        args = [env.get(a, a) if isinstance(a, fx.Node) else a for a in node.args]
        if target is torch.ops.graphpress_he.step.default:
            return self.step(node, args)
        if name in _IDENTITY:
            return args[0]
        if name.startswith("_assert") or name in ("sym_size", "sym_constrain_range_for_size"):
            return None
        x = args[0]
        if not isinstance(x, _Value) or x.kind == "float":
            raise BackendError(f"he secure: node {node.name!r} ({name}): runs on the input before any encrypted layer; the protocol starts with one")
        out_shape = tuple(int(s) for s in node.meta["val"].shape[1:]) if "val" in node.meta else x.shape
        if name == "relu":
            return self.emit("relu", [x], self.new(x.shape, x.scale, nonneg=True))
        if name == "add" and len(args) >= 2 and isinstance(args[1], _Value):
            y = args[1]
            if node.kwargs.get("alpha", 1) != 1 or y.shape != x.shape:
                raise BackendError(f"he secure: node {node.name!r} (add): only same-shape additions with alpha=1 are supported")
            common = np.minimum(x.scale, y.scale) / (1 << ADD_BITS)
            a = self._mul_to(x, common)
            b = self._mul_to(y, common)
            return self.emit("add", [a, b], self.new(x.shape, common, nonneg=x.nonneg and y.nonneg))
        if name in _RESHAPE:
            return self.emit("reshape", [x], self.new(out_shape, x.scale.reshape(out_shape), nonneg=x.nonneg), shape=list(out_shape))
        if name == "slice":
            axis = int(args[1]) % (len(x.shape) + 1) - 1 if len(args) > 1 else 0
            if axis < 0:
                raise BackendError(f"he secure: node {node.name!r} (slice): slicing the batch axis is not supported")
            start, end, step = (args[2] if len(args) > 2 else None), (args[3] if len(args) > 3 else None), (args[4] if len(args) > 4 else 1)
            end = None if end is not None and end >= 2**62 else end
            index = [slice(None)] * len(x.shape)
            index[axis] = slice(start, end, step)
            return self.emit("slice", [x], self.new(out_shape, x.scale[tuple(index)], nonneg=x.nonneg), axis=axis, start=start, end=end, step=int(step))
        if name in ("constant_pad_nd", "pad"):
            if name == "pad" and (args[2] if len(args) > 2 else node.kwargs.get("mode", "constant")) != "constant":
                raise BackendError(f"he secure: node {node.name!r} (pad): only constant zero padding is supported")
            value = (args[3] if len(args) > 3 else node.kwargs.get("value")) if name == "pad" else (args[2] if len(args) > 2 else node.kwargs.get("value", 0))
            value = 0 if value is None else value
            pads = [int(p) for p in args[1]]
            if value != 0 or any(p < 0 for p in pads):
                raise BackendError(f"he secure: node {node.name!r} (constant_pad_nd): only zero padding is supported")
            widths = [[0, 0] for _ in x.shape]
            for i in range(len(pads) // 2):
                widths[len(x.shape) - 1 - i] = [pads[2 * i], pads[2 * i + 1]]
            scale = np.pad(x.scale, widths, mode="edge")  # zeros: any positive scale
            return self.emit("pad", [x], self.new(out_shape, scale, nonneg=x.nonneg), widths=widths)
        if name in ("mean", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d"):
            return self.pool(node, name, x, args, out_shape)
        raise BackendError(
            f"he secure: node {node.name!r} ({name}): not supported by the secure protocol "
            "(supported between encrypted layers: relu, add, max/avg pooling, mean over H,W, flatten/reshape, slice, zero padding); "
            "use protocol='interactive' only to debug, it shows the client every activation"
        )

    def _mul_to(self, v: _Value, target: np.ndarray) -> _Value:
        m = np.rint(v.scale / target).astype(np.int64)
        key = self.const(f"m{len(self.arrays)}", _compact(m))
        return self.emit("mul", [v], self.new(v.shape, target, nonneg=v.nonneg), const=key)

    def pool(self, node: fx.Node, name: str, x: _Value, args: list[Any], out_shape: tuple[int, ...]) -> _Value:
        if len(x.shape) != 3:
            raise BackendError(f"he secure: node {node.name!r} ({name}): expects a (C, H, W) activation, got {list(x.shape)}")
        c, h, w = x.shape
        chan = x.scale[:, 0, 0]
        if not np.allclose(x.scale, chan[:, None, None]):
            raise BackendError(f"he secure: node {node.name!r} ({name}): needs one scale per channel")
        if name == "mean":
            dims = sorted(int(d) % 4 for d in args[1])
            if dims != [2, 3]:
                raise BackendError(f"he secure: node {node.name!r} (mean): only the mean over H and W is supported, got dims {args[1]}")
            keep = bool(args[2]) if len(args) > 2 else bool(node.kwargs.get("keepdim", False))
            scale = (chan / (h * w)).reshape((c, 1, 1) if keep else (c,))
            return self.emit("sum", [x], self.new(out_shape, scale, nonneg=x.nonneg), axes=[1, 2], keepdims=keep)
        if name == "adaptive_avg_pool2d":
            if tuple(int(a) for a in args[1]) != (1, 1):
                raise BackendError(f"he secure: node {node.name!r}: adaptive average pooling only to 1x1")
            return self.emit("sum", [x], self.new(out_shape, (chan / (h * w))[:, None, None], nonneg=x.nonneg), axes=[1, 2], keepdims=True)
        k = [int(a) for a in (args[1] if isinstance(args[1], (list, tuple)) else [args[1]] * 2)]
        k = k * 2 if len(k) == 1 else k
        stride = args[2] if len(args) > 2 and args[2] else k
        stride = [int(a) for a in (stride if isinstance(stride, (list, tuple)) else [stride] * 2)]
        stride = stride * 2 if len(stride) == 1 else stride
        padding = args[3] if len(args) > 3 else 0
        if stride != k or any(int(p) for p in (padding if isinstance(padding, (list, tuple)) else [padding])) or h % k[0] or w % k[1]:
            raise BackendError(f"he secure: node {node.name!r} ({name}): only non-overlapping, unpadded windows that tile the input (kernel = stride {k})")
        if name == "avg_pool2d":
            return self.emit("sumpool", [x], self.new(out_shape, (chan / (k[0] * k[1]))[:, None, None], nonneg=x.nonneg), k=k)
        return self.emit("maxpool", [x], self.new(out_shape, chan[:, None, None], nonneg=x.nonneg), k=k)

    def step(self, node: fx.Node, args: list[Any]) -> _Value:
        index = int(args[2])
        st = self.hp.steps[index]
        if st.encoding not in ("coeff-circulant", "coeff-dense"):
            raise BackendError(f"he secure: layer {st.name!r}: encoding {st.encoding!r}; the secure protocol runs coefficient encodings only")
        if st.activation is not None:
            raise BackendError(f"he secure: layer {st.name!r}: fused activation {st.activation!r} is not supported; capture without linear_act fusion")
        x = args[0]
        if not isinstance(x, _Value):
            raise BackendError(f"he secure: layer {st.name!r}: its input is not a tensor the protocol computes")
        if st.kind == "conv2d" and len(x.shape) != 3:
            raise BackendError(f"he secure: layer {st.name!r}: conv input must be (C, H, W) per sample, got {list(x.shape)}")
        xq = self.quantized(x, st.act, st.name)
        w_int = self.weights[st.weight_key]
        s_w = np.asarray(st.weight_scales, dtype=np.float64) * float(st.act["scale"])
        bias = args[1]
        b_int = np.zeros(st.out_features, dtype=np.int64)
        if isinstance(bias, torch.Tensor):
            b_int = np.rint(bias.detach().double().numpy() / s_w).astype(np.int64)
        bound = int(st.acc_bound) + int(np.abs(b_int).max(initial=0))
        bits = plain_bits_for(bound)
        geom = dict(
            index=index, name=st.name, kind=st.kind, b=int(st.b if st.encoding == "coeff-circulant" else 1), out_features=st.out_features,
            in_features=st.in_features, kernel_size=list(st.kernel_size), stride=list(st.stride), padding=list(st.padding),
            in_shape=list(xq.shape), out_shape=list(st.out_shape), plan_weights=list(PLAN_WEIGHTS),
        )
        probe = StepShape.from_dict({**geom, "params": {"poly_degree": 4096, "coeff_modulus_bits": [30], "plain_modulus": 3}, "flood_bits": 0})
        params, flood = secure_params(bits, lambda t, n: noise_bound_bits(w_int, probe, t, n), stat_bits=self.stat_bits, poly_degree=self.poly_degree, what=st.name)
        self.steps.append({**geom, "params": params.to_dict(), "flood_bits": int(flood), "plain_bits": int(bits)})
        self.arrays[f"w{index}"] = np.asarray(w_int, dtype=np.int64)
        self.arrays[f"bias{index}"] = b_int
        scale = s_w[:, None, None] if st.kind == "conv2d" else s_w
        out = self.new(tuple(st.out_shape), scale)
        self.ops.append({"op": "he", "in": [xq.name], "out": out.name, "step": index})
        return out


def _compact(m: np.ndarray) -> np.ndarray:
    """A per-channel multiplier as ``(C, 1, 1)`` when it is constant over ``H, W``."""
    if m.ndim == 3 and np.all(m == m[:, :1, :1]):
        return m[:, :1, :1].copy()
    return m


def compile_secure(
    program: HEProgram,
    weights: dict[str, np.ndarray],
    client: Graph,
    *,
    stat_bits: int = STAT_BITS,
    poly_degree: int | None = None,
) -> tuple[SecureProgram, dict[str, np.ndarray]]:
    """``(public program, server arrays)`` for an HE program built with a coefficient encoding.

    Raises
    ------
    BackendError
        An op the protocol cannot evaluate (named), a slot encoding, a layer that no 128-bit
        parameter set holds with flooding.
    """
    comp = _Compiler(program, weights, client, int(stat_bits), poly_degree)
    sp = comp.run()
    steps = sorted(sp.steps, key=lambda s: s["index"])
    if [s["index"] for s in steps] != list(range(len(steps))):
        raise BackendError("he secure: every encrypted layer must be reached exactly once from the input")
    sp.steps = steps
    sp.const_shapes = {k: list(v.shape) for k, v in comp.arrays.items() if k.startswith("m")}
    return sp, comp.arrays


__all__ = ["compile_secure"]
