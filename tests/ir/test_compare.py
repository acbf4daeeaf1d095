"""relative_noise: the one relative-output-noise measure the back-off ladders and sensitivities share."""

import math

import pytest
import torch

from graphpress.ir.compare import relative_noise


def test_relative_noise_sums_over_sets_and_skips_integer_outputs():
    refs = [(torch.tensor([3.0, 4.0]), torch.tensor([1, 2])), (torch.tensor([0.0, 5.0]), torch.tensor([3, 4]))]
    outs = [(torch.tensor([3.0, 5.0]), torch.tensor([9, 9])), (torch.tensor([2.0, 5.0]), torch.tensor([0, 0]))]
    # noise 1 + 4 over signal 25 + 25; the int outputs do not count
    assert math.isclose(relative_noise(refs, outs), 5.0 / 50.0)


def test_relative_noise_of_a_zero_reference_is_the_absolute_noise():
    assert relative_noise([(torch.zeros(3),)], [(torch.tensor([1.0, 0.0, 2.0]),)]) == 5.0
    assert relative_noise([(torch.ones(2),)], [(torch.ones(2),)]) == 0.0


def test_chunked_float64_figures_equal_whole_tensor_ones(monkeypatch):
    import graphpress.ir.compare as cmp

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 70, generator=gen)
    test = ref + 1e-3 * torch.randn(3, 5, 70, generator=gen)
    whole = (cmp.compare_outputs([ref], [test])[0], cmp.kl_divergence(ref, test), cmp.relative_noise([[ref]], [[test]]))
    monkeypatch.setattr(cmp, "CHUNK", 64)  # many chunks, one of them partial
    chunked = (cmp.compare_outputs([ref], [test])[0], cmp.kl_divergence(ref, test), cmp.relative_noise([[ref]], [[test]]))
    assert chunked[0].max_abs == whole[0].max_abs and chunked[0].within_tol == whole[0].within_tol
    assert chunked[0].sqnr_db == pytest.approx(whole[0].sqnr_db, rel=1e-12)
    assert chunked[1] == pytest.approx(whole[1], rel=1e-12) and chunked[2] == pytest.approx(whole[2], rel=1e-12)
    p = torch.log_softmax(ref.double(), -1)
    assert whole[1] == pytest.approx(float((p.exp() * (p - torch.log_softmax(test.double(), -1))).sum(-1).mean()), rel=1e-12)
