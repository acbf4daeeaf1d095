"""ir/gmcopy.structure_copy: a snapshot's module is a new structure over the same tensors, runs
the original's compiled code until its own graph changes, and falls back to deepcopy for a
module class FX did not make alone."""

import torch
import torch.nn as nn

from graphpress.ir.gmcopy import structure_copy
from graphpress.ir.graph import ANNOTATION_KEY, Graph


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _graph():
    torch.manual_seed(0)
    return Graph.capture(Net(), (torch.randn(2, 4),))


def test_the_copy_shares_tensors_and_code_but_not_modules_or_nodes():
    g = _graph()
    snap = g.snapshot()
    assert snap.get_tensor("body.0.weight") is g.get_tensor("body.0.weight")
    assert snap.gm.body is not g.gm.body and snap.gm.body._parameters is not g.gm.body._parameters
    assert type(snap.gm) is not type(g.gm)
    assert vars(type(snap.gm))["forward"] is vars(type(g.gm))["forward"]  # no recompile
    assert [n.name for n in snap.nodes] == [n.name for n in g.nodes]
    assert not set(snap.nodes) & set(g.nodes)
    x = torch.randn(3, 4)
    assert torch.equal(snap.run(x)[0], g.run(x)[0])


def test_changing_the_copy_leaves_the_original_alone():
    g = _graph()
    x = torch.randn(3, 4)
    want = g.run(x)[0]
    snap = g.snapshot()
    out = next(n for n in snap.nodes if n.op == "output")
    last = out.args[0][0]
    with snap.gm.graph.inserting_before(out):
        neg = snap.gm.graph.call_function(torch.ops.aten.neg.default, (last,))
    out.args = ((neg,),)
    snap.gm.recompile()
    snap.gm.body.register_buffer("extra", torch.ones(1))
    del snap.gm.head.bias
    snap.annotations(neg)["module"] = "head"
    snap.annotations(next(n for n in snap.nodes if n.name == "linear"))["quant"] = {"bits": 4}
    assert torch.equal(g.run(x)[0], want)  # the original's code, graph and tensors as they were
    assert "extra" not in g.gm.body._buffers and g.gm.head.bias is not None
    assert "quant" not in g.annotations(next(n for n in g.nodes if n.name == "linear"))
    assert len(g.nodes) == len(snap.nodes) - 1


def test_annotation_dicts_are_copied_all_the_way_down_but_tensors_are_shared():
    g = _graph()
    node = next(n for n in g.nodes if n.name == "linear")
    stats = torch.arange(3.0)
    g.annotations(node)["observed"] = {"max": stats, "seen": [1]}
    snap = g.snapshot()
    copied = snap.annotations(next(n for n in snap.nodes if n.name == "linear"))["observed"]
    copied["seen"].append(2)
    assert g.annotations(node)["observed"]["seen"] == [1]
    assert copied["max"] is stats


def test_a_module_class_with_more_than_fx_put_there_is_deep_copied():
    g = _graph()
    gm = g.gm
    type(gm).extra_method = lambda self: 1  # something the fast copy would not carry over
    memo = {id(t): t for _, t in g._owned_tensors()}
    new = structure_copy(gm, ANNOTATION_KEY, memo)
    assert vars(type(new))["forward"] is not vars(type(gm))["forward"]  # deepcopy: recompiled
    assert new.get_submodule("body.0").weight is gm.get_submodule("body.0").weight
    x = torch.randn(2, 4)
    assert torch.equal(new(x), gm(x))
