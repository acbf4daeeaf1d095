"""fold-constants: constant sub-graphs become tensors; random, impure, big and expanding ones stay."""

from __future__ import annotations

import torch
from torch import nn

from graphpress.passes.base import make_pass

aten = torch.ops.aten


def fold(graph, config=None):
    return make_pass("fold-constants", config)(graph)


class ConstChains(nn.Module):
    """Every op on a parameter here is constant: t, permute+reshape, mul by a scalar, to(dtype),
    a tensor literal (lift_fresh_copy + detach_)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.k = nn.Parameter(torch.randn(2, 3, 6))
        self.scale = nn.Parameter(torch.randn(6))
        self.register_buffer("offset", torch.randn(6, dtype=torch.float64))

    def forward(self, x):
        y = x @ self.w.t()  # t(w): frontier
        y = y + x[:, :6] @ self.k.permute(2, 0, 1).reshape(6, 6)  # permute -> reshape chain
        y = y * (self.scale * 2.0)  # mul(const, scalar)
        y = y + self.offset.to(torch.float32)  # dtype cast
        return y + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_folds_constant_chains_into_tensors(capture, op_count, tensor_names, assert_same_function):
    graph = capture(ConstChains(), 2, 8)
    before = graph.clone()
    n_ops = op_count(graph)
    result = fold(graph)

    s = result.stats
    assert result.changed and s["folded"] == 5, s
    assert s["skipped"] == {}
    assert op_count(graph, aten.t, aten.permute, aten.reshape, aten._to_copy, aten.to, aten.lift_fresh_copy, aten.detach_) == 0
    assert s["asserts_checked"] == 1  # the dtype assertion aten.to leaves on `offset`
    # only ops touching the input remain: matmul x2, slice, add x3, mul
    assert op_count(graph) == n_ops - 8 == 7
    assert op_count(graph, aten.mul) == 1
    # sources all consumed -> removed; 5 new tensors, contiguous and not views of each other
    names = tensor_names(graph)
    assert not {"w", "k", "scale", "offset", "lifted_tensor_0"} & names
    assert s["tensors_removed"] == 5
    news = [graph.get_tensor(n.target) for n in graph.nodes if n.op == "get_attr"]
    assert len(news) == 5 and all(t.is_contiguous() and t._base is None for t in news)
    assert graph.get_tensor("w_t").shape == (8, 6)
    assert s["folded_bytes"] == sum(t.numel() * t.element_size() for t in news)
    for n in graph.nodes:
        if n.op == "get_attr":
            assert "folded_from" in graph.annotations(n)
    # a matmul on a stored W^T may sum in another order than on a transposed view: allclose
    assert_same_function(before, graph)


def test_scale_folded_value_is_right(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * (self.scale * 2.0 + 1.0)

    model = M()
    graph = capture(model, 2, 4)
    assert fold(graph).stats["folded"] == 1
    (node,) = [n for n in graph.nodes if n.op == "get_attr"]
    torch.testing.assert_close(graph.get_tensor(node.target), model.scale.detach() * 2.0 + 1.0, rtol=0, atol=0)
    assert isinstance(graph.get_tensor(node.target), nn.Parameter)  # computed from a parameter


# ---------------------------------------------------------------------------- must not fold
def test_random_op_is_not_folded(capture, op_count, assert_same_function):
    class M(nn.Module):
        def forward(self, x):
            return x + torch.rand(4) * 0.0

    graph = capture(M(), 2, 4)
    result = fold(graph)
    assert not result.changed
    assert result.stats["skipped"] == {"random op": 1}
    assert op_count(graph, aten.rand) == 1


def test_mutated_buffer_is_not_a_constant(capture, op_count):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(4))

        def forward(self, x):
            self.count.add_(1.0)
            return x + self.count * 2.0

    graph = capture(M(), 2, 4)
    result = fold(graph)
    assert not result.changed and result.stats["folded"] == 0
    assert op_count(graph, aten.add_) == 1 and op_count(graph, aten.mul) == 1


def test_size_expanding_result_is_not_folded_but_its_input_is(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(4))

        def forward(self, x):  # (N, 512, 4)
            return x + (self.b * 2.0).expand(512, 4)  # 8 KiB > small_bytes

    graph = capture(M(), 2, 512, 4)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {"size-expanding result (numel above max_expand_ratio x inputs)": 1}
    assert result.stats["folded"] == 1  # the mul under the expand
    assert op_count(graph, aten.expand) == 1 and op_count(graph, aten.mul) == 0
    assert_same_function(before, graph, exact=True)

    graph = before.clone()
    assert fold(graph, {"max_expand_ratio": 1000.0}).stats["folded"] == 1
    assert op_count(graph, aten.expand) == 0
    assert_same_function(before, graph, exact=True)


def test_max_bytes_and_duplicates(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(48, 48))

        def forward(self, x):
            return x @ self.w.t() + x @ self.w  # t(w) folded would store w twice

    graph = capture(M(), 2, 48)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {"input constant also read elsewhere (folding would duplicate it)": 1}
    assert op_count(graph, aten.t) == 1

    graph = before.clone()
    assert fold(graph, {"small_bytes": 1 << 20}).stats["folded"] == 1
    assert op_count(graph, aten.t) == 0 and graph.parameter_count() == 2 * 48 * 48
    assert_same_function(before, graph)

    graph = before.clone()
    result = fold(graph, {"max_bytes": 1024, "small_bytes": 1 << 20})
    assert result.stats["skipped"] == {"result larger than max_bytes": 1}
    assert op_count(graph, aten.t) == 1


def test_folded_graph_reexports(capture):
    graph = capture(ConstChains(), 2, 8)
    fold(graph)
    ep = graph.export_program()
    x = torch.randn(3, 8)
    torch.testing.assert_close(ep.module()(x), graph.run(x)[0])
    assert not any(n.target in (aten.t.default, aten.permute.default) for n in ep.graph.nodes)
