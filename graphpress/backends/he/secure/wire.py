"""The parties' channel: framed, typed, numbered messages over one TCP socket, every byte counted.

Frame: ``b"GPS1"``, message type (1 byte), sequence number (4 bytes, per direction, from 0),
payload length (8 bytes), payload. The receiver names the message it expects; a different
type, a sequence number other than the next one (a replayed, dropped or reordered message), a
bad magic, an oversized payload, a closed connection or a silent peer (``timeout`` seconds) is
a one-line :class:`~graphpress.errors.BackendError` naming the message -- never a hang.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import numpy as np

from graphpress.errors import BackendError

MAGIC = b"GPS1"
_FRAME = struct.Struct("<4sBIQ")
MAX_PAYLOAD = 1 << 31

TYPES = {
    "hello": 1,
    "keys": 2,
    "cts_in": 3,
    "cts_out": 4,
    "share": 5,
    "reveal": 6,
    "error": 7,
    "done": 8,
    "ready": 9,
}
_NAMES = {v: k for k, v in TYPES.items()}


class Channel:
    """One party's end of the connection.

    Attributes
    ----------
    sent, received : int
        Bytes on the wire (frames included), each way.
    messages_sent, messages_received : int
    """

    def __init__(self, sock: socket.socket, timeout: float, peer: str):
        self.sock = sock
        self.sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
        self.peer = peer
        self.sent = self.received = 0
        self.messages_sent = self.messages_received = 0
        self._seq_out = self._seq_in = 0
        self.wait_s = 0.0

    # ------------------------------------------------------------------ connect
    @classmethod
    def listen(cls, port: int, timeout: float, peer: str = "client") -> "Channel":
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(1)
        srv.settimeout(timeout)
        try:
            sock, _ = srv.accept()
        except socket.timeout:
            raise BackendError(f"he secure: no {peer} connected to port {port} within {timeout:.0f} s") from None
        finally:
            srv.close()
        return cls(sock, timeout, peer)

    @classmethod
    def connect(cls, port: int, timeout: float, peer: str = "server") -> "Channel":
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                return cls(sock, timeout, peer)
            except OSError as err:
                if time.monotonic() > deadline:
                    raise BackendError(f"he secure: cannot reach the {peer} on port {port} ({err})") from None
                time.sleep(0.05)

    # ------------------------------------------------------------------ messages
    def send(self, kind: str, payload: bytes) -> None:
        frame = _FRAME.pack(MAGIC, TYPES[kind], self._seq_out, len(payload))
        try:
            self.sock.sendall(frame + payload)
        except OSError as err:
            raise BackendError(f"he secure: sending {kind!r} #{self._seq_out} to the {self.peer} failed ({err})") from None
        self._seq_out += 1
        self.sent += len(frame) + len(payload)
        self.messages_sent += 1

    def _read(self, n: int, what: str) -> bytes:
        chunks, got = [], 0
        while got < n:
            try:
                chunk = self.sock.recv(min(n - got, 1 << 20))
            except socket.timeout:
                raise BackendError(f"he secure: the {self.peer} sent nothing for {self.sock.gettimeout():.0f} s while {what} was expected") from None
            except OSError as err:
                raise BackendError(f"he secure: receiving {what} from the {self.peer} failed ({err})") from None
            if not chunk:
                raise BackendError(f"he secure: the {self.peer} disconnected while {what} was expected")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def recv(self, kind: str) -> bytes:
        what = f"message {kind!r} #{self._seq_in}"
        t0 = time.perf_counter()
        magic, typ, seq, length = _FRAME.unpack(self._read(_FRAME.size, what))
        if magic != MAGIC:
            raise BackendError(f"he secure: malformed frame from the {self.peer} while {what} was expected (bad magic)")
        if length > MAX_PAYLOAD:
            raise BackendError(f"he secure: {what} from the {self.peer} announces {length} bytes, more than {MAX_PAYLOAD}")
        payload = self._read(length, what)
        self.wait_s += time.perf_counter() - t0
        self.received += _FRAME.size + length
        self.messages_received += 1
        if typ == TYPES["error"] and kind != "error":
            raise BackendError(f"he secure: the {self.peer} failed: {payload.decode('utf-8', 'replace')}")
        if typ != TYPES[kind]:
            raise BackendError(f"he secure: expected {what}, the {self.peer} sent {_NAMES.get(typ, typ)!r} (malformed or out-of-order message)")
        if seq != self._seq_in:
            raise BackendError(f"he secure: {kind!r} message numbered {seq}, expected #{self._seq_in} (replayed or reordered message)")
        self._seq_in += 1
        return payload

    def stats(self) -> dict[str, Any]:
        return {"bytes_sent": self.sent, "bytes_received": self.received, "messages_sent": self.messages_sent, "messages_received": self.messages_received}

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # pragma: no cover
            pass


# ---------------------------------------------------------------------------- payload helpers
def pack_blobs(blobs: list[bytes]) -> bytes:
    head = np.array([len(blobs), *map(len, blobs)], dtype="<u8").tobytes()
    return head + b"".join(blobs)


def unpack_blobs(payload: bytes, what: str) -> list[bytes]:
    if len(payload) < 8:
        raise BackendError(f"he secure: {what}: truncated message")
    n = int(np.frombuffer(payload[:8], dtype="<u8")[0])
    if n > 1 << 20 or len(payload) < 8 * (n + 1):
        raise BackendError(f"he secure: {what}: malformed message ({n} parts)")
    sizes = np.frombuffer(payload[8 : 8 * (n + 1)], dtype="<u8").astype(np.int64)
    if 8 * (n + 1) + int(sizes.sum()) != len(payload):
        raise BackendError(f"he secure: {what}: malformed message (sizes do not add up)")
    out, pos = [], 8 * (n + 1)
    for s in sizes:
        out.append(payload[pos : pos + int(s)])
        pos += int(s)
    return out


def pack_array(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a, dtype="<u8").tobytes()


def unpack_array(payload: bytes, count: int, what: str) -> np.ndarray:
    if len(payload) != 8 * count:
        raise BackendError(f"he secure: {what}: expected {count} values, got {len(payload) / 8:g}")
    return np.frombuffer(payload, dtype="<u8").copy()


__all__ = ["Channel", "MAGIC", "TYPES", "pack_array", "pack_blobs", "unpack_array", "unpack_blobs"]
