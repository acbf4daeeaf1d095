"""Options of the ``tvm`` backend (torch- and tvm-free: validated before any work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TVMOptions:
    """``get_backend("tvm", **options)`` / ``--backend-option key=value``.

    Attributes
    ----------
    version : int
        Options format version (1).
    target : dict, optional
        A TVM target as a dict (``{"kind": "llvm", "mcpu": ...}`` or ``{"kind": "cuda"}``);
        default: the host CPU.
    check_seeds : tuple of int
        Seeds of the random input sets of the output check.
    tuning_db : str, optional
        A tuned artifact folder (or its ``tuning/`` folder) whose MetaSchedule database the
        build reuses (``--tvm-db``).
    tune_trials : int
        Tune with MetaSchedule for this many trials before writing the artifact (``--tvm-tune``;
        0: no tuning).
    tune_per_task : int, optional
        At most this many trials per kernel.
    tune_batch : int
        The batch size tuned for.
    """

    version: int = 1
    # typed Any: TVMBackend checks the dict itself and its message shows a valid target
    target: Any = None
    check_seeds: tuple[int, ...] = (0, 1)
    tuning_db: str | None = None
    tune_trials: int = 0
    tune_per_task: int | None = None
    tune_batch: int = 1


__all__ = ["TVMOptions"]
