"""HE polynomial protocol: CKKS outputs vs the plaintext polynomial graph, program structure, refusals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.backends.he.polynomial import (
    choose_params,
    compile_polynomial,
    describe,
    run_polynomial,
)
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass

pytest.importorskip("tenseal")


class MLP(nn.Module):
    def __init__(self, hidden=(16,), act=F.relu, d_in=10, d_out=5):
        super().__init__()
        dims = (d_in, *hidden, d_out)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.act = act

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class CNN(nn.Module):
    """conv(1->4, 3x3, pad 1)-BN-ReLU-maxpool 2-linear on 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.view(x.size(0), -1))


def polynomial_graph(module: nn.Module, *shape: int, config=None) -> Graph:
    torch.manual_seed(0)
    module = module.eval()
    gen = torch.Generator().manual_seed(1)
    graph = Graph.capture(module, (torch.randn(4, *shape, generator=gen),))
    graph.calibration = [(torch.randn(128, *shape, generator=gen),)]
    make_pass("polynomial-activations", config)(graph)
    return graph


def _inputs(*shape: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------------- encrypted == plaintext
def test_tiny_mlp_encrypted_matches_plaintext_polynomial_graph():
    graph = polynomial_graph(MLP(), 10)
    x = _inputs(10, n=3)
    out, rep = run_polynomial(graph, x, scale_bits=30)  # 30-bit scale: depth 3 fits ring degree 8192
    want = graph.run(x)[0].double().numpy()
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out, want, atol=2e-3 * max(1.0, np.abs(want).max()))
    assert rep["poly_modulus_degree"] == 8192 and rep["coeff_modulus_bits"] == [50, 30, 30, 30, 50] and rep["depth"] == 3
    assert rep["completed_squares"] == 1
    ops = rep["ops_per_sample"]
    assert ops["ct_mults"] == 1 and ops["relinearizations"] == 1 and ops["rescales"] == 3
    # rotations: the BSGS split of 16 diagonals (10->16) and of 8 diagonals + 1 fold (16->5)
    assert ops["rotations"] == sum(s.get("rotations", 0) for s in rep["stages"]) and 0 < ops["rotations"] < 16 + 8
    assert rep["max_abs_error_vs_graph"] == pytest.approx(float(np.abs(out - want).max()), rel=1e-6, abs=1e-9)
    assert rep["communication_per_sample"]["ciphertexts_sent"] == 1 and rep["communication_per_sample"]["bytes_sent"] > 0


def test_tiny_cnn_encrypted_matches_plaintext_polynomial_graph():
    model = CNN()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    graph = polynomial_graph(model, 1, 8, 8)
    x = _inputs(1, 8, 8)
    out, rep = run_polynomial(graph, x)
    want = graph.run(x)[0].double().numpy()
    np.testing.assert_allclose(out, want, atol=1e-3 * max(1.0, np.abs(want).max()))
    assert rep["poly_modulus_degree"] == 16384 and rep["depth"] == 3
    conv, square, head = rep["stages"][1:]
    # conv + (unfolded) batch-norm are one matrix with the 9 diagonals of a 3x3 kernel on 8x8
    assert conv["ops"] == ["aten.conv2d", "aten.batch_norm"] and conv["diagonals"] == 9 and conv["size"] == 256
    assert square["kind"] == "square" and square["completed_square"] is True
    # polynomial coefficients, avg-pool, view and linear fold into one matrix: 64 inputs -> 3 outputs
    assert {"aten.avg_pool2d", "aten.view", "aten.linear"} <= set(head["ops"]) and head["terms"] == 1


def test_degree_three_uses_a_product_and_three_terms():
    graph = polynomial_graph(MLP(act=F.silu), 10, config={"degree": 3})
    prog = compile_polynomial(graph)
    kinds = [s.kind for s in prog.stages]
    assert kinds == ["input", "affine", "square", "product", "affine"] and prog.depth == 4
    assert sorted(prog.stages[-1].terms) == [1, 2, 3]  # x, x^2, x^3 each need their own matrix product
    x = _inputs(10)
    out, rep = run_polynomial(graph, x)
    want = graph.run(x)[0].double().numpy()
    np.testing.assert_allclose(out, want, atol=1e-3 * max(1.0, np.abs(want).max()))
    assert rep["completed_squares"] == 0 and rep["ops_per_sample"]["mod_switches"] > 0


