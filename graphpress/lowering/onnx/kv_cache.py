"""ONNX lowering of ``graphpress::kv_quant_write``: caches stored as packed codes.

The op (:mod:`graphpress.ir.ops_kvcache`) keeps the float graph's interface: its caches are
float tensors whose rows lie on a k-bit grid. In the ONNX artifact the caches *are* the codes.
The export writes one ``graphpress.KVQuantWrite(past, present)`` marker node per cache
(:func:`translations`) and :func:`store_quantized_caches` then rewrites each marker with its
graph input ``past_key_values.{i}.key`` and graph output ``present.{i}.key``:

* the input becomes ``uint8`` codes ``(batch, kv_heads, past, head_dim * b / 8)`` plus
  ``past_key_values.{i}.key_scales`` float16 ``(batch, kv_heads, past, 2)`` (each row's step
  ``s`` and minimum ``m``); the graph reads ``codes * s + m`` where it read the float cache;
* the output becomes ``concat(past codes, codes of the new rows)`` and the matching
  ``present.{i}.key_scales``: only the step's rows are quantized (``Slice`` from the past's
  length), with the same float32 operations as the eager kernel.

Packing: ``n = 8 / b`` codes share a byte. The row's ``head_dim`` codes are cut into ``n``
contiguous slices of ``head_dim / n``; byte ``j`` of the packed row holds code ``j`` of slice
``t`` in bits ``[b t, b (t + 1))``. Unpacking is ``n`` shifts and masks and one ``Concat``.

A runtime feeds each ``present.*`` back as the ``past_key_values.*`` of the same name tail
(``...key_scales`` included), as for a float cache; the first step's caches have length 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from graphpress.ir.ops_kvcache import FLOAT_BITS, kv_quant_write, quantize_rows
from graphpress.lowering.onnx.common import contrib_op

DOMAIN = "graphpress"
MARKER = "KVQuantWrite"
SCALES = "_scales"


def _marker_schema():
    from onnx.defs import OpSchema

    fp = OpSchema.FormalParameter
    return OpSchema(MARKER, DOMAIN, 1, inputs=[fp("past", "T"), fp("present", "T")], outputs=[fp("stored", "T")],
                    type_constraints=[("T", ["tensor(float)"], "")],
                    attributes=[OpSchema.Attribute("bits", OpSchema.AttrType.INT, "")])


def _onnx_kv_quant_write(past, present, bits: int):
    if bits >= FLOAT_BITS:
        from onnxscript import opset18 as op

        return op.Identity(present)
    return contrib_op(MARKER, _marker_schema, domain=DOMAIN)(past, present, bits=int(bits))


def translations() -> dict[Callable, Callable]:
    """Op-to-onnxscript-function table: the marker that :func:`store_quantized_caches` rewrites."""
    return {torch.ops.graphpress.kv_quant_write.default: _onnx_kv_quant_write}


# ---------------------------------------------------------------- the storage rewrite (onnx_ir)
def store_quantized_caches(model) -> dict[str, int]:
    """Rewrite every ``graphpress.KVQuantWrite`` marker of ``model`` (an ``onnx_ir.Model``) into
    packed-code storage (module docstring). Returns ``{past input name: bits}``.

    Raises
    ------
    ValueError
        When a marker's past is not a graph input or its result not a graph output (the op
        must sit between a cache input and the present that is returned).
    """
    import onnx_ir as ir

    graph = model.graph
    markers = [n for n in graph if n.domain == DOMAIN and n.op_type == MARKER]
    stored: dict[str, int] = {}
    for node in markers:
        past, present, out = node.inputs[0], node.inputs[1], node.outputs[0]
        bits = node.attributes["bits"].as_int()
        if past is None or not past.is_graph_input() or not out.is_graph_output():
            raise ValueError(f"graphpress::kv_quant_write at {node.name!r}: its past must be a graph input and its result a graph "
                             f"output (the cache the next step reads back)")
        head_dim = past.shape[3]
        per_byte = 8 // bits
        if not isinstance(head_dim, int) or head_dim % per_byte:
            raise ValueError(f"graphpress::kv_quant_write: cache {past.name!r} needs a static head_dim divisible by {per_byte}, "
                             f"got {head_dim}")
        name, out_name = past.name, out.name
        dims = list(past.shape)[:3]
        codes = ir.Value(name=name + ".codes_tmp", shape=ir.Shape([*dims, head_dim // per_byte]), type=ir.TensorType(ir.DataType.UINT8))
        scales = ir.Value(name=name + SCALES, shape=ir.Shape([*dims, 2]), type=ir.TensorType(ir.DataType.FLOAT16))
        tape = ir.tape.Tape()
        read = _dequantize(tape, codes, scales, bits, head_dim)
        new_codes, new_scales = _quantize_new(tape, present, codes, bits, head_dim)
        out_codes = tape.op("Concat", [codes, new_codes], {"axis": 2})
        out_scales = tape.op("Concat", [scales, new_scales], {"axis": 2})
        # the float cache input and the marker's float result go; codes and scales take their places
        i = list(graph.inputs).index(past)
        past.replace_all_uses_with(read)
        graph.inputs.pop(i)
        graph.inputs.insert(i, codes)
        graph.inputs.insert(i + 1, scales)
        j = list(graph.outputs).index(out)
        graph.insert_before(node, tape.nodes)
        graph.outputs.pop(j)
        graph.remove(node, safe=False)
        past.name, out.name = name + ".float_tmp", out_name + ".float_tmp"
        codes.name, out_codes.name, out_scales.name = name, out_name, out_name + SCALES
        out_codes.type, out_codes.shape = codes.type, ir.Shape([*list(out.shape)[:3], head_dim // per_byte])
        out_scales.type, out_scales.shape = scales.type, ir.Shape([*list(out.shape)[:3], 2])
        graph.outputs.insert(j, out_codes)
        graph.outputs.insert(j + 1, out_scales)
        stored[name] = bits
    if markers:
        graph.opset_imports.pop(DOMAIN, None)
        model.opset_imports.pop(DOMAIN, None)
    return stored


def _c(tape, value, dtype) -> object:
    import onnx_ir as ir

    return tape.op("Constant", [], {"value": ir.tensor(np.array(value, dtype=dtype))})


def _dequantize(tape, codes, scales, bits: int, head_dim: int):
    """``unpack(codes) * s + m`` (float32, ``(batch, heads, past, head_dim)``)."""
    import onnx_ir as ir

    per_byte = 8 // bits
    if per_byte == 1:
        q = codes
    else:
        mask = _c(tape, 2 ** bits - 1, np.uint8)
        parts = [tape.op("BitwiseAnd", [tape.op("BitShift", [codes, _c(tape, bits * t, np.uint8)], {"direction": "RIGHT"}) if t else codes,
                                        mask]) for t in range(per_byte)]
        q = tape.op("Concat", parts, {"axis": 3})
    qf = tape.op("Cast", [q], {"to": ir.DataType.FLOAT})
    sf = tape.op("Cast", [scales], {"to": ir.DataType.FLOAT})
    s = tape.op("Slice", [sf, _c(tape, [0], np.int64), _c(tape, [1], np.int64), _c(tape, [3], np.int64)])
    m = tape.op("Slice", [sf, _c(tape, [1], np.int64), _c(tape, [2], np.int64), _c(tape, [3], np.int64)])
    return tape.op("Add", [tape.op("Mul", [qf, s]), m])


def _quantize_new(tape, present, codes, bits: int, head_dim: int):
    """Codes and float16 ``(s, m)`` of ``present``'s rows after the past's length."""
    import onnx_ir as ir

    qmax = float(2 ** bits - 1)
    past_len = tape.op("Shape", [codes], {"start": 2, "end": 3})
    new = tape.op("Slice", [present, past_len, _c(tape, [np.iinfo(np.int64).max], np.int64), _c(tape, [2], np.int64)])
    axes = _c(tape, [-1], np.int64)
    lo = tape.op("ReduceMin", [new, axes], {"keepdims": 1})
    hi = tape.op("ReduceMax", [new, axes], {"keepdims": 1})
    step = tape.op("Max", [tape.op("Div", [tape.op("Sub", [hi, lo]), _c(tape, qmax, np.float32)]), _c(tape, 2.0 ** -20, np.float32)])
    s16 = tape.op("Cast", [step], {"to": ir.DataType.FLOAT16})
    m16 = tape.op("Cast", [lo], {"to": ir.DataType.FLOAT16})
    s = tape.op("Cast", [s16], {"to": ir.DataType.FLOAT})
    m = tape.op("Cast", [m16], {"to": ir.DataType.FLOAT})
    q = tape.op("Clip", [tape.op("Round", [tape.op("Div", [tape.op("Sub", [new, m]), s])]), _c(tape, 0.0, np.float32), _c(tape, qmax, np.float32)])
    per_byte = 8 // bits
    if per_byte > 1:
        width = head_dim // per_byte
        packed = None
        for t in range(per_byte):
            part = tape.op("Slice", [q, _c(tape, [t * width], np.int64), _c(tape, [(t + 1) * width], np.int64), _c(tape, [3], np.int64)])
            if t:
                part = tape.op("Mul", [part, _c(tape, float(2 ** (bits * t)), np.float32)])
            packed = part if packed is None else tape.op("Add", [packed, part])
        q = packed
    return tape.op("Cast", [q], {"to": ir.DataType.UINT8}), tape.op("Concat", [s16, m16], {"axis": 3})


# ---------------------------------------------------------------- the same storage in torch
def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 packing of float codes ``q`` along the last dim (module docstring)."""
    per_byte = 8 // bits
    width = q.shape[-1] // per_byte
    packed = sum(q[..., t * width:(t + 1) * width] * float(2 ** (bits * t)) for t in range(per_byte))
    return packed.to(torch.uint8)


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Float codes from :func:`pack`'s bytes."""
    per_byte, mask = 8 // bits, 2 ** bits - 1
    c = codes.to(torch.int32)
    return torch.cat([(c >> (bits * t)) & mask for t in range(per_byte)], dim=-1).float()


