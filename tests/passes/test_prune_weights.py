"""prune-weights: exact zero counts per layer and pattern, the data-aware methods beat magnitude on
the model output, sequential calibration, allocations, and what is refused or left dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.passes.prune  # noqa: F401 -- registers the passes
from graphpress.errors import PassError, VerificationError
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass


class Net(nn.Module):
    """conv -> relu -> conv -> relu -> flatten -> linear -> relu -> linear, inputs with correlated channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 6 * 6, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 6, 6, generator=gen)
    mix = torch.randn(n, 4, 6, 6, generator=gen) * 0.3
    return base + mix  # channels share most of their signal: H is far from diagonal


@pytest.fixture
def net_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph.capture(Net().eval(), (images(2, 0),))
    g.calibration = [(images(128, 1),)]
    return g


def prune(graph: Graph, **cfg):
    return make_pass("prune-weights", cfg)(graph.clone())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "icbs"])
def test_every_row_loses_exactly_its_share(net_graph, method):
    r = prune(net_graph, method=method, sparsity=0.5)
    assert r.changed and r.stats["pruned"] == 4
    for name, target in (("c1.weight", 36 * 16), ("c2.weight", 144 * 16), ("fc1.weight", 576 * 64), ("fc2.weight", 64 * 10)):
        w = r.graph.get_tensor(name).reshape(r.graph.get_tensor(name).shape[0], -1)
        zeros_per_row = (w == 0).sum(1)
        assert abs(int((w == 0).sum()) - target // 2) <= w.shape[0], name
        if method in ("magnitude", "wanda"):
            assert torch.all(zeros_per_row == w.shape[1] // 2), name
    assert abs(r.stats["sparsity_pruned_layers"] - 0.5) < 0.01


def test_two_four_pattern_and_rows_not_a_multiple_of_four_stay_dense(net_graph):
    r = prune(net_graph, method="sparsegpt", pattern="2:4")
    # c1 has 4 * 9 = 36 inputs per row (a multiple of 4): pruned; every layer here qualifies
    for name in ("c1.weight", "c2.weight", "fc1.weight", "fc2.weight"):
        w = r.graph.get_tensor(name).reshape(r.graph.get_tensor(name).shape[0], -1, 4)
        assert torch.all((w != 0).sum(-1) <= 2), name
    g = Graph.capture(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(2, 6),))
    g.calibration = [(torch.randn(64, 6),)]
    r2 = make_pass("prune-weights", {"pattern": "2:4"})(g)
    assert r2.stats["pruned"] == 1 and "not a multiple of 4" in r2.stats["kept_dense"]["0"]


def test_data_aware_methods_keep_the_output_closer_than_magnitude(net_graph):
    x = images(256, 7)
    ref = net_graph.run(x)[0]
    sq = {m: sqnr_db(ref, prune(net_graph, method=m, sparsity=0.6).graph.run(x)[0]) for m in ("magnitude", "wanda", "sparsegpt", "icbs")}
    assert sq["wanda"] > sq["magnitude"]
    assert sq["sparsegpt"] > sq["wanda"] + 1.0
    assert sq["icbs"] > sq["wanda"]


def test_icbs_lowers_the_layer_objective_of_its_start(net_graph):
    w = prune(net_graph, method="wanda", sparsity=0.5)
    i = prune(net_graph, method="icbs", sparsity=0.5, sequential=False)
    w_ns = prune(net_graph, method="wanda", sparsity=0.5, sequential=False)
    for name in ("c2", "fc1"):
        assert i.stats["layers"][name]["objective"] <= w_ns.stats["layers"][name]["objective"] + 1e-9
        assert i.stats["layers"][name]["relative_error"] < w_ns.stats["layers"][name]["relative_error"]
    assert w.stats["layers"]["c1"]["objective"] == pytest.approx(w_ns.stats["layers"]["c1"]["objective"])  # first layer: same inputs


def test_sequential_measures_later_layers_on_the_pruned_graph(net_graph):
    seq = prune(net_graph, method="sparsegpt", sparsity=0.5)
    flat = prune(net_graph, method="sparsegpt", sparsity=0.5, sequential=False)
    assert torch.equal(seq.graph.get_tensor("c1.weight"), flat.graph.get_tensor("c1.weight"))
    assert not torch.equal(seq.graph.get_tensor("c2.weight"), flat.graph.get_tensor("c2.weight"))
    # c2's H came from c1's pruned output: a different matrix, so a different objective value
    assert seq.stats["layers"]["c2"]["objective"] != pytest.approx(flat.stats["layers"]["c2"]["objective"])


def test_global_and_sensitivity_allocations_meet_the_budget(net_graph):
    g = prune(net_graph, method="magnitude", sparsity=0.5, allocation="global")
    per = {k: v["sparsity"] for k, v in g.stats["layers"].items()}
    assert len(set(round(v, 2) for v in per.values())) > 1  # layers differ
    assert abs(g.stats["sparsity_pruned_layers"] - 0.5) < 0.02
    s = prune(net_graph, method="wanda", sparsity=0.5, allocation="sensitivity")
    targets = {k: v["target"] for k, v in s.stats["layers"].items()}
    params = {k: v["params"] for k, v in s.stats["layers"].items()}
    assert sum(targets[k] * params[k] for k in targets) / sum(params.values()) >= 0.5 - 1e-9
    assert set(targets.values()) <= {0.3, 0.4, 0.5, 0.6, 0.7}
    x = images(256, 9)
    ref = net_graph.run(x)[0]
    uni = prune(net_graph, method="wanda", sparsity=0.5)
    assert sqnr_db(ref, s.graph.run(x)[0]) > sqnr_db(ref, uni.graph.run(x)[0]) - 0.5


def test_tied_weights_and_skips_stay_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 16)
            self.mid = nn.Linear(16, 16)

        def forward(self, t):
            h = F.relu(self.mid(self.emb(t)))
            return F.linear(h, self.emb.weight)

    g = Graph.capture(Tied().eval(), (torch.randint(0, 20, (2, 5)),))
    g.calibration = [(torch.randint(0, 20, (32, 5)),)]
    r = make_pass("prune-weights", {"sparsity": 0.5})(g.clone())
    assert r.stats["pruned"] == 1 and any("tied" in why for why in r.stats["kept_dense"].values())
    r2 = make_pass("prune-weights", {"sparsity": 0.5, "skip": ["mid"]})(g.clone())
    assert not r2.changed


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"method": "wandaa"}, "'wandaa' is not one of"),
        ({"pattern": "2-4"}, "option 'pattern'"),
        ({"sparsity": 1.0}, r"must be in \[0, 1\)"),
        ({"allocation": "global", "method": "wanda"}, "needs method 'magnitude'"),
        ({"allocation": "sensitivity", "pattern": "2:4"}, "needs pattern 'unstructured'"),
        ({"skip": ["fc9"]}, "unknown layer 'fc9'"),
    ],
)
def test_bad_options_are_one_line_errors(net_graph, cfg, match):
    with pytest.raises(PassError, match=match):
        prune(net_graph, **cfg)


