"""fuse-parallel-linears: linears sharing an input -> one linear and slices, float and k-bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass

LINEAR = torch.ops.aten.linear.default
NBITS = torch.ops.graphpress.wlinear_nbits.default


class QKV(nn.Module):
    """An attention-like block: q/k/v (biased) and gate/up (no bias) on one input, and a lone
    output projection."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.k = nn.Linear(32, 16)
        self.v = nn.Linear(32, 16)
        self.up = nn.Linear(32, 64, bias=False)
        self.gate = nn.Linear(32, 64, bias=False)
        self.o = nn.Linear(64, 8)

    def forward(self, x):
        a = self.q(x)[..., :16] * self.k(x) + self.v(x)
        return self.o(torch.relu(self.gate(x)) * self.up(x)) + a.sum(-1, keepdim=True)


def _graph():
    torch.manual_seed(0)
    return Graph.capture(QKV(), (torch.randn(2, 5, 32),))


def _count(graph, target):
    return sum(n.target == target for n in graph.gm.graph.nodes)


def test_float_linears_on_one_input_fuse_by_agreement_and_outputs_stay():
    graph = _graph()
    x = torch.randn(3, 5, 32)
    before = graph.run(x)[0]
    assert _count(graph, LINEAR) == 6
    result = make_pass("fuse-parallel-linears")(graph.snapshot())
    out = result.graph
    # q, k and v (biased) fuse; gate and up (no bias) fuse apart: they disagree on the bias
    assert result.changed and result.stats["groups_fused"] == 2 and result.stats["linears_fused"] == 5
    assert _count(out, LINEAR) == 3 and _count(out, torch.ops.aten.slice.Tensor) >= 4
    assert result.stats["skipped"]["linears on one input that disagree (dtype, bits, group size, bias or zero points)"] == 1
    torch.testing.assert_close(out.run(x)[0], before, rtol=1e-5, atol=1e-6)
    out.verify()


def test_kbit_linears_fuse_with_their_codes_and_a_mixed_width_group_does_not():
    graph = _graph()
    x = torch.randn(3, 5, 32)
    q4 = Pipeline([("quantize-layerwise", {"bits": [4], "target_bits": 4, "activations": "int8-block", "min_sqnr_db": None})]).run(graph).graph
    before = q4.run(x)[0]
    assert _count(q4, NBITS) == 6
    fused = make_pass("fuse-parallel-linears")(q4.snapshot()).graph
    assert _count(fused, NBITS) == 3  # q+k+v, gate+up, o
    # the same codes and scales: the same values, int8 activation rounding included
    torch.testing.assert_close(fused.run(x)[0], before, rtol=1e-5, atol=1e-6)
    node = next(n for n in fused.gm.graph.nodes if n.target == NBITS and fused.tensor_of(n.args[1]).shape[0] == 64 + 64)
    assert node.args[5:9] == (32, 4, 32, 8)
    # the rule must not match members of different widths: q at 8 bits beside k and v at 4
    common = {"activations": "none", "min_sqnr_db": None}
    mixed = Pipeline([("quantize-layerwise", {"bits": [8], "target_bits": 8, "targets": ["q"], **common}),
                      ("quantize-layerwise", {"bits": [4], "target_bits": 4, **common})]).run(graph).graph
    assert sorted(n.args[6] for n in mixed.gm.graph.nodes if n.target == NBITS) == [4, 4, 4, 4, 4, 8]
    res = make_pass("fuse-parallel-linears")(mixed.snapshot())
    assert res.stats["linears_fused"] == 4 and _count(res.graph, NBITS) == 4  # k+v, gate+up; q and o alone
    assert res.stats["skipped"]["linears on one input that disagree (dtype, bits, group size, bias or zero points)"] == 2


def test_the_pass_in_a_pipeline_is_verified_exact_and_min_group_is_checked():
    graph = _graph()
    report = Pipeline(["fuse-parallel-linears"]).run(graph)
    assert report.steps[0].changed and report.steps[0].step[0].within_tol
    with pytest.raises(PassError, match="min_group must be an integer >= 2"):
        make_pass("fuse-parallel-linears", {"min_group": 1})


def test_a_lone_linear_is_left_alone():
    torch.manual_seed(0)
    graph = Graph.capture(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(2, 8),))
    result = make_pass("fuse-parallel-linears")(graph.snapshot())
    assert not result.changed and result.stats["skipped"]["a linear alone on its input"] == 2
