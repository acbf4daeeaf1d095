"""The op-converter registry: which Python function turns which ONNX op into torch code.

A converter is registered with :func:`converter`::

    @converter("Squeeze", since=1)      # axes is an attribute up to opset 12
    def squeeze_v1(ctx, node, x): ...

    @converter("Squeeze", since=13)     # axes became an optional input
    def squeeze_v13(ctx, node, x, axes=None): ...

For a model whose default-domain opset is ``N`` the converter with the largest ``since <= N``
is used, mirroring how ONNX itself versions operator schemas.  A converter is called as
``fn(ctx, node, *inputs)`` where

* ``ctx`` is the :class:`~graphpress.frontends.onnx_import.emitter.Emitter` that owns the
  ``torch.fx.Graph`` being built (use it to emit calls, read static values and shapes);
* ``node`` is an :class:`OnnxNode` (attributes already parsed to Python values);
* ``inputs`` are the converted ONNX inputs (see :mod:`.values`), trailing absent optional inputs
  left out and absent inputs in the middle passed as ``None`` -- so converters can use ordinary
  default arguments for optional inputs.

It returns one value, or a tuple with one entry per ONNX output (``None`` for outputs it does
not produce; using such an output later is an error naming the node).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import onnx

from .onnx_types import ValueType

#: ONNX spells the default operator set either ``""`` or ``"ai.onnx"``.
DEFAULT_DOMAIN = ""

Converter = Callable[..., Any]


@dataclass(frozen=True)
class _Entry:
    since: int
    fn: Converter


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def normalize_domain(domain: str) -> str:
    """Return ``""`` for both spellings of the default ONNX domain."""
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def converter(*op_types: str, since: int = 1, domain: str = DEFAULT_DOMAIN) -> Callable[[Converter], Converter]:
    """Register the decorated function as converter for ``op_types`` from opset ``since`` on.

    Parameters
    ----------
    *op_types : str
        ONNX op type names (several ops may share one converter, e.g. ``"Add", "Sub"``; the
        function can look at ``node.op_type``).
    since : int, optional
        First opset version of ``domain`` this converter handles.  Registering another converter
        for the same op with a larger ``since`` takes over from that version on.
    domain : str, optional
        Operator-set domain; ``""`` (default) is ``ai.onnx``.

    Returns
    -------
    callable
        A decorator returning the function unchanged.
    """

    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            entries = _REGISTRY.setdefault((normalize_domain(domain), op_type), [])
            if any(e.since == since for e in entries):
                raise ValueError(f"duplicate ONNX converter for {op_type} since opset {since}")
            entries.append(_Entry(since, fn))
            entries.sort(key=lambda e: e.since)
        return fn

    return register


def lookup(domain: str, op_type: str, opset: int | None) -> Converter | None:
    """Return the converter for ``op_type`` at ``opset``, or ``None`` if there is none.

    Parameters
    ----------
    domain : str
        The node's domain.
    op_type : str
        The node's op type.
    opset : int or None
        The model's opset version for ``domain``; ``None`` (domain not imported) finds nothing.
    """
    if opset is None:
        return None
    best = None
    for entry in _REGISTRY.get((normalize_domain(domain), op_type), ()):
        if entry.since <= opset:
            best = entry.fn
    return best


def qualified_op_name(domain: str, op_type: str) -> str:
    """``"Conv"`` for the default domain, ``"com.microsoft::FusedConv"`` otherwise."""
    domain = normalize_domain(domain)
    return op_type if domain == DEFAULT_DOMAIN else f"{domain}::{op_type}"


def supported_ops() -> list[str]:
    """Names of all ONNX ops that have a converter, sorted.

    Returns
    -------
    list of str
        Default-domain ops by bare name (``"Conv"``), others as ``"domain::Op"``.
    """
    from . import ops  # noqa: F401  (importing the package registers every converter)

    return sorted(qualified_op_name(d, t) for d, t in _REGISTRY)


def find_unsupported(nodes: Iterable[onnx.NodeProto], opsets: dict[str, int]) -> Counter[str]:
    """Count the nodes in ``nodes`` that no converter handles, by qualified op name.

    An op that has converters only for newer opsets than the model uses is reported as
    ``"Op (opset N)"`` so the user knows the op itself is not the problem.
    """
    from . import ops  # noqa: F401

    missing: Counter[str] = Counter()
    for node in nodes:
        domain = normalize_domain(node.domain)
        opset = opsets.get(domain)
        if lookup(domain, node.op_type, opset) is not None:
            continue
        name = qualified_op_name(domain, node.op_type)
        if (domain, node.op_type) in _REGISTRY and opset is not None:
            name = f"{name} (opset {opset})"
        missing[name] += 1
    return missing


@dataclass
class OnnxNode:
    """One ONNX node as converters see it.

    Attributes
    ----------
    op_type, domain, name : str
        From the ``NodeProto`` (``name`` may be empty in the file; the importer then makes one up).
    inputs, outputs : list of str
        Value names; ``""`` marks an absent optional input/output.
    attrs : dict
        Attributes parsed by :func:`.onnx_types.attribute_value`.
    opset : int
        Version of the node's domain imported by the model.
    types : dict
        Shared table value name -> :class:`.onnx_types.ValueType`.
    """

    op_type: str
    domain: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    types: dict[str, ValueType] = field(repr=False, default_factory=dict)

    def attr(self, key: str, default: Any = None) -> Any:
        """Attribute ``key`` or ``default`` when the node does not set it."""
        return self.attrs.get(key, default)

    def output_type(self, index: int = 0) -> ValueType | None:
        """Inferred type of output ``index`` (``None`` if unknown)."""
        if index >= len(self.outputs) or not self.outputs[index]:
            return None
        return self.types.get(self.outputs[index])

    def uses_output(self, index: int, used: set[str]) -> bool:
        """Whether output ``index`` exists and is consumed (``used`` = all consumed names)."""
        return index < len(self.outputs) and bool(self.outputs[index]) and self.outputs[index] in used

    def describe(self) -> str:
        """``"node 'conv1' (Conv)"`` for error messages."""
        return f"node '{self.name}' ({qualified_op_name(self.domain, self.op_type)})"
