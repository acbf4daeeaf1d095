"""The :class:`Emitter`: the one object converters use to produce torch code.

Converters never touch ``torch.fx.Graph`` directly.  They call :meth:`Emitter.call` (or
:meth:`Emitter.method`) with torch functions and the values they were given; the emitter then

* evaluates the call right away when every argument is known at import time (a tiny constant
  folder, so e.g. ``Reshape`` of an initializer never reaches the module), otherwise
* turns :class:`~.values.Const` arguments into ``get_attr`` nodes of parameters/buffers named
  after their ONNX initializers (:meth:`Emitter.lift`), turns :class:`~.values.ShapeValue`
  arguments into int64 tensors, and appends a ``call_function`` node.

It also answers the questions converters have about their inputs: static value, rank, shape,
dtype, the size of one dimension (as an int, or as a ``sym_size`` node when it is dynamic).

Shapes come from ONNX shape inference, which gives up behind data-dependent ``Reshape``\ s (the
legacy exporter's ``Shape -> Gather -> Concat -> Reshape`` chains).  As a fallback every emitted
node is also run on ``meta`` tensors (no data, no compute) built from example sizes; the result
provides rank and dtype -- never sizes, which would depend on the example.
"""

from __future__ import annotations

import keyword
import operator
import re
from typing import Any, Callable, NoReturn

import torch
import torch.fx as fx

from graphpress.errors import FrontendError

from .onnx_types import Dim, ValueType
from .registry import OnnxNode
from .values import Const, ShapeValue, SymInt, Value, is_runtime

PARAMETER = "parameter"
BUFFER = "buffer"

# Attribute names a tensor may not take on the produced GraphModule / its submodules.
_RESERVED_TOP = set(dir(fx.GraphModule))
_RESERVED_SUB = set(dir(torch.nn.Module))


def _sanitize_segment(segment: str, reserved: set[str]) -> str:
    """Make one dotted-name segment a valid, non-clashing attribute name."""
    # Leading separators of exporter names ("/encoder/Mul_output_0") carry no information.
    seg = re.sub(r"[^0-9a-zA-Z_]", "_", segment.lstrip("/:")) or "_"
    if keyword.iskeyword(seg) or seg in reserved:
        seg += "_"
    return seg


