"""polynomial-activations: least-squares fits, the rewrite's structure and numbers, must-not-fire cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import PassError
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.passes.polyact.activations import polynomial_of
from graphpress.passes.polyact.fit import fit_activation
from graphpress.train.distill import DistillConfig, distill, trainable_targets

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self, act=F.relu):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def polyact(graph, config=None):
    return make_pass("polynomial-activations", config)(graph)


def with_calibration(graph: Graph, n: int = 4, batch: int = 64, seed: int = 1) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    shape = graph.example_inputs[0].shape[1:]
    graph.calibration = [(torch.randn(batch, *shape, generator=gen),) for _ in range(n)]
    return graph


# ---------------------------------------------------------------------------- the fit
@pytest.mark.parametrize("a", [1.0, 4.0])
def test_range_fit_of_relu_matches_the_legendre_solution(a):
    # relu(x) = (x + |x|)/2; the L2-projection of |x| on [-1, 1] onto degree 2 is 3/16 + 15/16 x^2,
    # so relu ~ 3/32 + x/2 + 15/32 x^2, and on [-a, a] (relu is 1-homogeneous) 3a/32 + x/2 + 15/(32a) x^2
    x = np.random.default_rng(0).uniform(-a, a, 50_000)
    fit = fit_activation(x, "relu", 2, mode="range")
    np.testing.assert_allclose(fit.coefficients, [3 * a / 32, 0.5, 15 / (32 * a)], atol=1e-3 * max(a, 1))
    samples = fit_activation(x, "relu", 2, mode="samples")  # uniform samples: the same fit up to sampling noise
    np.testing.assert_allclose(samples.coefficients, fit.coefficients, atol=5e-3 * a)
    assert fit.lo == pytest.approx(x.min()) and fit.hi == pytest.approx(x.max())
    # the reported rmse is the L2 distance of relu from that polynomial (checked on a fine grid)
    grid = np.linspace(-a, a, 200_001)
    exact = np.sqrt(np.mean((np.maximum(grid, 0) - (3 * a / 32 + grid / 2 + 15 / (32 * a) * grid**2)) ** 2))
    assert fit.rmse == pytest.approx(exact, rel=0.02)


def test_degree_three_helps_only_on_asymmetric_ranges():
    # relu, gelu and silu are x/2 + (an even function): on a symmetric range the cubic term is 0
    sym = np.random.default_rng(0).uniform(-2, 2, 50_000)
    asym = np.random.default_rng(0).uniform(-1, 3, 50_000)
    for act in ("relu", "gelu", "silu"):
        assert fit_activation(sym, act, 3).rmse == pytest.approx(fit_activation(sym, act, 2).rmse, rel=1e-3)
        assert fit_activation(asym, act, 3).rmse < 0.6 * fit_activation(asym, act, 2).rmse


def test_fit_weights_by_the_observed_distribution():
    # most samples near 0, a few far out: the sample fit is tight near 0, the range fit is not
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.3, 20_000), rng.uniform(-6, 6, 200)])
    core = np.abs(x) < 0.6
    s, r = fit_activation(x, "relu", 2, mode="samples"), fit_activation(x, "relu", 2, mode="range")
    err = lambda f: np.sqrt(np.mean((f(x[core]) - np.maximum(x[core], 0)) ** 2))
    assert err(s) < 0.5 * err(r)


def test_quantile_drops_outliers_from_the_range():
    x = np.concatenate([np.linspace(-1, 1, 10_000), [50.0]])
    assert fit_activation(x, "relu", 2).hi == 50.0
    fit = fit_activation(x, "relu", 2, quantile=0.001)
    assert fit.hi < 1.0 and fit.samples < x.size


# ---------------------------------------------------------------------------- the rewrite
def test_mlp_relu_becomes_fitted_quadratic(capture, op_count):
    graph = with_calibration(capture(MLP(), 4, 8))
    before = graph.clone()
    result = polyact(graph)
    assert result.changed
    stats = result.stats
    assert stats["replaced_activations"] == 1 and stats["replaced_max_pools"] == 0 and stats["skipped"] == {}
    assert op_count(graph, aten.relu, aten.relu_) == 0
    assert op_count(graph, aten.mul) == 3 and op_count(graph, aten.add) == 2  # x*x, a2*x^2, a1*x; two sums
    (rec,) = stats["activations"]
    assert rec["activation"] == "relu" and rec["samples"] == 4 * 64 * 32
    # the graph's coefficient tensors are the fitted ones, and the range is the observed one
    coefs = [float(graph.get_tensor(f"relu_poly_a{k}")) for k in range(3)]
    np.testing.assert_allclose(coefs, rec["coefficients"], rtol=1e-5)
    with torch.no_grad():
        hidden = torch.cat([F.linear(b[0], graph.get_tensor("fc1.weight"), graph.get_tensor("fc1.bias")) for b in graph.calibration])
    assert rec["range"] == pytest.approx([float(hidden.min()), float(hidden.max())], rel=1e-5)
    # numbers: the rewritten graph computes fc2(poly(fc1 x)) exactly, and is close to the original on calibration data
    w1, b1, w2, b2 = (graph.get_tensor(n) for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
    for (x,) in graph.calibration:
        want = F.linear(polynomial_of(coefs, F.linear(x, w1, b1)), w2, b2)
        torch.testing.assert_close(graph.run(x)[0], want, rtol=1e-5, atol=1e-5)
        assert sqnr_db(before.run(x)[0], graph.run(x)[0]) > 12.0
    graph.verify()


def test_annotations_make_coefficients_the_annotated_trainables(capture):
    graph = with_calibration(capture(MLP(F.gelu), 4, 8))
    polyact(graph)
    assert trainable_targets(graph, "annotated") == ["gelu_poly_a2", "gelu_poly_a1", "gelu_poly_a0"]
    roles = {graph.annotations(n)["polyact"]["term"] for n in graph.call_nodes(aten.mul, aten.add)}
    assert roles == {"x^2", "a2*x^2", "a1*x^1", "sum", "+a0"}


def test_degree_three_adds_a_cube(capture, op_count):
    graph = with_calibration(capture(MLP(F.silu), 4, 8))
    result = polyact(graph, {"degree": 3})
    assert result.stats["he_levels_per_activation"] == 2
    assert len(result.stats["activations"][0]["coefficients"]) == 4
    assert op_count(graph, aten.mul) == 5 and op_count(graph, aten.add) == 3
    coefs = result.stats["activations"][0]["coefficients"]
    x = graph.calibration[0][0]
    h = F.linear(x, graph.get_tensor("fc1.weight"), graph.get_tensor("fc1.bias"))
    want = F.linear(polynomial_of(coefs, h), graph.get_tensor("fc2.weight"), graph.get_tensor("fc2.bias"))
    torch.testing.assert_close(graph.run(x)[0], want, rtol=1e-4, atol=1e-4)


def test_cnn_max_pool_becomes_avg_pool_and_fits_are_sequential(capture, op_count):
    graph = with_calibration(capture(CNN(), 2, 1, 8, 8))
    base = graph.clone()
    result = polyact(graph)
    assert op_count(graph, aten.max_pool2d) == 0 and op_count(graph, aten.avg_pool2d) == 1
    (pool,) = result.stats["pools"]
    assert pool["kernel"] == [2, 2] and pool["stride"] == [2, 2] and pool["replacement"] == "avg_pool2d"
    (avg,) = graph.call_nodes(aten.avg_pool2d)
    assert list(avg.args[1]) == [2, 2] and list(avg.args[2]) == [2, 2]
    # sequential: relu_1 was fitted on conv2's inputs *after* relu became a polynomial
    oneshot = polyact(with_calibration(base.clone()), {"sequential": False}).stats["activations"]
    seq = result.stats["activations"]
    assert seq[0]["coefficients"] == oneshot[0]["coefficients"]
    assert seq[1]["range"] != oneshot[1]["range"]


def test_max_pool_can_be_kept(capture, op_count):
    graph = with_calibration(capture(CNN(), 2, 1, 8, 8))
    result = polyact(graph, {"replace_max_pool": False})
    assert op_count(graph, aten.max_pool2d) == 1
    assert result.stats["skipped"] == {"max_pool2d kept (replace_max_pool=false)": 1}


# ---------------------------------------------------------------------------- must not fire
def test_no_relu_no_pool_is_unchanged(capture):
    graph = capture(MLP(torch.tanh), 4, 8)
    before = graph.clone()
    result = polyact(graph)
    assert not result.changed
    assert result.stats["replaced_activations"] == 0 and result.stats["replaced_max_pools"] == 0
    assert result.stats["skipped"] == {"tanh has no polynomial replacement here": 1}
    x = graph.random_inputs(3)
    torch.testing.assert_close(graph.run(*x)[0], before.run(*x)[0], rtol=0, atol=0)


def test_disabled_activation_is_left_with_a_reason(capture):
    graph = capture(MLP(F.gelu), 4, 8)
    result = polyact(graph, {"activations": ["relu"]})
    assert not result.changed
    assert result.stats["skipped"] == {"activation 'gelu' not enabled in config": 1}


@pytest.mark.parametrize("config, word", [({"degree": 4}, "degree"), ({"activations": ["tanh"]}, "tanh"), ({"fit": "minimax"}, "fit"),
                                           ({"quantile": 0.5}, "quantile")])
def test_bad_config_is_one_line_error(config, word):
    with pytest.raises(PassError, match=word) as err:
        make_pass("polynomial-activations", config)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------- pipeline + recovery
def test_pipeline_budget_and_distillation_recovers(capture):
    graph = capture(MLP(), 4, 8)
    gen = torch.Generator().manual_seed(1)
    # calibrated on too narrow inputs: the quadratics are off on the real data, distillation repairs it
    graph.calibration = [(0.3 * torch.randn(64, 8, generator=gen),)]
    report = Pipeline(["polynomial-activations"]).run(graph)
    step = report.steps[0]
    assert not step.exact and step.changed and step.worst_step_sqnr_db > 0.0  # the default budget
    student = report.graph
    data = torch.randn(512, 8, generator=gen)
    before = sqnr_db(graph.run(data)[0], student.run(data)[0])
    result = distill(student, graph, data, DistillConfig(trainable="all", epochs=20, lr=1e-3, batch_size=32, loss="mse", patience=20))
    after = sqnr_db(graph.run(data)[0], student.run(data)[0])
    assert "relu_poly_a2" in result.trained and "fc1.weight" in result.trained
    assert result.best_val_loss < 0.2 * result.initial_val_loss
    assert before < 8.0 and after > before + 8.0
    assert not any(n.target in (aten.relu.default, aten.relu_.default) for n in student.nodes)  # still polynomial
