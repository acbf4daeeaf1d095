"""HE layer kernels: exact integer outputs against numpy / F.conv2d, operation counters equal to
the analytic formulas of graphpress.lowering.he.counts, products falling with the block size, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graphpress.backends.he.bfv import BFVContext, choose_params
from graphpress.backends.he.kernels import KERNELS, get_kernel
from graphpress.errors import BackendError
from graphpress.lowering.he import counts as he_counts
from graphpress.ir.circulant import expand
from graphpress.ir.ops_circulant import conv_weight

N = 4096


@pytest.fixture(scope="module")
def ctx():
    return BFVContext(choose_params(24, N, batching=True))


def run_counted(ctx, fn, *args):
    before = ctx.counter.snapshot()
    out = fn(*args)
    return out, (ctx.counter.snapshot() - before).counts_only()


def conv_ref(x, w, bias, stride, padding):
    t = lambda a: torch.from_numpy(np.asarray(a)).double()
    return F.conv2d(t(x), t(w), t(bias), stride, padding).round().long().numpy()


# ---------------------------------------------------------------------------- linear
@pytest.mark.parametrize("name", ["slot-dense", "coeff-dense"])
@pytest.mark.parametrize(
    "m,n,batch",
    [(20, 36, 1), (64, 48, 3), (10, 700, 2), (12, 5000, 1), (2100, 8, 1)],
    ids=["wide", "tall-batch", "very-wide", "n>N", "m>slots"],
)
def test_dense_linear_exact_and_counted(ctx, name, m, n, batch):
    rng = np.random.default_rng(m * n)
    k = get_kernel(name)
    w, bias, x = rng.integers(-8, 8, (m, n)), rng.integers(-99, 99, m), rng.integers(-8, 8, (batch, n))
    prep = k.prepare_linear(ctx, w, bias, what="fc")
    y, counts = run_counted(ctx, k.run_linear, ctx, prep, x)
    assert y.dtype == np.int64 and np.array_equal(y, x @ w.T + bias)
    assert counts == k.counts_linear(m, n, N, vectors=batch, bias=True)
    if name == "coeff-dense":
        assert counts["rotations"] == 0
    assert np.array_equal(k.run_linear(ctx, prep, x[0]), x[0] @ w.T + bias)  # 1-D input


def test_dense_linear_splits(ctx):
    """n > N splits coeff-dense into column tiles; a matrix wider than a slot row splits slot-dense."""
    assert he_counts.plan_coeff_linear(12, 5000, N).col_tiles >= 2
    assert he_counts.plan_slot_linear(12, 5000, N).C >= 3
    assert he_counts.plan_slot_linear(2100, 8, N).R == 2
    # both rows of the batching matrix carry vectors: 2 * floor(2048 / (64 + 48 - 1)) per ciphertext
    assert he_counts.plan_slot_linear(64, 48, N).per_ct == 2 * (2048 // 111)


@pytest.mark.parametrize("b", [2, 4, 8, 16])
@pytest.mark.parametrize("p,q,batch", [(3, 5, 1), (8, 6, 5), (40, 150, 2)])
def test_circulant_linear_exact_and_counted(ctx, b, p, q, batch):
    rng = np.random.default_rng(b * 100 + p)
    k = get_kernel("coeff-circulant")
    c = rng.integers(-8, 8, (p, q, b))
    bias, x = rng.integers(-99, 99, p * b), rng.integers(-8, 8, (batch, q * b))
    w = expand(torch.from_numpy(c)).numpy()
    prep = k.prepare_linear(ctx, c, bias_int=bias, what="fc")
    y, counts = run_counted(ctx, k.run_linear, ctx, prep, x)
    assert np.array_equal(y, x @ w.T + bias)
    assert counts == k.counts_linear(p * b, q * b, N, b=b, vectors=batch, bias=True)
    assert counts["rotations"] == 0


def test_circulant_with_a_large_plain_modulus():
    """t above 2^31: the twist's modular products go through exact Python integers."""
    ctx = BFVContext(choose_params(40, 8192))
    assert ctx.t > 1 << 40
    rng = np.random.default_rng(3)
    c = rng.integers(-(1 << 20), 1 << 20, (3, 2, 8))
    x = rng.integers(-(1 << 12), 1 << 12, (2, 16))
    k = get_kernel("coeff-circulant")
    y = k.run_linear(ctx, k.prepare_linear(ctx, c, what="fc"), x)
    assert np.array_equal(y, x @ expand(torch.from_numpy(c)).numpy().T)
    assert np.abs(y).max() > 1 << 31  # beyond int32, exact


