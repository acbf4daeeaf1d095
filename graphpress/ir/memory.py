"""Process memory: what is resident, and handing freed memory back to the system.

A pipeline frees large tensors at known points (a pass's temporaries when it returns, the
weights a verified pass replaced). glibc's allocator keeps much of that memory in its heaps for
reuse -- 120+ MB after one int8 pass on a 100M-parameter Llama -- so the process's resident
size, and with it the peak, keeps growing from pass to pass. :func:`trim` asks the allocator to
return it (``malloc_trim``); off glibc it does nothing. (Fixing glibc's mmap threshold at 1 MiB
instead, so that weight-sized temporaries never enter the heap, lowered the peak of
``benchmarks/pipeline_memory.py`` by 50 MB but made the quantization pass 2.7x slower: every
large temporary then costs fresh page faults.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=None)
def _libc_fn(symbol: str, argtypes: tuple):
    name = ctypes.util.find_library("c")
    try:
        fn = getattr(ctypes.CDLL(name), symbol) if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if fn is not None:
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


def _malloc_trim():
    return _libc_fn("malloc_trim", (ctypes.c_size_t,))


def trim() -> bool:
    """Return the allocator's free memory to the system; True when that could be asked."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def rss_bytes(key: str = "VmRSS") -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``: resident now, ``VmHWM``: the process's
    peak) in bytes; None where the file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_mb(key: str = "VmRSS") -> float | None:
    """:func:`rss_bytes` in MB (2**20 bytes), to one decimal; None where it is unknown."""
    n = rss_bytes(key)
    return None if n is None else round(n / 2**20, 1)


def reset_peak() -> None:
    """Restart the kernel's count of the process's peak (``VmHWM``), so that a later reading is
    the peak of what came after; where that cannot be done, it stays the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


__all__ = ["reset_peak", "rss_bytes", "rss_mb", "trim"]
