"""OnnxTemplates: one export per unit structure, re-bound to the other units' tensors only once
ONNX Runtime showed re-binding gives the unit's own outputs."""

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")

from graphpress.backends.onnxruntime.lower import lower_to_onnx  # noqa: E402
from graphpress.ir.graph import Graph  # noqa: E402
from graphpress.stream.onnx_units import OnnxTemplates, _max_error, export_unit  # noqa: E402


class Unit(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, hidden):
        return self.fc2(torch.relu(self.fc1(hidden)))


def _unit(seed: int):
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(100 + seed))
    g = Graph.capture(Unit(seed), (x,), input_names=["hidden"], output_names=["hidden_out"])
    return g, ({"hidden": x}, g.run(x)[0])


def _renamed(model, old: str, new: str):
    """What an exporter that folded ``old`` into a constant of another name would give."""
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    return model


def test_the_second_unit_is_checked_in_onnxruntime_then_the_rest_are_rebound(tmp_path):
    templates = OnnxTemplates()
    export = lambda g: export_unit(lower_to_onnx, g, tmp_path)  # noqa: E731
    for seed in range(4):
        g, check = _unit(seed)
        model = templates.lower(g, export, check)
        assert _max_error(model, *check) < 1e-5  # each unit's own weights, whichever way it came
    assert (templates.exports, templates.rebound) == (1, 3)
    assert list(templates.trusted.values()) == [True]
    assert all(e < 1e-5 for e in templates.checked.values())


def test_a_weight_the_template_holds_under_another_name_is_never_rebound(tmp_path):
    templates = OnnxTemplates()
    export = lambda g: _renamed(export_unit(lower_to_onnx, g, tmp_path), "fc2.weight", "folded_0")  # noqa: E731
    for seed in range(3):
        g, check = _unit(seed)
        model = templates.lower(g, export, check)
        assert _max_error(model, *check) < 1e-5
    # re-binding would have kept unit 0's fc2 weight: the check caught it, every unit is exported
    assert (templates.exports, templates.rebound) == (3, 0)
    assert list(templates.trusted.values()) == [False]
    assert all(e > 1e-3 for e in templates.checked.values())
