"""prune/deps.py's dispatch: a table of rules indexed by op; a node no rule takes pins what it
reads, and the reason names the node and what its op's rules refused."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphpress.ir import opsets
from graphpress.ir.graph import Graph
from graphpress.ir.pattern import NoMatch, first_match
from graphpress.passes.base import make_pass
from graphpress.passes.prune import deps
from graphpress.passes.prune.deps import analyze

aten = torch.ops.aten


def capture(model: nn.Module, *shape: int) -> Graph:
    torch.manual_seed(0)
    return Graph.capture(model.eval(), (torch.randn(*shape),))


def only(graph: Graph, packet) -> fx.Node:
    nodes = list(graph.call_nodes(packet))
    assert len(nodes) == 1, nodes
    return nodes[0]


def test_rules_are_a_table_indexed_by_the_ops_of_the_opsets_families():
    names = {op: tuple(r.name for r in rules) for op, rules in deps._RULES.items()}
    for family, rule in [(opsets.CONV_ANY, "conv"), (opsets.BATCH_NORM, "batch norm"), (opsets.JOIN, "join"),
                         (opsets.RESHAPE, "reshape"), (opsets.POOLING | opsets.POOLING_TUPLE, "pooling"),
                         (opsets.SPLIT, "split"), (opsets.REDUCTION, "reduction"), (opsets.SHAPE_QUERY, "shape query")]:
        assert all(names[op] == (rule,) for op in family), rule
    assert names[operator.getitem] == ("getitem",) and names[aten.mm] == ("mm",) and names[aten.linear] == ("linear",)
    # one rule per op: the order of the old if-chain cannot matter
    assert all(len(rules) == 1 for rules in names.values())
    assert aten.cumsum not in deps._RULES and aten.conv_transpose2d not in deps._RULES


class ConvThen(nn.Module):
    """A conv whose output channels (group 'c') are read by ``tail``."""

    def __init__(self, tail):
        super().__init__()
        self.c, self.h, self.tail = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), tail

    def forward(self, x):
        return self.h(self.tail(F.relu(self.c(x))).mean((2, 3)))


def test_unknown_op_blocks_the_group_with_a_reason_naming_the_node():
    g = capture(ConvThen(lambda h: torch.cumsum(h, 1)), 2, 3, 8, 8)
    cumsum = only(g, aten.cumsum)
    assert first_match(deps._RULES, cumsum) == []  # no rule for the op, so no refusal to report
    group = analyze(g).group("c")
    assert not group.prunable
    assert group.pinned == [f"consumed by '{cumsum.name}': aten.cumsum (no pruning rule)"]
    # the same text is the pass's "why was this group left whole"
    stats = make_pass("prune-channels", {"sparsity": 0.5})(g.clone()).stats
    assert stats["pinned"]["c"] == f"consumed by '{cumsum.name}': aten.cumsum (no pruning rule)"
    # without the unknown op the group is prunable: the pin is the op's, not the model's
    assert analyze(capture(ConvThen(lambda h: h), 2, 3, 8, 8)).group("c").prunable


class MmOfActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = F.relu(self.c(x)).mean((2, 3))
        return torch.mm(y, y.t())


def test_mm_rule_does_not_match_an_activation_weight_and_the_pin_says_where():
    # mm(y, y.t()): the "weight" operand is computed, so mm is no layer and the group of y is pinned
    g = capture(MmOfActivations(), 2, 3, 8, 8)
    mm, t = only(g, aten.mm), only(g, aten.t)
    fails = first_match(deps._RULES, mm)
    assert len(fails) == 1 and isinstance(fails[0], NoMatch)
    assert (fails[0].node, fails[0].reason) == (t, "weight operand is not a parameter")
    reason = f"consumed by '{mm.name}': aten.mm (no pruning rule: {t.name}: weight operand is not a parameter)"
    assert reason in analyze(g).group("c").pinned


class Scaled(nn.Module):
    def __init__(self, beta: float):
        super().__init__()
        self.c, self.w, self.b, self.beta = nn.Conv2d(3, 8, 3), nn.Parameter(torch.randn(8, 5)), nn.Parameter(torch.randn(5)), beta

    def forward(self, x):
        return torch.addmm(self.b, F.relu(self.c(x)).mean((2, 3)), self.w, beta=self.beta)


def test_addmm_rule_refuses_scaling_and_takes_the_plain_form():
    g = capture(Scaled(2.0), 2, 3, 8, 8)
    addmm = only(g, aten.addmm)
    fails = first_match(deps._RULES, addmm)
    assert [(f.node, f.reason) for f in fails] == [(addmm, "argument 'beta' is 2.0, not 1")]
    a = analyze(g)
    assert f"consumed by '{addmm.name}': aten.addmm (no pruning rule: argument 'beta' is 2.0, not 1)" in a.group("c").pinned
    # beta == 1: a layer (GPT-2's Conv1D); its weight rows are the conv group's consumer columns
    g = capture(Scaled(1.0), 2, 3, 8, 8)
    rule, m = first_match(deps._RULES, only(g, aten.addmm))
    assert rule.name == "addmm" and m["w"].op == "get_attr" and m["bias"].op == "get_attr"
    a = analyze(g)
    assert a.group("c").prunable
    assert [(u.target, u.dim) for u in a.group("c").consumers] == [(str(m["w"].target), 0)]


def test_convolution_rule_reads_groups_by_schema_and_refuses_transposed():
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.get_attr("w")
    plain = graph.call_function(aten.convolution.default, (x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 4))
    transposed = graph.call_function(aten.convolution.default, (x, w, None, [1, 1], [0, 0], [1, 1], True, [0, 0], 1))
    rule, m = first_match(deps._RULES, plain)
    assert rule.name == "conv" and (m["x"], m["w"], m["bias"], m["groups"]) == (x, w, None, 4)
    fails = first_match(deps._RULES, transposed)
    assert [(f.node, f.reason) for f in fails] == [(transposed, "transposed convolution")]
