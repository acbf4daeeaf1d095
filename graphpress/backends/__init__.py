"""Backends: lower an :class:`~graphpress.ir.graph.Graph` into model files for one runtime.

``get_backend(name, **options)`` returns a backend instance; its options are a frozen dataclass
per backend (:func:`backend_options_class`), built from plain dicts by :func:`backend_options`
with the same one-line "did you mean" errors as pass configs. Backends are imported lazily so that this
package (and :mod:`graphpress.runtime`, which loads artifacts through it) does not import torch
or any backend's compiler until one is asked for.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from graphpress.backends.base import Backend, LoweredModel, Runner
from graphpress.config import config_from_dict
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


# name -> "module:attribute" of the backend's options: a frozen dataclass with a ``version``,
# in a module that imports neither torch nor the backend's compiler, so options are validated
# before any work.
_OPTIONS: dict[str, str] = {
    "onnxruntime": "graphpress.backends.onnxruntime.options:OnnxRuntimeOptions",
    "he": "graphpress.backends.he.options:HEOptions",
    "torch": "graphpress.backends.torch.options:TorchOptions",
    "tvm": "graphpress.backends.tvm.options:TVMOptions",
}


def _resolve(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _check_name(name: str) -> None:
    if name not in _BACKENDS:
        close = difflib.get_close_matches(str(name), _BACKENDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BackendError(f"unknown backend {name!r}; {hint}known backends: {', '.join(available_backends())}")


def backend_options_class(name: str) -> type:
    """The frozen options dataclass of backend ``name`` (fields, defaults and docs of its options).

    Raises
    ------
    BackendError
        When ``name`` is unknown (the message suggests the closest name and lists the known ones).
    """
    _check_name(name)
    return _resolve(_OPTIONS[name])


def backend_options(name: str, options: "dict[str, Any] | None" = None) -> Any:
    """Backend ``name``'s options built from a plain dict (YAML, JSON, ``--backend-option``).

    Parameters
    ----------
    name : str
        A registered backend name.
    options : dict, optional
        Option name -> value; missing options take their defaults.

    Returns
    -------
    frozen dataclass
        An instance of :func:`backend_options_class` (``name``).

    Raises
    ------
    BackendError
        One line: an unknown backend, an unknown option (``backend 'he': unknown option
        'encodng': did you mean 'encoding'?``) or a value of the wrong type.
    """
    return config_from_dict(backend_options_class(name), dict(options or {}), owner=f"backend '{name}'", error=BackendError)


def get_backend(name: "str | Backend", **options: Any) -> Backend:
    """Instantiate the backend called ``name`` with ``options``.

    Parameters
    ----------
    name : str or Backend
        A registered backend name (see :func:`available_backends`), e.g. ``"onnxruntime"``;
        an already configured backend instance is returned as is (so callers such as
        :func:`graphpress.api.compress` accept ``get_backend("he", encoding=...)``).
    **options
        The backend's options (fields of :func:`backend_options_class`; for onnxruntime:
        ``opset``, ``optimize``; for he: ``encoding``, ``protocol``, ``act_bits``,
        ``weight_bits``, ...), checked by :func:`backend_options` before the constructor runs.

    Returns
    -------
    Backend
        With ``options`` (the frozen options dataclass) as an attribute.

    Raises
    ------
    BackendError
        When ``name`` is unknown, an option is unknown or has the wrong type, or the backend
        refuses a value (e.g. an unknown HE encoding).
    """
    if not isinstance(name, str) and hasattr(name, "lower") and hasattr(name, "runner"):
        if options:
            raise BackendError(f"get_backend: options {sorted(options)} given with an already configured backend {name!r}")
        return name
    opts = backend_options(name, options)
    cls = _resolve(_BACKENDS[name])
    return cls(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "version"})


__all__ = ["Backend", "LoweredModel", "Runner", "available_backends", "backend_options", "backend_options_class", "get_backend"]
