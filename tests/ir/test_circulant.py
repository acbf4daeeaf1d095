"""Block-circulant math: projection, expansion and the FFT product agree with dense algebra."""

import pytest
import torch

from graphpress.ir.circulant import can_use, diagonal_index, expand, fft_matmul, project, sensitivity


def test_expand_builds_circulant_blocks():
    c = torch.arange(1.0, 5.0).reshape(1, 1, 4)
    w = expand(c)
    # each row is the previous one rotated right: W[r, s] = c[(r - s) mod 4]
    assert w.tolist() == [[1, 4, 3, 2], [2, 1, 4, 3], [3, 2, 1, 4], [4, 3, 2, 1]]
    assert diagonal_index(3).tolist() == [[0, 2, 1], [1, 0, 2], [2, 1, 0]]


@pytest.mark.parametrize("b", [1, 2, 4, 8])
def test_projection_is_exact_on_circulant_and_idempotent(b):
    torch.manual_seed(0)
    c = torch.randn(3, 2, b)
    w = expand(c)
    torch.testing.assert_close(project(w, b), c)
    w2 = torch.randn(3 * b, 2 * b)
    c2 = project(w2, b)
    torch.testing.assert_close(project(expand(c2), b), c2)


def test_projection_is_the_least_squares_optimum():
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    c = project(w, 4)
    best = (w - expand(c)).pow(2).sum()
    for _ in range(20):  # any perturbation of the vectors is worse
        assert (w - expand(c + 0.01 * torch.randn_like(c))).pow(2).sum() > best


def test_fisher_weighted_projection_minimizes_weighted_error():
    torch.manual_seed(2)
    w, f = torch.randn(8, 8), torch.rand(8, 8) ** 4
    cw, cp = project(w, 4, f), project(w, 4)
    err = lambda c: float((f * (w - expand(c)) ** 2).sum())  # noqa: E731
    assert err(cw) < err(cp)
    assert sensitivity(w, 4, f) == pytest.approx(err(cw), rel=1e-6)
    # uniform weights give the plain mean
    torch.testing.assert_close(project(w, 4, torch.ones_like(w)), cp)


def test_fft_matmul_matches_dense():
    torch.manual_seed(3)
    c = torch.randn(4, 3, 8)
    x = torch.randn(5, 2, 24)
    torch.testing.assert_close(fft_matmul(x, c), x @ expand(c).T, rtol=1e-5, atol=1e-5)


def test_conv_weights_project_per_kernel_position():
    torch.manual_seed(4)
    w = torch.randn(8, 4, 3, 3)
    c = project(w.permute(2, 3, 0, 1), 4)  # (3, 3, 2, 1, 4)
    assert c.shape == (3, 3, 2, 1, 4)
    dense = expand(c).permute(2, 3, 0, 1)
    assert dense.shape == w.shape
    torch.testing.assert_close(project(dense.permute(2, 3, 0, 1), 4), c)


def test_block_size_checks():
    assert can_use(64, 32, 16) and can_use(10, 6, 1)
    assert not can_use(10, 6, 4) and not can_use(12, 12, 3)
    with pytest.raises(ValueError, match="does not divide"):
        project(torch.randn(6, 10), 4)
