"""CIFAR-10 ResNet-20 (He et al. 2016, section 4.2) matching the shared pretrained checkpoint.

Architecture: conv3x3(3->16)-BN-ReLU, then three stages of three BasicBlocks with
16/32/64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling and ``linear`` 64->10. The downsampling shortcut is "option A": take every
second pixel and zero-pad the new channels, so the shortcut has no parameters and the
checkpoint holds only convs, BNs and the classifier.

Parameter names equal the checkpoint ``resnet20-12fca82f.th`` keys once the
``module.`` prefix (left by ``nn.DataParallel`` at training time) is stripped.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import FrontendError
from graphpress.zoo.paths import RESNET20_RELPATH, expected_path, resnet20_checkpoint_path

__all__ = ["BasicBlock", "ResNet20", "resnet20", "load_resnet20", "read_resnet20_checkpoint"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A only ever doubles the channels (16->32->64), so padding planes//4 on
        # each side of the channel axis turns in_planes = planes/2 into planes.
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            shortcut = x
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for 3x32x32 CIFAR images.

    Parameters
    ----------
    num_classes : int
        Width of the final ``linear`` layer.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, stride=1)
        self.layer2 = self._stage(16, 32, stride=2)
        self.layer3 = self._stage(32, 64, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Global average pooling; mean over H, W keeps the graph free of a
        # shape-dependent kernel size, so any input resolution exports the same way.
        out = out.mean(dim=(2, 3))
        return self.linear(out)

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Deterministic CIFAR-like inputs.

        Parameters
        ----------
        batch : int
            Number of images.

        Returns
        -------
        tuple of torch.Tensor
            ``(images,)`` with ``images`` of shape ``(batch, 3, 32, 32)``, standard
            normal like per-channel-normalized CIFAR images (real CIFAR is not available).
        """
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, 3, 32, 32, generator=gen),)


def resnet20(num_classes: int = 10) -> ResNet20:
    """Randomly initialised ResNet-20 in eval mode.

    Parameters
    ----------
    num_classes : int
        Number of output classes.

    Returns
    -------
    ResNet20
    """
    return ResNet20(num_classes).eval()


def read_resnet20_checkpoint(path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Read the checkpoint's state dict (``module.`` stripped) and ``best_prec1``.

    Parameters
    ----------
    path : str or Path, optional
        Checkpoint file; defaults to the shared ``resnet20-12fca82f.th``.

    Returns
    -------
    state_dict : dict of str to torch.Tensor
    best_prec1 : float
        Top-1 CIFAR-10 test accuracy (percent) recorded at training time, NaN if absent.

    Raises
    ------
    FrontendError
        When the file is missing or is not a ResNet-20 checkpoint.
    """
    if path is None:
        path = resnet20_checkpoint_path()
        if path is None:
            raise FrontendError(
                f"{expected_path(RESNET20_RELPATH)}: ResNet-20 checkpoint not found; "
                "pass a path or set GRAPHPRESS_SHARED"
            )
    path = Path(path)
    if not path.is_file():
        raise FrontendError(f"{path}: no such ResNet-20 checkpoint file")
    try:
        # The checkpoint was saved from CUDA tensors; map_location lets it load on CPU-only hosts.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise FrontendError(f"{path}: cannot read torch checkpoint ({type(exc).__name__}: {exc})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise FrontendError(f"{path}: expected a dict with 'state_dict', got {type(ckpt).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    best = float(ckpt.get("best_prec1", float("nan")))
    return state, best


def load_resnet20(path: str | Path | None = None) -> ResNet20:
    """ResNet-20 with the pretrained CIFAR-10 weights, in eval mode.

    Parameters
    ----------
    path : str or Path, optional
        Checkpoint file; defaults to the shared ``resnet20-12fca82f.th``.

    Returns
    -------
    ResNet20
        With ``best_prec1`` (float, percent) set from the checkpoint.

    Raises
    ------
    FrontendError
        When the file is missing or its keys/shapes do not match ResNet-20.
    """
    state, best = read_resnet20_checkpoint(path)
    model = ResNet20(num_classes=state["linear.weight"].shape[0] if "linear.weight" in state else 10)
    try:
        # The checkpoint predates BN's num_batches_tracked buffer; BatchNorm's
        # _load_from_state_dict fills it in, so strict loading still checks every real key.
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise FrontendError(f"{path or resnet20_checkpoint_path()}: not a ResNet-20 checkpoint ({' '.join(first[:2])})") from None
    model.best_prec1 = best
    return model.eval()
