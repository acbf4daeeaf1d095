"""The one layer selector (graphpress/passes/select.py), naming (ir/names.py) and recorder (passes/layers.observe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress.passes.prune  # noqa: F401 -- registers the passes
import graphpress.passes.quant  # noqa: F401
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.names import unique_names
from graphpress.passes.base import make_pass
from graphpress.passes.layers import find_layers, observe, record
from graphpress.passes.select import Selector


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 16)
        self.down = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """A conv literally named ``conv`` (a family name too), another conv, linears and a module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(64, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.shared = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        x = self.fc1(x.flatten(1))
        for b in self.blocks:
            x = b(x)
        x = self.shared(self.shared(x))  # one module, two calls
        return self.fc2(x)


@pytest.fixture(scope="module")
def graph() -> Graph:
    torch.manual_seed(0)
    return Graph.capture(Net().eval(), (torch.randn(2, 3, 4, 4),))


def chosen(graph: Graph, **options) -> list[str]:
    layers, rejected = find_layers(graph)
    sel = Selector("test-pass", **options).resolve({l.name: l.node for l in layers}, rejected)
    return [l.name for l in layers if sel.selects(l.name, l.node)]


ALL = ["conv", "conv2", "fc1", "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "shared", "shared#1", "fc2"]


def test_repeated_calls_get_k_suffixes_in_graph_order(graph):
    assert [l.name for l in find_layers(graph)[0]] == ALL
    assert unique_names(["a", "b", "a", "a"]) == ["a", "b", "a#1", "a#2"]


def test_empty_targets_select_everything(graph):
    assert chosen(graph) == ALL


def test_regex_targets_full_match(graph):
    assert chosen(graph, targets=(r"re:blocks\.\d+\.up",)) == ["blocks.0.up", "blocks.1.up"]
    assert chosen(graph, targets=("re:shared.*",)) == ["shared", "shared#1"]
    # full match, not search: 're:fc' is neither 'fc1' nor 'fc2', so it selects nothing and says so
    with pytest.raises(PassError, match=r"^pass 'test-pass': option 'targets': 're:fc' selects no layer: layers are: conv, conv2, fc1, "):
        chosen(graph, targets=("re:fc",))


def test_op_family_targets(graph):
    assert chosen(graph, targets=("op:conv",)) == ["conv", "conv2"]
    assert chosen(graph, targets=("linear",)) == ALL[2:]
    # a layer named like a family is that layer, not the family
    assert chosen(graph, targets=("conv",)) == ["conv"]


def test_ignore_beats_targets(graph):
    assert chosen(graph, targets=("re:blocks\\..*",), ignore=("blocks.1.down", "re:.*up")) == ["blocks.0.down"]
    assert chosen(graph, targets=("op:linear",), ignore=("op:linear",)) == []
    # an ignore pattern that matches nothing is allowed (one recipe for models with and without it)
    assert chosen(graph, ignore=("re:lm_head",)) == ALL


def test_skip_is_ignore_with_exact_names_only(graph):
    assert chosen(graph, skip=("fc1", "shared#1")) == chosen(graph, ignore=("fc1", "shared#1"))
    assert "fc1" not in chosen(graph, skip=("fc1",))
    with pytest.raises(PassError, match="option 'skip': names unknown layer 're:fc.*'"):
        chosen(graph, skip=("re:fc.*",))


def test_unknown_name_is_one_line_with_a_suggestion(graph):
    with pytest.raises(PassError) as err:
        make_pass("prune-weights", {"method": "magnitude", "ignore": ["blocks.0.upp"]})(graph.clone())
    assert str(err.value) == "pass 'prune-weights': option 'ignore': names unknown layer 'blocks.0.upp': did you mean 'blocks.0.up'?"
    with pytest.raises(PassError, match=r"option 'targets': names unknown layer 'zzz': layers are: conv, conv2, fc1, blocks.0.up, blocks.0.down, blocks.1.up, \.\.\."):
        chosen(graph, targets=("zzz",))


def test_pattern_syntax_is_checked_when_the_config_is_built():
    with pytest.raises(PassError, match=r"pass 'prune-weights': option 'targets': 're:\(' is not a valid regex"):
        make_pass("prune-weights", {"targets": ["re:("]})
    with pytest.raises(PassError, match="'op:lineer' names no op family of graphpress.ir.opsets: did you mean 'op:linear'"):
        make_pass("quantize-layerwise", {"ignore": ["op:lineer"]})


def test_passes_agree_skip_equals_ignore(graph):
    a = make_pass("prune-weights", {"method": "magnitude", "sparsity": 0.5, "skip": ["fc2", "conv"]})(graph.clone())
    b = make_pass("prune-weights", {"method": "magnitude", "sparsity": 0.5, "ignore": ["fc2", "conv"]})(graph.clone())
    tied = {"shared": "weight is read by other ops too (tied)", "shared#1": "weight is read by other ops too (tied)"}
    assert a.stats["kept_dense"] == b.stats["kept_dense"] == {"conv": "skipped by config", "fc2": "skipped by config", **tied}
    for target in ("fc1.weight", "conv.weight", "fc2.weight"):
        assert torch.equal(a.graph.get_tensor(target), b.graph.get_tensor(target))
    assert float((a.graph.get_tensor("fc2.weight") == 0).float().mean()) == 0.0  # left dense
    assert float((a.graph.get_tensor("fc1.weight") == 0).float().mean()) == 0.5
    c = make_pass("prune-weights", {"method": "magnitude", "sparsity": 0.5, "targets": ["op:conv"]})(graph.clone())
    assert float((c.graph.get_tensor("fc1.weight") == 0).float().mean()) == 0.0
    assert c.stats["kept_dense"]["fc1"] == "not in targets"
    assert float((c.graph.get_tensor("conv2.weight") == 0).float().mean()) == 0.5


def test_observe_reduces_what_record_keeps(graph):
    layers, _ = find_layers(graph)
    nodes = [l.input_node for l in layers[:3]]
    batches = [(torch.randn(2, 3, 4, 4),), (torch.randn(5, 3, 4, 4),)]
    kept = record(graph, nodes, batches)
    assert [v.shape[0] for v in kept[nodes[2].name]] == [2, 5]
    sums: dict[str, float] = {}
    n = observe(graph, nodes, lambda node, v: sums.__setitem__(node.name, sums.get(node.name, 0.0) + float(v.double().sum())), batches)
    assert n == 2
    for node in nodes:
        assert sums[node.name] == pytest.approx(sum(float(v.double().sum()) for v in kept[node.name]), rel=1e-12)
