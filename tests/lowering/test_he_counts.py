"""graphpress.lowering.he.counts without an HE library: the structural claims of each packing."""

import math

import pytest

from graphpress.lowering.he import counts as hc


@pytest.mark.parametrize("m,n", [(256, 256), (1024, 1024), (64, 512)])
def test_circulant_products_fall_with_b_and_never_rotate(m, n):
    dense = hc.counts_linear("coeff-dense", m, n, 8192)
    prev = dense["plain_mults"]
    for b in (2, 4, 8, 16):
        c = hc.counts_linear("coeff-circulant", m, n, 8192, b=b)
        assert c["rotations"] == c["key_switches"] == 0
        assert c["plain_mults"] <= prev
        # about m*n/(b*N) products: never more than twice the ideal packing, never below it
        ideal = math.ceil(m * n / (b * 8192))
        assert ideal <= c["plain_mults"] <= max(2 * ideal, ideal + 1)
        prev = c["plain_mults"]


def test_coeff_dense_is_circulant_at_b1_and_ignores_b():
    assert hc.counts_linear("coeff-dense", 256, 256, 8192, b=8) == hc.counts_linear("coeff-circulant", 256, 256, 8192, b=1)


def test_slot_dense_needs_rotations_and_is_flat_in_b():
    s = hc.counts_linear("slot-dense", 256, 256, 8192)
    assert s["rotations"] > 0 and s["rotations"] == s["key_switches"]
    assert hc.counts_linear("slot-dense", 256, 256, 8192, b=16) == s


def test_conv_counts_scale_with_batch_and_fall_with_b():
    one = hc.counts_conv("coeff-dense", 16, 16, 32, 32, 3, 3, 8192, padding=(1, 1))
    two = hc.counts_conv("coeff-dense", 16, 16, 32, 32, 3, 3, 8192, padding=(1, 1), batch=2)
    assert all(two[k] == 2 * one[k] for k in one)
    circ = hc.counts_conv("coeff-circulant", 16, 16, 32, 32, 3, 3, 8192, b=8, padding=(1, 1))
    assert circ["plain_mults"] < one["plain_mults"] and circ["rotations"] == 0


@pytest.mark.parametrize("bad", [dict(b=3), dict(b=32)])
def test_refuses_blocks_that_do_not_divide(bad):
    with pytest.raises(Exception, match="fc1"):
        hc.counts_linear("coeff-circulant", 48, 48, 8192, what="fc1", **bad)


def test_unknown_encoding_is_refused():
    with pytest.raises(Exception, match="slot-dense"):
        hc.counts_linear("slots", 16, 16, 8192)
