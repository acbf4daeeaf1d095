"""HE backend (interactive protocol): graph -> program -> encrypted inference vs plaintext.

The digits CNN (trained in about a second) is the reference model: encrypted outputs must equal
the plaintext fixed-point simulation bit for bit (BFV is exact) and agree with the float
model's top-1; a block-circulant graph must run on its compact weights with fewer products.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from graphpress.backends import get_backend
from graphpress.backends.he.program import PlainExecutor, build_program, find_layers, run_client
from graphpress.backends.he.quant import QuantConfig, RangeObserver, accumulator_bound, act_quant, plain_bits_for, quantize_weight
from graphpress.backends.he.runner import HERunner
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph
from graphpress.passes import make_pass
from graphpress.runtime import load


@pytest.fixture(scope="module", autouse=True)
def _cost_cache(tmp_path_factory):
    # measured op costs go to a scratch cache, never to the user's ~/.cache
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHPRESS_HE_COSTS", str(tmp_path_factory.mktemp("he-costs") / "he_op_costs.json"))
        yield


@pytest.fixture(scope="module")
def digits():
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    model, acc = train_digits_cnn(epochs=4)  # 98% test accuracy, a third of the training time
    x_tr, _y_tr, x_te, y_te = digits_data()
    graph = Graph.capture(model, (x_tr[:2],))
    graph = make_pass("fold-batchnorm", {})(graph).graph
    graph.calibration = [(x_tr[i : i + 256],) for i in range(0, x_tr.shape[0], 256)]
    return {"graph": graph, "x_test": x_te, "y_test": y_te, "acc": acc}


@pytest.fixture(scope="module")
def digits_artifact(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("he-digits")
    lowered = get_backend("he", protocol="interactive").lower(digits["graph"], folder)
    return folder, lowered


# ---------------------------------------------------------------------------- quantization
def test_quantization_bounds_and_unsigned_relu_inputs():
    obs = RangeObserver()
    obs.update(np.array([0.0, 0.5, 2.0]))
    aq = act_quant(obs, 8)
    assert (aq.lo, aq.hi) == (0, 255) and aq.scale == pytest.approx(2.0 / 255)  # never negative: unsigned
    obs.update(np.array([-4.0]))
    aq = act_quant(obs, 8)
    assert (aq.lo, aq.hi) == (-127, 127) and aq.scale == pytest.approx(4.0 / 127)
    assert aq.quantize(np.array([100.0, -100.0, 0.01]))[:2].tolist() == [127, -127]  # clipped to the range
    w = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [0.25, 0.25, -0.25]])
    w_int, s = quantize_weight(w, 8, 0)
    assert w_int[0].tolist() == [64, -127, 32] and s[1] == 1.0 and w_int[2].tolist() == [127, 127, -127]
    assert np.allclose(w_int * s[:, None], w, atol=s.max() / 2)
    # worst case |W_int x_int| over |x_int| <= 127: the largest row sum (381) times 127
    assert accumulator_bound(w_int, 0, 127) == 381 * 127
    assert plain_bits_for(381 * 127) == 17 and 2**17 > 2 * 381 * 127 >= 2**16
    with pytest.raises(BackendError, match="act_bits"):
        QuantConfig(act_bits=1)


# ---------------------------------------------------------------------------- program
def test_program_steps_and_client_graph(digits):
    graph = digits["graph"]
    program, weights, client = build_program(graph, encoding="coeff-dense")
    assert [s.name for s in program.steps] == ["conv1", "conv2", "fc1", "fc2"]
    assert [s.kind for s in program.steps] == ["conv2d", "conv2d", "linear", "linear"]
    assert program.steps[0].in_shape == [1, 8, 8] and program.steps[1].out_shape == [32, 8, 8]
    assert program.steps[2].weight_shape == [64, 512] and weights["w2"].dtype == np.int64
    assert int(np.abs(weights["w2"]).max()) == 127  # per-channel 8-bit: every row reaches 127
    # conv1 reads the standardized image (signed); the others read ReLU outputs (unsigned)
    assert program.steps[0].act["lo"] == -127 and all(s.act["lo"] == 0 for s in program.steps[1:])
    for s in program.steps:
        assert 2 * s.acc_bound < s.params["plain_modulus"] and s.plain_bits == plain_bits_for(s.acc_bound)
    # the client graph holds the biases but none of the server's weights
    names = {n for n, _ in client.gm.named_parameters()} | {n for n, _ in client.gm.named_buffers()}
    assert not any("weight" in n for n in names), names
    assert sum(1 for n in client.nodes if n.op == "call_function" and "graphpress_he" in str(n.target)) == 4
    with pytest.raises(BackendError, match="no executor bound"):
        client.gm(digits["x_test"][:1])
    # the plaintext integer simulation keeps the float model's test accuracy
    out = run_client(client.gm, PlainExecutor(program, weights), (digits["x_test"],))[0]
    ref = graph.run(digits["x_test"])[0]
    agree = float((out.argmax(-1) == ref.argmax(-1)).double().mean())
    assert agree >= 0.99, agree


def test_digits_encrypted_inference_matches_plaintext(digits, digits_artifact):
    folder, lowered = digits_artifact
    assert lowered.backend == "he" and lowered.model_file == "he_program.json"
    assert set(lowered.files) == {"he_program.json", "server_weights.npz", "client_graph.pt2", "he_cost.json"}
    assert lowered.check["passed"] and len(lowered.check["runs"]) == 2
    cost = json.loads((folder / "he_cost.json").read_text())
    assert [r["name"] for r in cost["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(r["predicted_s"] > 0 and r["measured_s"] > 0 for r in cost["layers"])
    # the kernels' op counters equal the analytic counts the prediction uses
    for r in cost["layers"]:
        assert {k: r["counts"][k] for k in r["predicted_counts"]} == r["predicted_counts"], r["name"]
    runner = HERunner(folder)
    x = digits["x_test"][:16]
    run = runner.run(x.numpy())
    enc = run.outputs[0]
    plain = runner.simulate(x.numpy())[0]
    assert np.array_equal(enc, plain)  # BFV is exact: decrypted == plaintext integer program
    ref = digits["graph"].run(x)[0].numpy()
    assert (enc.argmax(1) == ref.argmax(1)).all()
    assert np.abs(enc - ref).max() < 0.25 * np.abs(ref).max()
    assert [r["rows"] for r in run.layers] == [16, 16, 16, 16] and run.layers[2]["counts"]["plain_mults"] > 0


def test_runtime_loads_he_artifact(digits, tmp_path):
    from graphpress.api import export

    graph = digits["graph"]
    out = tmp_path / "art"
    res = export(graph, out, backend=get_backend("he", protocol="interactive", check_seeds=()), bench=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "he" and manifest["lowering"]["info"]["protocol"] == "interactive"
    assert manifest["lowering"]["info"]["security"]["name"] == "interactive"
    assert res.metrics["vs_original"][0]["sqnr_db"] > 10
    model = load(out)
    x = digits["x_test"][:4].numpy()
    (y,) = model(x)
    assert y.shape == (4, 10) and y.dtype == np.float32
    assert (y.argmax(1) == graph.run(torch.from_numpy(x))[0].numpy().argmax(1)).all()
    with pytest.raises(Exception, match="input 'x'"):
        model(np.zeros((1, 1, 7, 7), np.float32))


def test_circulant_graph_runs_on_compact_weights(digits, tmp_path):
    graph = make_pass("block-circulant", {"block_size": 4})(digits["graph"].clone()).graph  # passes rewrite in place
    program, weights, _client = build_program(graph, encoding="coeff-circulant")
    by = {s.name: s for s in program.steps}
    assert by["conv2"].encoding == by["fc1"].encoding == "coeff-circulant" and by["fc1"].b == 4
    assert by["conv1"].encoding == "coeff-dense" and by["conv1"].b == 1  # C_in = 1: stays dense
    assert by["fc1"].weight_shape == [16, 128, 4] and by["conv2"].weight_shape == [3, 3, 8, 4, 4]
    assert weights[by["fc1"].weight_key].size * 4 == 64 * 512
    # the same graph under coeff-dense runs on the exact dense expansion
    dense_prog, _dense_w, _ = build_program(graph, encoding="coeff-dense")
    assert dense_prog.steps[2].weight_shape == [64, 512]
    lowered = get_backend("he", protocol="interactive", encoding="coeff-circulant", check_seeds=()).lower(graph, tmp_path / "circ")
    runner = HERunner(tmp_path / "circ")
    x = digits["x_test"][:8].numpy()
    run = runner.run(x)
    assert np.array_equal(run.outputs[0], runner.simulate(x)[0])
    ref = graph.run(torch.from_numpy(x))[0].numpy()
    assert (run.outputs[0].argmax(1) == ref.argmax(1)).mean() >= 7 / 8
    fc1 = next(r for r in run.layers if r["name"] == "fc1")
    get_backend("he", protocol="interactive", encoding="coeff-dense", check_seeds=()).lower(graph, tmp_path / "dense", check=False)
    fc1_dense = next(r for r in HERunner(tmp_path / "dense").run(x).layers if r["name"] == "fc1")
    assert fc1["counts"]["plain_mults"] * 4 == fc1_dense["counts"]["plain_mults"]  # b times fewer products
    assert lowered.info["layers"][2]["b"] == 4


def test_slot_dense_encoding_runs_exactly(digits, tmp_path):
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    graph = Graph.capture(MLP().eval(), (torch.randn(4, 12),))
    get_backend("he", protocol="interactive", encoding="slot-dense", check_seeds=()).lower(graph, tmp_path / "slot")
    runner = HERunner(tmp_path / "slot")
    x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    run = runner.run(x)
    assert np.array_equal(run.outputs[0], runner.simulate(x)[0])
    assert all(r["encoding"] == "slot-dense" and r["counts"]["rotations"] > 0 for r in run.layers)


# ---------------------------------------------------------------------------- refusals
def test_unknown_encoding_and_protocol_are_refused():
    with pytest.raises(BackendError, match="unknown encoding 'coeff-sparse'.*coeff-circulant"):
        get_backend("he", encoding="coeff-sparse")
    with pytest.raises(BackendError, match="did you mean 'interactive'"):
        get_backend("he", protocol="interactve")


def test_layer_that_cannot_fit_is_named(digits):
    # 16-bit activations and weights at N = 4096: already conv1's accumulator needs a 34-bit t
    with pytest.raises(BackendError, match=r"layer 'conv1': .*34-bit plaintext modulus at N=4096.*lower the fixed-point bits"):
        build_program(digits["graph"], quant=QuantConfig(16, 16), poly_degree=4096)
    program, _w, _c = build_program(digits["graph"], quant=QuantConfig(16, 16))  # a larger N holds it
    assert max(s.params["poly_degree"] for s in program.steps) > 4096


def test_grouped_conv_is_refused():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            return self.dw(x)

    graph = Graph.capture(Grouped().eval(), (torch.randn(2, 4, 6, 6),))
    with pytest.raises(BackendError, match=r"layer 'dw': grouped conv \(groups=4\)"):
        find_layers(graph)


def test_wrong_parameters_are_caught_naming_the_layer(digits, tmp_path):
    # an artifact whose plain modulus was edited below the layer's bound must not decrypt garbage
    folder = tmp_path / "bad"
    get_backend("he", protocol="interactive", check_seeds=()).lower(digits["graph"], folder, check=False)
    program = json.loads((folder / "he_program.json").read_text())
    from graphpress.backends.he.bfv import choose_params

    program["steps"][2]["params"] = choose_params(12, 4096).to_dict()
    (folder / "he_program.json").write_text(json.dumps(program))
    runner = HERunner(folder)
    with pytest.raises(BackendError, match="layer 'fc1'"):
        runner(digits["x_test"][:2].numpy())


def test_polynomial_protocol_refuses_relu(digits, tmp_path):
    with pytest.raises(BackendError, match="relu.*polynomial-activations"):
        get_backend("he", protocol="polynomial").lower(digits["graph"], tmp_path / "poly")


def test_backends_package_imports_without_tenseal(monkeypatch):
    import sys

    import graphpress.backends.he as he

    monkeypatch.setitem(sys.modules, "tenseal", None)
    monkeypatch.setitem(sys.modules, "tenseal.sealapi", None)
    with pytest.raises(BackendError, match=r"install graphpress\[he\]"):
        he.require_tenseal()
    with pytest.raises(BackendError, match=r"install graphpress\[he\]"):
        get_backend("he")
