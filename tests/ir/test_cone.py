"""cone_key: equal exactly when two graphs compute their outputs with the same calls on the
same tensors."""

import torch
import torch.nn as nn

from graphpress.ir.cone import cone_key
from graphpress.ir.graph import Graph


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _graph():
    torch.manual_seed(0)
    return Graph.capture(Net(), (torch.randn(2, 6),))


def test_a_snapshot_and_a_dead_node_keep_the_key():
    g = _graph()
    key = cone_key(g)
    assert key is not None and cone_key(g.snapshot()) == key
    s = g.snapshot()
    x = next(n for n in s.gm.graph.nodes if n.op == "placeholder")
    with s.gm.graph.inserting_after(x):
        s.gm.graph.call_function(torch.ops.aten.neg.default, (x,))  # read by nothing
    s.recompile()
    assert cone_key(s) == key


def test_a_replaced_weight_a_changed_op_or_argument_changes_the_key():
    g = _graph()
    key = cone_key(g)
    s = g.snapshot()
    s.set_tensor("fc1.weight", g.get_tensor("fc1.weight") * 1.0)  # same values, another tensor
    assert cone_key(s) != key

    s = g.snapshot()
    relu = next(s.call_nodes(torch.ops.aten.relu.default))
    relu.target = torch.ops.aten.sigmoid.default
    assert cone_key(s) != key

    s = g.snapshot()
    lin = list(s.call_nodes(torch.ops.aten.linear.default))[1]
    lin.args = (lin.args[0], lin.args[1])  # the bias dropped
    assert cone_key(s) != key


def test_a_write_in_place_changes_the_key():
    g = _graph()
    key = cone_key(g)
    with torch.no_grad():
        g.get_tensor("fc2.bias").add_(0.0)  # the version counter moves
    assert cone_key(g) != key


def test_call_method_in_the_cone_is_not_described():
    g = _graph()
    out = next(n for n in g.gm.graph.nodes if n.op == "output")
    (res,) = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    with g.gm.graph.inserting_before(out):
        m = g.gm.graph.call_method("clone", (res,))
    out.args = ((m,),) if isinstance(out.args[0], (tuple, list)) else (m,)
    g.recompile()
    assert cone_key(g) is None
    assert cone_key(_graph()) != cone_key(_graph())  # equal values, other tensor objects


def test_a_cycle_is_not_described_and_does_not_hang():
    # a malformed graph (a node reading a later one) reaches cone_key before verify does
    g = _graph()
    relu = next(n for n in g.gm.graph.nodes if n.target == torch.ops.aten.relu.default)
    user = next(iter(relu.users))
    relu.args = (user,) + tuple(relu.args[1:])
    assert cone_key(g) is None
