import pytest
import torch
import torch.nn as nn

from graphpress.errors import VerificationError
from graphpress.ir.compare import compare_outputs, kl_divergence, sqnr_db, tolerance, top1_agreement
from graphpress.ir.graph import Graph
from graphpress.ir.nxview import dependency_groups, regions


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(y.mean((2, 3)))


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return Graph.capture(Block(), (torch.randn(2, 3, 8, 8),))


def test_capture_records_specs_and_dynamic_batch(graph):
    assert graph.dynamic_batch
    assert graph.input_specs[0].shape == ("batch", 3, 8, 8)
    assert graph.output_specs[0].shape == ("batch", 2)
    assert graph.output_specs[0].dtype == "float32"
    assert graph.run(torch.randn(5, 3, 8, 8))[0].shape == (5, 2)


def test_capture_batch_one_still_dynamic():
    g = Graph.capture(nn.Linear(4, 3), (torch.randn(1, 4),))
    assert g.dynamic_batch
    assert g.example_inputs[0].shape == (1, 4)
    assert g.run(torch.randn(6, 4))[0].shape == (6, 3)


def test_run_matches_eager(graph):
    torch.manual_seed(1)
    m = Block().eval()
    g = Graph.capture(m, (torch.randn(2, 3, 8, 8),))
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(g.run(x)[0], m(x), rtol=0, atol=0)


def test_annotations_name_source_modules(graph):
    modules = {n.name: graph.source_module(n) for n in graph.call_nodes()}
    assert modules["conv2d"] == "conv"
    assert modules["batch_norm"] == "bn"
    assert modules["linear"] == "fc"
    node = next(graph.call_nodes(torch.ops.aten.conv2d))
    graph.annotations(node)["circulant_block"] = 8
    assert graph.clone().annotations(next(graph.clone().call_nodes(torch.ops.aten.conv2d)))["circulant_block"] == 8


def test_clone_is_independent(graph):
    c = graph.clone()
    c.set_tensor("conv.weight", torch.zeros_like(c.get_tensor("conv.weight")))
    assert graph.get_tensor("conv.weight").abs().sum() > 0
    x = graph.example_inputs[0]
    assert not torch.equal(c.run(x)[0], graph.run(x)[0])


def test_verify_passes_on_captured_graph(graph):
    graph.verify()


def test_verify_catches_dangling_use(graph):
    g = graph.clone()
    relu = next(g.call_nodes(torch.ops.aten.relu))
    conv = next(g.call_nodes(torch.ops.aten.conv2d))
    # Make the conv read the relu that comes after it: a use before definition.
    conv.args = (relu,) + conv.args[1:]
    with pytest.raises(VerificationError, match="before it is defined"):
        g.verify()


def test_verify_catches_shape_error(graph):
    g = graph.clone()
    g.set_tensor("fc.weight", torch.randn(2, 5))  # fc expects 4 input features
    with pytest.raises(VerificationError, match="linear"):
        g.verify()


def test_verify_catches_missing_attribute(graph):
    g = graph.clone()
    delattr(g.gm.fc, "bias")
    with pytest.raises(VerificationError, match="fc.bias"):
        g.verify()


def test_summary_counts_params_and_flops(graph):
    s = graph.summary()
    conv_row = next(r for r in s.rows if r.name == "conv2d")
    # 2 * out numel (2*4*8*8) * in-ch*kh*kw (3*3*3)
    assert conv_row.flops == 2 * (2 * 4 * 8 * 8) * 27
    assert conv_row.params == 4 * 3 * 3 * 3 + 4
    lin = next(r for r in s.rows if r.name == "linear")
    assert lin.flops == 2 * 2 * 2 * 4
    assert s.op_counts["aten.conv2d"] == 2
    assert "MFLOPs" in str(s)


def test_networkx_view_and_analyses(graph):
    g = graph.to_networkx()
    assert g.has_edge("conv2d", "batch_norm")
    assert g.nodes["linear"]["module"] == "fc"
    groups = dependency_groups(graph)
    # the residual add ties conv (through bn, relu) and conv2 together
    assert {"conv2d", "conv2d_1"} in groups
    assert {"linear"} in groups
    fused = regions(g, lambda d: d["target"] in ("aten.conv2d", "aten.batch_norm", "aten.relu"))
    assert ["conv2d", "batch_norm", "relu", "conv2d_1"] in fused


def test_random_inputs_are_seeded_and_typed():
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 4)

        def forward(self, ids):
            return self.e(ids)

    ids = torch.randint(0, 50, (2, 6))
    g = Graph.capture(Emb(), (ids,))
    a, b = g.random_inputs(3, batch=4), g.random_inputs(3, batch=4)
    assert torch.equal(a[0], b[0]) and a[0].shape == (4, 6) and a[0].dtype == torch.int64
    assert int(a[0].min()) >= int(ids.min()) and int(a[0].max()) <= int(ids.max())


