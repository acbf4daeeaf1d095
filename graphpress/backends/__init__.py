"""Backends: lower an :class:`~graphpress.ir.graph.Graph` into model files for one runtime.

``get_backend(name)`` returns a backend instance. Backends are imported lazily so that this
package (and :mod:`graphpress.runtime`, which loads artifacts through it) does not import torch
or any backend's compiler until one is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from graphpress.backends.base import Backend, LoweredModel, Runner
from graphpress.errors import BackendError

# name -> "module:attribute" of the Backend class.
_BACKENDS: dict[str, str] = {
    "onnxruntime": "graphpress.backends.onnxruntime.lower:OnnxRuntimeBackend",
    "he": "graphpress.backends.he.lower:HEBackend",
    "torch": "graphpress.backends.torch.lower:TorchBackend",
    "tvm": "graphpress.backends.tvm.lower:TVMBackend",
}


def available_backends() -> list[str]:
    """Names accepted by :func:`get_backend`."""
    return sorted(_BACKENDS)


def get_backend(name: "str | Backend", **options: Any) -> Backend:
    """Instantiate the backend called ``name``.

    Parameters
    ----------
    name : str or Backend
        A registered backend name (see :func:`available_backends`), e.g. ``"onnxruntime"``;
        an already configured backend instance is returned as is (so callers such as
        :func:`graphpress.api.compress` accept ``get_backend("he", encoding=...)``).
    **options
        Passed to the backend's constructor (for onnxruntime: ``opset``, ``optimize``; for he:
        ``encoding``, ``protocol``, ``act_bits``, ``weight_bits``, ...).

    Returns
    -------
    Backend

    Raises
    ------
    BackendError
        When ``name`` is unknown (the message lists the known names).
    """
    if not isinstance(name, str) and hasattr(name, "lower") and hasattr(name, "runner"):
        if options:
            raise BackendError(f"get_backend: options {sorted(options)} given with an already configured backend {name!r}")
        return name
    target = _BACKENDS.get(name)
    if target is None:
        raise BackendError(f"unknown backend {name!r}; known backends: {', '.join(available_backends())}")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    return cls(**options)


__all__ = ["Backend", "LoweredModel", "Runner", "available_backends", "get_backend"]
