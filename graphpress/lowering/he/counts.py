"""Layouts and exact operation counts of the BFV layer kernels (pure Python: no HE library).

The HE kernels (:mod:`graphpress.backends.he.kernels`) execute the *plans* computed here, and
the counts below are what they execute -- the kernel tests compare the kernels' operation
counters with these formulas -- so a pass can price a layer at any shape and block size without
running HE (a measured cost model multiplies them by measured per-operation times).

Notation: ``N`` polynomial degree, ``t`` plaintext modulus, ``S = N/2`` slots per batching row,
``m x n`` weight (``m`` outputs), ``b`` circulant block size (``p = m/b``, ``q = n/b``), ``M = N/b``.
One *group* is the set of input vectors that share ciphertexts; ``vectors`` rows (batch) need
``G = ceil(vectors / V)`` groups for ``V`` vectors per ciphertext.

``coeff-circulant`` (and ``coeff-dense`` = the same layout with ``b = 1``, i.e. Cheetah)
    Exponents ``e = u*M + v``, ``Y = X^M`` (``Y^b = -1``): the ``u`` digit holds the position
    inside a circulant block and multiplies negacyclically, the ``v`` digit holds blocks.
    A linear tile of ``p_t x q_t`` blocks with ``p_t * q_t <= M`` costs one product::

        input  (vector nu, block j):   v = nu*p_t*q_t + j                 coefficient u*M + v = psi^u x_j[u]
        weight (block i, j):           v = i*q_t + q_t - 1 - j            coefficient u*M + v = psi^u c_ij[u]
        output (vector nu, block i):   v = nu*p_t*q_t + i*q_t + q_t - 1   coefficient r*M + v = psi^r y_i[r]

    (``psi`` a primitive ``2b``-th root of unity mod ``t``: the twist turns the cyclic
    convolution of a circulant block into the ring's negacyclic one). Per group, with
    ``R = ceil(p/p_t)`` row tiles and ``C = ceil(q/q_t)`` column tiles::

        encryptions = sent = forward NTTs = C          products = R*C
        ct_adds = R*(C-1)    inverse NTTs = decryptions = received = R    plain_adds = R (bias)
        rotations = key_switches = 0                   V = floor(M / (p_t*q_t))

    The plan minimizes the server cost of one vector (products, NTTs and additions weighted by
    their measured times, :data:`PRODUCT_WEIGHT` ...), so products ~ ``ceil(m n / (b N))``.
    Conv (HomConv over blocks of channels): the client zero-pads; a tile is ``rows`` output
    rows (``H_t = rows + kh - 1`` input rows) of ``Q`` input channel blocks and ``p_t`` output
    channel blocks, with ``p_t * Q * H_t * W' <= M``::

        input  (block j, row h, col w):       v = j*H_t*W' + h*W' + w
        weight (out block i, in block j, dy, dx): v = i*Q*H_t*W' + (Q-1-j)*H_t*W' + (kh-1-dy)*W' + (kw-1-dx)
        output (out block i, row h, col w):   v = i*Q*H_t*W' + (Q-1)*H_t*W' + (h+kh-1)*W' + (w+kw-1)

    Per image, ``T = ceil(H1/rows)`` row tiles (``H1`` stride-1 output rows), ``C = ceil(q/Q)``,
    ``R = ceil(p/p_t)``: encryptions = sent = forward NTTs = ``T*C``, products = ``T*R*C``,
    ct_adds = ``T*R*(C-1)``, inverse NTTs = decryptions = received = ``T*R``. Stride ``s``
    computes the stride-1 map and keeps every ``s``-th row and column (no extra operations; the
    ciphertexts carry ``s^2`` times more outputs than are used).

``slot-dense`` (BFV batching, diagonal method with baby-step/giant-step)
    The matrix is cut into ``R x C`` chunks of ``mb x nb``. A *tall* chunk (``mb >= nb``) has
    ``D = nb`` diagonals, slot ``s < mb`` computes row ``s`` from the input repeated with period
    ``nb`` (tile of ``mb + nb - 1`` slots). A *wide* chunk uses ``D = mb`` diagonals of length
    ``n' = mb * 2^ceil(log2(nb/mb))`` and ``F = log2(n'/mb)`` rotate-and-sum folds (tile of
    ``n' + mb - 1`` slots). ``V = 2 * floor(S / tile)`` vectors per ciphertext (both rows).
    ``n1 = 2^ceil(log2(D)/2)``, ``n2 = ceil(D/n1)``. Per group::

        encryptions = sent = C          products = R*C*D          forward NTTs = C*n1
        rotations = key_switches = C*(n1-1) + R*(n2-1) + R*F      inverse NTTs = R*n2
        ct_adds = R*(C*D - 1) + R*F     decryptions = received = R    plain_adds = R (bias)

    A conv runs as im2col by the client: ``m = C_out``, ``n = C_in*kh*kw``, one vector per
    output position -- each input value is sent up to ``kh*kw`` times.

Counts assume every weight plaintext is non-zero; a kernel skips the product (and its
addition) for an all-zero one and says how many it skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ENCODINGS = ("slot-dense", "coeff-dense", "coeff-circulant")
#: Relative server cost of each operation when a plan compares layouts, in NTT-domain
#: plaintext products. Measured with SEAL at N = 8192, two 60-bit data primes (thread CPU time,
#: medians of 200): product 0.10 ms, forward NTT of a ciphertext 0.47 ms, inverse NTT 0.32 ms,
#: addition 0.03 ms, rotation 2.3 ms. A ciphertext moved (encrypted or decrypted, serialized,
#: sent) is priced like a rotation.
PRODUCT_WEIGHT = 1.0
FORWARD_NTT_WEIGHT = 4.5
INVERSE_NTT_WEIGHT = 3.0
ADD_WEIGHT = 0.3
ROTATION_WEIGHT = 20.0
CIPHERTEXT_WEIGHT = 20.0
COUNT_FIELDS = (
    "plain_mults",
    "ct_adds",
    "plain_adds",
    "rotations",
    "key_switches",
    "ntts",
    "encryptions",
    "decryptions",
    "ciphertexts_sent",
    "ciphertexts_received",
)


def _where(what: str) -> str:
    return f"layer {what!r}: " if what else ""


def _check_degree(n_deg: int, what: str) -> None:
    if n_deg < 2 or n_deg & (n_deg - 1):
        raise ValueError(f"{_where(what)}poly_degree {n_deg} is not a power of two")


def _check_block(m: int, n: int, n_deg: int, b: int, what: str) -> None:
    if b < 1 or b & (b - 1):
        raise ValueError(f"{_where(what)}block size {b} is not a power of two")
    if m % b or n % b:
        raise ValueError(f"{_where(what)}block size {b} does not divide the {m}x{n} weight")
    if b > n_deg:
        raise ValueError(f"{_where(what)}block size {b} exceeds poly_degree {n_deg}")


def _counts(**kw: int) -> dict[str, int]:
    out = dict.fromkeys(COUNT_FIELDS, 0)
    out.update({k: int(v) for k, v in kw.items()})
    out["key_switches"] = out["rotations"]
    return out


def _coeff_cost(products: int, inputs: int, outputs: int) -> float:
    """Server cost of ``products`` NTT-domain products summed into ``outputs`` ciphertexts from
    ``inputs`` ciphertexts (one forward NTT per input, one inverse per output)."""
    adds = products - outputs
    return PRODUCT_WEIGHT * products + FORWARD_NTT_WEIGHT * inputs + INVERSE_NTT_WEIGHT * outputs + ADD_WEIGHT * adds


def _plan_cost(weights: tuple[float, float, float] | None, products: int, inputs: int, outputs: int) -> float:
    """The planner's objective: the server-side weighted cost, or ``weights = (product, input,
    output)`` seconds per product, input ciphertext and response ciphertext when a protocol
    measures its own (the secure protocol: a response costs ~30 products)."""
    if weights is None:
        return _coeff_cost(products, inputs, outputs)
    wp, wi, wo = weights
    return wp * products + wi * inputs + wo * outputs


#: The secure protocol's tiling objective (see :func:`_plan_cost`): a product, an input
#: ciphertext, a response ciphertext. Measured through its steps (N = 8192, two primes) a
#: ciphertext either way costs ~17 products (2.4 / 2.5 ms against 0.14 ms); on ResNet-20
#: (b = 1..16) the objectives (1, 8, 8), (1, 6, 12), (1, 12, 6), (1, 15, 28) and the server-only
#: one came within 5% of each other in HE time, (1, 8, 8) the lowest for the dense model.
SECURE_PLAN_WEIGHTS = (1.0, 8.0, 8.0)


def _split(total: int, parts: int) -> int:
    """Tile size that splits ``total`` into ``parts`` near-equal tiles."""
    return math.ceil(total / parts)


# ---------------------------------------------------------------------------- coefficient: linear
@dataclass(frozen=True)
class CoeffLinearPlan:
    """Tiling of a ``(p*b) x (q*b)`` (block-circulant) matrix into coefficient-encoded products."""

    poly_degree: int
    b: int
    p: int
    q: int
    p_t: int
    q_t: int
    per_ct: int  # vectors per ciphertext

    @property
    def M(self) -> int:
        return self.poly_degree // self.b

    @property
    def span(self) -> int:
        """v-digits one vector's product occupies (``p_t * q_t``)."""
        return self.p_t * self.q_t

    @property
    def row_tiles(self) -> int:
        return math.ceil(self.p / self.p_t)

    @property
    def col_tiles(self) -> int:
        return math.ceil(self.q / self.q_t)

    def groups(self, vectors: int) -> int:
        return math.ceil(vectors / self.per_ct)