def storage_of(graph) -> "CacheStorage":
    """The :class:`CacheStorage` a :class:`~graphpress.ir.graph.Graph` lowers to: the bits of
    every ``kv_quant_write`` whose past is a graph input (16 bits: float, not listed)."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    bits = {}
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.graphpress.kv_quant_write.default:
            past, b = node.args[0], int(node.args[2])
            if b < FLOAT_BITS and past in placeholders:
                bits[graph.input_names[placeholders.index(past)]] = b
    return CacheStorage(bits)


def _past_name(name: str) -> str:
    """The cache input a present output is fed back as (``present.3.key`` -> ``past_key_values.3.key``);
    any other name as it is."""
    return "past_key_values." + name[len("present."):] if name.startswith("present.") else name


@dataclass(frozen=True)
class CacheStorage:
    """How a lowered decoder stores its caches, to move between the float graph's interface
    (``Graph.run``) and the artifact's (codes and scales): ``bits`` of each quantized past input
    by name; every other input and output is passed through."""

    bits: dict[str, int]

    def encode(self, names: Sequence[str], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The artifact's inputs for float inputs named ``names``."""
        feeds: list[torch.Tensor] = []
        for name, x in zip(names, values, strict=True):
            if name not in self.bits:
                feeds.append(x)
                continue
            q, s, m = quantize_rows(x, self.bits[name])
            feeds += [pack(q, self.bits[name]), torch.cat([s, m], dim=-1).to(torch.float16)]
        return feeds

    def within_a_step(self, name: str, ref: torch.Tensor, test: torch.Tensor, upstream: bool = False) -> bool | None:
        """For an output stored as codes, whether ``test`` is within one grid step of ``ref`` in
        every row (None for any other output). A float difference of an ulp upstream (one thread
        count to another) moves a value across a rounding boundary to the next code, or shifts a
        row's range: at 2 bits a step is a third of the row's range, so allclose and SQNR floors
        fail for rounding, not for a wrong lowering (which is off by many steps, or everywhere).

        ``upstream``: the values themselves may differ by up to half a step before rounding (int8
        activations upstream, whose rounding ties ONNX Runtime breaks otherwise than torch: the
        key projection's input moves by an int8 step, which at 2 bits is no longer small against
        the cache's grid). Each side is within half its own step of its value, so the bound per
        element is ``(s_ref + s_test) / 2 + max(s_ref, s_test) / 2``, with each side's step taken
        from its own row range."""
        past = _past_name(name)
        if past not in self.bits or ref.shape != test.shape or ref.numel() == 0:
            return None
        levels = float(2 ** self.bits[past] - 1)
        step = (ref.amax(-1, keepdim=True) - ref.amin(-1, keepdim=True)) / levels
        slack = 1e-5 * max(1.0, float(ref.abs().max()))
        if not upstream:
            return bool(((ref - test).abs() <= 1.01 * step + slack).all())
        step_t = (test.amax(-1, keepdim=True) - test.amin(-1, keepdim=True)) / levels
        bound = 0.5 * (step + step_t) + 0.5 * torch.maximum(step, step_t)
        return bool(((ref - test).abs() <= 1.01 * bound + slack).all())

    def wrap(self, runner: Callable, input_names: Sequence[str], output_names: Sequence[str]) -> Callable:
        """``runner`` (the artifact's, numpy in and out) called with the float graph's inputs and
        returning its outputs: caches encoded on the way in, decoded on the way out."""
        if not self.bits:
            return runner

        def call(*arrays):
            feeds = self.encode(input_names, [torch.as_tensor(np.asarray(a)) for a in arrays])
            outs = runner(*[f.numpy() for f in feeds])
            return [o.numpy() for o in self.decode(output_names, [torch.as_tensor(o) for o in outs])]

        return call

    def specs(self, specs: Sequence[dict]) -> list[dict]:
        """The artifact's name/shape/dtype dicts for the graph's ``specs`` (inputs or outputs)."""
        out = []
        for spec in specs:
            name = spec["name"]
            past = _past_name(name)
            if past not in self.bits:
                out.append(dict(spec))
                continue
            *dims, head_dim = spec["shape"]
            out.append({"name": name, "shape": [*dims, int(head_dim) * self.bits[past] // 8], "dtype": "uint8"})
            out.append({"name": name + SCALES, "shape": [*dims, 2], "dtype": "float16"})
        return out

    def decode(self, names: Sequence[str], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Float tensors for the artifact's tensors ``values``, whose float names are ``names``
        (a quantized cache's codes and scales give one float tensor)."""
        out: list[torch.Tensor] = []
        it = iter(values)
        for name in names:
            x = next(it)
            past = _past_name(name)
            if past not in self.bits:
                out.append(x)
                continue
            sm = next(it).float()
            out.append(unpack(x, self.bits[past]) * sm[..., :1] + sm[..., 1:])
        return out


__all__ = ["CacheStorage", "kv_quant_write", "pack", "storage_of", "store_quantized_caches", "translations", "unpack"]
