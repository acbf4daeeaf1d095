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
