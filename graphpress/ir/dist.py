"""Data-parallel helpers over ``torch.distributed``, no-ops in a single process.

A pass that gathers statistics over calibration batches (a layer's ``H = X^T X``) sums them over
the ranks with :func:`all_reduce_sum`; a pass that solves one problem per layer lets the layer's
:func:`owner` solve it and :func:`share` the result with the others. Every rank then holds the
same weights, so the next unit is calibrated on activations of the same compressed model. Outside
an initialized process group (one rank) every helper returns its input untouched: passes call them
unconditionally.

The process group's own timeout (``init_process_group(timeout=...)``) bounds every collective, so
a rank that dies makes the others fail instead of waiting forever.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place; returns it."""
    _, size = world()
    if size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def owner(index: int) -> int:
    """The rank that solves item ``index`` of a list every rank walks in the same order."""
    return index % world()[1]


def share(index: int, solve: Callable[[], tuple[torch.Tensor, Any]], like: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Item ``index``'s ``(tensor, info)``: computed by :func:`owner` (``solve()``), sent to every
    other rank (``like`` gives the tensor's shape and dtype there; ``info`` must pickle)."""
    rank, size = world()
    if size == 1:
        return solve()
    import torch.distributed as dist

    src = owner(index)
    if rank == src:
        tensor, info = solve()
        tensor = tensor.detach().contiguous()
    else:
        tensor, info = torch.empty_like(like, memory_format=torch.contiguous_format), None
    dist.broadcast(tensor, src=src)
    box = [info]
    dist.broadcast_object_list(box, src=src)
    return tensor, box[0]


def barrier() -> None:
    """Wait for every rank (a no-op on one)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["all_reduce_sum", "barrier", "owner", "share", "world"]
