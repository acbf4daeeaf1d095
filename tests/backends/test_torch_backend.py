"""The torch backend: model.pt2 round trip, the output check, graphpress ops inside (quantized and
activation-sparse), the artifact through compress + runtime.load, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphpress.passes.quant  # noqa: F401
import graphpress.passes.sparsity  # noqa: F401
from graphpress.api import compress
from graphpress.backends import available_backends, get_backend
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.runtime import load


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(48, 96), nn.Linear(96, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def graph():
    torch.manual_seed(0)
    g = Graph.capture(MLP().eval(), (torch.randn(2, 48),))
    g.calibration = [(torch.randn(256, 48),)]
    return g


def test_registered_and_round_trip(graph, tmp_path):
    assert "torch" in available_backends()
    backend = get_backend("torch")
    lowered = backend.lower(graph, tmp_path)
    assert lowered.model_file == "model.pt2" and (tmp_path / "model.pt2").exists()
    assert lowered.check["passed"] and len(lowered.check["runs"]) == 3
    runner = backend.runner(tmp_path / "model.pt2")
    x = torch.randn(5, 48)
    (y,) = runner(x.numpy())
    np.testing.assert_allclose(y, graph.gm(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert runner.input_names == ["x"]


def test_sparse_graph_runs_with_the_kernel_op_after_reload(graph, tmp_path):
    report = Pipeline([("sparsify-activations", {"target_sparsity": 0.4, "include_classifier": True, "min_sqnr_db": 5})], random_inputs=0).run(graph)
    g = report.graph
    assert any("sparse_linear" in str(n.target) for n in g.gm.graph.nodes)
    get_backend("torch").lower(g, tmp_path)
    runner = get_backend("torch").runner(tmp_path / "model.pt2")
    x = torch.randn(1, 48)
    (y,) = runner(x)
    np.testing.assert_allclose(y, g.gm(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_compress_writes_a_loadable_torch_artifact(graph, tmp_path):
    recipe = {"name": "w8", "passes": [{"quantize-layerwise": {"bits": [8], "target_bits": 8, "activations": "none"}}],
              "verify": {"random_inputs": 0}}
    out = tmp_path / "art"
    torch.manual_seed(0)
    result = compress(MLP().eval(), example_inputs=(torch.randn(2, 48),), out=out, recipe=recipe, backend="torch", bench=False,
                      calibration=torch.randn(256, 48))
    assert result.manifest["backend"] == "torch"
    model = load(out)
    x = torch.randn(3, 48)
    (y,) = model(x.numpy())
    assert y.shape == (3, 10) and np.isfinite(y).all()


def test_bad_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BackendError, match="model.pt2: torch.export.load failed"):
        get_backend("torch").runner(bad)
