"""``graphpress::kv_quant_write``: only the step's new rows are rounded, on a per-row grid whose
step and minimum are float16; 16 bits is the identity; bytes per token as stored."""

import pytest
import torch

from graphpress.ir.ops_kvcache import kv_bytes_per_token, kv_quant_write, qdq_rows, quantize_rows


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_new_rows_land_on_their_grid_within_half_a_step(bits):
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0)) * 3
    q, s, m = quantize_rows(x, bits)
    assert q.min() >= 0 and q.max() <= 2 ** bits - 1 and torch.equal(q, q.round())
    assert torch.equal(s, s.half().float()) and torch.equal(m, m.half().float())  # what the artifact stores
    err = (qdq_rows(x, bits) - x).abs()
    # half a step, plus the float16 rounding of the minimum (at most 2^-11 of it)
    assert bool((err <= s / 2 + m.abs() * 2 ** -10 + 1e-6).all())
    # 8 bits are ~64x finer than 2 bits on the same rows
    if bits == 8:
        assert float((qdq_rows(x, 2) - x).pow(2).mean()) > 100 * float(err.pow(2).mean())


def test_only_the_steps_rows_are_rounded_and_16_bits_is_the_identity():
    g = torch.Generator().manual_seed(1)
    past = torch.randn(1, 2, 4, 8, generator=g)
    present = torch.cat([past, torch.randn(1, 2, 3, 8, generator=g)], 2)
    out = kv_quant_write(past, present, 4)
    assert torch.equal(out[:, :, :4], past)  # rows written at an earlier step are never rounded again
    assert torch.equal(out[:, :, 4:], qdq_rows(present[:, :, 4:], 4)) and not torch.equal(out[:, :, 4:], present[:, :, 4:])
    assert torch.equal(kv_quant_write(past, present, 16), present)
    # rounding twice changes nothing: a stored row re-quantized stays where it is
    assert torch.allclose(qdq_rows(out[:, :, 4:], 4), out[:, :, 4:], atol=1e-6)


def test_a_constant_row_is_exact_and_bad_widths_are_refused():
    past, present = torch.zeros(1, 1, 0, 4), torch.full((1, 1, 2, 4), 0.5)
    assert torch.equal(kv_quant_write(past, present, 2), present)
    with pytest.raises(RuntimeError, match="bits must be one of"):
        kv_quant_write(past, present, 3)
    with pytest.raises(RuntimeError, match="same batch, heads and head_dim"):
        kv_quant_write(torch.zeros(1, 2, 0, 4), present, 4)


def test_bytes_per_token_count_codes_and_float16_grids():
    assert kv_bytes_per_token(4, 64, 16) == 4 * 64 * 2
    assert kv_bytes_per_token(4, 64, 4) == 4 * (32 + 4)
    assert kv_bytes_per_token(4, 64, 2) == 4 * (16 + 4)
