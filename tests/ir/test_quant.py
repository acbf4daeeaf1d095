"""graphpress.ir.quant: integer grids, error bounds, packing layout and byte counts."""

from __future__ import annotations

import pytest
import torch

from graphpress.ir import quant as Q


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------------------- per-channel
def test_symmetric_per_channel_grid_and_error_bound():
    w = torch.randn(16, 40)
    w[3] = 0.0  # an all-zero channel gets scale 1 and codes 0
    q, s = Q.symmetric_per_channel(w, 8)
    assert q.dtype == torch.int8 and s.shape == (16,)
    assert int(q.min()) >= -127 and int(q.max()) <= 127  # -128 never used
    assert float(s[3]) == 1.0 and not q[3].any()
    err = (Q.dequantize_per_channel(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())
    # the largest magnitude of each channel is exactly on the grid edge
    assert torch.equal(q.abs().amax(1)[[i for i in range(16) if i != 3]], torch.full((15,), 127, dtype=torch.int8))
    qn, sn = Q.symmetric_per_channel(-w, 8)
    assert torch.equal(qn, -q) and torch.equal(sn, s)


def test_per_channel_conv_axis_and_bits():
    w = torch.randn(8, 4, 3, 3)
    q, s = Q.symmetric_per_channel(w, 4, axis=0)
    assert int(q.abs().max()) == 7 and s.shape == (8,)
    torch.testing.assert_close(s, w.abs().amax((1, 2, 3)) / 7)
    sq = [Q.weight_sqnr_db(w, Q.fake_quant_per_channel(w, b)) for b in (4, 6, 8)]
    assert sq[0] < sq[1] < sq[2] and sq[2] > 40


# ---------------------------------------------------------------------------- group-wise
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_groupwise_error_bound_and_zero_on_grid(bits, symmetric):
    w = torch.randn(6, 100)  # 100 = 3 groups of 32 + a padded one
    gq = Q.groupwise(w, bits, 32, symmetric=symmetric)
    assert gq.q.shape == (6, 4, 32) and gq.scale.shape == (6, 4) and gq.zero.shape == (6, 4)
    assert int(gq.q.max()) <= 2**bits - 1
    wh = gq.dequantize()
    assert wh.shape == w.shape
    err = (wh - w).abs().reshape(6, -1)
    pad = torch.nn.functional.pad(err, (0, 28)).reshape(6, 4, 32)
    step = gq.scale.abs()[..., None]
    if symmetric:  # the grid may clip a group's largest weights to round the rest finer: within its range, half a step
        inside = torch.nn.functional.pad(w.abs(), (0, 28)).reshape(6, 4, 32) <= step * (2 ** (bits - 1) - 1)
        pad = torch.where(inside, pad, torch.zeros_like(pad))
    assert bool((pad <= step / 2 + 1e-6).all())
    # 0 is exactly representable: a zero weight comes back as 0
    w0 = w.clone()
    w0[:, 5] = 0.0
    assert bool((Q.groupwise(w0, bits, 32, symmetric=symmetric).dequantize()[:, 5] == 0).all())
    if symmetric:
        assert bool((gq.zero == 2 ** (bits - 1)).all())


def test_groupwise_asymmetric_beats_symmetric_on_skewed_groups():
    w = torch.rand(32, 128) * 2.0 - 0.2  # mostly positive
    asym = Q.weight_sqnr_db(w, Q.fake_quant_groupwise(w, 4, 32))
    sym = Q.weight_sqnr_db(w, Q.fake_quant_groupwise(w, 4, 32, symmetric=True))
    assert asym > sym + 3.0


def test_groupwise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        Q.groupwise(torch.randn(4, 32), 1, 32)
    with pytest.raises(ValueError, match="group_size"):
        Q.groupwise(torch.randn(4, 32), 4, 48)
    with pytest.raises(ValueError, match="matrix"):
        Q.groupwise(torch.randn(4, 32, 2), 4, 32)


# ---------------------------------------------------------------------------- packing
def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert Q.pack_nbits(q, 4).tolist() == [[0x21, 0x0F]]
    assert Q.pack_nbits(torch.tensor([[1, 2, 3, 0, 2]], dtype=torch.uint8), 2).tolist() == [[0b00111001, 0b10]]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (3, 5, 37), dtype=torch.uint8)
    packed = Q.pack_nbits(q, bits)
    assert packed.shape == (3, 5, -(-37 * bits // 8))
    assert torch.equal(Q.unpack_nbits(packed, bits, 37), q)


@pytest.mark.parametrize("bits,container", [(2, 2), (3, 4), (4, 4), (6, 8), (8, 8)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_nbits_storage_round_trip(bits, container, symmetric):
    w = torch.randn(10, 70)
    gq = Q.groupwise(w, bits, 32, symmetric=symmetric)
    nb = Q.to_nbits(gq)
    assert nb.bits == container and nb.code_bits == bits
    assert nb.packed.shape == (10, 3, 32 * container // 8) and nb.scales.shape == (30,)
    assert (nb.zeros is None) == symmetric
    if not symmetric:
        assert nb.zeros.shape == (10 * -(-3 * container // 8),)
    back = Q.dequantize_nbits(nb.packed, nb.scales, nb.zeros, nb.bits, 32, 70)
    assert torch.equal(back, gq.dequantize())
    assert nb.nbytes == Q.weight_bytes(10, 70, bits, 32, symmetric=symmetric)


def test_weight_bytes_counts():
    # 64 x 128 at 4 bits, groups of 32: codes 64*4*16, scales 64*4*4, zero points 64*2
    assert Q.weight_bytes(64, 128, 4, 32) == 4096 + 1024 + 128
    assert Q.weight_bytes(64, 128, 4, 32, symmetric=True) == 4096 + 1024
    assert Q.weight_bytes(64, 128, 8, None) == 64 * 128 + 4 * 64
    assert Q.weight_bytes(64, 128, 32, None) == 4 * 64 * 128
    assert Q.weight_bytes(16, 8, 8, None, kernel=9) == 16 * 72 + 64


# ---------------------------------------------------------------------------- activations
def test_act_params_contain_zero_and_fake_quant_bounds():
    a = Q.act_params(0.5, 6.0)  # widened to [0, 6]
    assert a.zero_point == 0 and a.scale == pytest.approx(6.0 / 255, rel=1e-6)
    b = Q.act_params(-1.0, 3.0)
    assert 0 < b.zero_point < 255
    x = torch.linspace(-1.0, 3.0, 1001)
    xh = b.fake(x)
    assert float((xh - x).abs().max()) <= b.scale / 2 + 1e-6
    assert torch.equal(b.fake(xh), xh)  # values on the grid stay put
    assert float(b.fake(torch.tensor([100.0]))) == pytest.approx((255 - b.zero_point) * b.scale, rel=1e-6)  # clamped
    assert Q.act_params(0.0, 0.0) == Q.ActQuant(1.0, 0)


def test_dynamic_act_params_formula():
    x = torch.tensor([[-2.0, 0.5], [4.0, 1.0]])
    s, z = Q.dynamic_act_params(x)
    assert float(s) == pytest.approx(6.0 / 255) and float(z) == round(2.0 / (6.0 / 255))
    xp = torch.tensor([1.0, 3.0])  # min is raised to 0
    s2, z2 = Q.dynamic_act_params(xp)
    assert float(s2) == pytest.approx(3.0 / 255) and float(z2) == 0
    assert float((Q.fake_quant_act_dynamic(x) - x).abs().max()) <= float(s) / 2 + 1e-6


def test_blockwise_activation_quantization():
    x = torch.randn(3, 70)
    xh = Q.fake_quant_act_blockwise(x, 32)
    for blk in range(3):
        part = slice(32 * blk, min(70, 32 * blk + 32))
        step = x[:, part].abs().amax(1) / 127
        assert bool(((xh[:, part] - x[:, part]).abs() <= step[:, None] / 2 + 1e-6).all())
    assert not torch.equal(xh, x)


def test_calibrate_range_percentile_ignores_outliers():
    vals = torch.randn(100_000)
    vals[0] = 1000.0
    _lo, hi = Q.calibrate_range(vals, "minmax")
    assert hi == 1000.0
    plo, phi = Q.calibrate_range([vals[:50_000], vals[50_000:]], "percentile", 99.9)
    assert 2.5 < phi < 4.5 and -4.5 < plo < -2.5
    with pytest.raises(ValueError, match="method"):
        Q.calibrate_range(vals, "entropy")


# ---------------------------------------------------------------------------- MSE ranges
def test_mse_range_clips_a_heavy_tail_and_never_loses_to_minmax():
    lap = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    lo, hi = Q.mse_range(lap)
    assert -lap.min() > -lo > 4 and lap.max() > hi > 4  # clipped, but far outside the bulk
    e_mse = Q.act_quant_mse(lap, lo, hi)
    e_minmax = Q.act_quant_mse(lap, float(lap.min()), float(lap.max()))
    assert e_mse < 0.9 * e_minmax
    # uniform values: nothing to clip, the search stays at (almost) min/max
    u = torch.rand(100_000) * 3.0
    ulo, uhi = Q.mse_range(u)
    assert ulo == 0.0 and uhi > 0.98 * float(u.max())
    assert Q.act_quant_mse(u, ulo, uhi) <= Q.act_quant_mse(u, 0.0, float(u.max())) + 1e-12
    # calibrate_range("mse") keeps the extremes in its sample and agrees with a direct search
    clo, chi = Q.calibrate_range([lap[:100_000], lap[100_000:]], "mse")
    assert Q.act_quant_mse(lap, clo, chi) < 0.9 * e_minmax
    with pytest.raises(ValueError, match="minmax, percentile, mse"):
        Q.calibrate_range(lap, "entropy")


def test_mse_range_after_a_residual_relu_ignores_errors_the_relu_removes():
    # x is summed with r and rectified: values below -r never matter, so the negative end can be clipped
    x = torch.randn(100_000) * 2.0
    r = torch.rand(100_000) * 0.5
    after = lambda v: torch.relu(v + r)
    plain = Q.mse_range(x)
    aware = Q.mse_range(x, after=after)
    assert aware[0] > 0.5 * plain[0]  # much less of the negative side kept
    assert Q.act_quant_mse(x, *aware, after=after) < 0.7 * Q.act_quant_mse(x, *plain, after=after)
    assert Q.mse_range(torch.zeros(10)) == (0.0, 0.0)


def test_sample_indices_are_seeded_distinct_and_unaliased():
    a, b = Q.sample_indices(10_000, 500), Q.sample_indices(10_000, 500)
    assert torch.equal(a, b) and a.unique().numel() == 500 and bool((a[1:] > a[:-1]).all())
    assert torch.equal(Q.sample_indices(7, 500), torch.arange(7))
    # images whose first column is bright: a stride of a whole row would see only that column
    img = torch.zeros(512, 32, 32)
    img[..., 0] = 1.0
    vals = img.reshape(-1)
    picked = vals[Q.sample_indices(vals.numel(), 1 << 14)]
    assert abs(float(picked.mean()) - 1 / 32) < 0.01
    assert float(vals[:: vals.numel() // (1 << 14)].mean()) == 1.0  # what a stride of 32 would have seen
    assert Q.calibrate_range(vals, "percentile", 95.0)[1] == 0.0  # 1/32 of the values are 1: the 95th percentile is 0


# ---------------------------------------------------------------------------- GPTQ
def test_gptq_is_round_to_nearest_for_uncorrelated_inputs():
    w = torch.randn(8, 24)
    q_rtn, s = Q.symmetric_per_channel(w, 8)
    q = Q.gptq_per_channel(w, torch.eye(24) * 5.0, s, damp=0.0)
    assert q.dtype == torch.int8 and torch.equal(q, q_rtn)


def _output_error(codes, scale, w, x):
    """``||(W_hat - W) X^T||^2``: the error a quantized weight makes on the layer output."""
    return float(((Q.dequantize_per_channel(codes, scale) - w) @ x.T).pow(2).sum())


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    torch.manual_seed(1)
    k = 48
    base = torch.randn(4000, 6)
    x = base @ torch.randn(6, k) + 0.05 * torch.randn(4000, k)  # strongly correlated columns, like im2col rows
    x[:, 5] = 0.0  # an input that is always 0 (H_55 = 0)
    w = torch.randn(16, k)
    h = x.T @ x
    q_rtn, s = Q.symmetric_per_channel(w, 8)
    q = Q.gptq_per_channel(w, h, s, bits=8)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127 and not torch.equal(q, q_rtn)
    assert _output_error(q, s, w, x) < 0.5 * _output_error(q_rtn, s, w, x)  # same grid (scales), other points
    q4_rtn, s4 = Q.symmetric_per_channel(w, 4)
    q4 = Q.gptq_per_channel(w, h, s4, bits=4)
    assert int(q4.abs().max()) <= 7 and _output_error(q4, s4, w, x) < _output_error(q4_rtn, s4, w, x)
    with pytest.raises(ValueError, match="hessian"):
        Q.gptq_per_channel(w, torch.eye(k + 1), s)


# ---------------------------------------------------------------------------- GPTQ, group-wise
def _correlated(n: int, k: int, rank: int = 8, seed: int = 0) -> torch.Tensor:
    """Input rows that live near a low-rank subspace: what GPTQ's error feedback exploits."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_groupwise_lowers_the_output_error_on_its_grid(group_size, act_order, symmetric):
    torch.manual_seed(0)
    w, x = torch.randn(24, 200), _correlated(256, 200)  # 200 inputs: the last group is padded
    rtn = Q.groupwise(w, 4, group_size, symmetric=symmetric)
    gq = Q.gptq_groupwise(w, x.T @ x, 4, group_size, symmetric=symmetric, act_order=act_order)
    err = lambda q: float(((w - q.dequantize()) @ x.T).pow(2).sum())  # noqa: E731
    assert err(gq) < 0.2 * err(rtn)
    # the same storage: codes on the grid, padding at the zero point (dequantized to 0)
    assert gq.q.shape == rtn.q.shape and gq.q.dtype == torch.uint8 and int(gq.q.max()) <= 15
    full = (gq.q.float() - gq.zero.float()[..., None]) * gq.scale[..., None]
    assert torch.all(full.reshape(24, -1)[:, 200:] == 0)
    nb = Q.to_nbits(gq)
    torch.testing.assert_close(Q.dequantize_nbits(nb.packed, nb.scales, nb.zeros, nb.bits, group_size, 200), gq.dequantize())


def test_gptq_groupwise_without_correlations_is_round_to_nearest():
    torch.manual_seed(1)
    w = torch.randn(16, 96)
    gq, rtn = Q.gptq_groupwise(w, torch.eye(96), 4, 32), Q.groupwise(w, 4, 32)
    assert torch.equal(gq.q, rtn.q) and torch.equal(gq.scale, rtn.scale) and torch.equal(gq.zero, rtn.zero)


def test_gptq_groupwise_zeroes_an_input_that_never_fires_and_rejects_bad_shapes():
    torch.manual_seed(2)
    w, x = torch.randn(8, 64), _correlated(128, 64)
    x[:, 5] = 0
    gq = Q.gptq_groupwise(w, x.T @ x, 4, 32)
    assert torch.all(gq.dequantize()[:, 5] == 0)
    with pytest.raises(ValueError, match="gptq_groupwise: need w"):
        Q.gptq_groupwise(w, torch.eye(63), 4, 32)


def test_the_symmetric_grid_uses_all_codes_and_beats_max_over_seven():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    gq = Q.groupwise(w, 4, 32, symmetric=True)
    assert int(gq.q.min()) == 0 and int(gq.q.max()) == 15  # the -8 code is in use (max|w| / 7 never reaches it)
    # the old grid: max |w| / 7 around 8
    amax = w.reshape(64, 8, 32).abs().amax(-1, keepdim=True)
    s7 = amax / 7
    old = (torch.clamp(torch.round(w.reshape(64, 8, 32) / s7) + 8, 0, 15) - 8) * s7
    new = gq.dequantize()
    assert Q.weight_sqnr_db(w, new) > Q.weight_sqnr_db(w, old.reshape(64, 256)) + 0.5
    # each group's scale is the least-error candidate: never worse than max|w| / 7 or peak / -8 alone
    peak = torch.gather(w.reshape(64, 8, 32), -1, w.reshape(64, 8, 32).abs().argmax(-1, keepdim=True))
    s8 = peak / -8
    plain8 = (torch.clamp(torch.round(w.reshape(64, 8, 32) / s8) + 8, 0, 15) - 8) * s8
    err = (new.reshape(64, 8, 32) - w.reshape(64, 8, 32)).pow(2).sum(-1)
    assert bool((err <= (old - w.reshape(64, 8, 32)).pow(2).sum(-1) + 1e-9).all())
    assert bool((err <= (plain8 - w.reshape(64, 8, 32)).pow(2).sum(-1) + 1e-9).all())


def test_a_symmetric_group_of_zeros_or_of_one_value_is_exact():
    w = torch.zeros(2, 32)
    w[1] = -0.75
    back = Q.groupwise(w, 4, 32, symmetric=True).dequantize()
    assert torch.equal(back, w)  # zeros: scale 1, code 8; one value: it is the peak, on code 0
