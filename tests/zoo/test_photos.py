"""Photo crops: shape, determinism per seed, CIFAR normalisation, and a clear error without Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphpress.zoo.photos import CIFAR_MEAN, CIFAR_STD, photo_crops


def _photos():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8), np.full((33, 33, 3), 128, np.uint8)]


def test_crops_are_deterministic_normalised_and_in_range():
    photos = _photos()
    a, b, c = photo_crops(16, 1, photos), photo_crops(16, 1, photos), photo_crops(16, 2, photos)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    mean, std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    pixels = a * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # every crop is a native-resolution window of one of the photos (no resampling)
    raw = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grey = np.full((32, 32, 3), 128, np.uint8)
    for crop in raw:
        if np.array_equal(crop, grey):
            continue
        found = any(np.array_equal(photos[0][y : y + 32, x : x + 32], cand) for y in range(9) for x in range(19) for cand in (crop, crop[:, ::-1]))
        assert found


def test_sample_photos_when_available():
    pytest.importorskip("PIL", reason="scikit-learn's sample photos need Pillow")
    x = photo_crops(4, 0)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
