"""Shape functions of the custom ops are called directly by the structure check, with the same
checks as through the dispatcher."""

import pytest
import torch
import torch.nn as nn

import graphpress.ir.ops  # noqa: F401 -- registers the ops
import graphpress.ir.ops_quant  # noqa: F401
from graphpress.errors import VerificationError
from graphpress.ir.fakes import SHAPE_FUNCTIONS
from graphpress.ir.graph import Graph
from graphpress.ir.quant import groupwise, to_nbits


def test_every_graphpress_op_with_a_fake_kernel_has_a_direct_shape_function():
    for name in ("linear_act", "qlinear", "qconv2d", "wlinear_nbits", "quantize_act"):
        assert getattr(torch.ops.graphpress, name).default in SHAPE_FUNCTIONS, name


def _nbits_graph(in_features: int):
    torch.manual_seed(0)
    g = Graph.capture(nn.Sequential(nn.Linear(64, 16)), (torch.randn(2, 64),))
    lin = next(n for n in g.gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    w = g.tensor_of(lin.args[1])
    nb = to_nbits(groupwise(w, 4, 32, symmetric=True))
    gmg = g.gm.graph
    with gmg.inserting_before(lin):
        names = [g.add_tensor(f"q_{k}", t) for k, t in (("packed", nb.packed), ("scales", nb.scales))]
        p, s = (gmg.get_attr(n) for n in names)
        new = gmg.call_function(torch.ops.graphpress.wlinear_nbits.default, (lin.args[0], p, s, None, None, in_features, 4, 32, 0))
    lin.replace_all_uses_with(new)
    gmg.erase_node(lin)
    g.recompile()
    return g


def test_a_custom_op_is_propagated_and_its_shape_checks_still_run(monkeypatch):
    calls = []
    real = SHAPE_FUNCTIONS[torch.ops.graphpress.wlinear_nbits.default]
    monkeypatch.setitem(SHAPE_FUNCTIONS, torch.ops.graphpress.wlinear_nbits.default, lambda *a, **k: calls.append(1) or real(*a, **k))
    g = _nbits_graph(64)
    g.verify()
    assert calls == [1]  # called directly, once
    out = next(n for n in g.gm.graph.nodes if n.op == "output")
    assert tuple(out.meta["val"][0].shape) == (2, 16)
    # the same node with in_features that do not match the input: the shape function's error
    with pytest.raises(VerificationError, match="wlinear_nbits"):
        _nbits_graph(32).verify()
