"""Operation counts and per-operation wall time of a BFV computation.

Every homomorphic operation a :class:`~graphpress.backends.he.bfv.BFVContext` performs goes
through its :class:`OpCounter`, which adds one to the matching :class:`OpCounts` field and adds
the operation's wall time (``time.perf_counter``) to ``seconds[(side, op)]`` and its CPU time
(``time.thread_time``: SEAL runs each operation in the calling thread) to
``cpu_seconds[(side, op)]`` -- the CPU time does not count the time slices another process takes
on a shared machine, so it is the steadier measure there. The side says who would run it in the
two-party protocol:

* ``client``: key generation, encoding inputs, encryption, decryption, decoding;
* ``server``: encoding weights (offline), plaintext products, additions, rotations, NTTs;
* ``comm``: serializing a ciphertext on one side and loading it on the other.

So the *server latency* of a layer is ``counter.side_seconds("server")`` over the layer's run
(minus the offline ``encode`` of weights, which happens in ``prepare``), and the bytes on the
wire are ``bytes_sent`` (client -> server) plus ``bytes_received`` (server -> client), measured
from the serialized ciphertexts.

:class:`OpCounts` is plain data: it adds, subtracts (``after - before`` of two
:meth:`OpCounter.snapshot` calls gives one layer's counts) and converts to a dict; the analytic
formulas of :mod:`graphpress.lowering.he.counts` return dicts with the same keys (except the bytes,
which depend on compression and are only measured).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

#: Who runs each operation (see module docstring).
SIDES = ("client", "server", "comm")


@dataclass
class OpCounts:
    """How many of each homomorphic operation ran, and the bytes sent each way.

    Attributes
    ----------
    plain_mults : plaintext-ciphertext products (server)
    ct_adds : ciphertext-ciphertext additions (server)
    plain_adds : plaintext-ciphertext additions, e.g. a bias (server)
    rotations : slot rotations (server); each is one key switch
    key_switches : key switches (rotations; relinearizations would count here too)
    ntts : forward plus inverse NTTs of ciphertexts (server; weights are NTT'd offline)
    encryptions, decryptions : client operations
    ciphertexts_sent : client -> server ciphertexts
    ciphertexts_received : server -> client ciphertexts
    bytes_sent, bytes_received : their serialized sizes
    """

    plain_mults: int = 0
    ct_adds: int = 0
    plain_adds: int = 0
    rotations: int = 0
    key_switches: int = 0
    ntts: int = 0
    encryptions: int = 0
    decryptions: int = 0
    ciphertexts_sent: int = 0
    ciphertexts_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def __add__(self, other: OpCounts) -> OpCounts:
        return OpCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: OpCounts) -> OpCounts:
        return OpCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def counts_only(self) -> dict[str, int]:
        """The fields an analytic formula predicts exactly (everything but the bytes)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("bytes_")}


class OpCounter:
    """Counts (:class:`OpCounts`) plus wall seconds and calls per ``(side, op)``.

    ``op`` names: ``keygen``, ``encode``, ``encrypt``, ``decrypt``, ``decode`` (client);
    ``encode``, ``mul_plain``, ``add``, ``add_plain``, ``rotate``, ``ntt``, ``intt``
    (server); ``serialize``, ``deserialize`` (comm).
    """

    def __init__(self) -> None:
        self.counts = OpCounts()
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.cpu_seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, field: str, n: int = 1) -> None:
        setattr(self.counts, field, getattr(self.counts, field) + n)

    @contextmanager
    def timed(self, side: str, op: str, *, count: str | None = None, n: int = 1) -> Iterator[None]:
        """Time the block as ``(side, op)`` and, when ``count`` names a field, add ``n`` to it."""
        c0, t0 = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.seconds[(side, op)] += time.perf_counter() - t0
            self.cpu_seconds[(side, op)] += time.thread_time() - c0
            self.calls[(side, op)] += 1
        if count is not None:
            self.add(count, n)

    def snapshot(self) -> OpCounts:
        """A copy of the counts now (subtract two snapshots for one layer's counts)."""
        return OpCounts(**self.counts.to_dict())

    def side_seconds(self, side: str, *, exclude: tuple[str, ...] = (), cpu: bool = False) -> float:
        """Total wall (or, with ``cpu``, thread CPU) seconds of ``side``'s operations, leaving out
        the ops named in ``exclude``."""
        table = self.cpu_seconds if cpu else self.seconds
        return sum(s for (sd, op), s in table.items() if sd == side and op not in exclude)

    def time_per_op(self) -> dict[str, dict[str, float]]:
        """``{"side/op": {"calls", "seconds", "cpu_seconds", "mean_us"}}`` for every operation that ran."""
        out = {}
        for key in sorted(self.seconds):
            calls = self.calls[key]
            out[f"{key[0]}/{key[1]}"] = {
                "calls": calls,
                "seconds": self.seconds[key],
                "cpu_seconds": self.cpu_seconds[key],
                "mean_us": 1e6 * self.seconds[key] / max(calls, 1),
            }
        return out

    def reset(self) -> None:
        self.counts = OpCounts()
        self.seconds.clear()
        self.cpu_seconds.clear()
        self.calls.clear()


__all__ = ["SIDES", "OpCounter", "OpCounts"]
