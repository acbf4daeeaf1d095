"""BFV over Microsoft SEAL (``tenseal.sealapi``): parameters, keys, counted and timed operations.

Scheme. BFV encrypts a plaintext polynomial ``m in Z_t[X]/(X^N + 1)`` as a pair of polynomials
modulo ``q = q_1 ... q_L`` (the coefficient modulus). A plaintext-ciphertext product multiplies
polynomials (a *negacyclic convolution* of the coefficient vectors, the basis of coefficient
encoding); with ``t`` a prime ``= 1 (mod 2N)`` the ring ``Z_t[X]/(X^N+1)`` also splits into
``N`` slots (batching: a ``2 x N/2`` matrix of ``Z_t`` values, multiplied elementwise, rows
rotated with Galois automorphisms -- key switches). Decryption is exact while the noise stays
below ``q / (2t)``; everything is exact modulo ``t``, so an integer result is exact when its
absolute value is below ``t / 2`` (read centered, in ``(-t/2, t/2]``).

Parameters (:func:`choose_params`). 128-bit security (HomomorphicEncryption.org standard, SEAL's
table) bounds the total coefficient-modulus bits by ``N``: 1024: 27, 2048: 54, 4096: 109,
8192: 218, 16384: 438, 32768: 881. The noise budget after one product with a full-range
plaintext and a few thousand additions was measured (SEAL's invariant noise budget, symmetric
encryption, ``tests/backends/he/test_bfv.py``): a fresh ciphertext keeps about
``log2(q_data) - log2(t) - 5`` bits, a product costs about ``log2(t) + log2(N)/2`` more, ``k``
additions about ``log2(k)/2``. So the data primes (all but SEAL's last, *special* prime) need::

    log2(q_data) >= 2 log2(t) + log2(N) / 2 + NOISE_MARGIN_BITS        (19: 5 fresh + 6 for up to
                                                                         2^12 additions + 8 spare)

``t`` is the smallest prime ``= 1 (mod 2N)`` above ``2^plain_bits`` (so every ``|y| < 2^(plain_bits-1)``
is exact). The chain uses as few primes (at most 60 bits each, SEAL's limit) as the bound
allows. With rotations (``batching=True``) the special prime is as large as the data primes
(key-switching noise); without, one prime when it fits (no key switching at all), else a small
special prime. Settings beyond the table, a ``t`` above 60 bits, or a budget that cannot hold
one product are refused with a one-line :class:`~graphpress.errors.BackendError` naming the layer.

Context (:class:`BFVContext`). Client and server live in one process; each operation is counted
and timed in :attr:`BFVContext.counter` under the side that would run it. Inputs go to the
server through :meth:`BFVContext.upload_coeffs` / :meth:`BFVContext.upload_slots` (symmetric
encryption, serialized with SEAL's seed compression -- the second polynomial of a fresh
ciphertext is a PRNG seed -- and loaded on the other side), results come back through
:meth:`BFVContext.download`; the serialized sizes are the byte counts. Plaintexts are built from
a hexadecimal polynomial string assembled with numpy (measured at N = 8192: ~1.5 ms per
polynomial vs ~10 ms for Python string formatting); weights are transformed to NTT form once,
so that a product is a pointwise multiplication with an NTT'd ciphertext.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from graphpress.backends.he import rawct
from graphpress.backends.he.counter import OpCounter
from graphpress.errors import BackendError

#: Largest total coefficient-modulus bits at 128-bit classical security, by ``N``.
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: SEAL's largest prime size (coefficient primes and the plaintext modulus).
MAX_PRIME_BITS = 60
#: Spare noise bits on top of the product's growth (see module docstring).
NOISE_MARGIN_BITS = 19


def _import_seal() -> Any:
    try:
        import tenseal.sealapi as seal
    except ImportError as err:  # pragma: no cover -- the test folder skips without tenseal
        raise BackendError(f"he: tenseal is not installed ({err}); pip install tenseal") from err
    return seal


# ---------------------------------------------------------------------------- parameters
def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for ``n < 3.3e24`` (the first 12 prime bases)."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def find_plain_modulus(plain_bits: int, poly_degree: int) -> int:
    """The smallest prime ``t = 1 (mod 2N)`` with ``t > 2^plain_bits``."""
    step = 2 * poly_degree
    t = (1 << plain_bits) // step * step + 1
    while t <= 1 << plain_bits or not _is_prime(t):
        t += step
    return t


def noise_bits_needed(plain_modulus: int, poly_degree: int) -> int:
    """Data-prime bits one full-range product plus additions needs (see module docstring)."""
    return math.ceil(2 * math.log2(plain_modulus) + math.log2(poly_degree) / 2 + NOISE_MARGIN_BITS)


@dataclass(frozen=True)
class BFVParams:
    """One BFV parameter set.

    Attributes
    ----------
    poly_degree : int
        ``N``, a power of two in :data:`MAX_COEFF_BITS`.
    coeff_modulus_bits : tuple of int
        Bit sizes of the coefficient primes (SEAL ``CoeffModulus.Create``); with more than one,
        the last is the special (key-switching) prime and the others hold the data.
    plain_modulus : int
        ``t``, a prime ``= 1 (mod 2N)``.
    """

    poly_degree: int
    coeff_modulus_bits: tuple[int, ...]
    plain_modulus: int

    @property
    def data_bits(self) -> int:
        bits = self.coeff_modulus_bits
        return sum(bits[:-1]) if len(bits) > 1 else bits[0]

    @property
    def key_switching(self) -> bool:
        """Whether rotations are possible (SEAL needs a special prime)."""
        return len(self.coeff_modulus_bits) > 1

    def check(self, what: str = "") -> None:
        """Refuse settings outside the 128-bit table or SEAL's limits (one-line ``BackendError``)."""
        where = f"he: layer {what!r}: " if what else "he: "
        n = self.poly_degree
        if n not in MAX_COEFF_BITS:
            raise BackendError(f"{where}poly_degree {n} is not one of {sorted(MAX_COEFF_BITS)}")
        total = sum(self.coeff_modulus_bits)
        if total > MAX_COEFF_BITS[n]:
            raise BackendError(
                f"{where}coefficient modulus of {total} bits at N={n} is below 128-bit security (at most {MAX_COEFF_BITS[n]} bits); "
                "use a larger poly_degree"
            )
        if any(b > MAX_PRIME_BITS or b < 2 for b in self.coeff_modulus_bits):
            raise BackendError(f"{where}coefficient primes must have 2..{MAX_PRIME_BITS} bits, got {list(self.coeff_modulus_bits)}")
        t = self.plain_modulus
        if t.bit_length() > MAX_PRIME_BITS or not _is_prime(t) or t % (2 * n) != 1:
            raise BackendError(f"{where}plain modulus {t} must be a prime = 1 (mod 2N={2 * n}) of at most {MAX_PRIME_BITS} bits")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["coeff_modulus_bits"] = list(self.coeff_modulus_bits)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BFVParams:
        return cls(int(d["poly_degree"]), tuple(int(b) for b in d["coeff_modulus_bits"]), int(d["plain_modulus"]))


