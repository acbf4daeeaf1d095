import torch
import torch.nn as nn

from graphpress.ir.graph import Graph
from graphpress.passes.circulant.layers import find_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16, 12)

    def forward(self, x):
        return self.fc(self.dw(self.conv(x)).mean((2, 3)))


def test_find_layers_shapes_and_rejections():
    g = Graph.capture(Net(), (torch.randn(2, 8, 6, 6),))
    layers, rejected = find_layers(g)
    assert [(l.name, l.kind, l.out_features, l.in_features, l.kernel, l.out_positions) for l in layers] == [
        ("conv", "conv2d", 16, 8, (3, 3), 36),
        ("fc", "linear", 12, 16, (1, 1), 1),
    ]
    assert rejected == {"dw": "grouped conv (groups=16)"}
    assert layers[0].feasible((2, 4, 8, 16)) == [1, 2, 4, 8]
    assert layers[1].feasible((2, 4, 8)) == [1, 2, 4]
    assert layers[0].dense_params == 16 * 8 * 9