def test_compare_metrics():
    ref = torch.randn(100)
    assert sqnr_db(ref, ref) == float("inf")
    noisy = ref + 0.01 * torch.randn(100)
    assert 30 < sqnr_db(ref, noisy) < 50
    logits = torch.randn(4, 10)
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert top1_agreement(logits, logits) == 1.0
    rtol, atol = tolerance(torch.float32, 100.0)
    assert atol == pytest.approx(1e-3)
    d = compare_outputs([ref], [ref + 1e-7])[0]
    assert d.within_tol and d.max_abs == pytest.approx(1e-7, rel=0.5)
    assert not compare_outputs([ref], [noisy])[0].within_tol
    ints = torch.arange(5)
    assert not compare_outputs([ints], [ints + 1])[0].within_tol


def test_export_program_roundtrip(graph):
    ep = graph.export_program()
    x = torch.randn(7, 3, 8, 8)
    torch.testing.assert_close(ep.module()(x), graph.run(x)[0])


# ------------------------------------------------------------ op domains and NaN (issue 15, point 7)
class DomainOps(nn.Module):
    """Every input feeds an op that is NaN for negative arguments, through views and scaling."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b, c, d, e):
        y = torch.sqrt(a.view(a.shape[0], -1)) + torch.log(b[:, :6] * 2.0)
        y = y + c.pow(0.5) + torch.rsqrt(d.permute(0, 1) + 0.1)
        return self.fc(y + torch.log2(e).clamp(min=-10)), torch.layer_norm(e, (6,))


class FreeOps(nn.Module):
    def forward(self, x, y):
        # integer powers, sqrt of a square and a layer norm accept any sign
        return torch.sqrt(x * x + 1.0) + y.pow(2) + torch.layer_norm(y, (4,))


def _examples(*shapes):
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(*s, generator=gen) for s in shapes)


def test_random_inputs_respect_op_domains():
    g = Graph.capture(DomainOps(), _examples((2, 6), (2, 8), (2, 6), (2, 6), (2, 6)))
    assert g._positive_inputs() == {0, 1, 2, 3, 4}
    for seed in range(3):
        inputs = g.random_inputs(seed, batch=5)
        assert all(float(x.min()) >= 0 for x in inputs)
        assert [tuple(x.shape) for x in inputs] == [(5, 6), (5, 8), (5, 6), (5, 6), (5, 6)]
        assert all(bool(torch.isfinite(o).all()) for o in g.run(*inputs))
    # seeded: the same draw twice
    torch.testing.assert_close(g.random_inputs(1)[0], g.random_inputs(1)[0])


def test_random_inputs_of_sign_free_ops_keep_their_spread():
    g = Graph.capture(FreeOps(), _examples((2, 4), (2, 4)))
    assert g._positive_inputs() == set()
    x, y = g.random_inputs(0, batch=64)
    assert float(x.min()) < 0 and float(y.min()) < 0


def test_pipeline_exact_pass_on_a_sqrt_model_is_not_blamed_for_nan():
    from graphpress.passes import Pipeline

    g = Graph.capture(DomainOps(), _examples((2, 6), (2, 8), (2, 6), (2, 6), (2, 6)))
    report = Pipeline(["eliminate-dead-code"], random_inputs=3).run(g)
    assert report.steps[0].step[0].within_tol and report.steps[0].step[0].max_abs == 0.0


def test_compare_outputs_same_nan_positions_are_equal():
    nan, inf = float("nan"), float("inf")
    ref = torch.tensor([1.0, nan, 3.0, -inf])
    (same,) = compare_outputs([ref], [torch.tensor([1.0, nan, 3.0 + 1e-7, -inf])])
    assert same.within_tol and same.max_abs < 1e-6 and same.sqnr_db > 100
    (moved,) = compare_outputs([ref], [torch.tensor([nan, 2.0, 3.0, -inf])])
    assert not moved.within_tol and moved.max_abs == float("inf") and moved.sqnr_db == -float("inf")
    (new_nan,) = compare_outputs([torch.ones(3)], [torch.tensor([1.0, nan, 1.0])])
    assert not new_nan.within_tol and new_nan.sqnr_db == -float("inf")
    (flipped,) = compare_outputs([ref], [torch.tensor([1.0, nan, 3.0, inf])])
    assert not flipped.within_tol
    assert sqnr_db(torch.ones(3), torch.tensor([1.0, nan, 1.0])) == -float("inf")  # never passes a floor
