"""Reading an ONNX model and preparing it for conversion.

Steps, each turning a failure into a one-line :class:`~graphpress.errors.FrontendError` that
names the file:

1. :func:`load_model` -- read the protobuf (missing file, not protobuf, truncated/empty file).
2. :func:`prepare_model`

   a. ``onnx.checker`` (a warning only: it is stricter than runtimes);
   b. constant folding with onnxscript's folder (:func:`fold_constants`), so that weights
      computed by ``Constant``/``ConstantOfShape``/``Reshape``-of-initializer/... nodes become
      plain initializers, and shape computations on static dims become constants;
   c. ONNX shape inference, which gives converters the rank/dtype of every intermediate value;
   d. a scan of the whole graph for ops without converter, reported all at once.

Only constant folding and clean-up passes are run -- not onnxscript's rewrite rules, which would
fuse BatchNorm into Conv etc.; graphpress has its own passes for that and the imported graph
should mirror the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Union

import onnx
import onnx.checker
import onnx.shape_inference
from google.protobuf.message import DecodeError

from graphpress.errors import FrontendError

from .registry import find_unsupported, normalize_domain

ModelSource = Union[str, os.PathLike, onnx.ModelProto]

# onnxscript's defaults (8K input / 256K output elements) leave big weights unfolded; a weight
# computed as ``Constant * Constant`` must become an initializer whatever its size.
_FOLD_SIZE_LIMIT = 1 << 28


def load_model(source: ModelSource) -> tuple[onnx.ModelProto, str]:
    """Read an ONNX model from a path (or take a ``ModelProto``) and name it for messages.

    Parameters
    ----------
    source : str, os.PathLike or onnx.ModelProto
        Path to a ``.onnx`` file (external data next to it is loaded too) or an in-memory model,
        which is copied, never modified.

    Returns
    -------
    model : onnx.ModelProto
    label : str
        The path as given, or ``<in-memory ONNX model 'graph name'>``.

    Raises
    ------
    FrontendError
        The file does not exist, is not an ONNX protobuf, or is truncated/empty.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = f"<in-memory ONNX model '{source.graph.name}'>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(source)
        if not path.exists():
            raise FrontendError(f"{label}: no such file")
        if path.is_dir():
            raise FrontendError(f"{label}: is a directory, expected an .onnx file")
        try:
            model = onnx.load(str(path))
        except DecodeError as err:
            raise FrontendError(f"{label}: not a readable ONNX model (truncated file or not an ONNX protobuf: {err})") from None
        except Exception as err:  # missing external data, permissions, ...
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FrontendError(f"{label}: cannot load ONNX model: {detail}") from None
    else:
        raise FrontendError(f"cannot import {type(source).__name__} as ONNX: expected a path or onnx.ModelProto")
    if not model.HasField("graph") or model.ir_version == 0:
        raise FrontendError(f"{label}: not an ONNX model (no graph/ir_version found; the file may be empty or truncated)")
    return model, label


def opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    """Imported opset version per (normalized) domain."""
    return {normalize_domain(o.domain): int(o.version) for o in model.opset_import}


def unsupported_error(label: str, model: onnx.ModelProto) -> FrontendError | None:
    """A :class:`FrontendError` listing every op of ``model`` without converter, or ``None``."""
    missing = find_unsupported(model.graph.node, opset_versions(model))
    if not missing:
        return None
    listed = ", ".join(f"{name} (x{n})" for name, n in sorted(missing.items(), key=lambda kv: (-kv[1], kv[0])))
    total = sum(missing.values())
    return FrontendError(
        f"{label}: {total} unsupported ONNX op(s): {listed}; supported ops: run 'compress passes --onnx-ops'"
    )


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold everything computable without graph inputs into initializers.

    Uses onnxscript's constant folder (``onnxscript.optimizer.fold_constants``) on an
    ``onnx_ir`` model, inlines local functions first, and lifts every remaining ``Constant``
    node into an initializer afterwards, so converters see a single kind of constant.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    import onnxscript.optimizer

    ir_model = ir.serde.deserialize_model(model)
    if ir_model.functions:
        common_passes.InlinePass()(ir_model)
    # Old (IR < 4) files also list initializers as graph inputs; they are weights, not inputs.
    common_passes.RemoveInitializersFromInputsPass()(ir_model)
    onnxscript.optimizer.fold_constants(
        ir_model,
        onnx_shape_inference=True,
        input_size_limit=_FOLD_SIZE_LIMIT,
        output_size_limit=_FOLD_SIZE_LIMIT,
    )
    common_passes.RemoveUnusedNodesPass()(ir_model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    common_passes.TopologicalSortPass()(ir_model)
    return ir.serde.serialize_model(ir_model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Run ONNX shape inference (with data propagation) from the graph inputs' declared shapes.

    Existing ``value_info`` is dropped first: exporters sometimes record intermediate shapes with
    the example batch size baked in, and converters must not mistake those for static sizes.
    """
    del model.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is best effort; converters ask for what they really need
        return model


def prepare_model(model: onnx.ModelProto, label: str, fold: bool = True) -> onnx.ModelProto:
    """Check, constant-fold and shape-infer ``model``; reject it if any op is unsupported.

    Parameters
    ----------
    model : onnx.ModelProto
        As returned by :func:`load_model`.
    label : str
        Name for error messages.
    fold : bool, optional
        Run constant folding (default).  If the folder itself crashes the model is imported
        unfolded, with a warning.

    Returns
    -------
    onnx.ModelProto
        The model to convert.

    Raises
    ------
    FrontendError
        Ops without converter (all listed in one message).
    """
    try:
        onnx.checker.check_model(model)
    except ValueError:
        pass  # > 2 GB protos cannot be checked in memory; conversion still validates structure
    except Exception as err:
        # Unknown ops also fail the checker; listing them is the more useful message.
        error = unsupported_error(label, model)
        if error is not None:
            raise error from None
        # The checker is stricter than runtimes (e.g. it wants a shape on every graph output);
        # real structural damage (dangling inputs, bad attributes) is caught during conversion
        # with a message naming the node, so a checker complaint alone is only a warning.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"{label}: onnx.checker: {first}", stacklevel=3)

    if fold:
        try:
            model = fold_constants(model)
        except Exception as err:  # pragma: no cover - depends on onnxscript internals
            warnings.warn(f"{label}: constant folding failed ({type(err).__name__}: {err}); importing unfolded", stacklevel=3)
    model = infer_shapes(model)

    error = unsupported_error(label, model)
    if error is not None:
        raise error
    return model
