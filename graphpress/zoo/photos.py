"""Real images for CIFAR-sized models: random crops of scikit-learn's bundled sample photos.

ResNet-20 was trained on CIFAR-10, which is not on these machines; the two photos that ship with
scikit-learn (``china.jpg``, ``flower.jpg``, 427 x 640) are. Native-resolution 32 x 32 crops of
them are natural-image statistics (edges, textures, colour correlations) that seeded Gaussian
noise lacks, so calibration ranges and top-1 agreement measured on them are meaningful for a
deployed model. Loading needs Pillow (``load_sample_images`` decodes the JPEGs with it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graphpress.errors import FrontendError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's sample photos as ``(H, W, 3)`` uint8 arrays.

    Raises
    ------
    FrontendError
        When scikit-learn or Pillow is missing (``pip install scikit-learn Pillow``).
    """
    try:
        from sklearn.datasets import load_sample_images

        return [np.asarray(a) for a in load_sample_images().images]
    except ImportError as err:
        raise FrontendError(f"sample photos need scikit-learn and Pillow ({err}); run: pip install scikit-learn Pillow") from err


def photo_crops(n: int, seed: int, photos: list[Any] | None = None, size: int = 32) -> torch.Tensor:
    """``n`` random ``size x size`` crops (native resolution) of the photos with a random
    horizontal flip (p = 1/2), scaled to [0, 1] and normalised with the CIFAR-10 mean / std.

    Parameters
    ----------
    n : int
        Number of crops.
    seed : int
        Seed of the private generator (different seeds give disjoint-in-distribution sets).
    photos : list of array-like, optional
        ``(H, W, 3)`` uint8 images; default :func:`sample_photos`.
    size : int
        Crop side.

    Returns
    -------
    torch.Tensor
        ``(n, 3, size, size)`` float32.
    """
    photos = sample_photos() if photos is None else photos
    rng = np.random.default_rng(seed)
    mean, std = np.asarray(CIFAR_MEAN, np.float32), np.asarray(CIFAR_STD, np.float32)
    arrays = [np.asarray(p, dtype=np.float32) / 255.0 for p in photos]
    out = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        a = arrays[int(rng.integers(len(arrays)))]
        h, w = a.shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        crop = a[y : y + size, x : x + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = (crop - mean) / std
    return torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


__all__ = ["CIFAR_MEAN", "CIFAR_STD", "photo_crops", "sample_photos"]
