"""The tuning subprocess: MetaSchedule on a stored Relax module, then the tuned build. No torch.

Run as ``python -m graphpress.backends.tvm.tune_worker REQUEST.json`` by
:func:`graphpress.backends.tvm.tune.tune_folder`, with a ``PYTHONPATH`` whose first entry holds a
``torch`` package that raises ``ImportError``: ``tvm_ffi`` imports torch whenever it can, and so do
MetaSchedule's builder and runner worker processes, each time one starts. With torch importable
here, worker start-up was slow enough that the builder's 30 s timeout failed most candidates.

The request (JSON) names ``relax`` (the stored module), ``db_dir`` (the MetaSchedule JSON
database: created or extended; its records seed the search, so a second run starts where the first
stopped), ``target`` (a dict), ``shapes`` (the static input shapes to tune), ``trials``,
``per_task`` (optional), ``out`` (the library to write) and ``log_dir``.

Progress goes to stdout as one JSON object per line, prefixed ``@@gp``:
``{"event": "tasks", "tasks": [...]}``, ``{"event": "progress", "done": k, "total": n, "task": name}``,
``{"event": "done", ...}`` or ``{"event": "error", "message": ...}``; everything TVM prints goes
to ``log_dir``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

PREFIX = "@@gp "


def emit(event: str, **fields: Any) -> None:
    """One progress line for the parent process."""
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Tune ``req["relax"]`` and write the tuned library; returns the summary emitted as ``done``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback.measure_callback import _PyMeasureCallback

    from graphpress.backends.tvm import build

    target = dict(req["target"])
    db_dir = Path(req["db_dir"])
    db_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(req["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    mod = build.load_module(Path(req["relax"]))
    shapes = [list(s) for s in req["shapes"]]
    tgt = tvm.target.Target(target)
    static = build.legalize_and_fuse(build.static_module(mod, shapes), target)
    tasks = ms.relax_integration.extract_tasks(static, tgt)
    names = [t.task_name for t in tasks]
    emit("tasks", tasks=names)
    trials = int(req["trials"])
    per_task = req.get("per_task")
    done = {"n": 0}
    t0 = time.perf_counter()

    def on_measured(task_scheduler, task_id, candidates, builder_results, runner_results):  # noqa: ANN001 -- TVM's callback signature
        done["n"] += len(candidates)
        msgs = [str(b.error_msg or r.error_msg).strip().splitlines() for b, r in zip(builder_results, runner_results) if b.error_msg or r.error_msg]
        done["failed"] = done.get("failed", 0) + len(msgs)
        if msgs and msgs[0]:
            done["last_error"] = msgs[0][0][:200]
        emit("progress", done=min(done["n"], trials), total=trials, task=names[task_id] if task_id < len(names) else str(task_id),
             errors=len(msgs), error=done.get("last_error") if msgs else None)

    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, work_dir=str(log_dir), seed=int(req.get("seed", 0)))
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    records_before = len(database)
    if trials > 0:
        ms.tune.tune_tasks(
            tasks=contexts,
            task_weights=weights,
            work_dir=str(log_dir),
            max_trials_global=trials,
            max_trials_per_task=int(per_task) if per_task else None,
            num_trials_per_iter=int(req.get("per_iter", 16)),
            database=database,
            # MetaSchedule's 30 s default failed whole batches on a loaded 2-core machine.
            builder=ms.builder.LocalBuilder(timeout_sec=float(req.get("builder_timeout_s", 120))),
            runner=ms.runner.LocalRunner(timeout_sec=float(req.get("runner_timeout_s", 60))),
            measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [_PyMeasureCallback(on_measured)],
        )
    tuning_s = time.perf_counter() - t0
    full = build.with_static_copy(mod, shapes)
    info = build.compile_library(full, target, Path(req["out"]), db_dir=db_dir)
    return {
        "tasks": names, "trials": trials, "trials_measured": done["n"], "trials_failed": done.get("failed", 0),
        "last_error": done.get("last_error"), "per_task": per_task,
        "tuning_s": round(tuning_s, 1), "records": len(ms.database.JSONDatabase(work_dir=str(db_dir))), "records_before": records_before,
        **info,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m graphpress.backends.tvm.tune_worker REQUEST.json\n")
        return 2
    try:
        req = json.loads(Path(argv[0]).read_text())
        emit("done", **run(req))
    except Exception as err:  # the parent turns this into one line naming the artifact
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        emit("error", message=f"{type(err).__name__}: {lines[-1] if lines else ''}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
