"""Architectures referenced as 'tests.frontends.models:factory' by frontend tests."""

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    def example_inputs(self, batch: int = 2):
        return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def small_cnn():
    return SmallCNN().eval()


def not_a_module():
    return 42


class WideCNN(nn.Module):
    """Channel counts divisible by 16, so every layer but the first conv can be block-circulant."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))

    def example_inputs(self, batch: int = 2):
        return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


def wide_cnn():
    torch.manual_seed(0)
    return WideCNN().eval()