def _special_bits(n: int) -> int:
    """A small special prime for chains that never key-switch (room for primes ``= 1 mod 2N``)."""
    return max(20, int(math.log2(2 * n)) + 4)


def _chain(n: int, t: int, batching: bool) -> tuple[int, ...] | None:
    """Coefficient prime sizes for ``N = n`` holding one product with ``t``; None if impossible."""
    need, budget = noise_bits_needed(t, n), MAX_COEFF_BITS[n]
    if not batching and need <= min(budget, MAX_PRIME_BITS):
        return (min(budget, MAX_PRIME_BITS),)
    for n_data in range(max(1, math.ceil(need / MAX_PRIME_BITS)), 16):
        if batching:
            size = min(MAX_PRIME_BITS, budget // (n_data + 1))
            sizes, special = [size] * n_data, size
        else:
            special = _special_bits(n)
            total = min(MAX_PRIME_BITS * n_data, budget - special)
            sizes = [total // n_data + (1 if i < total % n_data else 0) for i in range(n_data)]
        if min(sizes) < _special_bits(n):
            return None
        if sum(sizes) >= need:
            return (*sizes, special)
    return None


def _avoid_plain_modulus(seal: Any, n: int, bits: tuple[int, ...], t: int) -> tuple[int, ...]:
    """Shrink a prime size by one bit while SEAL's primes for ``bits`` include ``t`` (not coprime)."""
    bits = list(bits)
    for _ in range(8):
        primes = [m.value() for m in seal.CoeffModulus.Create(n, bits)]
        if t not in primes:
            return tuple(bits)
        bits[primes.index(t)] -= 1
    raise BackendError(f"he: could not find coefficient primes coprime to t={t} at N={n}")


def choose_params(plain_bits: int, poly_degree: int | None = None, *, batching: bool = False, what: str = "") -> BFVParams:
    """BFV parameters at 128-bit security for integers ``|y| < 2^(plain_bits - 1)``.

    Parameters
    ----------
    plain_bits : int
        ``t > 2^plain_bits`` (e.g. ``ceil(log2(2 * bound + 1))`` for an accumulator bound).
    poly_degree : int, optional
        Force ``N``; default: the smallest ``N`` of :data:`MAX_COEFF_BITS` that fits.
    batching : bool
        The kernel rotates slots (slot encoding): a key-switching special prime as large as the
        data primes.
    what : str
        The layer's name, for error messages.

    Returns
    -------
    BFVParams

    Raises
    ------
    BackendError
        ``plain_bits`` outside ``1..59``, an ``N`` not in the table, or no chain with room for one
        product within the 128-bit bound (the message names ``what`` and the bits needed).
    """
    seal = _import_seal()
    where = f"he: layer {what!r}: " if what else "he: "
    if not 1 <= int(plain_bits) < MAX_PRIME_BITS:
        raise BackendError(f"{where}plain modulus of {plain_bits} bits is outside 1..{MAX_PRIME_BITS - 1} (SEAL's limit); lower the fixed-point bits")
    if poly_degree is not None and poly_degree not in MAX_COEFF_BITS:
        raise BackendError(f"{where}poly_degree {poly_degree} is not one of {sorted(MAX_COEFF_BITS)}")
    degrees = [poly_degree] if poly_degree is not None else sorted(MAX_COEFF_BITS)
    for n in degrees:
        t = find_plain_modulus(int(plain_bits), n)
        if t.bit_length() > MAX_PRIME_BITS:
            continue
        bits = _chain(n, t, batching)
        if bits is not None:
            params = BFVParams(n, _avoid_plain_modulus(seal, n, bits, t), t)
            params.check(what)
            return params
    n = degrees[-1]
    t = find_plain_modulus(int(plain_bits), n)
    mode = " with rotations (slot encoding)" if batching else ""
    raise BackendError(
        f"{where}no 128-bit BFV parameters{mode} for a {plain_bits}-bit plaintext modulus at N={n}: one product needs "
        f"~{noise_bits_needed(t, n)} data bits{' plus a special prime as large' if batching else ''}, the table allows {MAX_COEFF_BITS[n]}; "
        "lower the fixed-point bits or use a larger poly_degree"
    )


# ---------------------------------------------------------------------------- helpers
_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)
_DEC = np.frombuffer(b"0123456789", dtype=np.uint8)


def hex_poly(coeffs: np.ndarray, plain_modulus: int) -> str:
    """SEAL's hexadecimal polynomial string (``"1Fx^3 + 2"``) of coefficients in ``[0, t)``,
    built column by column with numpy (fixed-width fields; SEAL accepts leading zeros)."""
    a = np.asarray(coeffs, dtype=np.uint64)
    nz = np.flatnonzero(a)[::-1]  # descending degree, as SEAL writes it
    if nz.size == 0:
        return "0"
    const = nz[-1] == 0
    deg = nz[:-1] if const else nz
    tail = format(int(a[0]), "X") if const else ""
    if deg.size == 0:
        return tail
    hw = max(1, (int(plain_modulus).bit_length() + 3) // 4)
    ew = len(str(int(deg[0])))
    buf = np.empty((deg.size, hw + 2 + ew + 3), dtype=np.uint8)
    vals = a[deg]
    for k in range(hw):
        buf[:, hw - 1 - k] = _HEX[((vals >> np.uint64(4 * k)) & np.uint64(15)).astype(np.intp)]
    buf[:, hw] = ord("x")
    buf[:, hw + 1] = ord("^")
    e = deg.astype(np.int64)
    for k in range(ew):
        buf[:, hw + 2 + ew - 1 - k] = _DEC[(e // 10**k) % 10]
    buf[:, -3:] = np.frombuffer(b" + ", dtype=np.uint8)
    body = buf.tobytes().decode("ascii")
    return body + tail if tail else body[:-3]


def mulmod(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """``a * b mod t`` elementwise for ``0 <= a, b < t``, exact for any ``t < 2^60`` (int64 out)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if t < 1 << 31:
        return (a * b) % t
    return (a.astype(object) * b.astype(object) % t).astype(np.int64)


def centered(values: np.ndarray, t: int) -> np.ndarray:
    """Residues ``[0, t)`` -> integers in ``(-t/2, t/2]``."""
    v = np.asarray(values, dtype=np.int64) % t
    return np.where(v > t // 2, v - t, v)


# ---------------------------------------------------------------------------- context
class BFVContext:
    """Keys, encoders and counted, timed BFV operations for one :class:`BFVParams`.

    Attributes
    ----------
    params : BFVParams
    counter : OpCounter
        Every operation below adds to it (see :mod:`graphpress.backends.he.counter`).
    t, poly_degree, slots : int
        Plain modulus, ``N`` and ``N/2`` (the length of one batching row).
    """

    def __init__(self, params: BFVParams, *, what: str = ""):
        params.check(what)
        self.seal = seal = _import_seal()
        self.params = params
        self.t = int(params.plain_modulus)
        self.poly_degree = n = int(params.poly_degree)
        self.slots = n // 2
        self.counter = OpCounter()
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.BFV)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(n, list(params.coeff_modulus_bits)))
        parms.set_plain_modulus(seal.Modulus(self.t))
        self.context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not self.context.parameters_set():
            raise BackendError(f"he: SEAL refuses {params.to_dict()}: {self.context.parameters_error_message()}")
        with self.counter.timed("client", "keygen"):
            self._keygen = seal.KeyGenerator(self.context)
            self._secret = self._keygen.secret_key()
            public = seal.PublicKey()
            self._keygen.create_public_key(public)
        self._encryptor = seal.Encryptor(self.context, public, self._secret)
        self._decryptor = seal.Decryptor(self.context, self._secret)
        self._evaluator = seal.Evaluator(self.context)
        self._batch = seal.BatchEncoder(self.context)
        self._data_parms = self.context.first_parms_id()
        self._galois = seal.GaloisKeys()
        self._steps: set[int] = set()
        self._dir = tempfile.mkdtemp(prefix="graphpress-he-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        self._wire = os.path.join(self._dir, "wire")

    # ------------------------------------------------------------------ plaintexts
    def _reduce(self, values: Any, length: int, what: str) -> np.ndarray:
        a = np.asarray(values, dtype=np.int64).reshape(-1)
        if a.size > length:
            raise BackendError(f"he: {what} has {a.size} values, more than {length}")
        return a % self.t

    def plain_coeffs(self, coeffs: Any, *, ntt: bool = False, side: str = "server") -> Any:
        """Plaintext polynomial with coefficients ``coeffs mod t`` (length <= N); NTT form if ``ntt``
        (to multiply an NTT'd ciphertext)."""
        a = self._reduce(coeffs, self.poly_degree, "plaintext polynomial")
        with self.counter.timed(side, "encode"):
            pt = self.seal.Plaintext(hex_poly(a, self.t))
            if ntt:
                self._evaluator.transform_to_ntt_inplace(pt, self._data_parms)
        return pt

    def plain_slots(self, values: Any, *, ntt: bool = False, side: str = "server") -> Any:
        """Batched plaintext: slot ``i`` holds ``values[i] mod t`` (row 0: slots ``0..N/2-1``)."""
        a = np.zeros(self.poly_degree, dtype=np.int64)
        v = self._reduce(values, self.poly_degree, "slot vector")
        a[: v.size] = v
        with self.counter.timed(side, "encode"):
            pt = self.seal.Plaintext()
            self._batch.encode(a.tolist(), pt)
            if ntt:
                self._evaluator.transform_to_ntt_inplace(pt, self._data_parms)
        return pt

    @staticmethod
    def is_zero(pt: Any) -> bool:
        """Whether a plaintext is zero (SEAL refuses products with it: the result is transparent)."""
        return bool(pt.is_zero())

    # ------------------------------------------------------------------ client side
    def _encrypt(self, pt: Any) -> Any:
        ct = self.seal.Ciphertext()
        with self.counter.timed("client", "encrypt", count="encryptions"):
            self._encryptor.encrypt_symmetric(pt, ct)
        return ct

    def encrypt_coeffs(self, coeffs: Any) -> Any:
        """Client: encrypt the polynomial ``sum coeffs[i] X^i`` (kept on the client side)."""
        return self._encrypt(self.plain_coeffs(coeffs, side="client"))

    def encrypt_slots(self, values: Any) -> Any:
        """Client: encrypt a batched slot vector (kept on the client side)."""
        return self._encrypt(self.plain_slots(values, side="client"))

    def _upload(self, pt: Any) -> Any:
        with self.counter.timed("client", "encrypt", count="encryptions"):
            seeded = self._encryptor.encrypt_symmetric(pt)
        with self.counter.timed("comm", "serialize"):
            seeded.save(self._wire)
        size = os.path.getsize(self._wire)
        ct = self.seal.Ciphertext()
        with self.counter.timed("comm", "deserialize"):
            ct.load(self.context, self._wire)
        self.counter.add("ciphertexts_sent")
        self.counter.add("bytes_sent", size)
        return ct

    def upload_coeffs(self, coeffs: Any) -> Any:
        """Client encrypts a coefficient polynomial and sends it (seed-compressed); returns the
        server's ciphertext. Counts one encryption, one ciphertext sent and its bytes."""
        return self._upload(self.plain_coeffs(coeffs, side="client"))

    def upload_slots(self, values: Any) -> Any:
        """As :meth:`upload_coeffs` for a batched slot vector."""
        return self._upload(self.plain_slots(values, side="client"))

    def download(self, ct: Any) -> Any:
        """Server sends a result ciphertext to the client; returns the client's copy."""
        with self.counter.timed("comm", "serialize"):
            ct.save(self._wire)
        size = os.path.getsize(self._wire)
        out = self.seal.Ciphertext()
        with self.counter.timed("comm", "deserialize"):
            out.load(self.context, self._wire)
        self.counter.add("ciphertexts_received")
        self.counter.add("bytes_received", size)
        return out

    def _decrypt(self, ct: Any) -> Any:
        pt = self.seal.Plaintext()
        with self.counter.timed("client", "decrypt", count="decryptions"):
            self._decryptor.decrypt(ct, pt)
        return pt

    def decrypt_coeffs(self, ct: Any, indices: Any = None) -> np.ndarray:
        """Client: decrypt and read coefficients (all ``N``, or only ``indices``), centered
        in ``(-t/2, t/2]`` as int64."""
        pt = self._decrypt(ct)
        with self.counter.timed("client", "decode"):
            have = pt.coeff_count()
            idx = np.arange(self.poly_degree) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
            if idx.size > self.poly_degree // 8:  # many reads: one serialization beats one call per coefficient
                full = np.zeros(self.poly_degree, dtype=np.int64)
                full[:have] = rawct.plain_coeffs(pt, self._wire)
                out = full[idx]
            else:
                out = np.fromiter((pt[int(i)] if i < have else 0 for i in idx), dtype=np.int64, count=idx.size)
        return centered(out, self.t)

    def decrypt_slots(self, ct: Any) -> np.ndarray:
        """Client: decrypt a batched ciphertext; all ``N`` slots centered in ``(-t/2, t/2]``."""
        pt = self._decrypt(ct)
        with self.counter.timed("client", "decode"):
            out = np.asarray(self._batch.decode_int64(pt), dtype=np.int64)
        return centered(out, self.t)

    # ------------------------------------------------------------------ server side
    def to_ntt(self, ct: Any) -> Any:
        """NTT form of a ciphertext (new object), to multiply NTT-form plaintexts."""
        out = self.seal.Ciphertext()
        with self.counter.timed("server", "ntt", count="ntts"):
            self._evaluator.transform_to_ntt(ct, out)
        return out

    def to_ntt_inplace(self, ct: Any) -> Any:
        """NTT form in place (for a ciphertext the server owns, e.g. a received input)."""
        with self.counter.timed("server", "ntt", count="ntts"):
            self._evaluator.transform_to_ntt_inplace(ct)
        return ct

    def from_ntt_inplace(self, ct: Any) -> Any:
        """Back to coefficient form (BFV decrypts, rotates and adds plaintexts only there)."""
        with self.counter.timed("server", "intt", count="ntts"):
            self._evaluator.transform_from_ntt_inplace(ct)
        return ct

    def mul_plain(self, ct: Any, pt: Any) -> Any:
        """``ct * pt`` (new ciphertext); both in NTT form or both not."""
        if ct.is_ntt_form() != pt.is_ntt_form():
            raise BackendError("he: mul_plain needs the ciphertext and the plaintext both in NTT form or both not")
        out = self.seal.Ciphertext()
        with self.counter.timed("server", "mul_plain", count="plain_mults"):
            self._evaluator.multiply_plain(ct, pt, out)
        return out

    def add(self, a: Any, b: Any) -> Any:
        """``a + b`` (new ciphertext)."""
        out = self.seal.Ciphertext()
        with self.counter.timed("server", "add", count="ct_adds"):
            self._evaluator.add(a, b, out)
        return out

    def add_inplace(self, acc: Any, b: Any) -> Any:
        """``acc += b``; returns ``acc``."""
        with self.counter.timed("server", "add", count="ct_adds"):
            self._evaluator.add_inplace(acc, b)
        return acc

    def add_plain(self, ct: Any, pt: Any) -> Any:
        """``ct + pt`` (new ciphertext; BFV needs both out of NTT form)."""
        out = self.seal.Ciphertext()
        with self.counter.timed("server", "add_plain", count="plain_adds"):
            self._evaluator.add_plain(ct, pt, out)
        return out

    def add_plain_inplace(self, ct: Any, pt: Any) -> Any:
        with self.counter.timed("server", "add_plain", count="plain_adds"):
            self._evaluator.add_plain_inplace(ct, pt)
        return ct

    def encrypt_zero_server(self) -> Any:
        """Server: a public-key encryption of zero (the result of an all-zero weight tile)."""
        ct = self.seal.Ciphertext()
        with self.counter.timed("server", "encrypt", count="encryptions"):
            self._encryptor.encrypt_zero(ct)
        return ct

    # ------------------------------------------------------------------ rotations
    def ensure_rotations(self, steps: Any, *, what: str = "") -> None:
        """Client generates Galois keys for the row-rotation ``steps`` not yet covered (only those)."""
        want = {int(s) % self.slots for s in steps} - {0}
        if not want - self._steps:
            return
        if not self.context.using_keyswitching():
            where = f"layer {what!r}: " if what else ""
            raise BackendError(f"he: {where}rotations need a key-switching prime: choose_params(..., batching=True)")
        self._steps |= want
        tool = self.context.key_context_data().galois_tool()
        with self.counter.timed("client", "keygen"):
            keys = self.seal.GaloisKeys()
            self._keygen.create_galois_keys(tool.get_elts_from_steps(sorted(self._steps)), keys)
        self._galois = keys

    @property
    def rotation_steps(self) -> frozenset[int]:
        return frozenset(self._steps)

    def rotate_rows(self, ct: Any, steps: int) -> Any:
        """Rotate both batching rows left by ``steps`` (slot ``i`` gets slot ``i + steps``); one key switch."""
        s = int(steps) % self.slots
        if s not in self._steps:
            raise BackendError(f"he: no Galois key for rotation step {steps}; call ensure_rotations first")
        out = self.seal.Ciphertext()
        with self.counter.timed("server", "rotate", count="rotations"):
            self._evaluator.rotate_rows(ct, s, self._galois, out)
        self.counter.add("key_switches")
        return out

    # ------------------------------------------------------------------ inspection
    def noise_budget(self, ct: Any) -> int:
        """SEAL's invariant noise budget in bits (0: decryption fails); needs the secret key."""
        return int(self._decryptor.invariant_noise_budget(ct))

    def ciphertext_bytes(self, ct: Any) -> int:
        """Serialized size of a ciphertext (SEAL's default compression)."""
        path = os.path.join(self._dir, "size")
        ct.save(path)
        return os.path.getsize(path)

    def galois_keys_bytes(self) -> int:
        """Serialized size of the Galois keys generated so far (sent once, client -> server)."""
        if not self._steps:
            return 0
        path = os.path.join(self._dir, "galois")
        self._galois.save(path)
        return os.path.getsize(path)

    def root_of_unity(self, order: int) -> int:
        """A primitive ``order``-th root of unity mod ``t`` (``order`` a power of two dividing ``2N``)."""
        if order < 1 or order & (order - 1) or (self.t - 1) % order:
            raise BackendError(f"he: no primitive {order}-th root of unity modulo t={self.t}")
        if order == 1:
            return 1
        for a in range(2, 1 << 16):
            r = pow(a, (self.t - 1) // order, self.t)
            if pow(r, order // 2, self.t) == self.t - 1:
                return r
        raise BackendError(f"he: no primitive {order}-th root of unity found modulo t={self.t}")  # pragma: no cover


__all__ = [
    "MAX_COEFF_BITS",
    "MAX_PRIME_BITS",
    "NOISE_MARGIN_BITS",
    "BFVContext",
    "BFVParams",
    "centered",
    "choose_params",
    "find_plain_modulus",
    "hex_poly",
    "mulmod",
    "noise_bits_needed",
]
