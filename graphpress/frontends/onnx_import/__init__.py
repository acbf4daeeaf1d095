"""graphpress's own ONNX -> ``torch.fx.GraphModule`` importer.

Design
------
Importing is a small compiler pipeline; each stage lives in its own module:

``loader``
    Read the file, check it, fold constants with onnxscript (computed weights become
    initializers), run ONNX shape inference, and reject models with unsupported ops -- all of
    them listed in one error -- before converting anything.
``registry``
    ``@converter("Conv", since=1)`` maps an ONNX op (and the first opset a converter handles)
    to a Python function.  Attribute-vs-input changes between opsets (Slice, Squeeze, Split,
    Clip, Pad, Reduce*...) are separate registrations sharing one implementation.
``ops/``
    The converters, one module per family: ``elementwise``, ``activations``, ``linalg``,
    ``nn`` (conv/pool/norm/resize), ``shape`` (reshape/slice/gather/...), ``reduce``.
``values`` / ``symbolic``
    Import-time values: constants (read directly by converters, stored as parameters/buffers
    only when a runtime op needs them) and *shape values* whose elements may be symbolic
    (``sym_size(x, 0)``), so shape-computing subgraphs stay valid for any batch size and
    ``torch.export`` can trace the module with a dynamic batch dimension.
``emitter``
    The ``ctx`` converters use to emit torch calls into the ``torch.fx.Graph``.
``importer``
    Walks the graph, calls converters, builds the ``GraphModule``.

The result's ``forward`` takes the ONNX graph inputs positionally (ONNX order) and returns a
tuple with the ONNX graph outputs (ONNX order).  Float initializers become ``nn.Parameter``\\ s
(BatchNorm statistics and non-float tensors become buffers), named after the initializer
(``layer1.0.conv1.weight`` stays hierarchical); :attr:`ImportedOnnx.attr_names` maps ONNX names to
module attribute paths.

Example
-------
>>> imported = import_onnx("model.onnx")                    # doctest: +SKIP
>>> outputs = imported.module(*imported.example_inputs(batch=4))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from graphpress.errors import FrontendError

from .importer import convert_graph
from .loader import ModelSource, load_model, prepare_model
from .onnx_types import Dim
from .registry import converter, supported_ops

__all__ = ["ImportedOnnx", "import_onnx", "supported_ops", "converter"]


@dataclass
class ImportedOnnx:
    """An imported ONNX model.

    Attributes
    ----------
    module : torch.fx.GraphModule
        ``forward(*inputs) -> tuple`` of outputs, both in ONNX order.
    input_names, output_names : list of str
        ONNX names of the graph inputs/outputs, in order.
    input_specs : list of (shape, dtype)
        Per input: ONNX dims (int, symbolic name, or None when unknown) and torch dtype.
    label : str
        The file path (or an in-memory description) used in messages.
    attr_names : dict of str to str
        ONNX initializer/value name -> parameter/buffer path in ``module``.
    """

    module: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    input_specs: list[tuple[tuple[Dim, ...], torch.dtype]]
    label: str = ""
    attr_names: dict[str, str] = field(default_factory=dict)

    def example_inputs(self, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs matching :attr:`input_specs`.

        Parameters
        ----------
        batch : int, optional
            Size used for a symbolic/unknown leading dimension.
        seed : int, optional
            Seed of the private generator (the global RNG is left alone).

        Returns
        -------
        tuple of torch.Tensor
            Floating inputs ~ N(0, 1); integer inputs in ``[0, 2)``; booleans random.

        Raises
        ------
        FrontendError
            An input has a symbolic dimension other than the first (there is no way to guess
            it), or an unknown rank; pass real example inputs instead.
        """
        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for name, (dims, dtype) in zip(self.input_names, self.input_specs):
            if dims is None:
                raise FrontendError(f"{self.label}: input '{name}' has unknown rank; provide example inputs")
            shape = []
            for i, d in enumerate(dims):
                if isinstance(d, int):
                    shape.append(d)
                elif i == 0:
                    shape.append(batch)
                else:
                    raise FrontendError(
                        f"{self.label}: input '{name}' has symbolic dimension {i} ({d or '?'}); provide example inputs"
                    )
            if dtype.is_floating_point or dtype.is_complex:
                tensors.append(torch.randn(shape, generator=generator).to(dtype))
            elif dtype == torch.bool:
                tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
            else:
                tensors.append(torch.randint(0, 2, shape, generator=generator).to(dtype))
        return tuple(tensors)


def import_onnx(path_or_model: ModelSource) -> ImportedOnnx:
    """Import an ONNX model as a ``torch.fx.GraphModule``.

    Parameters
    ----------
    path_or_model : str, os.PathLike or onnx.ModelProto
        The ``.onnx`` file (external data is loaded from its folder) or an in-memory model.

    Returns
    -------
    ImportedOnnx

    Raises
    ------
    FrontendError
        One line naming the file: missing/unreadable/truncated file, invalid model, the list of
        all unsupported ops, or the node whose attributes cannot be converted.
    """
    model, label = load_model(path_or_model)
    model = prepare_model(model, label)
    converted = convert_graph(model, label)
    specs = []
    for name, vt in zip(converted.input_names, converted.input_types):
        if vt.dtype is None:
            raise FrontendError(f"{label}: input '{name}' has an element type torch does not support")
        specs.append((vt.shape, vt.dtype))
    return ImportedOnnx(
        module=converted.module,
        input_names=converted.input_names,
        output_names=converted.output_names,
        input_specs=specs,
        label=label,
        attr_names=converted.attr_names,
    )
