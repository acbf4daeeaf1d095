"""method='reconstruct' (output-fitted circulant projection) and sensitivity='output' (measured)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import PassError
from graphpress.ir.circulant import expand, project
from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass
from graphpress.passes.circulant.layers import Layer, find_layers
from graphpress.passes.circulant.reconstruct import (
    input_moments,
    output_error,
    project_reconstruct,
)
from graphpress.passes.circulant.search import CirculantSearch, CirculantSearchConfig


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def graph():
    torch.manual_seed(0)
    g = Graph.capture(Net().eval(), (torch.randn(2, 8, 6, 6),))
    # correlated inputs: a low-rank mix of channels, so the output-fitted projection differs from the mean
    mix = torch.randn(8, 3)
    g.calibration = [(torch.einsum("cr,nrhw->nchw", mix, torch.randn(16, 3, 6, 6)),) for _ in range(2)]
    return g


def _layer(kind, shape):
    return Layer("l", None, kind, "l.weight", shape[0], shape[1], tuple(shape[2:]) if kind == "conv2d" else (1, 1), 1)


@pytest.mark.parametrize("kind,shape", [("linear", (8, 12)), ("conv2d", (8, 12, 3, 3)), ("conv2d", (16, 8, 1, 3))])
@pytest.mark.parametrize("b", [2, 4])
def test_identity_moment_gives_the_plain_mean(kind, shape, b):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    layer = _layer(kind, shape)
    d = w[0].numel()
    c = project_reconstruct(layer, w, b, torch.eye(d, dtype=torch.float64), damp=1e-12)
    ref = project(w if kind == "linear" else w.permute(2, 3, 0, 1), b)
    assert c.shape == ref.shape
    torch.testing.assert_close(c, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,shape", [("linear", (8, 12)), ("conv2d", (8, 12, 3, 3))])
def test_minimises_output_error(kind, shape):
    torch.manual_seed(2)
    w = torch.randn(*shape)
    layer = _layer(kind, shape)
    d = w[0].numel()
    x = torch.randn(400, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64)
    moment = x.T @ x
    c = project_reconstruct(layer, w.double(), 4, moment, damp=1e-10)
    mean = project(w.double() if kind == "linear" else w.double().permute(2, 3, 0, 1), 4)
    best = output_error(layer, w.double(), c, moment)
    assert best < 0.9 * output_error(layer, w.double(), mean, moment)
    # a stationary point of a convex quadratic: no random perturbation improves it
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        assert output_error(layer, w.double(), c + 1e-3 * torch.randn(c.shape, generator=gen, dtype=c.dtype), moment) >= best - 1e-12


def test_block_circulant_weights_are_reproduced_exactly():
    # an already block-circulant weight has zero output error under any input moment: it must come back as is
    torch.manual_seed(3)
    layer = _layer("conv2d", (8, 8, 3, 3))
    c = torch.randn(3, 3, 2, 2, 4, dtype=torch.float64)
    w = expand(c).permute(2, 3, 0, 1)
    x = torch.randn(50, 72, dtype=torch.float64)
    got = project_reconstruct(layer, w, 4, x.T @ x, damp=1e-12)
    torch.testing.assert_close(got, c, atol=1e-8, rtol=1e-8)


def test_input_moments_match_unfold(graph):
    layers, _ = find_layers(graph)
    moments = input_moments(graph, layers)
    conv1 = next(l for l in layers if l.name == "conv1")
    x = torch.cat([b[0] for b in graph.calibration])
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 72).double()
    torch.testing.assert_close(moments[conv1.weight_target], cols.T @ cols)
    assert moments[next(l for l in layers if l.name == "fc").weight_target].shape == (16, 16)


def test_pass_reconstruct_beats_mean_on_outputs(graph):
    ref = graph.run(*graph.calibration[0])[0]
    errs = {}
    for method in ("mean", "reconstruct"):
        g = graph.clone()
        res = make_pass("block-circulant", {"block_size": 4, "method": method})(g)
        assert res.changed and res.stats["converted"] == 3 and res.stats["method"] == method
        out = res.graph.run(*graph.calibration[0])[0]
        errs[method] = float((out - ref).pow(2).sum() / ref.pow(2).sum())
        targets = [str(n.target) for n in res.graph.call_nodes()]
        assert sum("circulant" in t for t in targets) == 3
    assert errs["reconstruct"] < errs["mean"]


def test_bad_damp_is_refused():
    with pytest.raises(PassError, match="damp"):
        make_pass("block-circulant", {"method": "reconstruct", "damp": 0})
    with pytest.raises(PassError, match="damp"):
        CirculantSearch(CirculantSearchConfig(damp=-1.0))


def test_output_sensitivity_is_measured_and_restores_weights(graph):
    before = {k: v.clone() for k, v in graph.gm.state_dict().items()}
    search = CirculantSearch(CirculantSearchConfig(budget="uniform:4", sensitivity="output", method="reconstruct"))
    plan = search.plan(graph)
    after = graph.gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Omega_l(b): the relative output noise power with layer l alone projected, measured directly
    layer = next(l for l in plan.layers if l.name == "conv2")
    g = graph.clone()
    res = make_pass("block-circulant", {"blocks": {"conv1": 1, "conv2": 4, "fc": 1}, "method": "reconstruct"})(g)
    noise = signal = 0.0
    for batch in graph.calibration:
        y, yb = graph.run(*batch)[0].double(), res.graph.run(*batch)[0].double()
        noise += float((yb - y).pow(2).sum())
        signal += float(y.pow(2).sum())
    assert plan.stats["layers"][layer.name]["sensitivities"][4] == pytest.approx(noise / signal, rel=1e-4)
    assert plan.stats["layers"]["conv2"]["sensitivities"][1] == 0.0
    assert plan.stats["cost"] <= plan.stats["uniform_cost"] + 1e-9
