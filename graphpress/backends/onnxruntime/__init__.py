"""ONNX Runtime backend: ``torch.onnx`` (dynamo exporter) lowering plus an ORT session runner.

:class:`OrtRunner` (``session.py``) needs only numpy and onnxruntime; the lowering
(``lower.py``: :class:`OnnxRuntimeBackend`, :func:`lower_to_onnx`) needs torch and is imported on
first use, so loading an artifact does not import torch.
"""

from __future__ import annotations

from typing import Any

from graphpress.backends.onnxruntime.session import OrtRunner, default_providers

_LAZY = {"OnnxRuntimeBackend", "lower_to_onnx", "check_onnx", "optimize_onnx", "DEFAULT_OPSET", "MODEL_FILE"}


def __getattr__(name: str) -> Any:
    # PEP 562: import the torch-dependent lowering only when asked for.
    if name in _LAZY:
        from graphpress.backends.onnxruntime import lower

        return getattr(lower, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OrtRunner", "default_providers", "OnnxRuntimeBackend", "lower_to_onnx", "check_onnx", "optimize_onnx", "DEFAULT_OPSET", "MODEL_FILE"]
