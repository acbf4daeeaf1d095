"""Raw access to SEAL ciphertext and plaintext coefficients (what ``tenseal.sealapi`` does not expose).

The secure protocol needs three things SEAL's Python binding cannot do: add flooding noise to
``c0``, send only the coefficients of ``c0`` the client reads (Cheetah's response packing), and
let the client rebuild a ciphertext from those coefficients. Reading a whole plaintext is one
more: the binding reads one coefficient per Python call (~0.3-0.6 us), so past about ``N/8``
coefficients a serialization round trip (~0.4-0.5 ms at ``N = 4096-8192``) is cheaper. A SEAL ciphertext serialized with
``compr_mode = none`` is a 16-byte header, fixed members, then its ``2 x L x N`` coefficients
as little-endian ``uint64`` (polynomial, RNS limb, coefficient); SEAL's own ``save`` compresses
with zstd, so :func:`coeffs` decompresses (``zstandard``) and :func:`rebuild` writes an
uncompressed file that SEAL ``load`` validates (``is_valid_for``: every coefficient below its
prime, the parameters' id) like any other.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from graphpress.errors import BackendError

_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr_mode, reserved, total size


def _decompress(blob: bytes, what: str) -> bytes:
    """SEAL's members of a serialized object, uncompressed, after its 2-byte version."""
    magic, hsize, major, minor, mode, _, size = _HEADER.unpack_from(blob)
    if magic != _MAGIC or hsize != 16:
        raise BackendError(f"he: {what}: not a SEAL object (bad header)")
    return bytes([major, minor]) + _body(blob[16:size], mode)


def _body(body: bytes, mode: int) -> bytes:
    if mode == 0:
        return body
    if mode == 2:
        import zstandard

        return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 30)
    if mode == 1:
        import zlib

        return zlib.decompress(body)
    raise BackendError(f"he: unknown SEAL compression mode {mode}")


def save_bytes(obj: Any, path: str) -> bytes:
    """SEAL's serialization of ``obj`` (through a file in ``path``: the binding saves to files only)."""
    obj.save(path)
    with open(path, "rb") as f:
        return f.read()


def load_bytes(obj: Any, context: Any, blob: bytes, path: str, what: str) -> Any:
    """Load ``blob`` into ``obj``; a malformed blob is a one-line error naming ``what``."""
    with open(path, "wb") as f:
        f.write(blob)
    try:
        obj.load(context, path)
    except (RuntimeError, ValueError) as err:
        raise BackendError(f"he secure: {what}: malformed SEAL object ({str(err).splitlines()[0][:120]})") from None
    return obj


def coeffs(ct: Any, path: str) -> tuple[bytes, np.ndarray]:
    """``(SEAL version + members before the data, coefficients (2, L, N) uint64)`` of a size-2
    ciphertext (the version differs between tenseal builds: 0.3.16 and 0.3.18 carry other SEALs)."""
    raw = _decompress(save_bytes(ct, path), "ciphertext")
    n, limbs = int(ct.poly_modulus_degree()), int(ct.coeff_modulus_size())
    count = 2 * limbs * n
    if int(ct.size()) != 2 or len(raw) < 8 * count:
        raise BackendError(f"he secure: expected a fresh size-2 ciphertext, got size {ct.size()}")
    prefix = raw[: len(raw) - 8 * count]
    return prefix, np.frombuffer(raw, dtype="<u8", offset=len(prefix)).reshape(2, limbs, n).copy()


def plain_coeffs(pt: Any, path: str) -> np.ndarray:
    """All ``coeff_count`` coefficients of a coefficient-form plaintext (uint64), read through
    SEAL's serialization (its data array is the last member)."""
    count = int(pt.coeff_count())
    raw = _decompress(save_bytes(pt, path), "plaintext")
    if len(raw) < 8 * count:
        raise BackendError("he: plaintext serialization shorter than its coefficients")
    return np.frombuffer(raw, dtype="<u8", offset=len(raw) - 8 * count)


def rebuild(seal: Any, context: Any, prefix: bytes, data: np.ndarray, path: str, what: str = "ciphertext") -> Any:
    """A ciphertext with the members ``prefix`` (from :func:`coeffs`) and coefficients ``data``."""
    body = prefix[2:] + np.ascontiguousarray(data, dtype="<u8").tobytes()
    blob = _HEADER.pack(_MAGIC, 16, prefix[0], prefix[1], 0, 0, 16 + len(body)) + body
    return load_bytes(seal.Ciphertext(), context, blob, path, what)


def mulmod(a: np.ndarray, b: np.ndarray | int, q: int) -> np.ndarray:
    """``a * b mod q`` for ``0 <= a, b < q < 2^62`` elementwise (uint64): the quotient is
    estimated in x87 extended precision (64-bit mantissa), the remainder fixed in wrapping
    ``uint64`` arithmetic."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    quot = np.floor(a.astype(np.longdouble) * b.astype(np.longdouble) / np.longdouble(q)).astype(np.uint64)
    with np.errstate(over="ignore"):
        r = (a * b - quot * np.uint64(q)).astype(np.int64)  # exact modulo 2^64; the true value is in (-2q, 2q)
    qq = np.int64(q)
    r = np.where(r < 0, r + qq, r)
    r = np.where(r < 0, r + qq, r)
    r = np.where(r >= qq, r - qq, r)
    return np.where(r >= qq, r - qq, r).astype(np.uint64)


def big_uniform_mod(rng: np.random.Generator, count: int, bits: int, primes: list[int]) -> np.ndarray:
    """``count`` integers ``e`` uniform in ``[-2^bits, 2^bits)``, reduced modulo each prime:
    ``(len(primes), count)`` uint64. ``e`` is built from 31-bit digits, so ``bits`` may exceed 64."""
    digits = -(-(bits + 1) // 31)
    d = rng.integers(0, 1 << 31, size=(digits, count), dtype=np.int64).astype(np.uint64)
    top = (bits + 1) - 31 * (digits - 1)  # bits of the most significant digit
    d[-1] &= np.uint64((1 << top) - 1)
    out = np.empty((len(primes), count), dtype=np.uint64)
    for i, q in enumerate(primes):
        acc = np.zeros(count, dtype=np.uint64)
        for k in range(digits):
            term = mulmod(d[k] % np.uint64(q), pow(2, 31 * k, q), q)
            acc = (acc + term) % np.uint64(q)
        shift = q - pow(2, bits, q)  # subtract 2^bits: centre the range
        out[i] = (acc + np.uint64(shift)) % np.uint64(q)
    return out


__all__ = ["big_uniform_mod", "coeffs", "load_bytes", "mulmod", "plain_coeffs", "rebuild", "save_bytes"]
