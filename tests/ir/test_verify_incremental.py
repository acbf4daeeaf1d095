"""Incremental fake propagation in verify(): unchanged nodes keep their values, a fresh capture's
symbolic values are made concrete, and every change is still propagated and checked."""

import pytest
import torch
import torch.nn as nn
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphpress.errors import VerificationError
from graphpress.ir.graph import Graph


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


NO_VALUE = {"x", "output", "_guards_fn"}  # nodes that always run: inputs, the output, export's guard check


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return Graph.capture(Net(), (torch.randn(2, 6),))


@pytest.fixture
def ran(monkeypatch):
    """Names of the nodes whose meta kernels actually ran during a verify()."""
    names: list[str] = []
    inner = FakeTensorProp.run_node

    def run_node(self, n):
        names.append(n.name)
        return inner(self, n)

    monkeypatch.setattr(FakeTensorProp, "run_node", run_node)
    return names


def test_a_fresh_capture_is_checked_from_its_export_values(graph, ran):
    symbolic = [n for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and not all(isinstance(d, int) for d in n.meta["val"].shape)]
    assert symbolic  # torch.export recorded the batch as a symbol
    graph.verify()
    assert set(ran) <= NO_VALUE  # only the placeholder, the output and export's guard call ran
    for n in graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(d, int) for d in val.shape)  # concrete now
    assert next(n for n in graph.nodes if n.name == "linear_1").meta["val"].shape == (2, 3)


def test_an_unchanged_graph_runs_no_meta_kernel_again(graph, ran):
    graph.verify()
    ran.clear()
    graph.snapshot().verify()
    assert set(ran) <= NO_VALUE


def test_a_changed_weight_shape_is_propagated_and_caught(graph, ran):
    graph.verify()
    snap = graph.snapshot()
    snap.set_tensor("fc2.weight", torch.randn(3, 5))  # 5 inputs where the graph gives 8
    with pytest.raises(VerificationError, match=r"shape/dtype check failed at node 'linear_1'"):
        snap.verify()


def test_a_rewritten_node_and_its_users_run_again(graph, ran):
    graph.verify()
    snap = graph.snapshot()
    relu = next(n for n in snap.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.ops.aten.gelu.default
    snap.recompile()
    ran.clear()
    snap.verify()
    assert relu.name in ran and "linear_1" not in ran  # same layout out of gelu: its user keeps its value


def test_other_inputs_move_every_dependent_value(graph, ran):
    graph.verify()
    ran.clear()
    graph.verify((torch.randn(5, 6),))
    assert {"linear", "relu", "linear_1"} <= set(ran)
    assert next(n for n in graph.nodes if n.name == "linear_1").meta["val"].shape == (5, 3)


def test_unchanged_nodes_keep_their_value_objects_from_one_check_to_the_next(graph):
    graph.verify()
    before = {n.name: n.meta.get("val") for n in graph.nodes}
    snap = graph.snapshot()
    snap.verify()
    kept = [n.name for n in snap.nodes if n.op == "call_function" and n.meta.get("val") is before[n.name]]
    assert "linear" in kept and "linear_1" in kept  # reused, not re-created per check