class Emitter:
    """Builds the torch.fx graph for one ONNX graph; passed to converters as ``ctx``.

    Parameters
    ----------
    graph : torch.fx.Graph
        The graph being built.
    types : dict
        ONNX value name -> :class:`.onnx_types.ValueType` (after shape inference).
    label : str
        Model name for error messages (usually the file path).
    consumed : set of str
        Names of all ONNX values some node or graph output reads; lets converters tell whether
        an optional output (BatchNorm statistics, MaxPool indices...) is actually needed.
    """

    def __init__(self, graph: fx.Graph, types: dict[str, ValueType], label: str, consumed: set[str]):
        self.graph = graph
        self.types = types
        self.label = label
        self.consumed = consumed
        #: The node being converted (for error messages); set by the importer.
        self.node: OnnxNode | None = None
        #: Qualified attribute name -> (tensor, PARAMETER or BUFFER), in creation order.
        self.tensors: dict[str, tuple[torch.Tensor, str]] = {}
        #: ONNX initializer / value name -> qualified attribute name it was stored under.
        self.attr_names: dict[str, str] = {}
        self._modules: set[str] = set()
        self._lifted: dict[int, tuple[object, fx.Node]] = {}
        self._sym_sizes: dict[tuple[fx.Node, int], fx.Node] = {}
        self._anonymous = 0

    # ------------------------------------------------------------------ errors

    def fail(self, message: str) -> NoReturn:
        """Raise a one-line :class:`FrontendError` naming the model and the current node."""
        where = f" {self.node.describe()}:" if self.node is not None else ""
        raise FrontendError(f"{self.label}:{where} {message}")

    # ------------------------------------------------------------------ emitting code

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Emit ``fn(*args, **kwargs)``, or evaluate it now if no argument is a runtime value.

        Returns an ``fx.Node`` (runtime), or :class:`Const`/tuple of them/plain Python value when
        evaluated at import time.
        """
        if not is_runtime((args, kwargs)):
            with torch.no_grad():
                return _wrap_eager(fn(*_unwrap(args), **_unwrap(kwargs)))
        return self._propagate(self.graph.call_function(fn, self._args(args), self._args(kwargs)))

    def method(self, name: str, obj: Value, *args: Any, **kwargs: Any) -> Any:
        """Emit ``obj.<name>(*args, **kwargs)`` (a tensor method), folding it when possible."""
        if not is_runtime((obj, args, kwargs)):
            with torch.no_grad():
                return _wrap_eager(getattr(_unwrap(obj), name)(*_unwrap(args), **_unwrap(kwargs)))
        return self._propagate(self.graph.call_method(name, self._args((obj, *args)), self._args(kwargs)))

    def lift(self, value: Any, kind: str | None = None) -> Any:
        """Turn a value into something an fx node can take as a tensor argument.

        A :class:`Const` becomes a ``get_attr`` node of a parameter (floating point) or buffer
        (anything else, or when ``kind=BUFFER``), named after its ONNX name; the same Const always
        maps to the same node.  A :class:`ShapeValue` becomes ``torch.tensor([...])``.  Nodes
        and Python values pass through.
        """
        if isinstance(value, Const):
            hit = self._lifted.get(id(value))
            if hit is not None:
                return hit[1]
            tensor = value.value
            if kind is None:
                kind = PARAMETER if (tensor.is_floating_point() or tensor.is_complex()) else BUFFER
            qualname = self._new_attr_name(value.name)
            self.tensors[qualname] = (tensor, kind)
            if value.name:
                self.attr_names[value.name] = qualname
            node = self.graph.get_attr(qualname)
            node.meta["onnx_type"] = ValueType(tuple(tensor.shape), tensor.dtype)
            node.meta["example"] = torch.empty_like(tensor, device="meta")
            self._lifted[id(value)] = (value, node)  # keep ``value`` alive so its id stays unique
            return node
        if isinstance(value, ShapeValue):
            hit = self._lifted.get(id(value))
            if hit is not None:
                return hit[1]
            data = value.elems[0] if value.scalar else list(value.elems)
            node = self._propagate(self.graph.call_function(torch.tensor, (data,), {"dtype": torch.int64}))
            node.meta["onnx_type"] = ValueType(() if value.scalar else (len(value.elems),), torch.int64)
            self._lifted[id(value)] = (value, node)
            return node
        return value

    def _propagate(self, node: fx.Node) -> fx.Node:
        """Run ``node`` on the example (meta) values of its inputs; store the result as
        ``node.meta["example"]``.  Best effort: data-dependent ops (``item``, ``tolist``) and ops
        without meta kernels simply get no example."""
        try:
            args = fx.node.map_arg(node.args, lambda n: n.meta["example"])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["example"])
            with torch.device("meta"), torch.no_grad():
                if node.op == "call_function":
                    result = node.target(*args, **kwargs)
                else:
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
        except Exception:
            return node
        node.meta["example"] = result
        return node

    def _args(self, value: Any) -> Any:
        if isinstance(value, (Const, ShapeValue)):
            return self.lift(value)
        if isinstance(value, tuple):
            return tuple(self._args(v) for v in value)
        if isinstance(value, list):
            return [self._args(v) for v in value]
        if isinstance(value, slice):
            return slice(self._args(value.start), self._args(value.stop), self._args(value.step))
        if isinstance(value, dict):
            return {k: self._args(v) for k, v in value.items()}
        return value

    def _new_attr_name(self, onnx_name: str | None) -> str:
        """A fresh, valid, readable (possibly dotted) attribute path for an ONNX tensor name.

        ``"layer1.0.conv1.weight"`` keeps its hierarchy (so the state dict matches the torch
        model the ONNX file was exported from); odd characters become ``_``; clashes with
        existing names or with ``nn.Module``/``GraphModule`` attributes get a suffix.
        """
        if not onnx_name:
            self._anonymous += 1
            onnx_name = f"_const_{self._anonymous}"
        parts = [p for p in onnx_name.split(".") if p] or ["_"]
        parts = [_sanitize_segment(p, _RESERVED_TOP if i == 0 else _RESERVED_SUB) for i, p in enumerate(parts)]

        def clashes(candidate: list[str]) -> bool:
            full = ".".join(candidate)
            if full in self.tensors or full in self._modules:
                return True
            # A prefix that is already a tensor cannot also be a module.
            return any(".".join(candidate[:i]) in self.tensors for i in range(1, len(candidate)))

        if any(".".join(parts[:i]) in self.tensors for i in range(1, len(parts))):
            parts = ["_".join(parts)]
        candidate, n = list(parts), 0
        while clashes(candidate):
            n += 1
            candidate = [*parts[:-1], f"{parts[-1]}_{n}"]
        self._modules.update(".".join(candidate[:i]) for i in range(1, len(candidate)))
        return ".".join(candidate)

    # ------------------------------------------------------------------ reading values

    @staticmethod
    def static(value: Value) -> torch.Tensor | None:
        """The tensor of a :class:`Const`, else ``None`` (value only known at run time)."""
        return value.value if isinstance(value, Const) else None

    def scalar(self, value: Value) -> Any:
        """A 0-d :class:`Const` as Python number (readable ``x * 0.5``); anything else unchanged.

        Only for arguments where torch accepts a Python scalar in place of a tensor.  Type
        promotion is unchanged: torch treats 0-d tensors and Python scalars alike.
        """
        if isinstance(value, Const) and value.value.dim() == 0:
            return value.value.item()
        if isinstance(value, ShapeValue) and value.scalar:
            return value.elems[0]
        return value

    def ints(self, value: Value, what: str = "input") -> list[SymInt] | None:
        """Read a 1-d integer tensor (shape, axes, pads...) as a list of ints / symbolic ints.

        A tensor only known at run time is read element-wise with ``tolist()`` (works eagerly,
        but is data-dependent for ``torch.export``); its length must be known statically.
        """
        if value is None:
            return None
        if isinstance(value, Const):
            return [int(v) for v in value.value.reshape(-1).tolist()]
        if isinstance(value, ShapeValue):
            return list(value.elems)
        shape = self.shape(value)
        if shape is None or len(shape) > 1 or (len(shape) == 1 and not isinstance(shape[0], int)):
            self.fail(f"{what} must be a constant or have a static length")
        lst = self.method("tolist", value)
        if len(shape) == 0:
            return [lst]
        return [self.call(operator.getitem, lst, i) for i in range(shape[0])]

    def int_value(self, value: Value, what: str = "input") -> SymInt:
        """Read a one-element integer tensor as an int (or a symbolic int node)."""
        if isinstance(value, Const):
            if value.value.numel() != 1:
                self.fail(f"{what} must have exactly one element")
            return int(value.value.reshape(-1)[0].item())
        if isinstance(value, ShapeValue):
            if len(value.elems) != 1:
                self.fail(f"{what} must have exactly one element")
            return value.elems[0]
        if value is None:
            self.fail(f"{what} is required")
        return self.method("item", value)

    def number(self, value: Value, what: str = "input") -> Any:
        """Read a one-element tensor (any dtype) as Python number, or ``.item()`` at run time."""
        if isinstance(value, Const):
            if value.value.numel() != 1:
                self.fail(f"{what} must have exactly one element")
            return value.value.reshape(-1)[0].item()
        return self.int_value(value, what) if isinstance(value, ShapeValue) else self.method("item", value)

    def vtype(self, value: Value) -> ValueType | None:
        """Shape and dtype of ``value`` as far as known."""
        if isinstance(value, Const):
            return ValueType(tuple(value.value.shape), value.value.dtype)
        if isinstance(value, ShapeValue):
            return ValueType(() if value.scalar else (len(value.elems),), torch.int64)
        if isinstance(value, fx.Node):
            known = value.meta.get("onnx_type")
            example = value.meta.get("example")
            if not isinstance(example, torch.Tensor) or (known is not None and known.shape is not None and known.dtype is not None):
                return known
            # Rank and dtype from the meta run; sizes stay unknown (they depend on the example).
            shape = known.shape if known is not None and known.shape is not None else (None,) * example.dim()
            dtype = known.dtype if known is not None and known.dtype is not None else example.dtype
            return ValueType(shape, dtype)
        return None

    def shape(self, value: Value) -> tuple[Dim, ...] | None:
        """Static shape of ``value`` (entries int, symbolic name or None), or None if rank unknown."""
        vt = self.vtype(value)
        return None if vt is None else vt.shape

    def dtype(self, value: Value) -> torch.dtype | None:
        """Element type of ``value`` if known."""
        vt = self.vtype(value)
        return None if vt is None else vt.dtype

    def rank(self, value: Value, what: str = "input") -> int:
        """Rank of ``value``; fails with a clear message if shape inference could not tell."""
        shape = self.shape(value)
        if shape is None:
            self.fail(f"the rank of {what} is unknown (ONNX shape inference could not determine it)")
        return len(shape)

    def axis(self, axis: int, rank: int) -> int:
        """Normalize a possibly negative ``axis`` for a tensor of ``rank`` dims."""
        if not -rank <= axis < max(rank, 1):
            self.fail(f"axis {axis} is out of range for rank {rank}")
        return axis + rank if axis < 0 else axis

    def dim(self, value: Value, index: int) -> SymInt:
        """Size of dimension ``index``: an int when static, else a ``sym_size`` node.

        Emitting ``torch.ops.aten.sym_size.int(x, i)`` (rather than using the example size) is
        what keeps batch-dependent reshapes correct for every batch size.
        """
        if isinstance(value, Const):
            return int(value.value.shape[index])
        if isinstance(value, ShapeValue):
            return len(value.elems)
        shape = self.shape(value)
        if shape is not None:
            if index < 0:
                index += len(shape)
            if isinstance(shape[index], int):
                return shape[index]
        key = (value, index)
        if key not in self._sym_sizes:
            node = self.graph.call_function(torch.ops.aten.sym_size.int, (value, index))
            self._sym_sizes[key] = self._propagate(node)
        return self._sym_sizes[key]

    def sizes(self, value: Value) -> list[SymInt]:
        """All dimension sizes of ``value`` (ints or ``sym_size`` nodes); needs a known rank."""
        return [self.dim(value, i) for i in range(self.rank(value))]


def _unwrap(value: Any) -> Any:
    if isinstance(value, Const):
        return value.value
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, slice):
        return slice(_unwrap(value.start), _unwrap(value.stop), _unwrap(value.step))
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap_eager(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        # contiguous(): expand()/views of constants would otherwise become odd strided buffers
        return Const(value.contiguous())
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_wrap_eager(v) for v in value)
    return value
