"""MetaSchedule tuning of a lowered TVM model folder, in a torch-free subprocess.

``tune_folder(folder, trials=N)`` reads ``model.relax.json`` and ``model.json`` from a folder the
``tvm`` backend wrote, runs :mod:`graphpress.backends.tvm.tune_worker` in a subprocess that cannot
import torch, and leaves in the folder:

* ``tuning/database_workload.json``, ``tuning/database_tuning_record.json``: the MetaSchedule
  database. It is extended, never replaced: a second ``tune_folder`` starts from the best
  schedules found so far, and :class:`graphpress.backends.tvm.lower.TVMBackend` applies it when
  it builds the same model again (``tuning_db=``) without tuning;
* ``model.so``: rebuilt with ``main`` (any shape, default schedules) and ``main_static`` (the tuned
  shapes, tuned schedules);
* ``model.json``: gains ``static_shapes`` (the runner dispatches on them) and ``tuning``.

The backend tunes a folder and returns what it tuned (the summary); it never touches an artifact's
manifest or report: :func:`graphpress.runtime.tune.tune_artifact` copies an artifact's files to a
scratch folder, calls :func:`tune_folder` there and rewrites the artifact (the runtime sits above
the backends, so the backend does not import it).

The tuned library is checked against the untuned one on seeded random inputs of the tuned shapes
and, through ``main``, of another batch (fp32: rtol 1e-4, atol 1e-5 x max(1, max|ref|)). Tuning
changes schedules, not math; a mismatch is an error and the folder keeps its untuned library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphpress.backends.tvm.build import DB_FILES, RELAX_FILE, TUNING_DIR
from graphpress.backends.tvm.runner import META_FILE, TVMRunner
from graphpress.backends.tvm.tune_worker import PREFIX
from graphpress.errors import BackendError

Progress = Callable[[dict[str, Any]], None]

#: The files :func:`tune_folder` adds to a folder (besides rewriting ``model.so`` / ``model.json``):
#: the MetaSchedule database, which an artifact keeps to seed the next tuning run.
TUNING_FILES = tuple(f"{TUNING_DIR}/{name}" for name in DB_FILES)


def tuning_shapes(meta: dict[str, Any], batch: int = 1, dims: dict[str, int] | None = None) -> list[list[int]]:
    """The static input shapes to tune: the example shapes recorded at lowering, with the
    dynamic batch set to ``batch`` and other named dynamic dims set from ``dims``."""
    shapes = meta.get("example_shapes")
    specs = meta.get("input_dims")
    if not shapes or specs is None:
        raise BackendError(f"{META_FILE}: no example_shapes / input_dims recorded; re-export the artifact with this graphpress version")
    dims = dict(dims or {})
    out = []
    for shape, names in zip(shapes, specs):
        row = []
        for value, name in zip(shape, names):
            if name is None:
                row.append(int(value))
            elif name == "batch":
                row.append(int(dims.pop("batch", batch)))
            else:
                row.append(int(dims.pop(name, value)))
        out.append(row)
    if dims:
        known = sorted({n for names in specs for n in names if n})
        raise BackendError(f"tuning: unknown dim(s) {', '.join(dims)}; the model's dynamic dims are {', '.join(known) or 'none'}")
    return out


def _blocker(tmp: Path) -> Path:
    """A folder holding a ``torch`` package that refuses to import (put first on PYTHONPATH)."""
    pkg = tmp / "no_torch" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("torch is blocked in the graphpress TVM tuning worker")\n')
    return pkg.parent


def _compare(folder: Path, before: Path, shapes: Sequence[Sequence[int]], meta: dict[str, Any]) -> dict[str, Any]:
    new, old = TVMRunner(folder / "model.so"), TVMRunner(before)
    rng = np.random.default_rng(0)
    worst = 0.0
    other = [[s[0] + 2, *s[1:]] for s in shapes]  # a batch the static function does not take
    for case in (shapes, other):
        xs = []
        dtypes = meta.get("input_dtypes") or ["float32"] * len(shapes)
        ranges = meta.get("input_int_ranges") or [None] * len(shapes)
        for shape, dtype, span in zip(case, dtypes, ranges):
            if span is not None:  # token ids: stay inside the example's range (an embedding has no bounds check)
                xs.append(rng.integers(span[0], span[1] + 1, size=shape).astype(dtype))
            else:
                xs.append(rng.standard_normal(shape).astype(dtype))
        for a, b in zip(new(*xs), old(*xs)):
            err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
            atol = 1e-5 * max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
            if a.shape != b.shape or not np.allclose(a, b, rtol=1e-4, atol=atol):
                raise BackendError(f"tuning: the tuned library differs from the untuned one at shapes {case} (max abs {err:.3g}); kept the untuned library")
            worst = max(worst, err)
    return {"passed": True, "max_abs_vs_untuned": worst}


def tune_folder(
    folder: str | os.PathLike,
    trials: int,
    *,
    per_task: int | None = None,
    batch: int = 1,
    dims: dict[str, int] | None = None,
    progress: Progress | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Tune the TVM model in ``folder`` with MetaSchedule and rebuild it (see module docstring).

    Parameters
    ----------
    folder : path
        A folder written by the ``tvm`` backend (``model.so``, ``model.json``, ``model.relax.json``).
    trials : int
        Measured candidates in all (MetaSchedule's global budget); 0 rebuilds with the existing
        database only.
    per_task : int, optional
        Cap per kernel (default: the global budget spread by MetaSchedule's gradient scheduler).
    batch : int
        The batch to tune for (latency: 1).
    dims : dict, optional
        Values for other dynamic dims (e.g. ``{"seq": 128}``); default: the export's example.
    progress : callable, optional
        Called with each progress event (dicts with ``event`` = ``tasks`` / ``progress``).
    timeout_s : float, optional
        Kill the worker after this many seconds.

    Returns
    -------
    dict
        What ``model.json["tuning"]`` holds: tasks, trials, tuning seconds, records, tuned
        kernels, build seconds, shapes, check.
    """
    folder = Path(folder).resolve()  # the worker runs in a scratch folder
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise BackendError(f"{meta_path}: cannot read the TVM model's metadata ({err}); re-export the artifact") from err
    if not (folder / RELAX_FILE).is_file():
        raise BackendError(f"{folder / RELAX_FILE}: missing; the artifact was lowered before tuning support, re-export it")
    if meta.get("target", {}).get("kind") != "llvm":
        raise BackendError(f"{meta_path}: tuning supports llvm targets here, not {meta.get('target', {}).get('kind')!r}")
    if trials < 0:
        raise BackendError(f"tuning: trials must be >= 0, got {trials}")
    shapes = tuning_shapes(meta, batch, dims)
    with tempfile.TemporaryDirectory(prefix="gp-tune-") as tmp_name:
        tmp = Path(tmp_name)
        before = tmp / "untuned.so"
        shutil.copy2(folder / "model.so", before)
        out = tmp / "model.so"
        db_dir = tmp / TUNING_DIR  # a copy: the folder's database changes only when all went well
        if (folder / TUNING_DIR).is_dir():
            shutil.copytree(folder / TUNING_DIR, db_dir)
        req = {
            "relax": str(folder / RELAX_FILE), "db_dir": str(db_dir), "target": meta["target"],
            "shapes": shapes, "trials": int(trials), "per_task": per_task, "out": str(out), "log_dir": str(tmp / "logs"),
        }
        (tmp / "request.json").write_text(json.dumps(req))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_blocker(tmp)), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.setdefault("TVM_NUM_THREADS", str(meta["target"].get("num-cores", os.cpu_count() or 1)))
        cmd = [sys.executable, "-m", "graphpress.backends.tvm.tune_worker", str(tmp / "request.json")]
        summary: dict[str, Any] | None = None
        error = None
        with open(tmp / "worker.log", "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=tmp) as proc:
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    if not line.startswith(PREFIX):
                        log.write(line)
                        continue
                    event = json.loads(line[len(PREFIX):])
                    if event["event"] == "done":
                        summary = event
                    elif event["event"] == "error":
                        error = event["message"]
                    elif progress is not None:
                        progress(event)
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise BackendError(f"tuning {folder}: the worker ran past {timeout_s} s and was stopped; the folder is unchanged") from None
        if summary is None:
            tail = (tmp / "worker.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise BackendError(f"tuning {folder} failed: {error or tail[0]}")
        summary.pop("event")
        # Check the new library in the scratch folder before it replaces the old one; the runner
        # reads model.json next to a library, so each gets its own.
        (tmp / META_FILE).write_text(json.dumps(dict(meta, static_shapes=shapes), indent=2))
        (tmp / "old").mkdir()
        shutil.move(before, tmp / "old" / "model.so")
        shutil.copy2(meta_path, tmp / "old" / META_FILE)
        summary["check"] = _compare(tmp, tmp / "old" / "model.so", shapes, meta)
        summary["shapes"] = shapes
        (folder / TUNING_DIR).mkdir(exist_ok=True)
        for name in DB_FILES:
            shutil.copy2(db_dir / name, folder / TUNING_DIR / (name + ".tmp"))
            os.replace(folder / TUNING_DIR / (name + ".tmp"), folder / TUNING_DIR / name)
        tmp_so = folder / "model.so.tmp"
        shutil.copy2(out, tmp_so)
        os.replace(tmp_so, folder / "model.so")
        tmp_meta = folder / (META_FILE + ".tmp")
        tmp_meta.write_text(json.dumps(dict(meta, static_shapes=shapes, tuning=summary), indent=2))
        os.replace(tmp_meta, meta_path)
    return summary


def tuning_report(summary: dict[str, Any]) -> str:
    """The ``report.md`` section of a tuning run."""
    return "\n".join([
        "## TVM tuning (MetaSchedule)",
        "",
        f"* shapes tuned: {summary['shapes']} (other shapes run the untuned symbolic-shape function)",
        f"* trials: {summary['trials_measured']} measured of {summary['trials']} asked, over {len(summary['tasks'])} kernels; "
        f"{summary['tuning_s']} s; database records {summary['records_before']} -> {summary['records']}",
        f"* kernels with a tuned schedule: {summary.get('tuned_kernels')} of {summary.get('tir_kernels')} in the library",
        f"* check: tuned vs untuned library max abs {summary['check']['max_abs_vs_untuned']:.3g}",
    ])


__all__ = ["TUNING_FILES", "tune_folder", "tuning_report", "tuning_shapes"]
