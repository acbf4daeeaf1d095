"""Options of the ``onnxruntime`` backend (torch-free: validated before any work)."""

from __future__ import annotations

from dataclasses import dataclass

# The dynamo exporter's floor; newer opsets are accepted.
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """``get_backend("onnxruntime", **options)`` / ``--backend-option key=value``.

    Attributes
    ----------
    version : int
        Options format version (1).
    opset : int
        ONNX opset to export, >= 18.
    optimize : bool
        Store ORT's offline ``ORT_ENABLE_EXTENDED`` optimizations in ``model.onnx``.
    check_seeds : tuple of int
        Seeds of the random input sets of the output check.
    """

    version: int = 1
    opset: int = DEFAULT_OPSET
    optimize: bool = False
    check_seeds: tuple[int, ...] = (0, 1)


__all__ = ["DEFAULT_OPSET", "OnnxRuntimeOptions"]
