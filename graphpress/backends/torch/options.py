"""Options of the ``torch`` backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TorchOptions:
    """``get_backend("torch", **options)`` / ``--backend-option key=value``.

    Attributes
    ----------
    version : int
        Options format version (1).
    check_seeds : tuple of int
        Seeds of the random input sets of the output check.
    """

    version: int = 1
    check_seeds: tuple[int, ...] = (0, 1)


__all__ = ["TorchOptions"]
