"""Dense layers with BFV batching: the diagonal method with baby-step/giant-step rotations.

Slots. With ``t = 1 (mod 2N)`` a plaintext is a ``2 x S`` matrix (``S = N/2``) of ``Z_t``
values; products and additions act slot-wise and a Galois automorphism rotates both rows
(``rot(x, k)[s] = x[s + k]``, one key switch).

Diagonal method (Halevi-Shoup), for an ``mb x nb`` chunk of the weight:

* *tall* (``mb >= nb``): slot ``s < mb`` computes row ``s``. The input is written with period
  ``nb`` (``x[i mod nb]`` at slot ``i``), so ``rot(x, k)[s] = x[(s + k) mod nb]`` and
  ``y = sum_{k < nb} d_k * rot(x, k)`` with ``d_k[s] = W[s, (s + k) mod nb]``: ``D = nb``
  products, no folding. A tile spans ``mb + nb - 1`` slots.
* *wide* (``mb < nb``, GAZELLE's hybrid): pad the columns to ``n' = mb * 2^F``; with period
  ``n'``, ``z = sum_{k < mb} d_k * rot(x, k)``, ``d_k[s] = W[s mod mb, (s + k) mod n']`` for
  ``s < n'``, then ``F`` rotate-and-sum folds ``z += rot(z, mb * 2^f)`` leave
  ``y[r] = sum_t z[r + t*mb]`` in slot ``r`` -- for each ``r`` the pairs ``(t, k)`` cover every
  column once. ``D = mb`` products, ``F`` more rotations; a tile spans ``n' + mb - 1`` slots.

Baby-step/giant-step: ``k = g*n1 + j``; ``sum_k d_k rot(x, k) = sum_g rot(sum_j rot(d_k, -g*n1)
* rot(x, j), g*n1)`` -- the server pre-rotates the diagonals, so ``n1 - 1`` baby rotations per
input ciphertext and ``n2 - 1`` giant rotations per output ciphertext replace ``D - 1``.

Packing. A matrix larger than a row (tile > ``S``) is cut into ``R x C`` chunks (column chunks
sum into the same output ciphertext before the giant steps, which are linear). Tiles repeat
along both rows, one input vector each, so ``V = 2 floor(S / tile)`` vectors share every
operation. Products run in the NTT domain (baby-step ciphertexts are transformed once, the
inner sums transformed back before each giant rotation, since BFV rotates only outside it).

Conv: im2col by the client -- one vector of ``C_in*kh*kw`` values per output position, so each
input value is encrypted and sent up to ``kh*kw`` times (the price of not rotating over the
image, as GAZELLE's packed convolution does). Stride and padding are applied while gathering
the patches, so no output is wasted. Layout and counts:
:func:`graphpress.lowering.he.counts.plan_slot_linear`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
from graphpress.lowering.he.counts import SlotLinearPlan, conv_out, plan_slot_linear


def _tile_offsets(plan: SlotLinearPlan, vectors: int) -> np.ndarray:
    """Slot offset of vector ``nu``'s tile: row ``nu // T``, tile ``nu % T`` (``T = S // tile``)."""
    per_row = plan.S // plan.tile
    nu = np.arange(vectors)
    return (nu // per_row) * plan.S + (nu % per_row) * plan.tile


def _diagonals(plan: SlotLinearPlan, wb: np.ndarray) -> np.ndarray:
    """``(D, lanes)``: ``d_k[s]`` of a zero-padded ``mb x nb`` chunk (module docstring)."""
    s = np.arange(plan.lanes)[None, :]
    k = np.arange(plan.D)[:, None]
    if plan.tall:
        return wb[np.broadcast_to(s, (plan.D, plan.lanes)), (s + k) % plan.nb]
    col = (s + k) % plan.width
    padded = np.zeros((plan.mb, plan.width), dtype=np.int64)
    padded[:, : plan.nb] = wb
    return padded[np.broadcast_to(s % plan.mb, col.shape), col]


class SlotDense(Kernel):
    """``slot-dense``: dense integer weights, BFV batching, diagonal method + BSGS (module docstring)."""

    name = "slot-dense"

    def prepare_linear(self, ctx: Any, w_int: Any, bias_int: Any = None, what: str = "") -> Prepared:
        """Server: pre-rotated diagonals of every chunk as NTT plaintexts; client: Galois keys for
        exactly the plan's rotation steps."""
        w = as_int(w_int, "weight", what, (2,))
        check_fits(w, ctx.t, "weight", what)
        m, n = w.shape
        bias = None if bias_int is None else as_int(bias_int, "bias", what, (1,)).reshape(-1)
        if bias is not None:
            if bias.size != m:
                raise BackendError(f"{where(what)}bias has {bias.size} values, the layer has {m} outputs")
            check_fits(bias, ctx.t, "bias", what)
        try:
            plan = plan_slot_linear(m, n, ctx.poly_degree, what)
        except ValueError as err:
            raise plan_error(err, what) from None
        ctx.ensure_rotations(plan.steps(), what=what)
        prep = Prepared("linear", what, w, bias, m, n, row_abs_max(w, 0))
        offsets = _tile_offsets(plan, plan.per_ct)
        lanes = offsets[:, None] + np.arange(plan.lanes)[None, :]  # (V, lanes)
        diags: dict[tuple[int, int, int], Any] = {}
        for r in range(plan.R):
            for c in range(plan.C):
                wb = np.zeros((plan.mb, plan.nb), dtype=np.int64)
                blk = w[r * plan.mb : (r + 1) * plan.mb, c * plan.nb : (c + 1) * plan.nb]
                wb[: blk.shape[0], : blk.shape[1]] = blk
                d = _diagonals(plan, wb)
                for k in range(plan.D):
                    vec = np.zeros(ctx.poly_degree, dtype=np.int64)
                    vec[lanes.reshape(-1)] = np.broadcast_to(d[k], lanes.shape).reshape(-1)
                    shift = (k // plan.n1) * plan.n1  # pre-rotate by -g*n1 (right by g*n1), row-wise
                    vec = np.roll(vec.reshape(2, plan.S), shift, axis=1).reshape(-1)
                    diags[r, c, k] = None if not vec.any() else ctx.plain_slots(vec, ntt=True)
        biases = {}
        if bias is not None:
            for r in range(plan.R):
                vec = np.zeros(ctx.poly_degree, dtype=np.int64)
                part = bias[r * plan.mb : (r + 1) * plan.mb]
                vec[(offsets[:, None] + np.arange(part.size)[None, :]).reshape(-1)] = np.tile(part, plan.per_ct)
                biases[r] = ctx.plain_slots(vec)
        prep.layouts["linear"] = (plan, diags, biases)
        prep.skipped_products = sum(v is None for v in diags.values())
        return prep

    def run_linear(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:
        """``x (batch, n) -> W x + bias (batch, m)``, exact; ``V`` rows per ciphertext."""
        x = as_int(x_int, "input", prep.what, (1, 2))
        single = x.ndim == 1
        x = x.reshape(1, -1) if single else x
        if x.shape[1] != prep.in_features:
            raise BackendError(f"{where(prep.what)}input has {x.shape[1]} features, the layer takes {prep.in_features}")
        self.check_output(ctx, prep, x)
        y = self._matvec(ctx, prep, x)
        return y[0] if single else y

    def _matvec(self, ctx: Any, prep: Prepared, x: np.ndarray) -> np.ndarray:
        """The encrypted product of every row of ``x`` (checked by the caller)."""
        plan, diags, biases = prep.layouts["linear"]
        y = np.zeros((x.shape[0], prep.out_features), dtype=np.int64)
        for g0 in range(0, x.shape[0], plan.per_ct):
            xs = x[g0 : g0 + plan.per_ct]
            nv = xs.shape[0]
            offsets = _tile_offsets(plan, nv)
            # client: each vector's chunk repeated with period `width` over its tile
            babies = []
            for c in range(plan.C):
                chunk = np.zeros((nv, plan.width), dtype=np.int64)
                part = xs[:, c * plan.nb : (c + 1) * plan.nb]
                chunk[:, : part.shape[1]] = part
                vec = np.zeros(ctx.poly_degree, dtype=np.int64)
                pos = np.arange(plan.tile)
                vec[(offsets[:, None] + pos[None, :]).reshape(-1)] = chunk[:, pos % plan.width].reshape(-1)
                ct = ctx.upload_slots(vec)
                rots = [ct] + [ctx.rotate_rows(ct, j) for j in range(1, plan.n1)]
                babies.append([ctx.to_ntt_inplace(r_) for r_ in rots])  # after every rotation of ct
            # server: giant steps per row chunk
            for r in range(plan.R):
                acc = None
                for g in range(plan.n2):
                    inner = None
                    for c in range(plan.C):
                        for j in range(plan.n1):
                            k = g * plan.n1 + j
                            if k >= plan.D or diags[r, c, k] is None:
                                continue
                            prod = ctx.mul_plain(babies[c][j], diags[r, c, k])
                            inner = prod if inner is None else ctx.add_inplace(inner, prod)
                    if inner is None:
                        continue
                    ctx.from_ntt_inplace(inner)
                    if g:
                        inner = ctx.rotate_rows(inner, g * plan.n1)
                    acc = inner if acc is None else ctx.add_inplace(acc, inner)
                if acc is None:
                    acc = ctx.encrypt_zero_server()
                for f in range(plan.folds):
                    ctx.add_inplace(acc, ctx.rotate_rows(acc, plan.mb << f))
                if r in biases:
                    ctx.add_plain_inplace(acc, biases[r])
                slots = ctx.decrypt_slots(ctx.download(acc))
                rows = min(plan.mb, prep.out_features - r * plan.mb)
                idx = offsets[:, None] + np.arange(rows)[None, :]
                y[g0 : g0 + nv, r * plan.mb : r * plan.mb + rows] = slots[idx]
        return y

    # ------------------------------------------------------------------ conv (im2col)
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
        """The conv as the ``C_out x (C_in*kh*kw)`` matrix its im2col patches multiply
        (``input_hw`` is accepted for a uniform API; the layout does not depend on it)."""
        w = as_int(w_int, "weight", what, (4,))
        c_out, c_in, kh, kw = w.shape
        prep = self.prepare_linear(ctx, w.reshape(c_out, c_in * kh * kw), bias_int, what)
        prep.kind, prep.in_features = "conv2d", c_in
        prep.stride, prep.padding, prep.kernel = pair(stride, "stride", what), pair(padding, "padding", what), (kh, kw)
        prep.weight = w
        return prep

    def run_conv(self, ctx: Any, prep: Prepared, x_int: Any) -> np.ndarray:
        """``x (batch, C_in, H, W) -> conv(x) + bias``: the client gathers the patches (im2col)."""
        x = as_int(x_int, "input", prep.what, (3, 4))
        single = x.ndim == 3
        x = x[None] if single else x
        if x.shape[1] != prep.in_features:
            raise BackendError(f"{where(prep.what)}input has {x.shape[1]} channels, the layer takes {prep.in_features}")
        self.check_output(ctx, prep, x)
        (kh, kw), (sh, sw), (ph, pw) = prep.kernel, prep.stride, prep.padding
        ho, wo = conv_out(x.shape[2], kh, sh, ph), conv_out(x.shape[3], kw, sw, pw)
        if ho < 1 or wo < 1:
            raise BackendError(f"{where(prep.what)}kernel {kh}x{kw} is larger than the padded input {tuple(x.shape[2:])}")
        xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw][:, :, :ho, :wo]  # (B, C, ho, wo, kh, kw)
        patches = win.transpose(0, 2, 3, 1, 4, 5).reshape(x.shape[0] * ho * wo, -1)
        y = self._matvec(ctx, prep, patches).reshape(x.shape[0], ho, wo, -1).transpose(0, 3, 1, 2)
        return y[0] if single else y


__all__ = ["SlotDense"]
