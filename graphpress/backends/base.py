"""What every backend provides: a :class:`Backend` lowers an :class:`~graphpress.ir.graph.Graph`
into model files, a :class:`Runner` executes those files.

A backend consumes the IR only (it never imports a frontend) and checks its own output: after
lowering, the backend runs the lowered model on the graph's example inputs plus seeded random
ones and compares with :meth:`Graph.run`. The result of that check travels in
:attr:`LoweredModel.check` into the artifact manifest.

This module imports neither torch nor a backend runtime, so that ``graphpress.runtime`` can
use the types while loading an artifact with only numpy and the backend's runtime installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover -- typing only; importing ir pulls in torch
    import numpy as np

    from graphpress.ir.graph import Graph


@dataclass
class LoweredModel:
    """Result of :meth:`Backend.lower`.

    Attributes
    ----------
    backend : str
        Backend name, e.g. ``"onnxruntime"``; stored as ``manifest["backend"]``.
    model_file : str
        Name (relative to the folder) of the file a runner opens.
    files : list of str
        Every file the lowering wrote into the folder, ``model_file`` included (e.g. an
        external-data file next to ``model.onnx``).
    check : dict
        The output check report: ``{"passed": bool, "tolerance": str, "runs": [{"inputs": str,
        "outputs": [OutputDiff dicts]}], "worst": {...}}``; ``{"skipped": True}`` when not run.
    info : dict
        Backend facts for the manifest/report: opset, timings in seconds, file sizes, ...
    io : dict, optional
        ``{"inputs": [...], "outputs": [...]}`` (name/shape/dtype dicts) when the model file's
        interface is not the graph's (caches stored as codes); the manifest lists these.
    node_layers : dict
        Model-file node name -> graphpress layer name, where the backend can tell (ONNX Runtime:
        from the exporter's name scopes), so per-node profiles add up per layer. Not written to
        the manifest (thousands of entries on an LLM); empty where unknown.
    """

    backend: str
    model_file: str
    files: list[str]
    check: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    io: dict[str, Any] | None = None
    node_layers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Runner(Protocol):
    """A loaded model: positional arrays in, a list of numpy arrays out (in output order)."""

    input_names: list[str]
    output_names: list[str]

    def __call__(self, *inputs: Any) -> list["np.ndarray"]: ...


@runtime_checkable
class Backend(Protocol):
    """Lowers a graph into model files inside ``folder`` and checks the result.

    Implementations raise :class:`graphpress.errors.BackendError` (one line naming the model,
    the op or the output) when the graph cannot be lowered or the lowered outputs disagree.
    """

    name: str

    def lower(self, graph: "Graph", folder: Path, *, check: bool = True) -> LoweredModel: ...

    def runner(self, model_path: Path, **options: Any) -> Runner: ...


__all__ = ["Backend", "LoweredModel", "Runner"]
