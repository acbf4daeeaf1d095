"""Frontend: an ONNX file -> :class:`Graph`, through graphpress's own ONNX -> FX importer.

The importer (:mod:`graphpress.frontends.onnx_import`) folds constants first, converts each
node with a registered converter and fails up front with one line listing every unsupported op.
The resulting module is then captured with ``torch.export`` like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.torch_module import from_module
from graphpress.ir.graph import Graph


def load_onnx(
    path: str | Path,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
) -> Graph:
    """Import ``path`` and capture it; examples default to seeded random inputs of the ONNX specs."""
    from graphpress.frontends.onnx_import import import_onnx

    path = Path(path)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    imported = import_onnx(path)
    inputs = tuple(example_inputs) if example_inputs is not None else imported.example_inputs(batch)
    return from_module(
        imported.module,
        inputs,
        name=path.stem,
        dynamic_batch=dynamic_batch,
        input_names=imported.input_names,
        output_names=imported.output_names,
        source={"frontend": "onnx", "path": str(path)},
    )
