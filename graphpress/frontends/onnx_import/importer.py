"""Walking the ONNX graph and assembling the ``torch.fx.GraphModule``.

The ONNX graph is already topologically sorted (the loader makes sure), so one pass suffices:

1. every initializer becomes a :class:`~.values.Const` (nothing is added to the module yet);
2. every real graph input becomes an fx placeholder, in ONNX order;
3. each node is handed to its registered converter together with its converted inputs; the
   values it returns are recorded under the node's output names;
4. the ONNX graph outputs become the tuple returned by ``forward``;
5. dead code is dropped and the parameters/buffers the remaining graph reads are placed in a
   module hierarchy that follows the dotted initializer names.

The graph is built with ``torch.fx.Graph`` directly -- no tracing -- so the generated code is
exactly what the converters emitted.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import onnx
import torch
import torch.fx as fx

from graphpress.errors import FrontendError

from .emitter import PARAMETER, Emitter
from .loader import opset_versions
from .onnx_types import ValueType, attribute_value, collect_value_types, tensor_from_proto
from .registry import OnnxNode, lookup, normalize_domain
from .values import Const, ShapeValue, Value


@dataclass
class _Unavailable:
    """Marks an ONNX output that its converter did not produce (e.g. MaxPool ``Indices``)."""

    producer: str


@dataclass
class ConvertedGraph:
    """Result of :func:`convert_graph` (wrapped into ``ImportedOnnx`` by the package API)."""

    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    input_types: list[ValueType]
    attr_names: dict[str, str]


def _identifier(name: str, taken: set[str]) -> str:
    """A valid, unused Python identifier derived from an ONNX value name."""
    ident = re.sub(r"\W", "_", name) or "input"
    if ident[0].isdigit() or keyword.iskeyword(ident):
        ident = f"_{ident}"
    base, n = ident, 0
    while ident in taken:
        n += 1
        ident = f"{base}_{n}"
    taken.add(ident)
    return ident


def convert_graph(model: onnx.ModelProto, label: str) -> ConvertedGraph:
    """Convert a prepared (checked, folded, shape-inferred) ONNX model into a GraphModule.

    Parameters
    ----------
    model : onnx.ModelProto
        Output of :func:`.loader.prepare_model`.
    label : str
        Model name for error messages.

    Returns
    -------
    ConvertedGraph

    Raises
    ------
    FrontendError
        A converter rejected a node (attribute combination or dynamic value it cannot handle),
        or a converter crashed; the message names the node.
    """
    from . import ops  # noqa: F401  (registers the converters)

    gp = model.graph
    types = collect_value_types(gp)
    opsets = opset_versions(model)
    consumed = {name for node in gp.node for name in node.input if name} | {o.name for o in gp.output}
    graph = fx.Graph()
    ctx = Emitter(graph, types, label, consumed)

    env: dict[str, Value | _Unavailable] = {}
    for init in gp.initializer:
        env[init.name] = Const(tensor_from_proto(init), init.name)

    input_names = [vi.name for vi in gp.input if vi.name not in env]
    taken: set[str] = set()
    for name in input_names:
        placeholder = graph.placeholder(_identifier(name, taken))
        placeholder.meta["onnx_type"] = types.get(name)
        placeholder.meta["example"] = _example(types.get(name))
        env[name] = placeholder

    for index, proto in enumerate(gp.node):
        domain = normalize_domain(proto.domain)
        node = OnnxNode(
            op_type=proto.op_type,
            domain=domain,
            name=proto.name or f"{proto.op_type}_{index}",
            inputs=list(proto.input),
            outputs=list(proto.output),
            attrs={a.name: attribute_value(a) for a in proto.attribute},
            opset=opsets.get(domain, 0),
            types=types,
        )
        ctx.node = node
        fn = lookup(domain, proto.op_type, opsets.get(domain))
        if fn is None:  # the loader's scan reports these up front; this is a safety net
            ctx.fail("no converter for this op")
        args = [_fetch(ctx, env, name) for name in node.inputs]
        while args and args[-1] is None:
            args.pop()
        try:
            result = fn(ctx, node, *args)
        except FrontendError:
            raise
        except Exception as err:
            ctx.fail(f"conversion failed: {type(err).__name__}: {err}")
        results = result if isinstance(result, tuple) else (result,)
        for i, out_name in enumerate(node.outputs):
            if not out_name:
                continue
            value = results[i] if i < len(results) else None
            env[out_name] = _record(ctx, node, out_name, value)
    ctx.node = None

    output_names = [o.name for o in gp.output]
    outputs = []
    for name in output_names:
        value = _fetch(ctx, env, name)
        if value is None:
            raise FrontendError(f"{label}: graph output '{name}' is not produced by any node")
        outputs.append(ctx.lift(value))
    graph.output(tuple(outputs))
    graph.eliminate_dead_code()
    graph.lint()

    module = fx.GraphModule(_tensor_tree(ctx), graph, class_name="OnnxGraphModule")
    state_names = set(module.state_dict().keys())
    attr_names = {onnx_name: q for onnx_name, q in ctx.attr_names.items() if q in state_names}
    return ConvertedGraph(module, input_names, output_names, [types.get(n) or ValueType(None, None) for n in input_names], attr_names)


def _example(vt: ValueType | None) -> torch.Tensor | None:
    """A meta tensor standing in for a graph input (symbolic dims -> 2) for rank propagation."""
    if vt is None or vt.shape is None or vt.dtype is None:
        return None
    return torch.empty([d if isinstance(d, int) else 2 for d in vt.shape], dtype=vt.dtype, device="meta")


def _fetch(ctx: Emitter, env: dict[str, Value | _Unavailable], name: str) -> Value:
    if not name:
        return None
    if name not in env:
        ctx.fail(f"input '{name}' is not produced by any earlier node, initializer or graph input")
    value = env[name]
    if isinstance(value, _Unavailable):
        ctx.fail(f"uses '{name}', an output that the converter of {value.producer} does not support")
    return value


def _record(ctx: Emitter, node: OnnxNode, out_name: str, value: object) -> Value | _Unavailable:
    """Check one converter result and attach ONNX metadata to it."""
    if value is None:
        return _Unavailable(node.describe())
    if isinstance(value, Const):
        if value.name is None:
            value.name = out_name  # folded at import time: name the tensor after the ONNX value
        return value
    if isinstance(value, fx.Node):
        if value.meta.get("onnx_type") is None:
            value.meta["onnx_type"] = ctx.types.get(out_name)
        return value
    if isinstance(value, ShapeValue):
        return value
    ctx.fail(f"converter returned {type(value).__name__} for output '{out_name}'")


def _tensor_tree(ctx: Emitter) -> torch.nn.Module:
    """A plain module holding every lifted tensor at its (dotted) attribute path."""
    root = torch.nn.Module()
    for qualname, (tensor, kind) in ctx.tensors.items():
        *path, leaf = qualname.split(".")
        owner = root
        for segment in path:
            if not hasattr(owner, segment):
                owner.add_module(segment, torch.nn.Module())
            owner = getattr(owner, segment)
        if kind == PARAMETER:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
        else:
            owner.register_buffer(leaf, tensor)
    return root
