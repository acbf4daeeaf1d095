"""Torch-free build steps of the ``tvm`` backend, shared by the lowering and the tuning worker.

The lowering (in the user's process, with torch) imports the graph into a Relax module and
stores it as ``model.relax.json`` (weights inside, base64). Everything after that -- tuning,
applying a tuning database, compiling -- only needs that file, so it also runs in the torch-free
tuning subprocess (:mod:`graphpress.backends.tvm.tune_worker`).

Static shapes. MetaSchedule tunes kernels of fixed shape, but the imported ``main`` keeps the
batch (and a sequence length) symbolic. A tuned library therefore holds two functions:

* ``main``: the symbolic-shape function, TVM's default (untuned) schedules; any batch;
* ``main_static``: a copy of ``main`` with every symbolic dim bound to the tuned shapes
  (:func:`with_static_copy`), its kernels scheduled from the tuning database.

:class:`graphpress.backends.tvm.runner.TVMRunner` calls ``main_static`` when the inputs have
exactly the tuned shapes and ``main`` otherwise, so tuning never takes a capability away.

Applying a database: the module is legalized and fused (TVM's zero pipeline: LegalizeOps,
AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR), then ``MetaScheduleApplyDatabase``
replaces each kernel the database holds a record for (matched by the kernel's structure, so a
database tuned on one build is reused by the next build of the same model), then ``tvm.compile``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphpress.errors import BackendError

RELAX_FILE = "model.relax.json"
TUNING_DIR = "tuning"
STATIC_FN = "main_static"
DB_FILES = ("database_workload.json", "database_tuning_record.json")


def _tvm() -> Any:
    from graphpress.backends.tvm.runner import require_tvm

    return require_tvm()


def save_module(mod: Any, path: Path) -> None:
    """Write a Relax IRModule as TVM JSON (temporary file, then rename)."""
    tvm = _tvm()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tvm.ir.save_json(mod))
    os.replace(tmp, path)


def load_module(path: Path) -> Any:
    """Read a Relax IRModule written by :func:`save_module`."""
    tvm = _tvm()
    try:
        return tvm.ir.load_json(Path(path).read_text())
    except (OSError, ValueError, RuntimeError) as err:
        raise BackendError(f"{path}: cannot read the Relax module ({str(err).strip().splitlines()[0]}); re-export the artifact") from err


def has_database(db_dir: Path | None) -> bool:
    """Whether ``db_dir`` holds a MetaSchedule JSON database."""
    return db_dir is not None and all((Path(db_dir) / f).is_file() for f in DB_FILES)


def symbolic_bindings(func: Any, shapes: Sequence[Sequence[int]]) -> dict[Any, int]:
    """Map each symbolic dim of ``func``'s tensor parameters to its value in ``shapes``.

    Raises
    ------
    BackendError
        When the number of inputs or a rank differs, a static dim differs, or one symbolic dim
        would get two values.
    """
    tvm = _tvm()
    params = list(func.params)
    if len(params) != len(shapes):
        raise BackendError(f"tvm: the model takes {len(params)} inputs but {len(shapes)} tuning shapes were given")
    out: dict[Any, int] = {}
    for i, (param, shape) in enumerate(zip(params, shapes)):
        dims = list(param.ty.shape)
        if len(dims) != len(shape):
            raise BackendError(f"tvm: input {i} has rank {len(dims)} but the tuning shape {list(shape)} has rank {len(shape)}")
        for d, (dim, value) in enumerate(zip(dims, shape)):
            value = int(value)
            if isinstance(dim, tvm.tirx.Var):
                if out.get(dim, value) != value:
                    raise BackendError(f"tvm: symbolic dim {dim} of input {i} gets two values ({out[dim]} and {value}) in the tuning shapes")
                out[dim] = value
            elif int(dim) != value:
                raise BackendError(f"tvm: input {i} dim {d} is fixed at {int(dim)}, the tuning shape says {value}")
    return out


def static_module(mod: Any, shapes: Sequence[Sequence[int]]) -> Any:
    """A module whose ``main`` is ``mod["main"]`` with the symbolic dims bound to ``shapes`` (what is tuned)."""
    tvm = _tvm()
    main = mod["main"]
    bound = main.bind_symbolic_vars(symbolic_bindings(main, shapes))
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    return tvm.IRModule({"main": bound, **funcs}, attrs=mod.attrs, global_infos=mod.global_infos)


def with_static_copy(mod: Any, shapes: Sequence[Sequence[int]]) -> Any:
    """``mod`` plus :data:`STATIC_FN`: ``main`` with the symbolic dims bound to ``shapes``."""
    main = mod["main"]
    bound = main.bind_symbolic_vars(symbolic_bindings(main, shapes)).with_attr("global_symbol", STATIC_FN)
    tvm = _tvm()
    return tvm.IRModule({**{gv.name_hint: f for gv, f in mod.functions.items()}, STATIC_FN: bound}, attrs=mod.attrs, global_infos=mod.global_infos)


def legalize_and_fuse(mod: Any, target: dict[str, Any]) -> Any:
    """TVM's zero pipeline (legalize, fold constants, fuse) under ``target``: the kernels that tuning sees."""
    tvm = _tvm()
    from tvm import relax

    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.get_pipeline("zero"),
        ])(mod)