def plan_coeff_linear(
    m: int, n: int, poly_degree: int, b: int = 1, what: str = "", weights: tuple[float, float, float] | None = None
) -> CoeffLinearPlan:
    """Choose ``(p_t, q_t)`` with ``p_t * q_t <= N/b`` minimizing the weighted server cost of one
    vector (products, NTTs, additions: :data:`PRODUCT_WEIGHT` ...; or ``weights``, see
    :func:`_plan_cost`; ties: fewer ciphertexts, then the smaller span so that more vectors share
    a ciphertext).

    The tiling does not depend on the batch: the server encodes its weights once, and a batch of
    ``k`` vectors then needs ``ceil(k / per_ct)`` groups.
    """
    _check_degree(poly_degree, what)
    _check_block(m, n, poly_degree, b, what)
    p, q, big_m = m // b, n // b, poly_degree // b
    best, best_key = None, None
    for cols in sorted({math.ceil(q / q_t) for q_t in range(1, min(q, big_m) + 1)}):
        q_t = _split(q, cols)
        if q_t > big_m:
            continue
        p_t = _split(p, math.ceil(p / min(p, big_m // q_t)))
        plan = CoeffLinearPlan(poly_degree, b, p, q, p_t, q_t, big_m // (p_t * q_t))
        r, c = plan.row_tiles, plan.col_tiles
        key = (_plan_cost(weights, r * c, c, r), r + c, plan.span, -q_t)
        if best_key is None or key < best_key:
            best, best_key = plan, key
    assert best is not None  # q_t = 1, p_t = 1 always fits (M >= 1)
    return best


def coeff_linear_counts(plan: CoeffLinearPlan, vectors: int = 1, bias: bool = False) -> dict[str, int]:
    g, r, c = plan.groups(max(1, int(vectors))), plan.row_tiles, plan.col_tiles
    return _counts(
        plain_mults=g * r * c,
        ct_adds=g * r * (c - 1),
        plain_adds=g * r if bias else 0,
        ntts=g * (c + r),
        encryptions=g * c,
        decryptions=g * r,
        ciphertexts_sent=g * c,
        ciphertexts_received=g * r,
    )


# ---------------------------------------------------------------------------- coefficient: conv
def conv_out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


@dataclass(frozen=True)
class CoeffConvPlan:
    """HomConv tiling of a (block-circulant) conv over a zero-padded ``H' x W'`` input."""

    poly_degree: int
    b: int
    p: int  # output channel blocks
    q: int  # input channel blocks
    kh: int
    kw: int
    height: int  # input H (before padding)
    width: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    rows: int  # stride-1 output rows per tile
    Q: int  # input channel blocks per ciphertext
    p_t: int  # output channel blocks per product

    @property
    def M(self) -> int:
        return self.poly_degree // self.b

    @property
    def Hp(self) -> int:
        return self.height + 2 * self.padding[0]

    @property
    def Wp(self) -> int:
        return self.width + 2 * self.padding[1]

    @property
    def H1(self) -> int:
        """Stride-1 output rows."""
        return self.Hp - self.kh + 1

    @property
    def W1(self) -> int:
        return self.Wp - self.kw + 1

    @property
    def Ht(self) -> int:
        """Input rows per tile."""
        return self.rows + self.kh - 1

    @property
    def area(self) -> int:
        """v-digits of one channel block in a tile."""
        return self.Ht * self.Wp

    @property
    def span(self) -> int:
        return self.Q * self.area

    @property
    def tiles(self) -> int:
        return math.ceil(self.H1 / self.rows)

    @property
    def chan_groups(self) -> int:
        return math.ceil(self.q / self.Q)

    @property
    def out_groups(self) -> int:
        return math.ceil(self.p / self.p_t)

    @property
    def out_hw(self) -> tuple[int, int]:
        return (
            conv_out(self.height, self.kh, self.stride[0], self.padding[0]),
            conv_out(self.width, self.kw, self.stride[1], self.padding[1]),
        )


def plan_coeff_conv(
    c_out: int,
    c_in: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    poly_degree: int,
    b: int = 1,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    what: str = "",
    weights: tuple[float, float, float] | None = None,
) -> CoeffConvPlan:
    """Choose (rows per tile, input blocks per ciphertext, output blocks per product) minimizing
    the weighted server cost per image (or ``weights``, see :func:`_plan_cost`), subject to
    ``p_t * Q * (rows + kh - 1) * W' <= N/b``."""
    _check_degree(poly_degree, what)
    _check_block(c_out, c_in, poly_degree, b, what)
    stride, padding = (int(stride[0]), int(stride[1])), (int(padding[0]), int(padding[1]))
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"{_where(what)}stride {stride} / padding {padding} out of range")
    p, q, big_m = c_out // b, c_in // b, poly_degree // b
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    h1 = hp - kh + 1
    if h1 < 1 or wp - kw + 1 < 1:
        raise ValueError(f"{_where(what)}kernel {kh}x{kw} is larger than the padded input {hp}x{wp}")
    if kh * wp > big_m:
        raise ValueError(
            f"{_where(what)}one padded row block ({kh} rows x {wp}) exceeds N/b = {big_m} coefficients; "
            "use a larger poly_degree or a smaller block size"
        )
    best, best_key = None, None
    for tiles in sorted({math.ceil(h1 / r) for r in range(1, h1 + 1)}):
        rows = _split(h1, tiles)
        area = (rows + kh - 1) * wp
        if area > big_m:
            continue
        for cg in sorted({math.ceil(q / k) for k in range(1, min(q, big_m // area) + 1)}):
            qq = _split(q, cg)
            if qq * area > big_m:
                continue
            p_t = _split(p, math.ceil(p / min(p, big_m // (qq * area))))
            plan = CoeffConvPlan(poly_degree, b, p, q, kh, kw, h, w, stride, padding, rows, qq, p_t)
            t_, c_, r_ = plan.tiles, plan.chan_groups, plan.out_groups
            key = (t_ * _plan_cost(weights, r_ * c_, c_, r_), t_ * (r_ + c_), -rows)
            if best_key is None or key < best_key:
                best, best_key = plan, key
    assert best is not None
    return best


def coeff_conv_counts(plan: CoeffConvPlan, batch: int = 1, bias: bool = False) -> dict[str, int]:
    t_, c_, r_ = plan.tiles * max(1, int(batch)), plan.chan_groups, plan.out_groups
    return _counts(
        plain_mults=t_ * r_ * c_,
        ct_adds=t_ * r_ * (c_ - 1),
        plain_adds=t_ * r_ if bias else 0,
        ntts=t_ * (c_ + r_),
        encryptions=t_ * c_,
        decryptions=t_ * r_,
        ciphertexts_sent=t_ * c_,
        ciphertexts_received=t_ * r_,
    )


# ---------------------------------------------------------------------------- slots
def bsgs(d: int) -> tuple[int, int]:
    """Baby and giant steps for ``d`` diagonals: ``n1 = 2^ceil(log2(d)/2)``, ``n2 = ceil(d/n1)``."""
    n1 = 1 << math.ceil(math.log2(d) / 2) if d > 1 else 1
    return n1, math.ceil(d / n1)


@dataclass(frozen=True)
class SlotLinearPlan:
    """Diagonal-method layout of an ``m x n`` matrix in ``R x C`` chunks of ``mb x nb``."""

    poly_degree: int
    m: int
    n: int
    R: int
    C: int

    @property
    def S(self) -> int:
        return self.poly_degree // 2

    @property
    def mb(self) -> int:
        return _split(self.m, self.R)

    @property
    def nb(self) -> int:
        return _split(self.n, self.C)

    @property
    def tall(self) -> bool:
        return self.mb >= self.nb

    @property
    def D(self) -> int:
        return self.nb if self.tall else self.mb

    @property
    def width(self) -> int:
        """Period of the repeated input: ``nb`` (tall) or ``n' = mb * 2^F`` (wide)."""
        return self.nb if self.tall else self.mb << self.folds

    @property
    def folds(self) -> int:
        return 0 if self.tall else math.ceil(math.log2(self.nb / self.mb))

    @property
    def lanes(self) -> int:
        """Slots per tile that hold a diagonal product: ``mb`` (tall) or ``n'`` (wide)."""
        return self.mb if self.tall else self.width

    @property
    def tile(self) -> int:
        return self.lanes + self.D - 1

    @property
    def per_ct(self) -> int:
        return 2 * (self.S // self.tile)

    @property
    def n1(self) -> int:
        return bsgs(self.D)[0]

    @property
    def n2(self) -> int:
        return bsgs(self.D)[1]

    def groups(self, vectors: int) -> int:
        return math.ceil(vectors / self.per_ct)

    def steps(self) -> list[int]:
        """Row-rotation steps the kernel uses (Galois keys needed)."""
        out = set(range(1, self.n1)) | {g * self.n1 for g in range(1, self.n2)} | {self.mb << f for f in range(self.folds)}
        return sorted(out - {0})


def slot_linear_counts(plan: SlotLinearPlan, vectors: int = 1, bias: bool = False) -> dict[str, int]:
    g, r, c, d, n1, n2, f = plan.groups(max(1, int(vectors))), plan.R, plan.C, plan.D, plan.n1, plan.n2, plan.folds
    return _counts(
        plain_mults=g * r * c * d,
        ct_adds=g * (r * (c * d - 1) + r * f),
        plain_adds=g * r if bias else 0,
        rotations=g * (c * (n1 - 1) + r * (n2 - 1) + r * f),
        ntts=g * (c * n1 + r * n2),
        encryptions=g * c,
        decryptions=g * r,
        ciphertexts_sent=g * c,
        ciphertexts_received=g * r,
    )


def plan_slot_linear(m: int, n: int, poly_degree: int, what: str = "") -> SlotLinearPlan:
    """Choose the chunking ``R x C`` minimizing the weighted server cost (module constants) plus
    the ciphertexts sent and received, for one vector (ties: more vectors per ciphertext);
    independent of the batch, like the coefficient plans. (Without the ciphertext term a small
    matrix would be cut into single columns: no rotation, but one upload per column.)"""
    _check_degree(poly_degree, what)
    if poly_degree < 4:
        raise ValueError(f"{_where(what)}poly_degree {poly_degree} too small for batching")
    s = poly_degree // 2
    r_min, c_min = math.ceil(m / s), math.ceil(n / s)
    best, best_key = None, None
    for r in range(r_min, min(m, 4 * r_min + 4) + 1):
        for c in range(c_min, min(n, 4 * c_min + 4) + 1):
            plan = SlotLinearPlan(poly_degree, m, n, r, c)
            if plan.tile > s:
                continue
            k = slot_linear_counts(plan, 1)
            moved = k["ciphertexts_sent"] + k["ciphertexts_received"]
            cost = (
                PRODUCT_WEIGHT * k["plain_mults"]
                + FORWARD_NTT_WEIGHT * c * plan.n1
                + INVERSE_NTT_WEIGHT * r * plan.n2
                + ADD_WEIGHT * k["ct_adds"]
                + ROTATION_WEIGHT * k["rotations"]
                + CIPHERTEXT_WEIGHT * moved
            )
            key = (cost, -plan.per_ct, r * c)
            if best_key is None or key < best_key:
                best, best_key = plan, key
    if best is None:
        raise ValueError(f"{_where(what)}no slot layout of the {m}x{n} weight fits {s} slots")
    return best


# ---------------------------------------------------------------------------- public formulas
def _encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown HE encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    return encoding


def counts_linear(encoding: str, m: int, n: int, poly_degree: int, b: int = 1, vectors: int = 1, bias: bool = False, what: str = "") -> dict[str, int]:
    """Operations of one ``m x n`` linear layer on ``vectors`` input rows.

    Parameters
    ----------
    encoding : str
        ``"slot-dense"``, ``"coeff-dense"`` or ``"coeff-circulant"``.
    m, n : int
        Output and input features.
    poly_degree : int
        ``N``.
    b : int
        Circulant block size (``coeff-circulant`` only; the dense encodings ignore it).
    vectors : int
        Input rows (batch x tokens).
    bias : bool
        Whether the server adds a bias plaintext.

    Returns
    -------
    dict
        The :data:`COUNT_FIELDS` (the keys of :class:`graphpress.backends.he.counter.OpCounts`
        without the bytes).
    """
    enc = _encoding(encoding)
    if enc == "slot-dense":
        return slot_linear_counts(plan_slot_linear(m, n, poly_degree, what), vectors, bias)
    bb = b if enc == "coeff-circulant" else 1
    return coeff_linear_counts(plan_coeff_linear(m, n, poly_degree, bb, what), vectors, bias)


def counts_conv(
    encoding: str,
    c_out: int,
    c_in: int,
    h: int,
    w: int,
    kh: int,
    kw: int,
    poly_degree: int,
    b: int = 1,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    batch: int = 1,
    bias: bool = False,
    what: str = "",
) -> dict[str, int]:
    """Operations of one conv layer (``groups = 1``, no dilation) on ``batch`` images of ``h x w``;
    same return value as :func:`counts_linear`."""
    enc = _encoding(encoding)
    if enc == "slot-dense":
        ho, wo = conv_out(h, kh, stride[0], padding[0]), conv_out(w, kw, stride[1], padding[1])
        if ho < 1 or wo < 1:
            raise ValueError(f"{_where(what)}kernel {kh}x{kw} is larger than the padded input")
        return counts_linear(enc, c_out, c_in * kh * kw, poly_degree, vectors=batch * ho * wo, bias=bias, what=what)
    bb = b if enc == "coeff-circulant" else 1
    plan = plan_coeff_conv(c_out, c_in, h, w, kh, kw, poly_degree, bb, stride, padding, what)
    return coeff_conv_counts(plan, batch, bias)


# ---------------------------------------------------------------------------- secure protocol
def secure_counts(plan: CoeffLinearPlan | CoeffConvPlan, vectors: int = 1) -> dict[str, Any]:
    """Ciphertexts of one sample in the secure protocol (:mod:`graphpress.backends.he.secure`):
    ``inputs`` (the client's share), ``outputs`` (responses), ``products`` (all tiles, zero ones
    included) and ``reads``, the coefficients the client reads from each response in order --
    for a conv the strided outputs of its channel blocks in one row tile, for a linear layer
    the outputs of its row tile for the vectors sharing a ciphertext."""
    b = plan.b
    if isinstance(plan, CoeffLinearPlan):
        groups = math.ceil(vectors / plan.per_ct)
        reads = []
        for g in range(groups):
            nv = min(plan.per_ct, vectors - g * plan.per_ct)
            for rt in range(plan.row_tiles):
                reads.append(nv * (min(plan.p, (rt + 1) * plan.p_t) - rt * plan.p_t) * b)
        return {"inputs": groups * plan.col_tiles, "outputs": len(reads), "products": groups * plan.row_tiles * plan.col_tiles, "reads": reads}
    sh, sw = plan.stride
    cols = len(range(0, plan.W1, sw))
    reads = []
    for tile in range(plan.tiles):
        h0 = tile * plan.rows
        rows = sum(1 for h in range(h0, min(h0 + plan.rows, plan.H1)) if h % sh == 0)
        for og in range(plan.out_groups):
            reads.append((min(plan.p, (og + 1) * plan.p_t) - og * plan.p_t) * b * rows * cols)
    return {"inputs": plan.tiles * plan.chan_groups, "outputs": len(reads), "products": plan.tiles * plan.out_groups * plan.chan_groups, "reads": reads}


__all__ = [
    "ADD_WEIGHT",
    "CIPHERTEXT_WEIGHT",
    "COUNT_FIELDS",
    "ENCODINGS",
    "FORWARD_NTT_WEIGHT",
    "INVERSE_NTT_WEIGHT",
    "PRODUCT_WEIGHT",
    "ROTATION_WEIGHT",
    "SECURE_PLAN_WEIGHTS",
    "CoeffConvPlan",
    "CoeffLinearPlan",
    "SlotLinearPlan",
    "bsgs",
    "coeff_conv_counts",
    "coeff_linear_counts",
    "conv_out",
    "counts_conv",
    "counts_linear",
    "plan_coeff_conv",
    "plan_coeff_linear",
    "plan_slot_linear",
    "secure_counts",
    "slot_linear_counts",
]
