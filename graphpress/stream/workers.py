"""Local ranks for a streamed run: ``StreamOptions(workers=N)`` / ``compress run --workers N``.

The parent process starts ``N`` processes (``spawn``), each joins a ``gloo`` process group
(file rendezvous in a temporary folder, the run's collective timeout) and runs
:func:`graphpress.stream.engine.run_rank`. Rank 0 sends each unit's record back for the
progress line and writes the artifact; the parent returns its result. A rank that raises or
dies ends the run: the others are stopped and the error is one line naming the rank. The same
code runs under ``torchrun`` (the launcher's process group is used and nothing is spawned).
"""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from graphpress.errors import GraphpressError


def spawn(folder, recipe, out: Path, *, options, calibration, overwrite: bool, on_unit) -> Any:
    """Run the streamed compression on ``options.workers`` local ranks; rank 0's result."""
    import torch.multiprocessing as mp

    from graphpress.runtime.artifact import read_artifact
    from graphpress.stream.engine import StreamResult, UnitRecord

    size = options.workers
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="graphpress-ranks-") as rendezvous:
        init = Path(rendezvous) / "init"
        procs = mp.start_processes(
            _rank_main,
            args=(size, str(init), events, str(folder), recipe, str(out), options, calibration, overwrite),
            nprocs=size,
            join=False,
            start_method="spawn",
        )
        try:
            while not procs.join(timeout=0.5):
                _drain(events, on_unit)
        except mp.ProcessRaisedException as err:
            raise GraphpressError(f"streamed run failed on rank {err.error_index}: {_last_line(str(err))}") from None
        except mp.ProcessExitedException as err:
            raise GraphpressError(f"streamed run failed: rank {err.error_index} died (exit code {err.exit_code}); the other ranks were stopped") from None
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
        _drain(events, on_unit)
    manifest = read_artifact(out).manifest
    units = [UnitRecord(**{k: v for k, v in u.items()}) for u in manifest["stream"]["units"]]
    return StreamResult(out, manifest, units)


def under_launcher(folder, recipe, out: Path, *, options, calibration, overwrite: bool, on_unit) -> Any:
    """The run on this rank of a ``torchrun`` job (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` in
    the environment): joins the job's process group for the run; rank 0's result, None elsewhere."""
    import torch.distributed as dist

    from graphpress.stream.engine import run_rank

    backend = "nccl" if torch.cuda.is_available() and os.environ.get("GRAPHPRESS_DIST_BACKEND") == "nccl" else "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=options.collective_timeout_s))
    try:
        return run_rank(folder, recipe, out, options=options, calibration=calibration, overwrite=overwrite,
                        on_unit=on_unit if dist.get_rank() == 0 else None)
    finally:
        dist.destroy_process_group()


def _drain(events, on_unit) -> None:
    while True:
        try:
            done, total, record = events.get_nowait()
        except queue_mod.Empty:
            return
        if on_unit is not None:
            on_unit(done, total, record)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else "unknown error"


def _rank_main(rank: int, size: int, init: str, events, folder: str, recipe, out: str, options, calibration, overwrite: bool) -> None:
    import torch.distributed as dist

    from graphpress.stream.engine import run_rank

    # the machine's cores shared between the ranks (each would otherwise start one thread per core)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=options.collective_timeout_s))
    try:
        run_rank(folder, recipe, Path(out), options=options, calibration=calibration, overwrite=overwrite,
                 on_unit=(lambda done, total, record: events.put((done, total, record))) if rank == 0 else None)
    finally:
        dist.destroy_process_group()


__all__ = ["spawn", "under_launcher"]
