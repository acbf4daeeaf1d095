"""A small CNN for scikit-learn's bundled 8x8 handwritten digits, trained in seconds.

The digits data (1797 images, 10 classes) ships inside scikit-learn, so this model
and its data are available everywhere without a download: it is the embedded
reference model for end-to-end tests that need a *task metric* (accuracy), not only
numeric closeness.

Architecture: conv(1->16, 3x3, pad 1)-BN-ReLU, conv(16->32, 3x3, pad 1)-BN-ReLU,
maxpool 2, flatten, linear(512->64)-ReLU, linear(64->10).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsCNN", "digits_cnn", "digits_data", "train_digits_cnn", "accuracy"]


class DigitsCNN(nn.Module):
    """Two conv-BN-ReLU layers, a max-pool and a two-layer MLP head for 1x8x8 images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Deterministic inputs: the first ``batch`` standardized test images when
        scikit-learn's digits can be loaded, seeded standard-normal noise otherwise.

        Parameters
        ----------
        batch : int
            Number of images.

        Returns
        -------
        tuple of torch.Tensor
            ``(images,)`` with ``images`` of shape ``(batch, 1, 8, 8)``.
        """
        try:
            _, _, x_test, _ = digits_data(seed=0)
        except Exception:  # noqa: BLE001 - data is a nicety; fall back to noise
            x_test = torch.empty(0, 1, 8, 8)
        if batch <= x_test.shape[0]:
            return (x_test[:batch].clone(),)
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 1, 8, 8, generator=gen),)


def digits_cnn(num_classes: int = 10) -> DigitsCNN:
    """Randomly initialised :class:`DigitsCNN` in eval mode.

    Parameters
    ----------
    num_classes : int
        Number of output classes.

    Returns
    -------
    DigitsCNN
    """
    return DigitsCNN(num_classes).eval()


_DATA_CACHE: dict[tuple[int, float], tuple[torch.Tensor, ...]] = {}


def digits_data(seed: int = 0, test_size: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as a fixed, stratified train/test split.

    Pixels (0..16) are scaled to [0, 1] and then standardized with the *training*
    set's mean and standard deviation (one scalar each), so no test statistics leak.

    Parameters
    ----------
    seed : int
        Seed of the split.
    test_size : float
        Fraction of the 1797 images held out for testing.

    Returns
    -------
    x_train, y_train, x_test, y_test : torch.Tensor
        Images ``float32 (N, 1, 8, 8)``, labels ``int64 (N,)``.
    """
    key = (seed, test_size)
    if key not in _DATA_CACHE:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        y = digits.target.astype(np.int64)
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
        _DATA_CACHE[key] = (
            torch.from_numpy(x_tr[:, None].astype(np.float32)),
            torch.from_numpy(y_tr),
            torch.from_numpy(x_te[:, None].astype(np.float32)),
            torch.from_numpy(y_te),
        )
    # Clones: callers may modify their tensors without corrupting the cache.
    return tuple(t.clone() for t in _DATA_CACHE[key])  # type: ignore[return-value]


@torch.no_grad()
def accuracy(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``fn`` (a batch -> logits function, e.g. a model) on ``(x, y)``.

    Parameters
    ----------
    fn : callable
        Maps a ``(B, ...)`` tensor to ``(B, classes)`` logits.
    x, y : torch.Tensor
        Inputs and integer labels.
    batch_size : int
        Evaluation batch size.

    Returns
    -------
    float
        Fraction in [0, 1].
    """
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = fn(x[i : i + batch_size])
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic algorithms for the duration, restoring the caller's setting after."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


def train_digits_cnn(epochs: int = 12, seed: int = 0, batch_size: int = 64, lr: float = 3e-3) -> tuple[DigitsCNN, float]:
    """Train :class:`DigitsCNN` on :func:`digits_data` deterministically.

    The initialisation and the shuffling use seeded generators, and the global RNG
    state is restored afterwards, so two calls with the same arguments in one process
    give identical weights.

    Parameters
    ----------
    epochs : int
        Passes over the 1347 training images.
    seed : int
        Seed of the initialisation, the shuffling and the data split.
    batch_size : int
        Mini-batch size.
    lr : float
        Peak Adam learning rate of a one-cycle schedule (warm-up, then cosine decay).

    Returns
    -------
    model : DigitsCNN
        Trained, in eval mode.
    test_accuracy : float
        Accuracy on the held-out 25 %.
    """
    x_tr, y_tr, x_te, y_te = digits_data(seed)
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(seed)
        model = DigitsCNN()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        steps_per_epoch = (x_tr.shape[0] + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(x_tr.shape[0], generator=gen)
            for i in range(0, x_tr.shape[0], batch_size):
                idx = perm[i : i + batch_size]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
    return model, accuracy(model, x_te, y_te)
