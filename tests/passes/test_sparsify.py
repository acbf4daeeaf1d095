"""sparsify-activations: thresholds per method reach their sparsity, the graph roles CHESS uses,
the greedy allocation, the rewritten graph equals the masked computation, held-out sparsity, the
ONNX lowering, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.passes.sparsity  # noqa: F401 -- registers the pass
from graphpress.errors import PassError, VerificationError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.passes.sparsity import thresholds as th
from graphpress.passes.sparsity.sparsify import _Masking, greedy, measure_sparsity
from graphpress.zoo import llama2c_tiny

OPS = torch.ops.graphpress


@pytest.fixture(scope="module")
def llama():
    model = llama2c_tiny(dim=32, hidden_dim=64, n_layers=2, vocab_size=64, seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 16), generator=gen)
    g = Graph.capture(model, (ids,))
    g.calibration = [(torch.randint(0, 64, (16, 16), generator=gen),)]
    held = torch.randint(0, 64, (16, 16), generator=gen)
    return g, held


class ReluMLP(nn.Module):
    """fc2 reads a ReLU output (half exact zeros, the rest heavy-tailed); fc1 a dense Gaussian input."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.fc2(F.relu(self.fc1(x))))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    g = Graph.capture(ReluMLP().eval(), (torch.randn(4, 64),))
    g.calibration = [(torch.randn(512, 64),)]
    return g


def _sparse_nodes(g):
    return [n for n in g.gm.graph.nodes if n.op == "call_function" and n.target in (OPS.sparse_linear.default, OPS.sparse_linear_pc.default)]


def test_roles_are_found_from_the_graph(llama):
    g, _ = llama
    r = make_pass("sparsify-activations", {"method": "teal", "target_sparsity": 0.3, "allocation": "uniform"})(g.clone())
    roles = r.stats["roles"]
    for i in range(2):
        assert {roles[f"layers.{i}.attention.{w}"] for w in ("wq", "wk", "wv")} == {"attention-input"}
        assert roles[f"layers.{i}.attention.wo"] == "attention-output"
        assert {roles[f"layers.{i}.feed_forward.{w}"] for w in ("w1", "w2", "w3")} == {"mlp"}
    # the tied classifier produces the output: left dense unless asked
    assert "output" not in r.stats["layers"]
    assert r.stats["skipped"] == {"classifier (produces a graph output; include_classifier: true to sparsify it)": 1}


@pytest.mark.parametrize("method", ["teal", "chess", "wina"])
def test_uniform_thresholds_reach_the_target_and_the_graph_equals_the_masked_model(llama, method):
    g, held = llama
    r = make_pass("sparsify-activations", {"method": method, "target_sparsity": 0.4, "allocation": "uniform"})(g.clone())
    layers = r.stats["layers"]
    assert layers and all(abs(v["calibration_sparsity"] - 0.4) < 0.02 for v in layers.values())
    nodes = _sparse_nodes(r.graph)
    assert len(nodes) == len(layers)
    per_channel = method != "teal"
    assert all((n.target is OPS.sparse_linear_pc.default) == per_channel for n in nodes)
    if method == "chess":  # selective attention: q/k/v stay dense, wo is sparsified
        assert not any(k.endswith(("wq", "wk", "wv")) for k in layers) and "layers.0.attention.wo" in layers
    else:
        assert "layers.0.attention.wq" in layers
    # the ops compute exactly the masked product the calibration simulated
    masks = {}
    by_name = {g.source_module(n) or n.name: n.name for n in g.gm.graph.nodes if n.op == "call_function"}
    for name, n in zip(layers, nodes, strict=True):
        args = n.args
        t = th.Thresholds(0.4, threshold=float(args[3])) if not per_channel else th.Thresholds(0.4, thresholds=r.graph.tensor_of(args[3]),
                                                                                              scores=r.graph.tensor_of(args[4]) if args[4] is not None else None)
        masks[by_name[name]] = t
    with torch.no_grad():
        want = _Masking(g.gm, masks).run(held)
        got = r.graph.gm(held)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # held-out sparsity is close to the calibrated one (same distribution)
    held_sparsity = measure_sparsity(r.graph, [(held,)])
    assert set(held_sparsity) == set(layers)
    assert all(abs(v - 0.4) < 0.1 for v in held_sparsity.values())
    assert 0 < r.stats["activated_parameter_fraction"] < 1


def test_wina_scores_are_weight_column_norms(llama):
    g, _ = llama
    r = make_pass("sparsify-activations", {"method": "wina", "target_sparsity": 0.3, "allocation": "uniform"})(g.clone())
    node = _sparse_nodes(r.graph)[0]
    wt, scores = r.graph.tensor_of(node.args[1]), r.graph.tensor_of(node.args[4])
    torch.testing.assert_close(scores, wt.norm(dim=1))  # wt = W^T: row i is column i of W


def test_greedy_spends_sparsity_where_it_is_cheap(mlp):
    uni = make_pass("sparsify-activations", {"target_sparsity": 0.5, "allocation": "uniform", "include_classifier": True})(mlp.clone())
    gre = make_pass("sparsify-activations", {"target_sparsity": 0.5, "allocation": "greedy", "include_classifier": True})(mlp.clone())
    for r in (uni, gre):
        assert r.stats["achieved_sparsity"] >= 0.5 - 0.02
    # fc2's input is a ReLU output: half of it is already zero, so its sparsity is nearly free
    assert gre.stats["layers"]["fc2"]["target"] > gre.stats["layers"]["fc1"]["target"]
    noise = lambda r: sum(v["output_noise"] * v["weights"] for v in r.stats["layers"].values())  # noqa: E731
    assert noise(gre) < noise(uni)
    x = torch.randn(256, 64)
    ref = mlp.gm(x)
    err = lambda r: float((r.graph.gm(x) - ref).detach().pow(2).mean())  # noqa: E731
    assert err(gre) < err(uni)


