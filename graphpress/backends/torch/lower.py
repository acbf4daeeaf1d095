"""``torch`` backend: save the graph as a ``torch.export`` program and run it with torch.

Lowering writes ``model.pt2`` (:func:`torch.export.save` of :meth:`Graph.export_program`: the
ATen graph, its weights and graphpress custom ops by name) and, with ``check``, loads it back and
compares it with :meth:`Graph.run` on the example inputs and seeded random ones (fp32: rtol 1e-4,
atol 1e-5 x max(1, max|ref|)). The runner loads the program with :func:`torch.export.load` after
importing :mod:`graphpress.ir.ops` (which registers every ``graphpress::`` op the program may
call) and runs its module under ``torch.inference_mode``.

Loading a ``.pt2`` file unpickles nothing user-written: the format is a zip of the serialized
graph, JSON metadata and raw tensors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress.backends.base import LoweredModel
from graphpress.backends.check import check_against_graph
from graphpress.backends.torch.options import TorchOptions
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph

MODEL_FILE = "model.pt2"
#: Inside ``model.pt2``: the graph's input and output names, which the runner reports.
IO_FILE = "graphpress_io.json"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


class TorchRunner:
    """A loaded ``model.pt2``: positional arrays (numpy or torch) in, numpy arrays out.

    Parameters
    ----------
    model_path : path
        The ``.pt2`` file.
    threads : int, optional
        ``torch.set_num_threads`` before each call when given (process-wide in torch).
    """

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None):
        import graphpress.ir.ops  # noqa: F401 -- registers graphpress:: ops before the program is read

        self.model_path = Path(model_path)
        extra = {IO_FILE: ""}
        try:
            program = torch.export.load(str(self.model_path), extra_files=extra)
        except Exception as err:
            raise BackendError(f"{self.model_path.name}: torch.export.load failed: {_first_line(err)}") from err
        self.module = program.module()
        sig = program.graph_signature
        self.input_names = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
        self.output_names = [getattr(s.arg, "name", f"output_{i}") for i, s in enumerate(sig.output_specs) if s.kind.name == "USER_OUTPUT"]
        # the graph's own names, stored at lowering: export names a forward's *args "past_0", "past_1" ...
        names = json.loads(extra[IO_FILE]) if extra.get(IO_FILE) else {}
        if len(names.get("inputs", ())) == len(self.input_names):
            self.input_names = list(names["inputs"])
        if len(names.get("outputs", ())) == len(self.output_names):
            self.output_names = list(names["outputs"])
        self.threads = threads

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise BackendError(f"{self.model_path.name}: got {len(inputs)} inputs, expected {len(self.input_names)} ({', '.join(self.input_names)})")
        xs = [x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        with torch.inference_mode():
            out = self.module(*xs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    def __repr__(self) -> str:
        return f"TorchRunner({self.model_path.name!r}, inputs={self.input_names})"


def check_program(graph: Graph, model_path: Path, seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Load ``model_path`` back and compare it with ``graph.run`` (:func:`graphpress.backends.check.check_against_graph`)."""
    return check_against_graph(graph, TorchRunner(model_path), "torch", seeds)


class TorchBackend:
    """The ``"torch"`` backend (see module docstring).

    Parameters
    ----------
    check_seeds : sequence of int
        Seeds of the random input sets of the output check.
    """

    name = "torch"
    Options = TorchOptions

    def __init__(self, check_seeds: Sequence[int] = (0, 1)):
        self.check_seeds = tuple(check_seeds)
        self.options = TorchOptions(check_seeds=self.check_seeds)

    def lower(self, graph: Graph, folder: Path, *, check: bool = True) -> LoweredModel:
        """Write ``model.pt2`` into ``folder`` and, with ``check``, verify it against ``graph``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            program = graph.export_program()
        except Exception as err:
            raise BackendError(f"torch: torch.export of {graph.name!r} failed: {_first_line(err)}") from err
        path = folder / MODEL_FILE
        torch.export.save(program, str(path), extra_files={IO_FILE: json.dumps({"inputs": list(graph.input_names),
                                                                                 "outputs": list(graph.output_names)})})
        info = {"export_s": round(time.perf_counter() - t0, 3), "model_bytes": path.stat().st_size, "torch_version": torch.__version__}
        report = check_program(graph, path, self.check_seeds) if check else {"skipped": True}
        return LoweredModel(backend=self.name, model_file=MODEL_FILE, files=[MODEL_FILE], check=report, info=info)

    def runner(self, model_path: Path, threads: int | None = None) -> TorchRunner:
        """A :class:`TorchRunner` for a lowered model."""
        return TorchRunner(model_path, threads=threads)

    def __repr__(self) -> str:
        return "TorchBackend()"


__all__ = ["MODEL_FILE", "TorchBackend", "TorchRunner", "check_program"]