# ---------------------------------------------------------------------------- program structure (no encryption)
def test_program_evaluation_equals_the_graph_in_float64():
    graph = polynomial_graph(MLP(hidden=(12, 12)), 10)
    prog = compile_polynomial(graph)
    assert [s.kind for s in prog.stages] == ["input", "affine", "square", "affine", "square", "affine"]
    assert prog.depth == 5 and sum(s.completed_square for s in prog.stages) == 2
    x = _inputs(10, n=3)
    want = graph.run(x)[0].double().numpy()
    got = np.stack([prog.evaluate(row)[0][0] for row in x.double().numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_square_is_not_completed_when_the_activation_input_has_another_linear_reader():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(F.relu(h)) + self.c(h)  # c(h) is not a column scaling of b's matrix

    graph = polynomial_graph(Skip(), 6)
    prog = compile_polynomial(graph)
    assert not any(s.completed_square for s in prog.stages)
    assert sorted(prog.stages[-1].terms) == [1, 2]  # h and h^2 both feed the output matrix
    x = _inputs(6, n=3)
    got = np.stack([prog.evaluate(row)[0][0] for row in x.double().numpy()])
    np.testing.assert_allclose(got, graph.run(x)[0].double().numpy(), rtol=1e-5, atol=1e-5)


def test_two_outputs_and_circulant_layers_compile_exactly():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4), nn.Conv1d(2, 3, 3, padding=1)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h), self.c(h.view(h.shape[0], 2, 4)).mean(-1)

    torch.manual_seed(0)
    graph = Graph.capture(Heads().eval(), (torch.randn(4, 8),))
    graph.calibration = [(torch.randn(64, 8),)]
    from graphpress.passes import Pipeline

    graph = Pipeline([("block-circulant", {"block_size": 4, "min_sqnr_db": -100}), "polynomial-activations"]).run(graph).graph
    assert graph.op_counts()["graphpress.circulant_linear"] == 2
    prog = compile_polynomial(graph)
    assert [shape for _sid, shape in prog.outputs] == [(4,), (3,)]
    assert "graphpress.circulant_linear" in prog.stages[1].ops and "aten.conv1d" in prog.stages[-1].ops
    x = _inputs(8, n=3)
    ref = graph.run(x)
    for i, row in enumerate(x.double().numpy()):
        outs, _ = prog.evaluate(row)
        for o, r in zip(outs, ref):
            np.testing.assert_allclose(o, r[i].double().numpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- refusals
def test_refuses_max_pool_left_in_the_graph():
    graph = polynomial_graph(CNN(), 1, 8, 8, config={"replace_max_pool": False})
    with pytest.raises(BackendError, match=r"node 'max_pool2d' \(aten.max_pool2d\): not a polynomial: run the polynomial-activations pass first"):
        run_polynomial(graph, _inputs(1, 8, 8))


def test_refuses_relu_and_sigmoid():
    torch.manual_seed(0)
    graph = Graph.capture(MLP().eval(), (torch.randn(2, 10),))
    with pytest.raises(BackendError, match=r"'relu'.*polynomial-activations"):
        compile_polynomial(graph)
    graph = Graph.capture(MLP(act=torch.sigmoid).eval(), (torch.randn(2, 10),))
    with pytest.raises(BackendError, match=r"'sigmoid'.*not a polynomial"):
        compile_polynomial(graph)


def test_refuses_depth_beyond_the_requested_ring():
    graph = polynomial_graph(MLP(hidden=(8, 8, 8)), 10)
    prog = compile_polynomial(graph)
    assert prog.depth == 7
    assert choose_params(prog).poly_modulus_degree == 16384
    with pytest.raises(BackendError, match=r"depth 7 exceeds the 2 levels that ring degree 8192 holds.*node 'linear_1', level 3") as err:
        choose_params(prog, poly_degree=8192)
    assert "\n" not in str(err.value)


def test_refuses_two_inputs_and_bad_shapes():
    class Two(nn.Module):
        def forward(self, x, y):
            return x * 2 + y

    graph = Graph.capture(Two(), (torch.randn(2, 3), torch.randn(2, 3)))
    with pytest.raises(BackendError, match="exactly one tensor input"):
        compile_polynomial(graph)
    mlp = polynomial_graph(MLP(), 10)
    with pytest.raises(BackendError, match=r"inputs of shape \(2, 7\); expected \(batch, 10\)"):
        run_polynomial(mlp, torch.randn(2, 7))


def test_describe_states_who_sees_what():
    text = describe()
    assert "client" in text and "server sees no input" in text and "128" in text
