"""What the ONNX translations share: constants and ``com.microsoft`` contrib ops in onnxscript's
trace mode."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

_CONTRIB: dict[tuple[str, str], Any] = {}


def const(array: np.ndarray):
    """A ``Constant`` node holding ``array`` (indices, shapes, scales, DFT matrices)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    return op.Constant(value=ir.tensor(np.ascontiguousarray(array)))


def contrib_op(name: str, schema: Callable[[], Any], domain: str = "com.microsoft"):
    """The ``domain`` op ``name`` (a ``com.microsoft`` contrib op by default) as an onnxscript
    callable, built once from ``schema()`` (an ``onnx.defs.OpSchema``: the ``onnx`` package ships
    none for contrib ops, and the exporter needs one to bind inputs and attributes)."""
    if (domain, name) not in _CONTRIB:
        from onnxscript.values import Op, Opset

        _CONTRIB[domain, name] = Op(Opset(domain, 1), name, schema())
    return _CONTRIB[domain, name]


__all__ = ["const", "contrib_op"]
