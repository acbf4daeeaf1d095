"""relative_noise: the one relative-output-noise measure the back-off ladders and sensitivities share."""

import math

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
