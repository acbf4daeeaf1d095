"""Block-circulant layers with coefficient encoding: many circulant blocks per BFV product.

Claim: a ``(p*b) x (q*b)`` block-circulant matrix (compact ``c (p, q, b)``,
``W[i*b + r, j*b + s] = c[i, j, (r - s) mod b]``, :mod:`graphpress.ir.circulant`) costs about
``ceil(m n / (b N))`` plaintext-ciphertext products, ``b`` times fewer than dense coefficient
encoding, and the result is exact modulo ``t``.

Ring split. Write exponents ``e = u*M + v`` (``M = N/b``, ``0 <= u < b``, ``0 <= v < M``) and
``Y = X^M``, so ``X^e = Y^u X^v`` and ``Y^b = X^N = -1``. In a product of two polynomials whose
``v`` digits add up without reaching ``M`` the ``u`` digits multiply modulo ``Y^b + 1``: a
length-``b`` *negacyclic* convolution per pair of ``v`` positions.

Twist. A circulant block is a *cyclic* convolution, ``y[r] = sum_s c[(r - s) mod b] x[s]``. With
``psi`` a primitive ``2b``-th root of unity mod ``t`` (``psi^b = -1``; it exists because
``t = 1 mod 2N``), ``a~[u] = psi^u a[u]`` gives ``(c~ *neg x~)[r] = psi^r (c *cyc x)[r]``: a wrapped
term picks up ``-1`` from ``Y^b`` and ``psi^b = -1`` from the twist. The client twists ``x``
before encrypting and multiplies the decrypted outputs by ``psi^-r``; the server twists ``c``.

Block packing on ``v`` (Cheetah's layout, one level up). Input block ``j`` sits at ``v = j``,
weight block ``(i, j)`` at ``v = i*q_t + (q_t - 1 - j)`` (reversed), so the product's digit
``v = i*q_t + q_t - 1`` collects exactly ``sum_j c_ij~ *neg x_j~`` (two pairs meet there only
when ``j - j' = (i - i') q_t``, i.e. ``j = j'``, ``i = i'``). A pair whose digits overflow into
``u`` lands at ``v + v' - M``; it can hit a read position only if
``(i - i'') q_t + (j - j') = M``, impossible when ``p_t q_t <= M`` (the left side is at most
``p_t q_t - 1``). So one product handles a ``p_t x q_t`` tile of blocks with ``p_t q_t <= M``;
vectors ``nu`` of a batch sit at ``v`` offsets ``nu * p_t q_t`` (the same argument with
``V p_t q_t <= M``). The tiling and the counts are :func:`graphpress.lowering.he.counts.plan_coeff_linear`.

Convolutions (circulant over channels at each kernel position, compact ``c (kh, kw, p, q, b)``):
the channel inside a block goes on ``u``; Cheetah's HomConv layout goes on ``v`` -- input block
``j``, padded row ``h``, column ``w`` at ``v = j*A + h*W' + w`` (``A = H_t W'``, ``H_t`` rows of
a row tile), the kernel of output block ``i`` reversed at
``v = i*Q*A + (Q-1-j)*A + (kh-1-dy)*W' + (kw-1-dx)``, output at
``v = i*Q*A + (Q-1)*A + (h+kh-1)*W' + (w+kw-1)``. Cross terms land only on unread digits for
valid positions ``h <= H_t - kh``, ``w <= W' - kw`` (the spatial offsets differ by less than a
row / a block), and nothing carries into ``u`` while ``p_t * Q * A <= M``
(:func:`graphpress.lowering.he.counts.plan_coeff_conv`). The client zero-pads; a stride ``s`` conv is
the stride-1 map subsampled (same operations, ``s^2`` times more outputs than used). With
``b = 1`` this is exactly dense coefficient encoding (:mod:`.coeff_dense`).

Products run in the NTT domain: the server transforms each input ciphertext once and each
output once (weights are transformed offline), and leaves out all-zero weight tiles.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphpress.backends.he.bfv import centered, mulmod
from graphpress.backends.he.kernels.base import (
    Kernel,
    Prepared,
    as_int,
    check_fits,
    pair,
    plan_error,
    row_abs_max,
    where,
)
from graphpress.errors import BackendError
from graphpress.lowering.he.counts import (
    CoeffConvPlan,
    CoeffLinearPlan,
    plan_coeff_conv,
    plan_coeff_linear,
)


def _powers(ctx: Any, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``psi^u`` and ``psi^-u`` mod ``t`` for ``u < b`` (``psi`` a primitive ``2b``-th root)."""
    psi = ctx.root_of_unity(2 * b) if b > 1 else 1
    inv = pow(psi, -1, ctx.t)
    fwd = np.array([pow(psi, u, ctx.t) for u in range(b)], dtype=np.int64)
    bwd = np.array([pow(inv, u, ctx.t) for u in range(b)], dtype=np.int64)
    return fwd, bwd