# ---------------------------------------------------------------------------- conv
CONV_CASES = [
    # c_out, c_in, h, w, (kh, kw), stride, padding, batch
    (4, 3, 6, 7, (3, 3), (1, 1), (1, 1), 2),
    (8, 16, 16, 16, (3, 3), (2, 2), (1, 1), 1),
    (5, 2, 9, 9, (1, 1), (1, 1), (0, 0), 1),
    (3, 2, 10, 8, (3, 2), (2, 1), (0, 1), 1),
    (16, 40, 12, 12, (3, 3), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("name", ["slot-dense", "coeff-dense"])
@pytest.mark.parametrize("case", CONV_CASES, ids=["pad-batch", "stride2", "1x1", "rect-kernel", "channel-split"])
def test_dense_conv_exact_and_counted(ctx, name, case):
    c_out, c_in, h, w_, (kh, kw), stride, padding, batch = case
    rng = np.random.default_rng(c_out * h)
    k = get_kernel(name)
    w, bias, x = rng.integers(-8, 8, (c_out, c_in, kh, kw)), rng.integers(-99, 99, c_out), rng.integers(-8, 8, (batch, c_in, h, w_))
    prep = k.prepare_conv(ctx, w, bias_int=bias, stride=stride, padding=padding, what="conv")
    y, counts = run_counted(ctx, k.run_conv, ctx, prep, x)
    want = conv_ref(x, w, bias, stride, padding)
    assert y.shape == want.shape and np.array_equal(y, want)
    assert counts == k.counts_conv(c_out, c_in, h, w_, kh, kw, N, stride=stride, padding=padding, batch=batch, bias=True)


@pytest.mark.parametrize("b", [2, 4, 8, 16])
@pytest.mark.parametrize(
    "p,q,h,w,kh,stride,padding",
    [(2, 3, 6, 6, 3, (1, 1), (1, 1)), (2, 2, 14, 14, 3, (2, 2), (1, 1)), (1, 2, 8, 8, 1, (1, 1), (0, 0))],
    ids=["pad", "stride2", "1x1"],
)
def test_circulant_conv_exact_and_counted(ctx, b, p, q, h, w, kh, stride, padding):
    rng = np.random.default_rng(b + h)
    k = get_kernel("coeff-circulant")
    c = rng.integers(-8, 8, (kh, kh, p, q, b))
    bias, x = rng.integers(-99, 99, p * b), rng.integers(-8, 8, (2, q * b, h, w))
    prep = k.prepare_conv(ctx, c, bias_int=bias, stride=stride, padding=padding, what="conv", input_hw=(h, w))
    y, counts = run_counted(ctx, k.run_conv, ctx, prep, x)
    want = conv_ref(x, conv_weight(torch.from_numpy(c)).numpy(), bias, stride, padding)
    assert y.shape == want.shape and np.array_equal(y, want)
    assert counts == k.counts_conv(p * b, q * b, h, w, kh, kh, N, b=b, stride=stride, padding=padding, batch=2, bias=True)


def test_conv_layout_cached_per_input_size(ctx):
    k = get_kernel("coeff-dense")
    w = np.ones((2, 2, 3, 3), dtype=np.int64)
    prep = k.prepare_conv(ctx, w, padding=(1, 1), what="conv")
    assert not prep.layouts  # encoded lazily, per input size
    k.run_conv(ctx, prep, np.ones((1, 2, 5, 5), dtype=np.int64))
    k.run_conv(ctx, prep, np.ones((1, 2, 7, 7), dtype=np.int64))
    assert set(prep.layouts) == {("conv", 5, 5), ("conv", 7, 7)}


# ---------------------------------------------------------------------------- the claim: products ~ 1/b
def test_products_fall_with_block_size():
    lin = [he_counts.counts_linear("coeff-circulant", 256, 256, 8192, b=b)["plain_mults"] for b in (1, 2, 4, 8, 16)]
    assert lin == [8, 4, 2, 1, 1]
    assert he_counts.counts_linear("coeff-dense", 256, 256, 8192)["plain_mults"] == 8
    conv = [he_counts.counts_conv("coeff-circulant", 16, 16, 32, 32, 3, 3, 8192, b=b, padding=(1, 1))["plain_mults"] for b in (1, 2, 4, 8, 16)]
    assert conv == [48, 24, 16, 6, 3]
    for b, n in zip((2, 4, 8, 16), conv[1:]):
        assert conv[0] / n >= b / 2
    # slot encoding: flat in b (it takes the dense matrix), with rotations
    slot = he_counts.counts_linear("slot-dense", 256, 256, 8192)
    assert (slot["plain_mults"], slot["rotations"]) == (256, 30)
    # batching several vectors per coefficient product when they fit
    plan = he_counts.plan_coeff_linear(256, 256, 8192, b=16)
    assert plan.per_ct == 2 and he_counts.counts_linear("coeff-circulant", 256, 256, 8192, b=16, vectors=4)["plain_mults"] == 2


# ---------------------------------------------------------------------------- zero tiles
def test_zero_weight_tiles_are_skipped(ctx):
    rng = np.random.default_rng(7)
    k = get_kernel("coeff-dense")
    w = rng.integers(-8, 8, (64, 300))
    w[:32] = 0  # whole row tiles without a product
    x = rng.integers(-8, 8, (1, 300))
    prep = k.prepare_linear(ctx, w, what="fc")
    assert prep.skipped_products > 0
    y, counts = run_counted(ctx, k.run_linear, ctx, prep, x)
    assert np.array_equal(y, x @ w.T)
    assert counts["plain_mults"] == k.counts_linear(64, 300, N)["plain_mults"] - prep.skipped_products
    s = get_kernel("slot-dense")
    diag = np.diag(rng.integers(1, 8, 40))  # only diagonal 0 is non-zero
    prep = s.prepare_linear(ctx, diag, what="fc")
    y, counts = run_counted(ctx, s.run_linear, ctx, prep, x[:, :40])
    assert np.array_equal(y, x[:, :40] @ diag.T)
    assert prep.skipped_products == 39 and counts["plain_mults"] == 1


# ---------------------------------------------------------------------------- bounds and refusals
def test_max_abs_output():
    w = np.array([[1, -2, 3], [-4, 0, 0]])
    assert get_kernel("coeff-dense").max_abs_output(w, 10) == 60
    assert get_kernel("slot-dense").max_abs_output(w, 10, bias_int=[5, -7]) == 67
    c = np.arange(-12, 12).reshape(2, 3, 4)
    dense = expand(torch.from_numpy(c)).numpy()
    assert get_kernel("coeff-circulant").max_abs_output(c, 3) == np.abs(dense).sum(1).max() * 3
    cc = np.arange(-27, 27).reshape(3, 3, 1, 3, 2)
    wd = conv_weight(torch.from_numpy(cc)).numpy()
    assert get_kernel("coeff-circulant").max_abs_output(cc, 2) == np.abs(wd).sum((1, 2, 3)).max() * 2


def test_accumulator_overflow_refused_naming_layer(ctx):
    k = get_kernel("coeff-circulant")
    prep = k.prepare_linear(ctx, np.full((2, 2, 4), 1000), what="fc9")
    ok = np.full((1, 8), 1000)  # bound 8e6 < t/2 ~ 8.4e6
    assert np.array_equal(k.run_linear(ctx, prep, ok), np.full((1, 8), 8_000_000))
    with pytest.raises(BackendError, match=r"layer 'fc9': accumulator bound 9600000 .*plain_bits=25") as err:
        k.run_linear(ctx, prep, np.full((1, 8), 1200))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda k, ctx: k["coeff-circulant"].prepare_linear(ctx, np.ones((4, 4)), what="fc2"), "'fc2'.*must be compact"),
        (lambda k, ctx: k["coeff-circulant"].prepare_linear(ctx, np.ones((2, 2, 3)), what="fc2"), "'fc2'.*block size 3"),
        (lambda k, ctx: k["coeff-circulant"].counts_linear(30, 32, N, b=4), "block size 4 does not divide the 30x32"),
        (lambda k, ctx: k["coeff-circulant"].prepare_conv(ctx, np.ones((3, 3, 1, 1, 16)), padding=(1, 1), what="c5", input_hw=(20, 100)), "'c5'.*N/b = 256"),
        (lambda k, ctx: k["coeff-dense"].prepare_linear(ctx, np.full((2, 2), 2**24), what="fc3"), "'fc3': weight value 16777216"),
        (lambda k, ctx: k["coeff-dense"].prepare_linear(ctx, np.ones((2, 2)), bias_int=np.ones(3), what="fc4"), "'fc4': bias has 3 values"),
        (lambda k, ctx: k["slot-dense"].run_linear(ctx, k["slot-dense"].prepare_linear(ctx, np.ones((2, 3)), what="fc6"), np.ones((1, 4))), "'fc6': input has 4"),
        (lambda k, ctx: k["coeff-dense"].prepare_linear(ctx, np.full((2, 2), 0.5), what="fc7"), "'fc7': weight must hold integers"),
        (lambda k, ctx: k["slot-dense"].prepare_linear(BFVContext(choose_params(13, 2048)), np.ones((8, 8)), what="fc8"), "'fc8'.*batching=True"),
    ],
    ids=["2d-compact", "b-not-pow2", "b-not-dividing", "too-wide-for-N/b", "weight-vs-t", "bias-size", "input-size", "float", "no-keyswitch"],
)
def test_refusals(ctx, call, match):
    with pytest.raises(BackendError, match=match) as err:
        call(KERNELS, ctx)
    assert "\n" not in str(err.value)


