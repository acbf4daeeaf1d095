"""The example pass of docs/architecture.md, run as written: it must fire, be exact, and skip what it must."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes import base

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture(scope="module")
def example_pass():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)[0]
    module = types.ModuleType("docs_architecture_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(code, str(DOC), "exec"), module.__dict__)  # noqa: S102 -- our own documentation
    yield module.Relu6ToClamp
    base._REGISTRY.pop("relu6-to-clamp", None)
    sys.modules.pop(module.__name__, None)


class Net(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(8, 16), act, nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.act(self.fc(x) * 4))


def targets(graph: Graph) -> list:
    return [n.target for n in graph.gm.graph.nodes if n.op == "call_function"]


def test_example_pass_fires_and_is_exact(example_pass):
    torch.manual_seed(0)
    graph = Graph.capture(Net(nn.ReLU6()).eval(), (torch.randn(4, 8),))
    assert torch.ops.aten.hardtanh.default in targets(graph)
    x = torch.randn(5, 8) * 3
    before = graph.run(x)[0]
    report = Pipeline(["relu6-to-clamp"]).run(graph)
    step = report.steps[0]
    assert step.changed and step.stats == {"replaced": 1, "skipped": {}}
    after = report.graph
    assert torch.ops.aten.hardtanh.default not in targets(after) and targets(after).count(torch.ops.aten.clamp.default) == 1
    assert torch.equal(after.run(x)[0], before)


def test_example_pass_skips_other_bounds(example_pass):
    graph = Graph.capture(Net(nn.Hardtanh(-1.0, 1.0)).eval(), (torch.randn(4, 8),))
    result = example_pass()(graph)
    assert not result.changed and result.stats["skipped"] == {"hardtanh bounds are not (0, 6)": 1}
    assert torch.ops.aten.hardtanh.default in targets(graph)
