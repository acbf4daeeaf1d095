"""The kinds of value an ONNX tensor can become while the torch.fx graph is being built.

ONNX has one kind of value, the tensor.  During import we keep three, because what matters for
the produced torch code is *when* a value is known:

``torch.fx.Node``
    A tensor only known when the module runs (graph inputs and everything computed from them).
:class:`Const`
    A tensor known at import time: initializers, ``Constant`` nodes and anything computed only
    from those.  Converters read it directly (axes, shapes, pads...).  It only becomes part of
    the module -- as an ``nn.Parameter`` or buffer, named after the ONNX initializer -- if a
    runtime op actually consumes it (see :meth:`.emitter.Emitter.lift`).
:class:`ShapeValue`
    A 0-d/1-d int64 tensor whose *elements* are individually known: each is either a Python int
    or an fx node yielding a (possibly symbolic) int, e.g. ``sym_size(x, 0)``.  This is what
    ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` chains operate on.  Keeping the batch
    size as ``sym_size(x, 0)`` instead of a tensor (or a baked-in number) makes the produced
    module work for any batch size and lets ``torch.export`` trace it with a dynamic batch dim.
    A ShapeValue always holds at least one non-int element; all-int results become :class:`Const`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.fx as fx


@dataclass(eq=False)
class Const:
    """A tensor known at import time.

    Attributes
    ----------
    value : torch.Tensor
        The data (CPU).
    name : str or None
        ONNX name it came from (initializer or node output); used to name the parameter/buffer.
    """

    value: torch.Tensor
    name: str | None = None


# One element of a ShapeValue: a known int, or an fx node that yields an int when the module runs.
SymInt = Union[int, fx.Node]


@dataclass(eq=False)
class ShapeValue:
    """A small int64 tensor (0-d if ``scalar``, else 1-d) with per-element symbolic contents."""

    elems: list[SymInt]
    scalar: bool = False

    def __post_init__(self) -> None:
        if self.scalar and len(self.elems) != 1:
            raise ValueError("a scalar ShapeValue has exactly one element")


Value = Union[fx.Node, Const, ShapeValue, None]


def make_shape(elems: list[SymInt], scalar: bool = False, name: str | None = None) -> Const | ShapeValue:
    """Build the canonical value for int64 elements: a :class:`Const` when all are ints."""
    if all(isinstance(e, int) for e in elems):
        data = torch.tensor(elems[0] if scalar else elems, dtype=torch.int64)
        return Const(data, name)
    return ShapeValue(list(elems), scalar)


def is_runtime(value: object) -> bool:
    """Whether ``value`` (possibly nested in lists/tuples/slices/dicts) needs the module to run."""
    if isinstance(value, (fx.Node, ShapeValue)):
        return True
    if isinstance(value, (list, tuple)):
        return any(is_runtime(v) for v in value)
    if isinstance(value, slice):
        return is_runtime(value.start) or is_runtime(value.stop) or is_runtime(value.step)
    if isinstance(value, dict):
        return any(is_runtime(v) for v in value.values())
    return False