def test_greedy_metric_model_runs_and_meets_the_budget(mlp):
    r = make_pass("sparsify-activations", {"target_sparsity": 0.4, "allocation": "greedy", "greedy_metric": "model", "include_classifier": True})(mlp.clone())
    assert r.stats["greedy_metric"] == "model" and r.stats["achieved_sparsity"] >= 0.38


def test_greedy_allocator_on_known_curves():
    grid = [0.0, 0.25, 0.5, 0.75]
    curves = {"cheap": [0.0, 0.01, 0.02, 0.5], "dear": [0.0, 0.2, 0.4, 0.6]}
    level = greedy(curves, {"cheap": 100, "dear": 100}, grid, 0.5)
    assert level == {"cheap": 2, "dear": 2} or level["cheap"] >= 2
    assert sum(grid[i] for i in level.values()) / 2 >= 0.5
    # size matters: the same error per step on a 4x larger layer skips 4x the reads
    level = greedy({"small": [0, 0.1, 0.2, 0.3], "big": [0, 0.1, 0.2, 0.3]}, {"small": 25, "big": 100}, grid, 0.3)
    assert level["big"] > level["small"]


def test_pipeline_budget_and_onnx_lowering(mlp, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from graphpress.backends.onnxruntime.lower import lower_to_onnx

    report = Pipeline([("sparsify-activations", {"target_sparsity": 0.3, "min_sqnr_db": 5})], random_inputs=0).run(mlp)
    g = report.graph
    lower_to_onnx(g, tmp_path)
    x = torch.randn(8, 64)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), g.gm(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="SQNR"):
        Pipeline([("sparsify-activations", {"target_sparsity": 0.9, "max_layer_sparsity": 0.95, "allocation": "uniform",
                                            "include_classifier": True, "min_sqnr_db": 40, "on_budget": "fail"})], random_inputs=0).run(mlp)


# ---------------------------------------------------------------------------- on_budget
AMBITIOUS = {"target_sparsity": 0.8, "max_layer_sparsity": 0.9, "allocation": "greedy", "include_classifier": True, "min_sqnr_db": 15.0}


def test_adapt_backs_off_the_most_costly_layers_until_the_budget_holds(mlp):
    report = Pipeline([("sparsify-activations", AMBITIOUS)], random_inputs=0).run(mlp)
    step = report.steps[0]
    s = step.stats
    assert s["asked_sparsity"] == 0.8 and 0.0 < s["achieved_sparsity"] < 0.8
    assert step.worst_step_sqnr_db >= 15.0
    assert s["backed_off_layers"] and all(v["got"] < v["asked"] for v in s["backed_off_layers"].values())
    ob = s["on_budget"]
    assert ob["met"] and ob["first_try"].startswith("output") and 0 < ob["backed_off_moves"] <= ob["moves_available"]
    assert ob["tries"][0]["sqnr_db"] < 15.0 and len(ob["tries"]) <= 2 * ob["moves_available"].bit_length() + 2
    # one move fewer misses the budget (the search returns the least back-off that passed)
    fewer = [t for t in ob["tries"] if t["moves"] == ob["backed_off_moves"] - 1]
    assert all(t["sqnr_db"] < 15.0 for t in fewer)
    # the calibration was reused: every sparse op's thresholds come from the first run's rows
    assert measure_sparsity(report.graph, mlp.calibration)


def test_fail_names_the_best_value_and_the_option_in_one_line(mlp):
    with pytest.raises(VerificationError) as err:
        Pipeline([("sparsify-activations", {**AMBITIOUS, "on_budget": "fail"})], random_inputs=0).run(mlp)
    msg = str(err.value)
    assert "\n" not in msg
    assert "below the pass budget min_sqnr_db=15.0 at sparsity 0.8" in msg and "lower target_sparsity, set on_budget: adapt" in msg


def test_a_met_target_runs_once_and_is_unchanged_by_on_budget(mlp):
    cfg = {"target_sparsity": 0.3, "min_sqnr_db": 5.0}
    adapt = Pipeline([("sparsify-activations", cfg)], random_inputs=0).run(mlp)
    fail = Pipeline([("sparsify-activations", {**cfg, "on_budget": "fail"})], random_inputs=0).run(mlp)
    a, f = adapt.steps[0].stats, fail.steps[0].stats
    assert "on_budget" not in a and a["backed_off_layers"] == {}
    assert a["achieved_sparsity"] == f["achieved_sparsity"] and abs(a["achieved_sparsity"] - 0.3) < 0.02
    x = torch.randn(16, 64)
    torch.testing.assert_close(adapt.graph.run(x)[0], fail.graph.run(x)[0])


def test_nothing_to_do_and_refusals(mlp):
    r = make_pass("sparsify-activations", {"target_sparsity": 0.0})(mlp.clone())
    assert not r.changed and not _sparse_nodes(r.graph)
    r = make_pass("sparsify-activations", {"min_in_features": 1000})(mlp.clone())
    assert not r.changed and r.stats["skipped"]
    for bad, match in (({"method": "teel"}, "'teel' is not one of"), ({"target_sparsity": 1.5}, "target_sparsity"),
                       ({"attention": "some"}, "attention"), ({"target_sparsity": 0.8, "max_layer_sparsity": 0.5}, "cannot be met"),
                       ({"step": 0}, "step"), ({"allocation": "ilp"}, "allocation")):
        with pytest.raises(PassError, match=match):
            make_pass("sparsify-activations", bad)
