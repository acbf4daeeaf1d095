"""``tvm`` backend: lower a graph to Apache TVM Relax and compile it for the host CPU (LLVM).

Steps (see ``docs/backends/tvm.md``):

1. :meth:`Graph.export_program` (the graph's dynamic batch / sequence dims stay symbolic);
2. ``tvm.relax.frontend.torch.from_exported_program``: ATen -> Relax, weights bound as constants;
3. ``tvm.compile`` with the default Relax pipeline (legalization, operator fusion, lowering) for
   the target ``{"kind": "llvm", "mcpu": <host CPU>, "num-cores": <cores>}`` (the host CPU from
   LLVM's own detection: the library uses its vector instructions, so it runs only on CPUs that
   have them);
4. the executable is written as ``model.so`` with ``model.json`` (input / output names, target,
   versions) next to it, both into a temporary file first and then renamed;
5. the check: the library is loaded back into a Relax VM and compared with :meth:`Graph.run` on the
   example inputs and two seeded random input sets (fp32: rtol 1e-4, atol 1e-5 x max(1, max|ref|)).

This is the untuned build: TVM's default schedules, which on CPU run many times slower than ONNX
Runtime (MetaSchedule tuning is a later step of the backend). graphpress custom ops
(``graphpress::*``: quantized, circulant, sparse) are expanded before step 1 into ATen ops and
dense float constants (:mod:`graphpress.backends.tvm.expand_ops`; ``info["expanded_ops"]`` says how, per op);
an op with no expansion fails with a one-line error naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphpress.backends.base import LoweredModel
from graphpress.backends.check import check_against_graph
from graphpress.backends.tvm.build import DB_FILES, RELAX_FILE, TUNING_DIR, compile_library, has_database, save_module, with_static_copy
from graphpress.backends.tvm.fixups import apply_fixups
from graphpress.backends.tvm.options import TVMOptions
from graphpress.backends.tvm.regions import RegionRecorder, group_regions
from graphpress.backends.tvm.runner import META_FILE, TVMRunner, require_tvm
from graphpress.backends.tvm.tune import tune_folder, tuning_shapes
from graphpress.errors import BackendError
from graphpress.backends.tvm.expand_ops import ExpansionError, expand_graphpress_ops
from graphpress.ir.graph import Graph

MODEL_FILE = "model.so"


def _first_line(err: BaseException) -> str:
    text = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def host_target(num_cores: int | None = None) -> dict[str, Any]:
    """The LLVM target of this machine as a dict: ``kind``, ``mcpu`` (LLVM's host CPU name) and ``num-cores``."""
    require_tvm()
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu()), "num-cores": int(num_cores or os.cpu_count() or 1)}


