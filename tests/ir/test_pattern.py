"""ir/pattern.py: declarative patterns capture what they match and say why they did not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import ACTIVATION, ADD, BATCH_NORM, CONV, LINEAR, MOVEMENT, RELU
from graphpress.ir.pattern import (
    NoMatch, Rule, alt, any, apply_rules, argument, attr, const, first_match, index_rules, match, op, through,
)
from graphpress.ir.rewrite import Skips

aten = torch.ops.aten


def capture(module: nn.Module, *shape: int) -> Graph:
    return Graph.capture(module.eval(), (torch.randn(*shape),))


def only(graph: Graph, *family) -> torch.fx.Node:
    nodes = list(graph.call_nodes(*family))
    assert len(nodes) == 1, nodes
    return nodes[0]


class ConvBNReLU(nn.Module):
    def __init__(self, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=bias)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


CONV_BN = op(BATCH_NORM, op(CONV, any("x"), name="conv", single_use=True, weight=const("w"), bias=const("b", optional=True)),
             name="bn", running_mean=const("mean"))


def test_match_captures_nodes_and_constant_tensors():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    bn, conv = only(graph, *BATCH_NORM), only(graph, *CONV)
    m = match(CONV_BN, bn, graph)
    assert m, m
    assert m["bn"] is bn and m["conv"] is conv and m["x"] is conv.args[0]
    assert m.nodes == [bn, conv]
    assert torch.equal(m.tensors["w"], graph.tensor_of(conv.args[1]))
    assert m["b"] is None and m.tensors["b"] is None  # optional bias absent
    assert torch.equal(m.tensors["mean"], torch.zeros(4))


def test_failed_match_names_the_node_and_the_constraint():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    relu = only(graph, *RELU)
    fail = match(CONV_BN, relu, graph)
    assert isinstance(fail, NoMatch) and not fail
    assert fail.node is relu
    assert fail.reason.startswith("is not ") and "batch_norm" in fail.reason
    assert str(fail) == f"{relu.name}: {fail.reason}"
    # a constraint deeper in the tree names the node where it failed, and `why` replaces the text
    bn = only(graph, *BATCH_NORM)
    pattern = op(BATCH_NORM, op(LINEAR, why="input is not a linear"))
    fail = match(pattern, bn, graph)
    assert (fail.node, fail.reason) == (only(graph, *CONV), "input is not a linear")
    literal = match(op(CONV, groups=2), only(graph, *CONV), graph)
    assert literal.reason == "argument 'groups' is 1, not 2"


def test_single_use_and_check_run_in_order_with_their_reasons():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    graph = capture(TwoUsers(), 2, 3, 8, 8)
    bn, conv = only(graph, *BATCH_NORM), only(graph, *CONV)
    assert match(CONV_BN, bn, graph).reason == "output has other users"
    named = op(BATCH_NORM, op(CONV, single_use="conv output has other users"))
    assert str(match(named, bn, graph)) == f"{conv.name}: conv output has other users"
    # check runs before single_use and may veto with its own reason
    vetoed = op(BATCH_NORM, op(CONV, single_use=True, check=lambda n, m: "refused by check"))
    assert match(vetoed, bn, graph).reason == "refused by check"


def test_const_refuses_computed_tensors():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return F.linear(x, self.w * 2)

    graph = capture(Computed(), 2, 3)
    lin = only(graph, *LINEAR)
    fail = match(op(LINEAR, weight=const("w", why="weight is not a constant")), lin, graph)
    assert fail.reason == "weight is not a constant" and fail.node is lin.args[1]
    assert match(op(LINEAR, weight=const()), lin, graph).reason == "is not a constant tensor"


def test_keyword_constraints_resolve_through_the_schema():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    bn = only(graph, *BATCH_NORM)
    # positional in the graph, named in the pattern
    assert argument(bn, "training") is False and argument(bn, "eps") == pytest.approx(1e-5)
    assert match(op(BATCH_NORM, training=False), bn, graph)
    assert match(op(BATCH_NORM, training=True), bn, graph).reason == "argument 'training' is False, not True"
    assert match(op(BATCH_NORM, no_such_argument=any()), bn, graph).reason == "argument is missing"
    assert match(op(BATCH_NORM, momentum=0.1), bn, graph)
    assert match(op(BATCH_NORM, training=0), bn, graph).reason == "argument 'training' is False, not 0"


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def test_commute_tries_both_operand_orders_and_restores_captures():
    graph = capture(Residual(), 2, 6)
    add = only(graph, *ADD)
    assert isinstance(add.args[0], torch.fx.Node) and add.args[0].op == "placeholder"  # x + relu(...)
    ordered = op(ADD, op(RELU, name="act"), any("skip"))
    fail = match(ordered, add, graph)
    assert fail.node is add.args[0] and fail.reason.startswith("is not relu")
    m = match(op(ADD, op(RELU, name="act"), any("skip"), commute=True), add, graph)
    assert m["act"] is add.args[1] and m["skip"] is add.args[0]
    assert m.nodes == [add, add.args[1]]
    with pytest.raises(ValueError, match="exactly two"):
        op(ADD, any(), commute=True)


def test_through_skips_movement_ops():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.relu(self.conv(x).flatten(1).unsqueeze(0))

    graph = capture(Flat(), 2, 3, 5, 5)
    relu, conv = only(graph, *RELU), only(graph, *CONV)
    assert match(op(RELU, op(CONV)), relu, graph).reason.startswith("is not conv")
    m = match(op(RELU, through(MOVEMENT, op(CONV, name="conv"), name="moves")), relu, graph)
    assert m["conv"] is conv
    assert [str(n.target.overloadpacket) for n in m["moves"]] == ["aten.unsqueeze", "aten.flatten"]
    # zero movement ops is fine too
    graph2 = capture(ConvBNReLU(), 2, 3, 8, 8)
    assert match(op(BATCH_NORM, through(MOVEMENT, op(CONV))), only(graph2, *BATCH_NORM), graph2)


def test_alt_takes_the_first_alternative_that_matches_and_drops_failed_captures():
    graph = capture(Residual(), 2, 6)
    add = only(graph, *ADD)
    relu = add.args[1]
    # the first alternative gets as far as capturing the relu, then fails on its input: its captures go
    p = alt(op(RELU, op(CONV, name="conv"), name="act"), op(RELU, op(LINEAR, name="lin")), name="hidden")
    m = match(p, relu, graph)
    assert m["hidden"] is relu and m["lin"] is relu.args[0] and "act" not in m and "conv" not in m
    assert m.nodes == [relu, relu.args[0]]
    # none matches: the first loud failure is reported, a quiet one only when all are quiet
    fail = match(alt(op(BATCH_NORM, quiet=True), op(RELU, op(CONV))), relu, graph)
    assert isinstance(fail, NoMatch) and not fail.quiet and fail.node is relu.args[0] and fail.reason.startswith("is not conv")
    quiet = match(alt(op(BATCH_NORM, quiet=True), op(CONV, quiet=True)), relu, graph)
    assert isinstance(quiet, NoMatch) and quiet.quiet and quiet.node is relu
    with pytest.raises(ValueError, match="no alternatives"):
        alt()


def test_a_name_captured_twice_must_be_the_same_value_in_either_operand_order():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            z = torch.relu(x)
            return z + torch.relu(self.fc(z)), x + torch.relu(self.fc(x * 2))

    graph = capture(Twice(), 2, 6)
    same_input, other_input = list(graph.call_nodes(*ADD))
    # the main side is written first and binds x = z; matched swapped, it must still bind first, or
    # the shortcut side's relu(any("x")) would bind x to the graph input and the main side would fail
    p = op(ADD, op(RELU, op(LINEAR, any("x"))), alt(op(RELU, any("x")), any("x")), commute=True)
    m = match(p, same_input, graph)
    assert m["x"] is same_input.args[0] and m.nodes == [same_input, same_input.args[1], same_input.args[1].args[0]]
    # fc reads x * 2, the other operand is x: a named failure
    fail = match(op(ADD, any("x"), op(RELU, op(LINEAR, any("x")))), other_input, graph)
    assert fail.node.name == "mul" and fail.reason == f"is not x ({other_input.args[0].name})"


def test_rules_are_indexed_by_op_and_apply_counts_fires_and_skips():
    seen = []
    relu_rule = Rule("relu-after-linear", op(RELU, op(LINEAR, name="lin", quiet=True), name="act"),
                     rewrite=lambda g, m: seen.append(m["act"]))
    add_rule = Rule("add", op(ADD, any(), any(), check=lambda n, m: "adds are refused"), rewrite=lambda g, m: None)
    index = index_rules([relu_rule, add_rule])
    assert index[aten.relu] == (relu_rule,) and index[aten.relu_] == (relu_rule,) and index[aten.add] == (add_rule,)
    assert aten.linear not in index

    graph = capture(Residual(), 2, 6)
    skips = Skips()
    fired = apply_rules(graph, index, skips)
    assert fired == {"relu-after-linear": 1} and seen == [only(graph, *RELU)]
    assert skips == {"adds are refused": 1}

    # a quiet family mismatch (relu not after a linear) is no skip; a rule-level check is
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    skips = Skips()
    assert apply_rules(graph, [relu_rule], skips) == {} and skips == {}
    checked = Rule("checked", op(ACTIVATION, op(BATCH_NORM)), rewrite=lambda g, m: None, check=lambda g, m: "vetoed")
    skips = Skips()
    assert apply_rules(graph, [checked], skips) == {} and skips == {"vetoed": 1}
    with pytest.raises(ValueError, match="root must be an op"):
        Rule("bad", any(), rewrite=lambda g, m: None)


def test_a_rule_that_fires_hides_the_refusals_of_the_others_on_that_node():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    refuses = Rule("refuses", op(RELU, op(LINEAR)), rewrite=lambda g, m: None)
    fires = Rule("fires", op(RELU, op(BATCH_NORM)), rewrite=lambda g, m: None)
    skips = Skips()
    assert apply_rules(graph, [refuses, fires], skips) == {"fires": 1} and skips == {}


def test_single_use_const_refuses_a_tensor_another_op_reads():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + self.fc(x * 2)

    graph = capture(Shared(), 2, 4)
    first = list(graph.call_nodes(*LINEAR))[0]
    assert match(op(LINEAR, weight=const("w")), first, graph)
    fail = match(op(LINEAR, weight=const("w", single_use=True)), first, graph)
    assert fail.reason == "tensor is shared with another op" and fail.node is first.args[1]
    named = match(op(LINEAR, weight=const(single_use="weight is shared")), first, graph)
    assert named.reason == "weight is shared"


def test_first_match_returns_the_rule_or_every_refusal_and_no_refusal_without_a_rule():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    relu, bn, conv = only(graph, *RELU), only(graph, *BATCH_NORM), only(graph, *CONV)
    on_linear = Rule("on-linear", op(RELU, op(LINEAR, why="input is not a linear")), rewrite=lambda g, m: None)
    vetoed = Rule("vetoed", op(RELU, op(BATCH_NORM)), rewrite=lambda g, m: None, check=lambda g, m: "vetoed by check")
    fires = Rule("fires", op(RELU, op(BATCH_NORM, name="bn")), rewrite=lambda g, m: None)
    index = index_rules([on_linear, vetoed, fires])
    rule, m = first_match(index, relu, graph)
    assert rule is fires and m["bn"] is bn
    # no rule takes the relu: one refusal per rule tried, in order; a check's refusal is reported at the root
    fails = first_match([on_linear, vetoed], relu, graph)
    assert [(f.node, f.reason) for f in fails] == [(bn, "input is not a linear"), (relu, "vetoed by check")]
    # no rule indexed under the op: no refusal, which a caller tells apart from refusals
    assert first_match(index, conv, graph) == []
    # nothing was rewritten
    assert only(graph, *RELU) is relu


def test_attr_takes_any_module_attribute_node_and_names_what_is_not():
    graph = capture(ConvBNReLU(), 2, 3, 8, 8)
    conv = only(graph, *CONV)
    m = match(op(CONV, any("x"), attr("w")), conv)  # no graph needed: the tensor is not read
    assert m["w"] is conv.args[1] and m["w"].op == "get_attr" and m["x"].op == "placeholder"
    fail = match(op(CONV, attr()), conv)
    assert fail.node is conv.args[0] and fail.reason == "is not a module attribute"
    assert match(op(CONV, attr(why="input is not a parameter")), conv).reason == "input is not a parameter"
