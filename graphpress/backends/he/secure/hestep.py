"""One linear/conv layer on additive secret shares, Cheetah style: the client's half of the work
(:class:`ClientStep`) and the server's (:class:`ServerStep`), exchanged as bytes.

Shares. The layer's input ``X`` is split ``X = a + s (mod t)``: the client holds ``a``, the
server ``s`` (for the network's input, ``a`` is the client's quantized image and ``s = 0``). The
client encrypts ``a`` in the coefficient layout of :mod:`graphpress.backends.he.kernels` (dense:
Cheetah's HomConv / matrix layout; block-circulant: the twisted ``Y = X^(N/b)`` layout, see
:mod:`..kernels.coeff_circulant`) with seeded symmetric encryption, and sends it. The server
adds its share to each input ciphertext (a plaintext in the same layout: ``Enc(a) + s =
Enc(X)``) and computes, per output ciphertext,

    ct = sum_tiles Enc(X) * W_tile  +  Z,    Z = Enc_pk(bias + off - R) with c0 flooded (made offline)

with ``R`` fresh and uniform in ``Z_t`` at the read positions (its share of the output),
``off = floor(t/2)`` (so that ``Y + off`` lies in ``[0, t)`` for every ``|Y| < t/2``) and the
*flooding*, a uniform integer of ``flood_bits`` bits, in ``Z``'s ``c0`` at every coefficient
the client will read. ``Z`` does not depend on the input, so the server makes it before the
client's input exists; online a response costs one addition. The server switches the result to
its last prime and sends ``c1`` and only the read coefficients of ``c0``. The client decrypts
``Y + off - R (mod t)``: uniformly distributed whatever ``W`` and ``X`` are.

What each addition is for (semi-honest client):

* ``R`` hides the value ``W X`` itself (the client sees ``Y + off - R``, uniform in ``Z_t``);
* ``Z`` is a fresh public-key encryption, so it re-randomizes ``c1``: without it ``c1 = a_seed * W_poly`` and the client, who
  knows its own seed polynomial, would divide and read the weight polynomial;
* the flooding noise (``2^flood_bits``, at least ``2^stat_bits`` times the bound on the
  weight-dependent noise ``max_response sum ||W_tile||_1 * (B_fresh + 1)``) makes the decrypted noise
  statistically independent of ``W`` (distance ``<= 2^-stat_bits`` per coefficient);
* sending only the read coefficients of ``c0`` keeps the cross terms of the coefficient
  encoding (other linear combinations of weights and inputs) on the server, and the
  modulus switch shrinks every sent coefficient to the last prime's bits.

The server learns nothing: it sees fresh RLWE ciphertexts under the client's key (128-bit
parameters) and its own shares. Stride-2 convolutions read only every second row and column of
the stride-1 map, so only those coefficients travel.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphpress.backends.he import rawct
from graphpress.backends.he.bfv import BFVContext, BFVParams, centered
from graphpress.backends.he.kernels.coeff_circulant import CoeffCirculant, _powers, _twist
from graphpress.backends.he.kernels.coeff_dense import CoeffDense
from graphpress.errors import BackendError
from graphpress.lowering.he.counts import SECURE_PLAN_WEIGHTS, plan_coeff_conv, plan_coeff_linear

#: SEAL's clipped fresh-noise bound (6 sigma, sigma = 3.2) per coefficient.
FRESH_NOISE = 19.2
#: The tiling objective of every secure layer (stored in the program: both parties plan alike).
PLAN_WEIGHTS = SECURE_PLAN_WEIGHTS


# ---------------------------------------------------------------------------- geometry (public)
@dataclass(frozen=True)
class StepShape:
    """What both parties know of a layer: shapes, block size, parameters (never the weights)."""

    index: int
    name: str
    kind: str  # "linear" | "conv2d"
    b: int
    out_features: int
    in_features: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: BFVParams
    flood_bits: int
    #: the tiling's objective, seconds-like weights per (product, input ciphertext, response
    #: ciphertext); part of the program so that both parties derive the same tiling
    plan_weights: tuple[float, float, float] | None = PLAN_WEIGHTS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepShape":
        pw = d.get("plan_weights")
        return cls(
            int(d["index"]), str(d["name"]), str(d["kind"]), int(d["b"]), int(d["out_features"]), int(d["in_features"]),
            tuple(d["kernel_size"]), tuple(d["stride"]), tuple(d["padding"]), tuple(d["in_shape"]), tuple(d["out_shape"]),
            BFVParams.from_dict(d["params"]), int(d["flood_bits"]), None if pw is None else tuple(float(v) for v in pw),
        )

    @property
    def t(self) -> int:
        return int(self.params.plain_modulus)

    @property
    def offset(self) -> int:
        return self.t // 2

    def plan(self) -> Any:
        return self.plan_at(self.params.poly_degree)

    def plan_at(self, n: int) -> Any:
        """The layer's coefficient tiling at ``N = n`` (what both parties derive independently)."""
        b = self.b
        try:
            if self.kind == "linear":
                return plan_coeff_linear(self.out_features, self.in_features, n, b, self.name, self.plan_weights)
            return plan_coeff_conv(
                self.out_features, self.in_features, self.in_shape[1], self.in_shape[2], *self.kernel_size, n, b,
                self.stride, self.padding, self.name, self.plan_weights,
            )
        except ValueError as err:
            raise BackendError(f"he secure: layer {self.name!r}: {err}") from None

    @property
    def rows(self) -> int:
        """Input vectors of a linear layer per sample (tokens)."""
        return int(np.prod(self.in_shape[:-1])) if self.kind == "linear" else 1


