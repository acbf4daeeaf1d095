"""Run an HE artifact: load the program, make fresh keys, run encrypted inferences.

An HE artifact folder holds ``he_program.json`` (the steps, scales and parameters),
``server_weights.npz`` (the server's integer weights), ``client_graph.pt2`` (the plaintext
parts, a ``torch.export`` program) and ``he_cost.json`` (the cost report of the lowering).
No key is ever stored: :class:`HERunner` generates a fresh key pair per parameter set when it
is created (the client's secret key lives only in memory) and encodes the weights into
plaintexts once (the server's offline work).

>>> from graphpress.runtime import load
>>> model = load("out/digits-he")                   # doctest: +SKIP
>>> (logits,) = model(images)                       # encrypted inference (interactive protocol)
>>> run = model.runner.run(images)                  # doctest: +SKIP
>>> [(r["name"], r["measured_s"], r["predicted_s"]) for r in run.layers]   # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress.backends.he.program import EncryptedExecutor, HEProgram, PlainExecutor, Step, StepRecord, run_client
from graphpress.errors import BackendError

PROGRAM_FILE = "he_program.json"
COST_FILE = "he_cost.json"


@dataclass
class HERun:
    """One encrypted inference: outputs, wall time, and one record per executed step.

    ``layers`` rows: ``index``, ``name``, ``kind``, ``encoding``, ``rows`` (input vectors),
    ``measured_s`` (wall time of the kernel call: encrypt + server products + decrypt),
    ``counts`` (the kernel's op counter for that call), ``predicted_s`` and ``predicted_counts``
    (cost model; None when no per-op costs are cached).
    """

    outputs: list[np.ndarray]
    seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The server's integer weights (widened to int64 for the kernels)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k].astype(np.int64) for k in f.files}
    except (OSError, ValueError) as err:
        raise BackendError(f"{path}: cannot read the HE weights ({err})") from err


def load_client(path: Path) -> torch.nn.Module:
    """The client graph module (registers ``graphpress_he::step`` first via the program import)."""
    try:
        return torch.export.load(str(path)).module()
    except Exception as err:  # any deserialization failure is one line
        raise BackendError(f"{path}: cannot load the client graph ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from err


class HERunner:
    """Encrypted inference for an HE artifact folder (interactive protocol).

    Parameters
    ----------
    folder : path
        The artifact folder (or the ``he_program.json`` inside it).
    costs : bool
        Attach cost-model predictions to :meth:`run` records (needs the per-op cost cache;
        ``None`` where a parameter set is not cached).
    verify : bool
        Compare every decrypted layer output with the plaintext integer product (raises
        :class:`BackendError` naming the layer on a difference); costs a plaintext product per layer.
    on_prepare : callable, optional
        Called with each :class:`Step` once its weights are encoded (progress bars).

    Attributes
    ----------
    program : HEProgram
    input_names, output_names : list of str
    """

    def __init__(self, folder: str | Path, *, costs: bool = True, verify: bool = False, on_prepare: Any = None):
        folder = Path(folder)
        if folder.is_file():
            folder = folder.parent
        self.folder = folder
        path = folder / PROGRAM_FILE
        if not path.is_file():
            raise BackendError(f"{folder}: no {PROGRAM_FILE}; not an HE artifact")
        self.program = HEProgram.from_json(path.read_text(encoding="utf-8"), where=str(path))
        if self.program.protocol != "interactive":
            raise BackendError(f"{path}: protocol {self.program.protocol!r} is run by graphpress.backends.he.polynomial, not HERunner")
        self.weights = load_weights(folder / self.program.weights)
        self.client = load_client(folder / self.program.client_graph)
        self.input_names = list(self.program.input_names)
        self.output_names = list(self.program.output_names)
        t0 = time.perf_counter()
        self.executor = EncryptedExecutor(self.program, self.weights, on_prepare=on_prepare, verify=verify)
        self.setup_seconds = time.perf_counter() - t0
        self._costs = costs

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """Encrypted inference: positional numpy arrays (or tensors) in, numpy outputs out."""
        return self.run(*inputs, predict=False).outputs

    def run(self, *inputs: Any, predict: bool = True) -> HERun:
        """Encrypted inference with one record per step (see :class:`HERun`)."""
        tensors = [torch.as_tensor(np.asarray(x)) for x in inputs]
        start = len(self.executor.records)
        t0 = time.perf_counter()
        outs = run_client(self.client, self.executor, tensors)
        seconds = time.perf_counter() - t0
        records = self.executor.records[start:]
        del self.executor.records[start:]
        layers = [layer_row(self.program.steps[r.index], r) for r in records]
        if predict and self._costs:
            attach_predictions(layers, self.program)
        return HERun([o.numpy() for o in outs], seconds, layers)

    def simulate(self, *inputs: Any) -> list[np.ndarray]:
        """The same program in plaintext integers (no encryption): what :meth:`__call__` must return, exactly."""
        tensors = [torch.as_tensor(np.asarray(x)) for x in inputs]
        return [o.numpy() for o in run_client(self.client, PlainExecutor(self.program, self.weights), tensors)]


def layer_row(step: Step, rec: StepRecord) -> dict[str, Any]:
    return {
        "index": step.index,
        "name": step.name,
        "kind": step.kind,
        "encoding": step.encoding,
        "b": step.b,
        "shape": f"{step.out_features}x{step.in_features}" + (f"x{step.kernel_size[0]}x{step.kernel_size[1]}" if step.kind == "conv2d" else ""),
        "poly_degree": step.params.get("poly_degree"),
        "plain_bits": step.plain_bits,
        "rows": rec.rows,
        "measured_s": rec.seconds,
        "counts": dict(rec.counts),
        "op_seconds": dict(rec.op_seconds),
    }


def attach_predictions(layers: list[dict[str, Any]], program: HEProgram) -> None:
    """Add ``predicted_s`` / ``predicted_counts`` to step rows from the cached per-op costs."""
    from graphpress.backends.he.costmodel import predict_step

    for row in layers:
        pred = predict_step(program.steps[row["index"]], row["rows"])
        row["predicted_s"] = pred["seconds"] if pred else None
        row["predicted_counts"] = pred["counts"] if pred else None
        row["predicted_terms"] = pred["terms"] if pred else None


__all__ = ["COST_FILE", "HERun", "HERunner", "PROGRAM_FILE", "attach_predictions", "layer_row", "load_client", "load_weights"]