def test_unknown_kernel():
    with pytest.raises(BackendError, match="did you mean 'coeff-dense'"):
        get_kernel("coeff-dens")
    assert set(KERNELS) == {"slot-dense", "coeff-dense", "coeff-circulant"}


def test_counter_sides(ctx):
    k = get_kernel("slot-dense")
    prep = k.prepare_linear(ctx, np.ones((8, 8), dtype=np.int64), what="fc")
    ctx.counter.reset()
    k.run_linear(ctx, prep, np.ones((1, 8), dtype=np.int64))
    ops = ctx.counter.time_per_op()
    assert {"client/encrypt", "client/decrypt", "server/mul_plain", "server/rotate", "comm/serialize"} <= set(ops)
    assert ops["server/mul_plain"]["calls"] == 8 and ctx.counter.side_seconds("server") > 0


# ---------------------------------------------------------------------------- benchmark shapes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("name,b", [("slot-dense", 1), ("coeff-dense", 1), ("coeff-circulant", 2), ("coeff-circulant", 16)])
def test_benchmark_shapes_exact_at_8192(name, b):
    ctx = BFVContext(choose_params(24, 8192, batching=True))
    rng = np.random.default_rng(0)
    k = get_kernel(name)
    shape = (256 // b, 256 // b, b) if name == "coeff-circulant" else (256, 256)
    w = rng.integers(-128, 128, shape)
    wd = expand(torch.from_numpy(w)).numpy() if name == "coeff-circulant" else w
    x = rng.integers(-128, 128, (1, 256))
    y, counts = run_counted(ctx, k.run_linear, ctx, k.prepare_linear(ctx, w, what="fc"), x)
    assert np.array_equal(y, x @ wd.T) and counts == k.counts_linear(256, 256, 8192, b=b)
    cw = rng.integers(-128, 128, (3, 3, 16 // b, 16 // b, b) if name == "coeff-circulant" else (16, 16, 3, 3))
    wd = conv_weight(torch.from_numpy(cw)).numpy() if name == "coeff-circulant" else cw
    x = rng.integers(-128, 128, (1, 16, 32, 32))
    prep = k.prepare_conv(ctx, cw, padding=(1, 1), what="conv", input_hw=(32, 32))
    y, counts = run_counted(ctx, k.run_conv, ctx, prep, x)
    assert np.array_equal(y, conv_ref(x, wd, np.zeros(16), (1, 1), (1, 1)))
    assert counts == k.counts_conv(16, 16, 32, 32, 3, 3, 8192, b=b, padding=(1, 1))
