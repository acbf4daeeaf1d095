"""BFV layer: parameter choice against the 128-bit table, measured noise budget of one full-range
product, exact encrypt/multiply/rotate/decrypt, counting and refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphpress.backends.he.bfv import (
    MAX_COEFF_BITS,
    BFVContext,
    BFVParams,
    choose_params,
    find_plain_modulus,
    hex_poly,
)
from graphpress.backends.he.counter import OpCounter, OpCounts
from graphpress.errors import BackendError


def negacyclic(a: np.ndarray, b: np.ndarray, t: int) -> np.ndarray:
    """``a * b mod (X^N + 1, t)`` with exact int64 arithmetic (small N, t)."""
    n = a.size
    full = np.convolve(a.astype(np.int64), b.astype(np.int64))  # |terms| < N t^2 < 2^63 here
    out = full[:n].copy()
    out[: n - 1] -= full[n:]
    return out % t


@pytest.fixture(scope="module")
def ctx4096():
    return BFVContext(choose_params(20, 4096, batching=True))


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "plain_bits,degree,batching",
    [(13, 2048, False), (20, 4096, False), (20, 4096, True), (24, 8192, True), (30, None, False), (40, None, True), (59, None, False)],
)
def test_choose_params_fits_table_and_plain_modulus(plain_bits, degree, batching):
    p = choose_params(plain_bits, degree, batching=batching, what="fc")
    n = p.poly_degree
    assert sum(p.coeff_modulus_bits) <= MAX_COEFF_BITS[n]
    assert max(p.coeff_modulus_bits) <= 60
    t = p.plain_modulus
    assert t > 2**plain_bits and t % (2 * n) == 1
    assert all(t % d for d in range(2, 1000) if d < t)  # no small factor (it is prime)
    if degree is None:  # the smallest N that fits: the next smaller one must be refused
        smaller = n // 2
        if smaller in MAX_COEFF_BITS:
            with pytest.raises(BackendError):
                choose_params(plain_bits, smaller, batching=batching)
    if batching:  # a special prime as large as the data primes
        assert len(p.coeff_modulus_bits) >= 2 and p.coeff_modulus_bits[-1] >= max(p.coeff_modulus_bits[:-1])


def test_choose_params_known_values():
    assert choose_params(24, 8192, batching=True) == BFVParams(8192, (60, 60, 60), 16957441)
    assert choose_params(13, 2048) == BFVParams(2048, (54,), 12289)
    assert find_plain_modulus(16, 4096) == 65537  # 65537 = 8 * 8192 + 1 is prime
    assert find_plain_modulus(17, 4096) == 147457


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"plain_bits": 60}, "outside 1..59"),
        ({"plain_bits": 20, "poly_degree": 1000}, "poly_degree 1000"),
        ({"plain_bits": 20, "poly_degree": 2048}, "no 128-bit BFV parameters"),
        ({"plain_bits": 13, "poly_degree": 2048, "batching": True}, "with rotations"),
    ],
)
def test_choose_params_refusals_name_the_layer(kwargs, match):
    with pytest.raises(BackendError, match=match) as err:
        choose_params(what="conv3", **kwargs)
    assert "'conv3'" in str(err.value) and "\n" not in str(err.value)


def test_insecure_params_refused():
    with pytest.raises(BackendError, match="below 128-bit security"):
        BFVParams(2048, (40, 40), 12289).check("fc")
    with pytest.raises(BackendError, match="below 128-bit security"):
        BFVContext(BFVParams(4096, (60, 60), 40961))
    with pytest.raises(BackendError, match="= 1 \\(mod 2N"):
        BFVContext(BFVParams(4096, (36, 36, 36), 65539))  # prime, but not 1 mod 8192
    p = choose_params(20, 4096)
    assert BFVParams.from_dict(p.to_dict()) == p


# ---------------------------------------------------------------------------- noise budget
@pytest.mark.parametrize("plain_bits,degree,batching", [(13, 2048, False), (20, 4096, False), (24, 8192, True)])
def test_noise_budget_after_full_range_products_and_additions(plain_bits, degree, batching):
    """64 products of an encryption with a uniformly random (full-range) plaintext, summed in the
    NTT domain (the noise adds coherently: the worst case of 64 additions), for parameters
    choose_params picked: exact, with budget to spare, and one product costs what the model says."""
    ctx = BFVContext(choose_params(plain_bits, degree, batching=batching))
    t, n = ctx.t, ctx.poly_degree
    rng = np.random.default_rng(0)
    x, w = rng.integers(0, t, n), rng.integers(0, t, n)
    fresh_ct = ctx.encrypt_coeffs(x)
    fresh = ctx.noise_budget(fresh_ct)
    ct = ctx.to_ntt_inplace(fresh_ct)
    pt = ctx.plain_coeffs(w, ntt=True)
    one = ctx.from_ntt_inplace(ctx.mul_plain(ct, pt))
    acc = ctx.mul_plain(ct, pt)
    for _ in range(63):
        ctx.add_inplace(acc, ctx.mul_plain(ct, pt))
    ctx.from_ntt_inplace(acc)
    left = ctx.noise_budget(acc)
    assert left >= 8, f"only {left} bits of noise budget left (fresh {fresh})"
    assert np.array_equal(ctx.decrypt_coeffs(acc) % t, 64 * negacyclic(x, w, t) % t)
    # one product costs about log2(t) + log2(N)/2 bits, the growth choose_params budgets for
    assert fresh - ctx.noise_budget(one) <= math.log2(t) + math.log2(n) / 2 + 2


def test_rotation_keeps_exactness_and_budget(ctx4096):
    ctx, t = ctx4096, ctx4096.t
    rng = np.random.default_rng(1)
    v, w = rng.integers(0, t, 4096), rng.integers(0, t, 4096)
    ctx.ensure_rotations([3, 7])
    ct = ctx.encrypt_slots(v)
    rot = ctx.rotate_rows(ct, 3)
    prod = ctx.mul_plain(ctx.to_ntt_inplace(rot), ctx.plain_slots(w, ntt=True))
    prod = ctx.rotate_rows(ctx.from_ntt_inplace(prod), 7)
    got = ctx.decrypt_slots(prod) % t
    rows = v.reshape(2, 2048)
    want = (np.roll(rows, -3, axis=1) * w.reshape(2, 2048) % t)
    want = np.roll(want, -7, axis=1).reshape(-1)
    assert np.array_equal(got, want)
    assert ctx.noise_budget(prod) > 5


# ---------------------------------------------------------------------------- operations
def test_hex_poly_roundtrip(ctx4096):
    seal = ctx4096.seal
    t = ctx4096.t
    a = np.zeros(4096, dtype=np.int64)
    a[[0, 5, 4095]] = [7, t - 1, 255]
    assert hex_poly(a, t).endswith(" + 7") and hex_poly(np.zeros(4), t) == "0"
    pt = seal.Plaintext(hex_poly(a, t))
    assert [pt[i] for i in (0, 1, 5, 4095)] == [7, 0, t - 1, 255]
    assert hex_poly(np.array([0, 3]), t).endswith("3x^1")


def test_encrypt_decrypt_centered_and_counted(ctx4096):
    ctx, t = ctx4096, ctx4096.t
    before = ctx.counter.snapshot()
    x = np.array([0, 1, -1, (t - 1) // 2, -((t - 1) // 2), 12345])
    ct = ctx.upload_coeffs(x)
    back = ctx.download(ct)
    assert np.array_equal(ctx.decrypt_coeffs(back)[:6], x)
    assert np.array_equal(ctx.decrypt_coeffs(back, [5, 2]), x[[5, 2]])
    d = ctx.counter.snapshot() - before
    assert (d.encryptions, d.ciphertexts_sent, d.ciphertexts_received, d.decryptions) == (1, 1, 1, 2)
    # a fresh seeded ciphertext is about half a full one (second polynomial = PRNG seed)
    assert 0.3 < d.bytes_sent / d.bytes_received < 0.7
    assert d.bytes_received == ctx.ciphertext_bytes(back) or abs(d.bytes_received - ctx.ciphertext_bytes(back)) < 2048
    slots = np.arange(-100, 100)
    assert np.array_equal(ctx.decrypt_slots(ctx.encrypt_slots(slots))[:200], slots)


def test_mul_add_plain(ctx4096):
    ctx, t = ctx4096, ctx4096.t
    x = np.array([1, 2, 3])
    w = np.array([4, 0, -1])
    ct = ctx.encrypt_coeffs(x)
    prod = ctx.mul_plain(ct, ctx.plain_coeffs(w))  # non-NTT path
    out = ctx.add_plain(ctx.add(prod, prod), ctx.plain_coeffs([10]))
    # (1 + 2X + 3X^2)(4 - X^2) = 4 + 8X + 11X^2 - 2X^3 - 3X^4; doubled, + 10
    assert np.array_equal(ctx.decrypt_coeffs(out)[:6], [18, 16, 22, -4, -6, 0])
    with pytest.raises(BackendError, match="both in NTT form"):
        ctx.mul_plain(ct, ctx.plain_coeffs(w, ntt=True))
    with pytest.raises(BackendError, match="more than 4096"):
        ctx.plain_coeffs(np.ones(4097))
    assert ctx.is_zero(ctx.plain_coeffs([0, 0])) and not ctx.is_zero(ctx.plain_coeffs([0, 1]))
    assert t % 2 == 1


def test_rotations_need_keys_and_a_special_prime(ctx4096):
    with pytest.raises(BackendError, match="no Galois key for rotation step 11"):
        ctx4096.rotate_rows(ctx4096.encrypt_slots([1]), 11)
    single = BFVContext(choose_params(13, 2048))  # one prime: no key switching
    with pytest.raises(BackendError, match="layer 'fc'.*batching=True"):
        single.ensure_rotations([1], what="fc")
    before = ctx4096.counter.snapshot()
    ctx4096.ensure_rotations([1, 2])
    assert {1, 2} <= ctx4096.rotation_steps
    assert ctx4096.galois_keys_bytes() > 0
    assert (ctx4096.counter.snapshot() - before).rotations == 0


def test_root_of_unity(ctx4096):
    t = ctx4096.t
    for order in (2, 4, 16, 8192):
        r = ctx4096.root_of_unity(order)
        assert pow(r, order, t) == 1 and pow(r, order // 2, t) == t - 1
    with pytest.raises(BackendError, match="no primitive 3-th root"):
        ctx4096.root_of_unity(3)


def test_counter_arithmetic_and_timing():
    c = OpCounter()
    with c.timed("server", "mul_plain", count="plain_mults", n=3):
        pass
    c.add("bytes_sent", 100)
    snap = c.snapshot()
    assert snap.plain_mults == 3 and snap.to_dict()["bytes_sent"] == 100
    assert (snap + snap).plain_mults == 6 and (snap - snap) == OpCounts()
    assert "bytes_sent" not in snap.counts_only()
    assert c.calls[("server", "mul_plain")] == 1 and c.side_seconds("server") >= 0
    assert set(c.time_per_op()) == {"server/mul_plain"}
    c.reset()
    assert c.snapshot() == OpCounts() and not c.seconds