def test_data_aware_methods_need_calibration():
    g = Graph.capture(nn.Sequential(nn.Linear(8, 8)).eval(), (torch.randn(2, 8),))
    with pytest.raises(PassError, match="needs calibration data"):
        make_pass("prune-weights", {"method": "wanda"})(g)
    assert make_pass("prune-weights", {"method": "magnitude"})(g.clone()).changed


def test_pipeline_checks_the_budget(net_graph):
    with pytest.raises(VerificationError, match="pass 'prune-weights' .* below the pass budget min_sqnr_db=30.0"):
        Pipeline([("prune-weights", {"method": "magnitude", "sparsity": 0.9, "min_sqnr_db": 30.0, "on_budget": "fail"})], random_inputs=0).run(net_graph)
    ok = Pipeline([("prune-weights", {"method": "sparsegpt", "sparsity": 0.3, "min_sqnr_db": 10.0})], random_inputs=0).run(net_graph)
    assert ok.steps[0].stats["pruned"] == 4


# ---------------------------------------------------------------------------- on_budget
def test_adapt_backs_off_the_most_sensitive_layers_until_the_budget_holds(net_graph):
    report = Pipeline([("prune-weights", {"method": "wanda", "sparsity": 0.8, "min_sqnr_db": 15.0})], random_inputs=0).run(net_graph)
    step = report.steps[0]
    s = step.stats
    assert s["asked_sparsity"] == 0.8 and 0.0 < s["achieved_sparsity"] < 0.8 and step.worst_step_sqnr_db >= 15.0
    assert s["backed_off_layers"] and all(v["got"] < v["asked"] == 0.8 for v in s["backed_off_layers"].values())
    for name, v in s["backed_off_layers"].items():  # each layer really has the sparsity reported
        if v["got"] > 0:
            assert abs(s["layers"][name]["sparsity"] - v["got"]) < 0.02
        else:
            assert s["kept_dense"][name] == "backed off to dense to meet the budget"
    assert s["on_budget"]["met"] and s["on_budget"]["tries"][0]["sqnr_db"] < 15.0


def test_fail_is_one_line_with_the_sparsity_and_the_option(net_graph):
    with pytest.raises(VerificationError) as err:
        Pipeline([("prune-weights", {"method": "wanda", "sparsity": 0.8, "min_sqnr_db": 15.0, "on_budget": "fail"})], random_inputs=0).run(net_graph)
    msg = str(err.value)
    assert "\n" not in msg and "below the pass budget min_sqnr_db=15.0 at sparsity 0.8" in msg
    assert "lower sparsity, set on_budget: adapt, or change min_sqnr_db" in msg


def test_a_met_target_runs_once_and_is_unchanged_by_on_budget(net_graph):
    cfg = {"method": "sparsegpt", "sparsity": 0.3, "min_sqnr_db": 10.0}
    adapt = Pipeline([("prune-weights", cfg)], random_inputs=0).run(net_graph)
    fail = Pipeline([("prune-weights", {**cfg, "on_budget": "fail"})], random_inputs=0).run(net_graph)
    a = adapt.steps[0].stats
    assert "on_budget" not in a and a["backed_off_layers"] == {} and abs(a["achieved_sparsity"] - 0.3) < 0.01
    x = images(4, 9)
    torch.testing.assert_close(adapt.graph.run(x)[0], fail.graph.run(x)[0])


def test_the_default_budget_is_explicit():
    from graphpress.passes.base import get_pass_class

    cfg = get_pass_class("prune-weights").Config()
    assert cfg.min_sqnr_db == 10.0 and cfg.on_budget == "adapt"
    with pytest.raises(PassError, match="option 'on_budget': 'retry' is not one of 'adapt', 'fail'"):
        make_pass("prune-weights", {"on_budget": "retry"})


def test_layer_sparsity_alone_prunes_its_layers(net_graph):
    # a default sparsity of 0 must not switch off the per-layer targets (compress auto prunes layer by layer this way)
    r = prune(net_graph, sparsity=0.0, layer_sparsity={"fc1": 0.5}, min_sqnr_db=None)
    assert r.changed
    assert float((r.graph.get_tensor("fc1.weight") == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert int((r.graph.get_tensor("c1.weight") == 0).sum()) == 0
    assert not prune(net_graph, sparsity=0.0, min_sqnr_db=None).changed