def compile_library(mod: Any, target: dict[str, Any], path: Path, db_dir: Path | None = None) -> dict[str, Any]:
    """Compile ``mod`` for ``target`` into ``path`` (temporary file, then rename).

    With a database in ``db_dir`` the module is legalized and fused first and every kernel the
    database holds a record for gets its tuned schedule; the others keep TVM's default schedule.

    Returns
    -------
    dict
        ``build_s`` and, with a database, ``tuned_kernels`` / ``tir_kernels`` (how many of the
        module's kernels got a tuned schedule).
    """
    tvm = _tvm()
    from tvm import relax

    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    # A GPU target needs a host for the VM's own code: this CPU.
    tgt = tvm.target.Target(target, host={"kind": "llvm"}) if target.get("kind") == "cuda" else tvm.target.Target(target)
    if has_database(db_dir):
        from tvm.s_tir import meta_schedule as ms

        mod = legalize_and_fuse(mod, target)
        with tgt, ms.database.JSONDatabase(work_dir=str(db_dir)):
            mod = relax.transform.MetaScheduleApplyDatabase(str(db_dir))(mod)
        kernels = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
        # The pass marks each kernel it scheduled from a record ("tirx.is_scheduled" in 0.27).
        info["tir_kernels"] = len(kernels)
        info["tuned_kernels"] = sum(1 for f in kernels if f.attrs is not None and any(str(k).endswith("is_scheduled") for k in dict(f.attrs)))
    try:
        executable = tvm.compile(mod, target=tgt)
    except Exception as err:
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise BackendError(f"tvm: build for {target} failed: {type(err).__name__}: {lines[-1] if lines else ''}") from err
    if target.get("kind") == "cuda":
        info["cuda"] = cuda_kernels(executable.mod)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.so")
    executable.export_library(str(tmp))
    os.replace(tmp, path)
    info["build_s"] = round(time.perf_counter() - t0, 3)
    return info


def cuda_kernels(module: Any) -> dict[str, Any]:
    """The CUDA kernels inside a built module: ``__global__`` count and source size (checks that a
    ``cuda`` build really produced device code, on a machine that cannot run it)."""
    found = {"kernels": 0, "source_chars": 0}
    stack = [module]
    while stack:
        m = stack.pop()
        if getattr(m, "kind", "") == "cuda":
            src = m.inspect_source("")
            found["kernels"] += src.count("__global__")
            found["source_chars"] += len(src)
        stack.extend(m.imports)
    return found


__all__ = [
    "cuda_kernels",
    "DB_FILES", "RELAX_FILE", "STATIC_FN", "TUNING_DIR", "compile_library", "has_database", "legalize_and_fuse",
    "load_module", "save_module", "static_module", "symbolic_bindings", "with_static_copy",
]