def check_library(graph: Graph, model_path: Path, seeds: Sequence[int] = (0, 1)) -> dict[str, Any]:
    """Load ``model_path`` into a Relax VM and compare it with ``graph.run`` (:func:`graphpress.backends.check.check_against_graph`)."""
    return check_against_graph(graph, TVMRunner(model_path), "tvm", seeds)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class TVMBackend:
    """The ``"tvm"`` backend (see module docstring).

    Parameters
    ----------
    target : dict, optional
        A TVM target as a dict (``{"kind": "llvm", "mcpu": ...}``); default :func:`host_target`.
    check_seeds : sequence of int
        Seeds of the random input sets of the output check.
    """

    name = "tvm"
    Options = TVMOptions

    def __init__(
        self,
        target: dict[str, Any] | None = None,
        check_seeds: Sequence[int] = (0, 1),
        tuning_db: str | os.PathLike | None = None,
        tune_trials: int = 0,
        tune_per_task: int | None = None,
        tune_batch: int = 1,
        tune_progress: Callable[[dict[str, Any]], None] | None = None,
    ):
        if target is not None and (not isinstance(target, dict) or "kind" not in target):
            raise BackendError(f"tvm: target must be a dict with a 'kind' (e.g. {{'kind': 'llvm'}}), got {target!r}")
        if target is not None and target["kind"] not in ("llvm", "cuda"):
            raise BackendError(f"tvm: target kind {target['kind']!r} is not supported; use 'llvm' (CPU) or 'cuda'")
        if target is not None and target["kind"] == "cuda" and (tuning_db is not None or tune_trials):
            raise BackendError("tvm: tuning is supported for llvm targets only; drop tune_trials / tuning_db for a cuda target")
        self.target = dict(target) if target is not None else None
        self.check_seeds = tuple(check_seeds)
        self.tuning_db = None
        if tuning_db is not None:
            db = Path(tuning_db)
            if db.is_dir() and not has_database(db) and has_database(db / TUNING_DIR):
                db = db / TUNING_DIR  # an artifact folder: its tuning/ database
            if not has_database(db):
                raise BackendError(f"tvm: tuning_db {tuning_db}: no MetaSchedule database there ({', '.join(DB_FILES)}); pass a tuned artifact or its tuning/ folder")
            self.tuning_db = db
        if int(tune_trials) < 0:
            raise BackendError(f"tvm: tune_trials must be >= 0, got {tune_trials}")
        self.tune_trials = int(tune_trials)
        self.tune_per_task = tune_per_task
        self.tune_batch = int(tune_batch)
        self.tune_progress = tune_progress
        self.options = TVMOptions(
            target=self.target,
            check_seeds=self.check_seeds,
            tuning_db=None if tuning_db is None else str(tuning_db),
            tune_trials=self.tune_trials,
            tune_per_task=tune_per_task,
            tune_batch=self.tune_batch,
        )

    def lower(self, graph: Graph, folder: Path, *, check: bool = True) -> LoweredModel:
        """Compile ``graph`` into ``folder/model.so`` (+ ``model.json``) and, with ``check``, verify it."""
        tvm = require_tvm()
        from tvm.relax.frontend.torch import from_exported_program

        try:  # graphpress ops -> ATen ops and dense constants; the check still compares with `graph`
            source, expanded_ops = expand_graphpress_ops(graph)
        except ExpansionError as err:
            raise BackendError(f"tvm: {graph.name!r}: {err}") from err
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = self.target or host_target()
        info: dict[str, Any] = {"target": target, "tvm_version": tvm.__version__, "tuned": False, "expanded_ops": expanded_ops}
        t0 = time.perf_counter()
        try:
            program = source.export_program()
        except Exception as err:
            raise BackendError(f"tvm: torch.export of {graph.name!r} failed: {_first_line(err)}") from err
        try:
            with RegionRecorder() as recorder:  # which Relax bindings each fuse-blocks region emitted (regions.py)
                mod = from_exported_program(program)
            mod, info["fixups"] = apply_fixups(mod)  # exact repairs of importer gaps (fixups.py)
        except Exception as err:
            raise BackendError(f"tvm: Relax import of {graph.name!r} failed: {_first_line(err)}") from err
        info["import_s"] = round(time.perf_counter() - t0, 3)
        mod, info["regions"], info["kernels"] = group_regions(mod, recorder, target)  # each region -> one TIR kernel
        # The export's batch bound (65536) would make TVM's static memory planner reserve buffers
        # for that batch (BERT with a dynamic sequence: bad_alloc); without it buffers are sized per call.
        if mod["main"].attrs is not None and "tir_var_upper_bound" in mod["main"].attrs:
            mod["main"] = mod["main"].without_attr("tir_var_upper_bound")
        save_module(mod, folder / RELAX_FILE)  # what tuning and later rebuilds start from, without torch
        meta = {
            "inputs": list(graph.input_names), "outputs": list(graph.output_names), "target": target, "tvm_version": tvm.__version__,
            "example_shapes": [list(x.shape) for x in graph.example_inputs],
            "input_dims": [[d if isinstance(d, str) else None for d in spec.shape] for spec in graph.input_specs],
            "input_dtypes": [str(x.dtype).removeprefix("torch.") for x in graph.example_inputs],
            "input_int_ranges": [None if x.dtype.is_floating_point or x.dtype == torch.bool else [int(x.min()), int(x.max())] for x in graph.example_inputs],
        }
        path = folder / MODEL_FILE
        extra: list[tuple[str, tuple[Any, ...]]] = []
        if self.tuning_db is not None:  # reuse a tuning database: tuned kernels without tuning
            shapes = tuning_shapes(meta, self.tune_batch)
            shutil.copytree(self.tuning_db, folder / TUNING_DIR, dirs_exist_ok=True)
            info.update(compile_library(with_static_copy(mod, shapes), target, path, db_dir=folder / TUNING_DIR))
            meta["static_shapes"] = shapes
            info["tuning_db"] = {"reused": str(self.tuning_db), "shapes": shapes}
            info["tuned"] = True
            extra.append((f"random inputs at the tuned shapes {shapes}", graph.random_inputs(7, batch=shapes[0][0])))
        else:
            info.update(compile_library(mod, target, path))
        _write_json(folder / META_FILE, meta)
        info["model_bytes"] = path.stat().st_size
        if check and target["kind"] == "cuda" and not (tvm.runtime.enabled("cuda") and tvm.cuda(0).exist):
            # Build-only: the CUDA code was generated and compiled, but nothing here can run it.
            report = {"skipped": True, "reason": "no CUDA device on this machine: build only (the kernels are in info['cuda'])"}
        elif check:
            report = check_against_graph(graph, TVMRunner(path), "tvm", self.check_seeds, extra)
        else:
            report = {"skipped": True}
        files = [MODEL_FILE, META_FILE, RELAX_FILE]
        if self.tune_trials > 0:
            info["tuning"] = tune_folder(folder, self.tune_trials, per_task=self.tune_per_task, batch=self.tune_batch, progress=self.tune_progress)
            info["tuned"] = True
        if (folder / TUNING_DIR).is_dir():
            files += [f"{TUNING_DIR}/{name}" for name in DB_FILES]
        return LoweredModel(backend=self.name, model_file=MODEL_FILE, files=files, check=report, info=info)

    def runner(self, model_path: Path, threads: int | None = None) -> TVMRunner:
        """A :class:`TVMRunner` for a lowered model."""
        return TVMRunner(model_path, threads=threads)

    def __repr__(self) -> str:
        return f"TVMBackend(target={self.target or 'host'})"


__all__ = ["MODEL_FILE", "TVMBackend", "check_library", "host_target"]
