"""The nonlinear segments on secret shares: SecretFlow SPU, Cheetah protocol, two parties.

Each :class:`~.program.Segment` is traced once with ``jax.numpy`` (64-bit integers) and compiled
by SPU; both parties compile the same function and run it over SPU's own link (brpc over
loopback). The shares we hold are SPU's own representation: an arithmetic share of Cheetah
over the ring ``Z_2^64`` (``cheetah.AShr<FM64>``) is one ``uint64`` per element and party, so a
party hands its local array to SPU as its share of a secret and reads its share of each output
back -- no re-sharing round. The HE outputs enter as ``(a, R)`` with ``a + R = Y + off`` in
``[0, 2t)`` (unwrapped inside by one comparison); the server's multipliers enter as ``(0, M)``.

Only SPU's integer operations are used (add, multiply, compare, select, max, floor division by
a power of two on non-negative values): they are exact, so the protocol reproduces the numpy
fixed-point simulation bit for bit (checked by the tests). SPU needs numpy < 2 and jax <= 0.4.34:
this module runs only in the party processes, in their own virtual environment
(:mod:`.launch`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from graphpress.backends.he.secure.program import Segment, SecureProgram, segment_function
from graphpress.errors import BackendError


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b7, v = v & 0x7F, v >> 7
        out.append(b7 | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _chunk_content(chunk: bytes) -> bytes:
    """The ``content`` bytes (field 3) of an SPU ``ValueChunkProto``."""
    pos, out = 0, b""
    while pos < len(chunk):
        key = chunk[pos]
        pos += 1
        val = shift = 0
        while True:
            byte = chunk[pos]
            pos += 1
            val |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if key & 7 == 2:  # length-delimited: val is the length
            if key >> 3 == 3:
                out = chunk[pos : pos + val]
            pos += val
    return out


class SPUParty:
    """One party's SPU runtime and the compiled segments."""

    def __init__(self, rank: int, addresses: list[str], program: SecureProgram, segments: list[Segment], timeout_s: float):
        import jax

        jax.config.update("jax_enable_x64", True)
        import spu
        import spu.utils.frontend as fe
        from spu.libspu import link

        self.spu, self.rank = spu, rank
        desc = link.Desc()
        desc.id = "graphpress-secure"
        for name, addr in zip(("client", "server"), addresses):
            desc.add_party(name, addr)
        desc.recv_timeout_ms = int(timeout_s * 1000)
        desc.connect_retry_times = 60
        desc.connect_retry_interval_ms = 500
        t0 = time.perf_counter()
        try:
            self.link = link.create_brpc(desc, rank)
        except RuntimeError as err:
            raise BackendError(f"he secure: SPU link to the other party failed ({str(err).splitlines()[0][:160]})") from None
        self.config = spu.RuntimeConfig(protocol=spu.ProtocolKind.CHEETAH, field=spu.FieldType.FM64)
        self.runtime = spu.Runtime(self.link, self.config)
        self.io = spu.Io(2, self.config)
        self.link_s = time.perf_counter() - t0
        self.executables: dict[int, Any] = {}
        self._templates: dict[tuple[int, ...], bytes] = {}
        t0 = time.perf_counter()
        for seg in segments:
            f = segment_function(seg, program, jax.numpy)
            args = []
            for name, source in seg.inputs:
                zeros = np.zeros(self._shape(program, name, source), dtype=np.int64)
                args.extend([zeros] * (4 if source.startswith("split:") else 1))
            names = [f"s{seg.index}_in{i}" for i in range(len(args))]
            outs = [f"s{seg.index}_out{i}" for i in range(len(seg.outputs))]
            ex, _ = fe.compile(fe.Kind.JAX, f, args, {}, names, [spu.Visibility.VIS_SECRET] * len(args), lambda _o, outs=outs: outs)
            self.executables[seg.index] = (ex, names, outs)
        self.compile_s = time.perf_counter() - t0
        self._value_shapes = program.shapes

    @staticmethod
    def _shape(program: SecureProgram, name: str, source: str) -> tuple[int, ...]:
        if source.startswith("const:"):
            return tuple(program.const_shapes[source[6:]])
        return tuple(program.shapes[name])

    def _meta(self, shape: tuple[int, ...]) -> bytes:
        if shape not in self._templates:
            self._templates[shape] = self.io.make_shares(np.zeros(shape, dtype=np.int64), self.spu.Visibility.VIS_SECRET, -1)[self.rank].meta
        return self._templates[shape]

    def share(self, values: np.ndarray) -> Any:
        """This party's ``uint64`` array as its arithmetic share of a secret."""
        arr = np.ascontiguousarray(np.asarray(values).astype(np.int64).astype(np.uint64))
        raw = arr.tobytes()
        s = self.spu.libspu.Share()
        s.meta = self._meta(tuple(arr.shape))
        s.share_chunks = [b"\x08" + _varint(len(raw)) + b"\x1a" + _varint(len(raw)) + raw]
        return s

    def run(self, seg: Segment, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run a segment on this party's input shares (a ``split`` input as its four arrays,
        :func:`~.program.split_share`); returns its output shares (uint64)."""
        ex, names, outs = self.executables[seg.index]
        for name, value in zip(names, inputs):
            self.runtime.set_var(name, self.share(value))
        try:
            self.runtime.run(ex)
        except RuntimeError as err:
            raise BackendError(f"he secure: SPU segment {seg.index} failed ({str(err).strip().splitlines()[0][:160]})") from None
        result = []
        for name, value_name in zip(outs, seg.outputs):
            sh = self.runtime.get_var(name)
            if b"AShr" not in sh.meta:
                raise BackendError(f"he secure: SPU segment {seg.index} returned {value_name!r} as a non-arithmetic share")
            raw = b"".join(_chunk_content(c) for c in sh.share_chunks)
            shape = tuple(self._value_shapes[value_name])
            count = int(np.prod(shape)) if shape else 1
            if len(raw) != 8 * count:
                raise BackendError(f"he secure: SPU segment {seg.index}: {value_name!r} has {len(raw)} bytes, expected {8 * count}")
            result.append(np.frombuffer(raw, dtype="<u8").reshape(shape).copy())
            self.runtime.del_var(name)
        for name in names:
            self.runtime.del_var(name)
        return result

    def close(self) -> None:
        try:
            self.link.stop_link()
        except Exception:  # noqa: BLE001 -- best effort at shutdown
            pass


__all__ = ["SPUParty"]
