"""Translation of ONNX protobuf pieces (dtypes, tensors, attributes, value types) to Python/torch.

Everything protobuf-specific that the converters would otherwise have to know lives here, so that
the op converters only ever see torch dtypes, torch tensors and plain Python attribute values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper

# One ONNX dimension: a static size, a symbolic name (``dim_param``) or unknown (``None``).
Dim = Union[int, str, None]

#: ONNX ``TensorProto.DataType`` -> torch dtype, for the types a converted graph can carry.
ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """Map an ONNX element type to a torch dtype.

    Parameters
    ----------
    onnx_type : int
        A ``onnx.TensorProto.DataType`` value.

    Returns
    -------
    torch.dtype

    Raises
    ------
    KeyError
        If torch has no equivalent (strings, float8 variants, ...).
    """
    try:
        return ONNX_TO_TORCH_DTYPE[onnx_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(onnx_type) if onnx_type in onnx.TensorProto.DataType.values() else str(onnx_type)
        raise KeyError(f"ONNX element type {name} has no torch equivalent") from None


def tensor_from_proto(proto: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    """Decode an ONNX ``TensorProto`` (raw or typed data, external data) into a torch tensor."""
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        # numpy has no native bfloat16: reinterpret the 16-bit words bit-for-bit.
        raw = numpy_helper.to_array(proto, base_dir or "")
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy()).view(torch.bfloat16)
    array = numpy_helper.to_array(proto, base_dir or "")
    if array.dtype == np.uint16 or array.dtype == np.uint32 or array.dtype == np.uint64:
        # torch's unsigned 16/32/64-bit support is thin; keep the bits, widen where lossless.
        return torch.from_numpy(array.astype(np.int64)).to(torch_dtype(proto.data_type))
    # ``np.array(..., copy=True)``: numpy_helper may hand back read-only views of the protobuf buffer.
    return torch.from_numpy(np.array(array, copy=True))


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """Parse one node attribute into a plain Python value.

    Ints/floats stay scalars, lists become Python lists, strings are decoded to ``str`` and
    tensors become torch tensors.  Graph attributes (control flow) are returned as protos;
    no converter accepts them.
    """
    kind = attr.type
    A = onnx.AttributeProto
    if kind == A.FLOAT:
        return float(attr.f)
    if kind == A.INT:
        return int(attr.i)
    if kind == A.STRING:
        return attr.s.decode("utf-8", errors="replace")
    if kind == A.TENSOR:
        return tensor_from_proto(attr.t)
    if kind == A.FLOATS:
        return [float(v) for v in attr.floats]
    if kind == A.INTS:
        return [int(v) for v in attr.ints]
    if kind == A.STRINGS:
        return [s.decode("utf-8", errors="replace") for s in attr.strings]
    if kind == A.TENSORS:
        return [tensor_from_proto(t) for t in attr.tensors]
    if kind == A.GRAPH:
        return attr.g
    if kind == A.GRAPHS:
        return list(attr.graphs)
    return onnx.helper.get_attribute_value(attr)


@dataclass(frozen=True)
class ValueType:
    """What ONNX (after shape inference) knows about one value.

    Attributes
    ----------
    shape : tuple of Dim, or None
        ``None`` when even the rank is unknown.
    dtype : torch.dtype or None
        ``None`` when the element type is unknown or has no torch equivalent.
    """

    shape: tuple[Dim, ...] | None
    dtype: torch.dtype | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def value_type(type_proto: onnx.TypeProto) -> ValueType:
    """Read a ``TypeProto`` (tensor types only) into a :class:`ValueType`."""
    if not type_proto.HasField("tensor_type"):
        return ValueType(None, None)
    tt = type_proto.tensor_type
    dtype = ONNX_TO_TORCH_DTYPE.get(tt.elem_type)
    if not tt.HasField("shape"):
        return ValueType(None, dtype)
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return ValueType(tuple(dims), dtype)


def collect_value_types(graph: onnx.GraphProto) -> dict[str, ValueType]:
    """Gather the declared/inferred type of every named value in ``graph``.

    Sources are graph inputs, ``value_info`` (filled by shape inference), outputs and
    initializers.  Later sources never erase information an earlier one had.
    """
    types: dict[str, ValueType] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        vt = value_type(vi.type)
        old = types.get(vi.name)
        if old is None or (old.shape is None and vt.shape is not None):
            types[vi.name] = vt
    for init in graph.initializer:
        types[init.name] = ValueType(tuple(int(d) for d in init.dims), ONNX_TO_TORCH_DTYPE.get(init.data_type))
    return types
