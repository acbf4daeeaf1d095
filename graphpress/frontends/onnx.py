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
    input_shape: Sequence[int] | None = None,
    batch: int = 2,
    dynamic_batch: bool = True,
) -> Graph:
    """Import ``path`` and capture it; examples default to seeded random inputs of the ONNX specs.

    Parameters
    ----------
    path : str or Path
    example_inputs : sequence of Tensor, optional
        Inputs to trace with.
    input_shape : sequence of int, optional
        Shape of the model's single input (``--input-shape``): it must agree with every static
        dimension the file declares (symbolic dims take any size) and then sets the examples'
        shape, including symbolic dims beyond the batch.
    batch : int
        Size of a symbolic leading dim when neither examples nor ``input_shape`` are given.
    dynamic_batch : bool

    Raises
    ------
    FrontendError
        ``input_shape`` contradicts the declared input (naming the file, the input and both
        shapes), or the model has several inputs.
    """
    from graphpress.frontends.onnx_import import import_onnx

    path = Path(path)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    imported = import_onnx(path)
    if example_inputs is not None:
        inputs = tuple(example_inputs)
    elif input_shape is not None:
        inputs = (_input_from_shape(path, imported, tuple(int(d) for d in input_shape)),)
    else:
        inputs = imported.example_inputs(batch)
    source = {"frontend": "onnx", "path": str(path)}
    if dynamic_batch and _mixed_leading_dims(imported):
        # A graph input declared with a fixed leading size (a (1, C, 1, 1) bias broadcast against
        # the (N, C, H, W) activations) is no batch: graphpress makes dim 0 of every input the
        # batch, which would tie it to N. Such a model is captured with static shapes.
        dynamic_batch = False
        source["static_batch"] = "inputs " + ", ".join(
            f"{n} {'x'.join(str(d) if d is not None else '?' for d in dims)}"
            for n, (dims, _) in zip(imported.input_names, imported.input_specs)
            if dims
        ) + " do not share a batch dim"
    return from_module(
        imported.module,
        inputs,
        name=path.stem,
        dynamic_batch=dynamic_batch,
        input_names=imported.input_names,
        output_names=imported.output_names,
        source=source,
    )


def _mixed_leading_dims(imported) -> bool:
    """Whether some inputs declare a symbolic dim 0 and others a fixed one."""
    firsts = [dims[0] for dims, _ in imported.input_specs if dims]
    return any(isinstance(d, int) for d in firsts) and any(not isinstance(d, int) for d in firsts)


def _input_from_shape(path: Path, imported, shape: tuple[int, ...]) -> torch.Tensor:
    """A seeded random input of ``shape`` after checking it against the declared ONNX input."""
    if len(imported.input_names) != 1:
        raise FrontendError(
            f"{path}: --input-shape describes one input but the model has {len(imported.input_names)} "
            f"({', '.join(imported.input_names)}); pass example inputs instead"
        )
    name, (dims, dtype) = imported.input_names[0], imported.input_specs[0]
    if dims is not None:
        declared = "x".join(str(d) if isinstance(d, int) else (d or "?") for d in dims)
        given = "x".join(map(str, shape))
        clash = len(dims) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape))
        if clash:
            raise FrontendError(
                f"{path}: --input-shape {given} contradicts input '{name}' declared as {declared} in the file; "
                f"pass a shape that matches it (symbolic dims may take any size) or leave --input-shape out"
            )
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(0, 2, shape, generator=gen).to(dtype)