def _twist(a: np.ndarray, pw: np.ndarray, t: int) -> np.ndarray:
    """``a * pw`` mod ``t`` along the last axis (the position inside a block)."""
    return mulmod(a % t, np.broadcast_to(pw, a.shape), t)


def _untwist(vals: np.ndarray, r: np.ndarray, inv: np.ndarray, t: int) -> np.ndarray:
    return centered(mulmod(vals % t, inv[r], t), t)


class CoeffCirculant(Kernel):
    """``coeff-circulant``: compact block-circulant weights, coefficient encoding (module docstring)."""

    name = "coeff-circulant"
    compact = True

    def __init__(self, plan_weights: tuple[float, float, float] | None = None):
        #: the tiling's objective (:func:`graphpress.lowering.he.counts.plan_coeff_conv`); None: server work
        self.plan_weights = plan_weights

    # ------------------------------------------------------------------ weight forms
    def _compact_linear(self, w: np.ndarray, what: str) -> np.ndarray:
        """The compact ``(p, q, b)`` form this kernel multiplies (dense kernels override)."""
        if w.ndim != 3:
            raise BackendError(f"{where(what)}coeff-circulant linear weight must be compact (p, q, b), got shape {w.shape}")
        return w

    def _compact_conv(self, w: np.ndarray, what: str) -> np.ndarray:
        if w.ndim != 5:
            raise BackendError(f"{where(what)}coeff-circulant conv weight must be compact (kh, kw, p, q, b), got shape {w.shape}")
        return w

    def _check_b(self, ctx: Any, b: int, what: str) -> None:
        if b < 1 or b & (b - 1) or b > ctx.poly_degree:
            raise BackendError(f"{where(what)}block size {b} must be a power of two <= N={ctx.poly_degree}")

    # ------------------------------------------------------------------ linear
    def prepare_linear(self, ctx: Any, w_int: Any, bias_int: Any = None, what: str = "") -> Prepared:
        """Server: encode the ``p_t x q_t`` block tiles of the weight as NTT-form plaintexts."""
        c = self._compact_linear(as_int(w_int, "weight", what, (2, 3)), what)
        p, q, b = c.shape
        self._check_b(ctx, b, what)
        check_fits(c, ctx.t, "weight", what)
        bias = None if bias_int is None else as_int(bias_int, "bias", what, (1,)).reshape(-1)
        if bias is not None:
            if bias.size != p * b:
                raise BackendError(f"{where(what)}bias has {bias.size} values, the layer has {p * b} outputs")
            check_fits(bias, ctx.t, "bias", what)
        try:
            plan = plan_coeff_linear(p * b, q * b, ctx.poly_degree, b, what, self.plan_weights)
        except ValueError as err:
            raise plan_error(err, what) from None
        prep = Prepared("linear", what, c, bias, p * b, q * b, row_abs_max(c, 0))
        fwd, inv = _powers(ctx, b)
        ct = _twist(c, fwd, ctx.t)
        big_m, t = plan.M, ctx.t
        u = np.arange(b)
        tiles: dict[tuple[int, int], Any] = {}
        for rt in range(plan.row_tiles):
            rows = np.arange(rt * plan.p_t, min(p, (rt + 1) * plan.p_t))
            for cti in range(plan.col_tiles):
                cols = np.arange(cti * plan.q_t, min(q, (cti + 1) * plan.q_t))
                li, lj = rows - rt * plan.p_t, cols - cti * plan.q_t
                # coefficient u*M + i*q_t + q_t - 1 - j  holds  psi^u c[i, j, u]
                idx = u[None, None, :] * big_m + (li[:, None, None] * plan.q_t + plan.q_t - 1 - lj[None, :, None])
                poly = np.zeros(ctx.poly_degree, dtype=np.int64)
                poly[idx.reshape(-1)] = ct[np.ix_(rows, cols, u)].reshape(-1)
                tiles[rt, cti] = None if not poly.any() else ctx.plain_coeffs(poly, ntt=True)
        biases = {}
        if bias is not None:
            bt = _twist(bias.reshape(p, b), fwd, t)
            for rt in range(plan.row_tiles):
                rows = np.arange(rt * plan.p_t, min(p, (rt + 1) * plan.p_t))
                idx = self._linear_out_index(plan, plan.per_ct, rows - rt * plan.p_t, b)  # (V, i, r)
                poly = np.zeros(ctx.poly_degree, dtype=np.int64)
                poly[idx.reshape(-1)] = np.broadcast_to(bt[rows][None], idx.shape).reshape(-1)
                biases[rt] = ctx.plain_coeffs(poly)
        prep.layouts["linear"] = (plan, tiles, biases, inv, fwd)
        prep.skipped_products = sum(v is None for v in tiles.values())
        return prep

    @staticmethod
    def _linear_out_index(plan: CoeffLinearPlan, vectors: int, local_rows: np.ndarray, b: int) -> np.ndarray:
        """Coefficients ``r*M + nu*span + i*q_t + q_t - 1`` as ``(vectors, rows, b)``."""
        nu = np.arange(vectors)[:, None, None]
        r = np.arange(b)[None, None, :]
        return r * plan.M + nu * plan.span + local_rows[None, :, None] * plan.q_t + plan.q_t - 1

    @staticmethod
    def linear_input_poly(plan: CoeffLinearPlan, xs: np.ndarray, cti: int, n: int) -> np.ndarray:
        """The client's polynomial for column tile ``cti`` of the twisted vectors ``xs``
        (``(vectors, q, b)``): tile block ``j`` of vector ``nu`` at ``u*M + nu*span + j``."""
        u = np.arange(plan.b)
        cols = np.arange(cti * plan.q_t, min(plan.q, (cti + 1) * plan.q_t))
        idx = u[None, None, :] * plan.M + np.arange(xs.shape[0])[:, None, None] * plan.span + (cols - cti * plan.q_t)[None, :, None]
        poly = np.zeros(n, dtype=np.int64)
        poly[idx.reshape(-1)] = xs[:, cols, :].reshape(-1)
        return poly

    def run_linear(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:
        """``x (batch, n) -> W x + bias (batch, m)``: client encrypts, server multiplies, client decrypts."""
        x = as_int(x_int, "input", prep.what, (1, 2))
        single = x.ndim == 1
        x = x.reshape(1, -1) if single else x
        if x.shape[1] != prep.in_features:
            raise BackendError(f"{where(prep.what)}input has {x.shape[1]} features, the layer takes {prep.in_features}")
        self.check_output(ctx, prep, x)
        plan, tiles, biases, inv, fwd = prep.layouts["linear"]
        b, p, q, t = plan.b, plan.p, plan.q, ctx.t
        xt = _twist(x.reshape(-1, q, b), fwd, t)
        y = np.zeros((x.shape[0], p * b), dtype=np.int64)
        u = np.arange(b)
        for g0 in range(0, x.shape[0], plan.per_ct):
            xs = xt[g0 : g0 + plan.per_ct]
            nv = xs.shape[0]
            inputs = [ctx.to_ntt_inplace(ctx.upload_coeffs(self.linear_input_poly(plan, xs, cti, ctx.poly_degree))) for cti in range(plan.col_tiles)]
            # server: one product per tile, summed over column tiles
            for rt in range(plan.row_tiles):
                acc = self._accumulate(ctx, [(inputs[cti], tiles[rt, cti]) for cti in range(plan.col_tiles)])
                if rt in biases:
                    ctx.add_plain_inplace(acc, biases[rt])
                back = ctx.download(acc)
                rows = np.arange(rt * plan.p_t, min(p, (rt + 1) * plan.p_t))
                idx = self._linear_out_index(plan, nv, rows - rt * plan.p_t, b)
                vals = ctx.decrypt_coeffs(back, idx.reshape(-1)).reshape(idx.shape)
                out = _untwist(vals, np.broadcast_to(u, idx.shape), inv, t)  # (nv, rows, b)
                y[g0 : g0 + nv, rows[0] * b : (rows[-1] + 1) * b] = out.reshape(nv, -1)
        return y[0] if single else y

    @staticmethod
    def _accumulate(ctx: Any, pairs: list[tuple[Any, Any]]) -> Any:
        """``sum ct * pt`` over the non-zero plaintexts, back out of NTT form (a fresh zero
        encryption when every plaintext is zero)."""
        acc = None
        for ct, pt in pairs:
            if pt is None:
                continue
            prod = ctx.mul_plain(ct, pt)
            acc = prod if acc is None else ctx.add_inplace(acc, prod)
        if acc is None:
            return ctx.encrypt_zero_server()
        return ctx.from_ntt_inplace(acc)

    # ------------------------------------------------------------------ conv
    def prepare_conv(
        self,
        ctx: Any,
        w_int: Any,
        bias_int: Any = None,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        what: str = "",
        input_hw: tuple[int, int] | None = None,
    ) -> Prepared:
        """Server: keep the weight; encode it for an input size now (``input_hw``) or at the first
        run with that size (the layout depends on ``H x W``)."""
        c = self._compact_conv(as_int(w_int, "weight", what, (4, 5)), what)
        kh, kw, p, q, b = c.shape
        self._check_b(ctx, b, what)
        check_fits(c, ctx.t, "weight", what)
        bias = None if bias_int is None else as_int(bias_int, "bias", what, (1,)).reshape(-1)
        if bias is not None:
            if bias.size != p * b:
                raise BackendError(f"{where(what)}bias has {bias.size} values, the layer has {p * b} output channels")
            check_fits(bias, ctx.t, "bias", what)
        prep = Prepared(
            "conv2d", what, c, bias, p * b, q * b, row_abs_max(c, 2), pair(stride, "stride", what), pair(padding, "padding", what), (kh, kw)
        )
        if input_hw is not None:
            self._conv_layout(ctx, prep, *pair(input_hw, "input_hw", what))
        return prep

    def _conv_layout(self, ctx: Any, prep: Prepared, h: int, w: int) -> tuple:
        key = ("conv", h, w)
        if key in prep.layouts:
            return prep.layouts[key]
        c = prep.weight
        kh, kw, p, q, b = c.shape
        try:
            plan = plan_coeff_conv(p * b, q * b, h, w, kh, kw, ctx.poly_degree, b, prep.stride, prep.padding, prep.what, self.plan_weights)
        except ValueError as err:
            raise plan_error(err, prep.what) from None
        fwd, inv = _powers(ctx, b)
        ct = _twist(c, fwd, ctx.t)  # (kh, kw, p, q, b)
        u = np.arange(b)
        dy, dx = np.arange(kh), np.arange(kw)
        tiles: dict[tuple[int, int], Any] = {}
        for og in range(plan.out_groups):
            outs = np.arange(og * plan.p_t, min(p, (og + 1) * plan.p_t))
            for cg in range(plan.chan_groups):
                chans = np.arange(cg * plan.Q, min(q, (cg + 1) * plan.Q))
                li, lj = outs - og * plan.p_t, chans - cg * plan.Q
                # u*M + i*Q*A + (Q-1-j)*A + (kh-1-dy)*W' + (kw-1-dx), axes (dy, dx, i, j, u)
                idx = (
                    u[None, None, None, None, :] * plan.M
                    + li[None, None, :, None, None] * plan.span
                    + (plan.Q - 1 - lj)[None, None, None, :, None] * plan.area
                    + (kh - 1 - dy)[:, None, None, None, None] * plan.Wp
                    + (kw - 1 - dx)[None, :, None, None, None]
                )
                poly = np.zeros(ctx.poly_degree, dtype=np.int64)
                poly[idx.reshape(-1)] = ct[:, :, outs][:, :, :, chans].reshape(-1)
                tiles[og, cg] = None if not poly.any() else ctx.plain_coeffs(poly, ntt=True)
        biases = {}
        if prep.bias is not None:
            bt = _twist(prep.bias.reshape(p, b), fwd, ctx.t)
            for og in range(plan.out_groups):
                outs = np.arange(og * plan.p_t, min(p, (og + 1) * plan.p_t))
                idx = self._conv_out_index(plan, outs - og * plan.p_t, plan.rows)  # (i, r, h, w)
                poly = np.zeros(ctx.poly_degree, dtype=np.int64)
                poly[idx.reshape(-1)] = np.broadcast_to(bt[outs][:, :, None, None], idx.shape).reshape(-1)
                biases[og] = ctx.plain_coeffs(poly)
        layout = (plan, tiles, biases, inv, fwd)
        prep.layouts[key] = layout
        prep.skipped_products = sum(v is None for v in tiles.values())
        return layout

    @staticmethod
    def _conv_out_index(plan: CoeffConvPlan, local_outs: np.ndarray, rows: int) -> np.ndarray:
        """Coefficients ``r*M + i*Q*A + (Q-1)*A + (h+kh-1)*W' + (w+kw-1)`` as ``(i, r, h, w)``."""
        r = np.arange(plan.b)[None, :, None, None]
        hh = np.arange(rows)[None, None, :, None]
        ww = np.arange(plan.W1)[None, None, None, :]
        base = local_outs[:, None, None, None] * plan.span + (plan.Q - 1) * plan.area
        return r * plan.M + base + (hh + plan.kh - 1) * plan.Wp + (ww + plan.kw - 1)

    @staticmethod
    def conv_inputs(plan: CoeffConvPlan, x: np.ndarray, fwd: np.ndarray, t: int) -> np.ndarray:
        """Zero-padded (plus the last row tile's spare rows), twisted input blocks of a batch
        ``(B, C_in, H, W)``, as ``(B, q, H', W', b)``."""
        ph, pw = plan.padding
        xp = np.zeros((x.shape[0], plan.q * plan.b, plan.Hp + plan.Ht, plan.Wp), dtype=np.int64)
        xp[:, :, ph : ph + plan.height, pw : pw + plan.width] = x
        return _twist(xp.reshape(x.shape[0], plan.q, plan.b, xp.shape[2], plan.Wp).transpose(0, 1, 3, 4, 2), fwd, t)

    @staticmethod
    def conv_input_poly(plan: CoeffConvPlan, xt: np.ndarray, tile: int, cg: int, n: int) -> np.ndarray:
        """The client's polynomial for row tile ``tile`` and channel group ``cg`` of one image's
        blocks ``xt`` (``(q, H', W', b)``): block ``j``, row ``h``, column ``w``, position ``u`` at
        ``u*M + j*A + h*W' + w``."""
        u, hh, ww = np.arange(plan.b), np.arange(plan.Ht), np.arange(plan.Wp)
        chans = np.arange(cg * plan.Q, min(plan.q, (cg + 1) * plan.Q))
        idx = (
            u[None, None, None, :] * plan.M
            + (chans - cg * plan.Q)[:, None, None, None] * plan.area
            + hh[None, :, None, None] * plan.Wp
            + ww[None, None, :, None]
        )
        h0 = tile * plan.rows
        poly = np.zeros(n, dtype=np.int64)
        poly[idx.reshape(-1)] = xt[chans, h0 : h0 + plan.Ht].reshape(-1)
        return poly

    def run_conv(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:
        """``x (batch, C_in, H, W) -> conv(x) + bias (batch, C_out, H_out, W_out)``, exact."""
        x = as_int(x_int, "input", prep.what, (3, 4))
        single = x.ndim == 3
        x = x[None] if single else x
        if x.shape[1] != prep.in_features:
            raise BackendError(f"{where(prep.what)}input has {x.shape[1]} channels, the layer takes {prep.in_features}")
        self.check_output(ctx, prep, x)
        plan, tiles, biases, inv, fwd = self._conv_layout(ctx, prep, int(x.shape[2]), int(x.shape[3]))
        b, p, q, t = plan.b, plan.p, plan.q, ctx.t
        xt = self.conv_inputs(plan, x, fwd, t)  # (B, q, H', W', b)
        out1 = np.zeros((x.shape[0], p * b, plan.H1, plan.W1), dtype=np.int64)
        u = np.arange(b)
        for n_img in range(x.shape[0]):
            for tile in range(plan.tiles):
                h0 = tile * plan.rows
                inputs = [
                    ctx.to_ntt_inplace(ctx.upload_coeffs(self.conv_input_poly(plan, xt[n_img], tile, cg, ctx.poly_degree)))
                    for cg in range(plan.chan_groups)
                ]
                rows = min(plan.rows, plan.H1 - h0)
                for og in range(plan.out_groups):
                    acc = self._accumulate(ctx, [(inputs[cg], tiles[og, cg]) for cg in range(plan.chan_groups)])
                    if og in biases:
                        ctx.add_plain_inplace(acc, biases[og])
                    back = ctx.download(acc)
                    outs = np.arange(og * plan.p_t, min(p, (og + 1) * plan.p_t))
                    idx = self._conv_out_index(plan, outs - og * plan.p_t, rows)  # (i, r, h, w)
                    vals = ctx.decrypt_coeffs(back, idx.reshape(-1)).reshape(idx.shape)
                    res = _untwist(vals, np.broadcast_to(u[None, :, None, None], idx.shape), inv, t)
                    out1[n_img, outs[0] * b : (outs[-1] + 1) * b, h0 : h0 + rows] = res.reshape(-1, rows, plan.W1)
        y = out1[:, :, :: plan.stride[0], :: plan.stride[1]]
        return y[0] if single else y


__all__ = ["CoeffCirculant"]
