"""HE backend: linear and conv layers on encrypted inputs (BFV, SEAL via ``tenseal.sealapi``).

``get_backend("he", encoding=..., protocol=...)`` lowers a graph into an HE program
(:mod:`.program`): every linear/conv layer -- dense or block-circulant -- runs on encrypted,
fixed-point inputs (:mod:`.quant`) with one of H1's kernels (:mod:`.kernels`:
``coeff-circulant``, ``coeff-dense``, ``slot-dense``); in the ``interactive`` protocol the
client runs everything between them in plaintext (:mod:`.protocol` says exactly what each
party learns), in the ``polynomial`` protocol the whole graph runs encrypted under CKKS
(:mod:`.polynomial`). :mod:`.costmodel` measures per-operation costs once per machine and
predicts each layer's time from its exact operation counts. See ``docs/backends/he.md``.

Importing this package needs neither tenseal nor torch; the names below load on first use, and
a missing tenseal is a one-line error asking for ``pip install graphpress[he]``.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "HEBackend": "graphpress.backends.he.lower",
    "PolynomialRunner": "graphpress.backends.he.lower",
    "load_runner": "graphpress.backends.he.lower",
    "HERunner": "graphpress.backends.he.runner",
    "HERun": "graphpress.backends.he.runner",
    "HEProgram": "graphpress.backends.he.program",
    "Step": "graphpress.backends.he.program",
    "build_program": "graphpress.backends.he.program",
    "ENCODINGS": "graphpress.backends.he.program",
    "QuantConfig": "graphpress.backends.he.quant",
    "PROTOCOLS": "graphpress.backends.he.protocol",
    "get_protocol": "graphpress.backends.he.protocol",
    "calibrate": "graphpress.backends.he.costmodel",
    "predict_step": "graphpress.backends.he.costmodel",
}


def require_tenseal() -> None:
    """Raise a one-line :class:`~graphpress.errors.BackendError` when tenseal is missing."""
    from graphpress.errors import BackendError

    try:
        import tenseal.sealapi  # noqa: F401
    except ImportError as err:
        raise BackendError(f"the he backend needs tenseal ({err}); install graphpress[he] (pip install 'graphpress[he]')") from None


def __getattr__(name: str) -> Any:
    # PEP 562: the HE modules import torch and tenseal; load them only when asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [*sorted(_LAZY), "require_tenseal"]
