"""eliminate-dead-code: unused pure ops, get_attrs and tensors go; inputs, guards and impure ops stay."""

from __future__ import annotations

import torch
from torch import nn

from graphpress.passes.base import make_pass

aten = torch.ops.aten


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.fc(x))


def dce(graph):
    return make_pass("eliminate-dead-code")(graph)


def add_dead_code(graph):
    """Insert a dead chain on the input, a dead chain on a new 16x8 parameter, and an unused
    in-place op (impure: must stay). Returns the number of removable call_function nodes."""
    g = graph.gm.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    out = next(n for n in g.nodes if n.op == "output")
    target = graph.add_tensor("unused_weight", torch.randn(16, 8))
    with g.inserting_before(out):
        a = g.call_function(aten.mul.Tensor, (x, 2.0))
        g.call_function(aten.sum.default, (a,))  # dead chain of 2 on the input
        w = g.get_attr(target)
        wt = g.call_function(aten.t.default, (w,))
        g.call_function(aten.mm.default, (x, wt))  # dead chain of 2 on a parameter
        c = g.call_function(aten.clone.default, (x,))
        g.call_function(aten.relu_.default, (c,))  # impure: stays, and keeps the clone alive
    graph.recompile()
    return 4


def test_removes_dead_chains_and_their_tensors(capture, op_count, tensor_names, assert_same_function):
    graph = capture(Small(), 2, 8)
    before = graph.clone()
    n_dead = add_dead_code(graph)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    n_ops = op_count(graph)

    result = dce(graph)
    assert result.changed
    s = result.stats
    assert s["ops_removed"] == n_dead
    assert s["get_attrs_removed"] == 1
    assert s["nodes_removed"] == n_dead + 1
    assert s["tensors_removed"] == 1 and s["bytes_freed"] == 16 * 8 * 4
    assert s["skipped"] == {"unused op has side effects": 1}
    assert "unused_weight" not in tensor_names(graph)
    assert op_count(graph) == n_ops - n_dead
    assert op_count(graph, aten.relu_) == 1 and op_count(graph, aten.clone) == 1
    assert op_count(graph, aten.mm, aten.t, aten.sum, aten.mul) == 0
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == placeholders
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in graph.nodes)
    assert_same_function(before, graph, exact=True)


def test_unread_buffers_are_removed_after_capture(capture, tensor_names, assert_same_function):
    """A captured conv+BN has num_batches_tracked read by nobody: its get_attr and buffer go."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x))

    graph = capture(M(), 2, 3, 6, 6)
    before = graph.clone()
    result = dce(graph)
    assert result.stats["ops_removed"] == 0
    assert result.stats["get_attrs_removed"] == 1
    assert result.stats["tensors_removed"] == 1 and result.stats["bytes_freed"] == 8  # one int64
    assert "bn.num_batches_tracked" not in tensor_names(graph)
    assert "bn.running_mean" in tensor_names(graph)
    assert_same_function(before, graph, exact=True)


def test_nothing_to_remove_is_a_no_op(capture, op_count, assert_same_function):
    graph = capture(Small(), 2, 8)
    before = graph.clone()
    n_ops, n_nodes = op_count(graph), len(graph.gm.graph.nodes)
    result = dce(graph)
    assert not result.changed
    assert result.stats["nodes_removed"] == 0 and result.stats["tensors_removed"] == 0
    assert op_count(graph) == n_ops and len(graph.gm.graph.nodes) == n_nodes
    assert_same_function(before, graph, exact=True)


def test_random_and_inplace_ops_without_users_stay(capture, op_count, assert_same_function):
    graph = capture(Small(), 2, 8)
    g = graph.gm.graph
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        g.call_function(aten.rand.default, ([4],), {"device": torch.device("cpu")})
        x = next(n for n in g.nodes if n.op == "placeholder")
        g.call_function(aten.add_.Tensor, (g.call_function(aten.clone.default, (x,)), 1.0))
    graph.recompile()
    before = graph.clone()
    result = dce(graph)
    assert result.stats["ops_removed"] == 0
    assert result.stats["skipped"] == {"unused op has side effects": 2}
    assert op_count(graph, aten.rand) == 1 and op_count(graph, aten.add_) == 1
    assert_same_function(before, graph, exact=True)


def test_keep_tensors_option(capture, tensor_names):
    graph = capture(Small(), 2, 8)
    add_dead_code(graph)
    result = make_pass("eliminate-dead-code", {"remove_tensors": False})(graph)
    assert result.stats["tensors_removed"] == 0
    assert "unused_weight" in tensor_names(graph)