def _kernel(shape: StepShape) -> CoeffCirculant:
    return CoeffCirculant(shape.plan_weights) if shape.b > 1 else CoeffDense(shape.plan_weights)


def _out_positions(shape: StepShape, plan: Any) -> list[tuple[tuple[int, int], np.ndarray, tuple[np.ndarray, ...]]]:
    """Per response ciphertext ``(key, coefficient positions, output index arrays)``, in the order
    the server sends them. Positions are the read coefficients; the index arrays address the
    per-sample output ``(C_out, H_out, W_out)`` (conv) or ``(rows, m)`` (linear) and the position
    ``r`` inside a block (for the twist)."""
    b = plan.b
    out: list = []
    if shape.kind == "linear":
        for g0 in range(0, shape.rows, plan.per_ct):
            nv = min(plan.per_ct, shape.rows - g0)
            for rt in range(plan.row_tiles):
                rows = np.arange(rt * plan.p_t, min(plan.p, (rt + 1) * plan.p_t))
                idx = CoeffCirculant._linear_out_index(plan, nv, rows - rt * plan.p_t, b)  # (nv, i, r)
                vec = np.broadcast_to((g0 + np.arange(nv))[:, None, None], idx.shape)
                feat = np.broadcast_to(rows[None, :, None] * b + np.arange(b)[None, None, :], idx.shape)
                r = np.broadcast_to(np.arange(b)[None, None, :], idx.shape)
                out.append(((g0, rt), idx.reshape(-1), (vec.reshape(-1), feat.reshape(-1)), r.reshape(-1)))
        return out
    sh, sw = shape.stride
    for tile in range(plan.tiles):
        h0 = tile * plan.rows
        nrows = min(plan.rows, plan.H1 - h0)
        for og in range(plan.out_groups):
            outs = np.arange(og * plan.p_t, min(plan.p, (og + 1) * plan.p_t))
            idx = CoeffCirculant._conv_out_index(plan, outs - og * plan.p_t, nrows)  # (i, r, h, w)
            hh = h0 + np.arange(nrows)
            keep_h = hh % sh == 0
            keep_w = np.arange(plan.W1) % sw == 0
            idx = idx[:, :, keep_h][:, :, :, keep_w]
            ch = outs[:, None, None, None] * b + np.arange(b)[None, :, None, None]
            ho = (hh[keep_h] // sh)[None, None, :, None]
            wo = (np.arange(plan.W1)[keep_w] // sw)[None, None, None, :]
            full = np.broadcast_arrays(ch, ho, wo, np.arange(b)[None, :, None, None], idx)
            out.append(((tile, og), full[4].reshape(-1), (full[0].reshape(-1), full[1].reshape(-1), full[2].reshape(-1)), full[3].reshape(-1)))
    return out


def input_polys(shape: StepShape, plan: Any, a: np.ndarray, fwd: np.ndarray, n: int) -> list[np.ndarray]:
    """A share's polynomials in the layer's input layout (twisted for ``b > 1``), in the order the
    ciphertexts travel: what the client encrypts, and what the server adds to them (its share)."""
    t = shape.t
    a = np.asarray(a, dtype=np.int64) % t
    if shape.kind == "linear":
        x = _twist(a.reshape(shape.rows, plan.q, plan.b), fwd, t)
        return [
            CoeffCirculant.linear_input_poly(plan, x[g0 : g0 + plan.per_ct], cti, n)
            for g0 in range(0, shape.rows, plan.per_ct)
            for cti in range(plan.col_tiles)
        ]
    xt = CoeffCirculant.conv_inputs(plan, a[None], fwd, t)[0]
    return [CoeffCirculant.conv_input_poly(plan, xt, tile, cg, n) for tile in range(plan.tiles) for cg in range(plan.chan_groups)]


def _pack(values: np.ndarray, nbytes: int) -> bytes:
    return np.ascontiguousarray(values.astype("<u8")).view(np.uint8).reshape(-1, 8)[:, :nbytes].tobytes()


def _unpack(blob: bytes, count: int, nbytes: int, what: str) -> np.ndarray:
    if len(blob) != count * nbytes:
        raise BackendError(f"he secure: {what}: expected {count * nbytes} bytes, got {len(blob)}")
    buf = np.zeros((count, 8), dtype=np.uint8)
    buf[:, :nbytes] = np.frombuffer(blob, dtype=np.uint8).reshape(count, nbytes)
    return buf.view("<u8").reshape(-1)


class _Side:
    def __init__(self, ctx: BFVContext):
        self.ctx = ctx
        self.seal = ctx.seal
        self._dir = tempfile.mkdtemp(prefix="graphpress-secure-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)  # also at interpreter exit
        self.path = os.path.join(self._dir, "obj")
        last = ctx.context.last_context_data()
        self.q_last = int(last.parms().coeff_modulus()[0].value())
        self.nbytes = (self.q_last.bit_length() + 7) // 8


# ---------------------------------------------------------------------------- client
class ClientStep(_Side):
    """The client's half: encrypt its input share, decrypt its output share."""

    def __init__(self, shape: StepShape, ctx: BFVContext):
        super().__init__(ctx)
        self.shape = shape
        self.plan = shape.plan()
        self.fwd, self.inv = _powers(ctx, shape.b)
        self.outputs = _out_positions(shape, self.plan)
        # a ciphertext at the last level, for its members (parms id, sizes): responses are rebuilt on it
        zero = ctx.encrypt_coeffs(np.zeros(1, dtype=np.int64))
        while zero.coeff_modulus_size() > 1:
            ctx._evaluator.mod_switch_to_next_inplace(zero)
        self._prefix, _ = rawct.coeffs(zero, self.path)

    def encrypt(self, a: np.ndarray) -> list[bytes]:
        """Seeded symmetric encryptions of the input share ``a`` (per-sample ``in_shape``, mod t)."""
        ctx = self.ctx
        polys = input_polys(self.shape, self.plan, a, self.fwd, ctx.poly_degree)
        out = []
        for poly in polys:
            pt = ctx.plain_coeffs(poly, side="client")
            with ctx.counter.timed("client", "encrypt", count="encryptions"):
                seeded = ctx._encryptor.encrypt_symmetric(pt)
            with ctx.counter.timed("client", "serialize"):
                out.append(rawct.save_bytes(seeded, self.path))
        return out

    def decrypt(self, responses: list[bytes]) -> np.ndarray:
        """The client's output share ``Y + off - R (mod t)``, per-sample ``out_shape`` (int64)."""
        s, ctx, t, n = self.shape, self.ctx, self.shape.t, self.ctx.poly_degree
        if len(responses) != len(self.outputs):
            raise BackendError(f"he secure: layer {s.name!r}: expected {len(self.outputs)} response ciphertexts, got {len(responses)}")
        y = np.zeros((s.rows, s.out_features) if s.kind == "linear" else tuple(s.out_shape), dtype=np.int64)
        for blob, (_, pos, where, r) in zip(responses, self.outputs):
            vals = _unpack(blob, n + pos.size, self.nbytes, f"layer {s.name!r} response")
            if int(vals.max(initial=0)) >= self.q_last:
                raise BackendError(f"he secure: layer {s.name!r}: response coefficient out of range (malformed message)")
            data = np.zeros((2, 1, n), dtype=np.uint64)
            data[1, 0] = vals[:n]
            data[0, 0, pos] = vals[n:]
            ct = rawct.rebuild(self.seal, ctx.context, self._prefix, data, self.path, f"layer {s.name!r} response")
            got = ctx.decrypt_coeffs(ct, pos) % t
            share = got * self.inv[r] % t if s.b > 1 else got
            y[where] = share
        return y.reshape(s.out_shape) if s.kind == "linear" else y


def local_contexts(params: BFVParams) -> tuple[BFVContext, BFVContext]:
    """A client and a server context in one process (calibration, tests): the server encrypts
    zeros under the client's public key, passed through SEAL's serialization as on the wire."""
    cctx, sctx = BFVContext(params), BFVContext(params)
    pk = cctx.seal.PublicKey()
    cctx._keygen.create_public_key(pk)
    blob = rawct.save_bytes(pk, os.path.join(cctx._dir, "pk"))
    pk_server = rawct.load_bytes(sctx.seal.PublicKey(), sctx.context, blob, os.path.join(sctx._dir, "pk"), "public key")
    sctx._encryptor = sctx.seal.Encryptor(sctx.context, pk_server)
    return cctx, sctx


# ---------------------------------------------------------------------------- server
def dense_weight(w_int: np.ndarray, kind: str) -> np.ndarray:
    """Dense integer weight ``(m, n)`` / ``(C_out, C_in, kh, kw)`` of a dense or compact circulant one."""
    w = np.asarray(w_int, dtype=np.int64)
    if kind == "linear" and w.ndim == 3:
        p, q, b = w.shape
        r, s = np.arange(b)[:, None], np.arange(b)[None, :]
        return w[:, :, (r - s) % b].transpose(0, 2, 1, 3).reshape(p * b, q * b)
    if kind == "conv2d" and w.ndim == 5:
        kh, kw, p, q, b = w.shape
        r, s = np.arange(b)[:, None], np.arange(b)[None, :]
        return w[:, :, :, :, (r - s) % b].transpose(2, 4, 3, 5, 0, 1).reshape(p * b, q * b, kh, kw)
    return w


def plain_layer(x: np.ndarray, w_dense: np.ndarray, shape: StepShape) -> np.ndarray:
    """``W x`` in exact int64 for one sample (``in_shape`` -> ``out_shape``)."""
    x = np.asarray(x, dtype=np.int64)
    if shape.kind == "linear":
        return (x.reshape(shape.rows, shape.in_features) @ w_dense.T).reshape(shape.out_shape)
    ph, pw = shape.padding
    sh, sw = shape.stride
    kh, kw = shape.kernel_size
    xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (C, Ho, Wo, kh, kw)
    return np.tensordot(w_dense, win, axes=([1, 2, 3], [0, 3, 4]))


def noise_bound_bits(w_int: np.ndarray, shape: StepShape, t: int, n: int | None = None) -> int:
    """``log2`` of a bound on the weight-dependent noise of every response ciphertext at ``N = n``
    (default: the shape's own), for plain modulus ``t``.

    A fresh input ciphertext decrypts as ``(q/t) a + e'`` with ``|e'| <= B_fresh + 1/2`` (SEAL
    scales messages by ``round(q a / t)``, not ``floor(q/t) a``: measured, the noise of a product
    does not grow with ``a``), and the server's plaintext share adds another ``1/2``. A product
    with the centered weight polynomial ``w`` gives ``(q/t) a w + e' w``: the wrap-around of
    ``a w`` past ``t`` is a multiple of ``q`` and vanishes, so coefficient ``j`` of a response
    ``sum_tiles Enc(a_c) w_c`` carries at most ``sum_c ||w_c||_1 (B_fresh + 1)``. The tiles summed
    into one response hold exactly the weights of its output blocks (every input block, every
    kernel tap, once), so the bound is the largest L1 norm of one output group's weights, centered
    mod ``t`` after the twist for ``b > 1`` (there: nearly uniform)."""
    w = np.asarray(w_int, dtype=np.int64)
    n = int(shape.params.poly_degree) if n is None else int(n)
    if shape.b > 1:
        psi = _root(t, 2 * shape.b)
        pw = np.array([pow(psi, u, t) for u in range(shape.b)], dtype=np.int64)
        mags = np.abs(centered(w % t * pw % t, t)).astype(np.float64)
        # compact (p, q, b) / (kh, kw, p, q, b): L1 per output block p
        per_block = mags.sum(axis=(1, 2)) if shape.kind == "linear" else mags.sum(axis=(0, 1, 3, 4))
    else:
        mags = np.abs(w).astype(np.float64)
        per_block = mags.sum(axis=tuple(range(1, mags.ndim)))  # (m, n) / (C_out, C_in, kh, kw): per output
    plan = shape.plan_at(n)
    group = plan.p_t
    sums = np.add.reduceat(per_block, np.arange(0, per_block.size, group)) if per_block.size else np.zeros(1)
    l1 = float(sums.max(initial=0.0))
    return int(math.ceil(math.log2(max(l1, 1.0) * (FRESH_NOISE + 1))))


def _root(t: int, order: int) -> int:
    for a in range(2, 1 << 16):
        r = pow(a, (t - 1) // order, t)
        if pow(r, order // 2, t) == t - 1:
            return r
    raise BackendError(f"he secure: no primitive {order}-th root of unity modulo {t}")  # pragma: no cover


class ServerStep(_Side):
    """The server's half: multiply, add its share's contribution and the mask, flood, pack."""

    def __init__(self, shape: StepShape, ctx: BFVContext, w_int: np.ndarray, bias_int: np.ndarray | None, rng: np.random.Generator):
        super().__init__(ctx)
        self.shape, self.rng = shape, rng
        self.kernel = _kernel(shape)
        what = shape.name
        if shape.kind == "linear":
            self.prep = self.kernel.prepare_linear(ctx, w_int, None, what)
            self.plan, self.tiles, _, self.inv, self.fwd = self.prep.layouts["linear"]
        else:
            self.prep = self.kernel.prepare_conv(ctx, w_int, None, shape.stride, shape.padding, what, input_hw=shape.in_shape[1:])
            self.plan, self.tiles, _, self.inv, self.fwd = self.prep.layouts["conv", shape.in_shape[1], shape.in_shape[2]]
        self.bias = np.zeros(shape.out_features, dtype=np.int64) if bias_int is None else np.asarray(bias_int, dtype=np.int64)
        self.outputs = _out_positions(shape, self.plan)
        self.primes = [int(m.value()) for m in ctx.context.first_context_data().parms().coeff_modulus()]
        self._pool: list[tuple[Any, np.ndarray]] = []
        self.n_inputs = self.plan.col_tiles * math.ceil(shape.rows / self.plan.per_ct) if shape.kind == "linear" else self.plan.tiles * self.plan.chan_groups

    def refill(self) -> None:
        """Offline (before the client's input exists): per response ciphertext, the server's mask
        ``R`` at its coefficients and a public-key encryption of ``bias + off - R`` there whose
        ``c0`` already carries the flooding noise. Online, the server adds one ciphertext to each
        result: masking, re-randomization and flooding cost one addition."""
        with self.ctx.counter.timed("server", "offline"):
            self._pool = [self._masked_zero(k) for k in range(len(self.outputs))]

    def respond(self, blobs: list[bytes], s_share: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """``(responses, R)``: the packed ciphertexts for the client and the server's output share."""
        shape, ctx, plan, t = self.shape, self.ctx, self.plan, self.shape.t
        if len(blobs) != self.n_inputs:
            raise BackendError(f"he secure: layer {shape.name!r}: expected {self.n_inputs} input ciphertexts, got {len(blobs)}")
        s_share = np.asarray(s_share, dtype=np.int64) % t
        # the server's share joins the client's inside the ciphertexts (Enc(a) + s = Enc(X)), in the
        # same layout: no plaintext W s on the server, and the product is W X directly
        s_polys = input_polys(shape, plan, s_share, self.fwd, ctx.poly_degree) if s_share.any() else None
        inputs = []
        for k, blob in enumerate(blobs):
            ct = rawct.load_bytes(self.seal.Ciphertext(), ctx.context, blob, self.path, f"layer {shape.name!r} input {k}")
            if ct.size() != 2 or ct.parms_id() != ctx.context.first_parms_id():
                raise BackendError(f"he secure: layer {shape.name!r} input {k}: not a fresh ciphertext at the layer's parameters")
            if s_polys is not None and s_polys[k].any():
                ctx.add_plain_inplace(ct, ctx.plain_coeffs(s_polys[k]))
            inputs.append(ctx.to_ntt_inplace(ct))
        pool, self._pool = self._pool, []  # used once: a mask or a flood is never reused
        if len(pool) != len(self.outputs):
            pool = [self._masked_zero(k) for k in range(len(self.outputs))]
        mask = np.zeros((shape.rows, shape.out_features) if shape.kind == "linear" else tuple(shape.out_shape), dtype=np.int64)
        per = plan.col_tiles if shape.kind == "linear" else plan.chan_groups
        responses = []
        for k, (key, pos, where, _r) in enumerate(self.outputs):
            group = key[0] // plan.per_ct if shape.kind == "linear" else key[0]
            ins = inputs[group * per : (group + 1) * per]
            acc = self.kernel._accumulate(ctx, [(ins[c], self.tiles[key[1], c]) for c in range(per)])
            zero, r_k = pool[k]
            with ctx.counter.timed("server", "flood"):
                ctx._evaluator.add_inplace(acc, zero)
            mask[where] = r_k
            with ctx.counter.timed("server", "mod_switch"):
                while acc.coeff_modulus_size() > 1:
                    ctx._evaluator.mod_switch_to_next_inplace(acc)
                _, low = rawct.coeffs(acc, self.path)
            responses.append(_pack(np.concatenate([low[1, 0], low[0, 0, pos]]), self.nbytes))
        return responses, mask.reshape(shape.out_shape) if shape.kind == "linear" else mask

    def _masked_zero(self, k: int) -> tuple[Any, np.ndarray]:
        """``(Enc_pk(bias + off - R) with c0 flooded at the read coefficients, R)`` for response ``k``:
        ``R`` fresh and uniform mod ``t`` (the server's output share at those outputs)."""
        ctx, shape, t = self.ctx, self.shape, self.shape.t
        _key, pos, where, r = self.outputs[k]
        r_k = self.rng.integers(0, t, size=pos.size, dtype=np.int64)
        feature = where[1] if shape.kind == "linear" else where[0]
        vals = (self.bias[feature] + shape.offset - r_k) % t
        if shape.b > 1:
            vals = vals * self.fwd[r] % t
        prefix, data = rawct.coeffs(ctx.encrypt_zero_server(), self.path)
        noise = rawct.big_uniform_mod(self.rng, pos.size, shape.flood_bits, self.primes)
        for i, q in enumerate(self.primes):
            data[0, i, pos] = (data[0, i, pos] + noise[i]) % np.uint64(q)
        ct = rawct.rebuild(self.seal, ctx.context, prefix, data, self.path)
        poly = np.zeros(ctx.poly_degree, dtype=np.int64)
        poly[pos] = vals
        ctx.add_plain_inplace(ct, ctx.plain_coeffs(poly))
        return ct, r_k


__all__ = ["ClientStep", "FRESH_NOISE", "ServerStep", "StepShape", "dense_weight", "local_contexts", "noise_bound_bits", "plain_layer"]
