"""The secure two-party protocol: exactness, what each party sees, and refusals.

In-process tests (main environment, tenseal) check one HE layer on shares and the channel;
the two-process tests run the real parties (SPU in its own environment: ``compress
secure-setup``, or ``$GRAPHPRESS_SPU_PYTHON``).

Privacy is tested statistically on what a party actually receives: for two different weight
sets and the same input, the client's decrypted shares are uniform on ``Z_t`` and
indistinguishable (Kolmogorov-Smirnov, p > 1e-3), while the debugging ``interactive`` kernel --
the rule that must not match -- hands the client ``W x`` itself, which the same test tells
apart at p < 1e-9; for two different inputs, the ciphertext coefficients the server receives
are uniform and indistinguishable.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
import torch
from scipy import stats

from graphpress.backends import get_backend
from graphpress.backends.he.bfv import BFVContext
from graphpress.backends.he.kernels.coeff_dense import CoeffDense
from graphpress.backends.he.program import build_program
from graphpress.backends.he import rawct
from graphpress.lowering.he import op_costs
from graphpress.backends.he.secure import launch
from graphpress.backends.he.secure.compile import compile_secure
from graphpress.backends.he.secure.hestep import ClientStep, ServerStep, StepShape, dense_weight, local_contexts, noise_bound_bits, plain_layer
from graphpress.backends.he.secure.params import secure_params
from graphpress.backends.he.secure.program import SERVER_FILE, SecureProgram, plan_segments, simulate
from graphpress.backends.he.secure.wire import Channel
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph
from graphpress.passes import make_pass


# ---------------------------------------------------------------------------- one layer in process
def _pair(shape_kw: dict, w: np.ndarray, bias: np.ndarray | None, seed: int = 1):
    probe = StepShape(**shape_kw, params=None, flood_bits=0)
    params, flood = secure_params(20, lambda t, n: noise_bound_bits(w, probe, t, n), what=shape_kw["name"])
    shape = StepShape(**shape_kw, params=params, flood_bits=flood)
    cctx, sctx = local_contexts(params)
    return shape, ClientStep(shape, cctx), ServerStep(shape, sctx, w, bias, np.random.default_rng(seed))


CONV = dict(index=0, name="conv", kind="conv2d", b=1, out_features=8, in_features=4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1),
            in_shape=(4, 8, 8), out_shape=(8, 4, 4))
CIRC = dict(index=0, name="fc", kind="linear", b=4, out_features=16, in_features=32, kernel_size=(1, 1), stride=(1, 1), padding=(0, 0),
            in_shape=(32,), out_shape=(16,))


@pytest.mark.parametrize("kw", [CONV, CIRC], ids=["conv-stride2", "circulant-linear"])
def test_shares_reconstruct_the_layer_exactly(kw):
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 4, 3, 3)) if kw["kind"] == "conv2d" else rng.integers(-127, 128, (4, 8, 4))
    bias = rng.integers(-500, 500, kw["out_features"])
    shape, client, server = _pair(kw, w, bias)
    t = shape.t
    x = rng.integers(0, 256, shape.in_shape)
    s = rng.integers(0, t, shape.in_shape)  # the server's share of the input
    server.refill()  # offline: flooded encryptions of zero, one per response, used once
    responses, mask = server.respond(client.encrypt((x - s) % t), s)
    assert server._pool == []
    y = (client.decrypt(responses) + mask) % t - shape.offset
    ref = plain_layer(x, dense_weight(w, shape.kind), shape) + (bias[:, None, None] if shape.kind == "conv2d" else bias)
    assert np.array_equal(y, ref)
    # stride 2: only the strided outputs' coefficients travel (a quarter of the stride-1 map)
    if shape.kind == "conv2d":
        sent = sum(len(r) for r in responses) // client.nbytes - len(responses) * shape.params.poly_degree
        assert sent == int(np.prod(shape.out_shape))


def _client_view(w: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    shape, client, server = _pair(CONV, w, None, seed)
    responses, _ = server.respond(client.encrypt(x % shape.t), np.zeros(shape.in_shape, dtype=np.int64))
    return client.decrypt(responses).reshape(-1) / shape.t, shape


def test_client_view_is_uniform_and_independent_of_the_weights():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, CONV["in_shape"])
    w1 = rng.integers(-3, 4, (8, 4, 3, 3))  # small weights
    w2 = rng.integers(-127, 128, (8, 4, 3, 3))  # large ones
    views = []
    for k, w in enumerate((w1, w2)):
        v = np.concatenate([_client_view(w, x, seed)[0] for seed in range(4 * k, 4 * k + 4)])
        assert stats.kstest(v, "uniform").pvalue > 1e-3
        views.append(v)
    assert stats.ks_2samp(*views).pvalue > 1e-3
    # the rule that must not match: the debugging protocol decrypts W x itself
    ctx = BFVContext(_client_view(w1, x, 0)[1].params)
    kern = CoeffDense()
    small = x // 64  # within the debugging kernel's plaintext modulus
    plain = [kern.run_conv(ctx, kern.prepare_conv(ctx, w, None, (2, 2), (1, 1), "conv"), small).reshape(-1) for w in (w1, w2)]
    assert stats.ks_2samp(*plain).pvalue < 1e-9


def test_server_view_is_uniform_and_independent_of_the_input():
    rng = np.random.default_rng(4)
    w = rng.integers(-127, 128, (8, 4, 3, 3))
    views = []
    for x in (np.zeros(CONV["in_shape"], dtype=np.int64), rng.integers(0, 256, CONV["in_shape"])):
        shape, client, server = _pair(CONV, w, None)
        coeffs = []
        for blob in client.encrypt(x):
            ct = rawct.load_bytes(server.seal.Ciphertext(), server.ctx.context, blob, server.path, "input")
            _, data = rawct.coeffs(ct, server.path)
            coeffs.append(data[0, 0] / float(server.primes[0]))  # c0 in the first prime: what the server stores
        v = np.concatenate(coeffs)
        assert stats.kstest(v, "uniform").pvalue > 1e-3
        views.append(v)
    assert stats.ks_2samp(*views).pvalue > 1e-3


def test_masks_are_fresh_for_every_run():
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (8, 4, 3, 3))
    x = rng.integers(0, 256, CONV["in_shape"])
    shape, client, server = _pair(CONV, w, None)
    zero = np.zeros(shape.in_shape, dtype=np.int64)
    (r1, m1), (r2, m2) = (server.respond(client.encrypt(x), zero) for _ in range(2))
    assert np.mean(m1 == m2) < 1e-3 and r1 != r2
    # the parties draw from OS entropy unless a test seeds them
    fresh = [_pair(CONV, w, None, seed=None)[2].respond(client.encrypt(x), zero)[1] for _ in range(2)]
    assert np.mean(fresh[0] == fresh[1]) < 1e-3


CCONV = dict(index=0, name="cconv", kind="conv2d", b=4, out_features=8, in_features=8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
             in_shape=(8, 8, 8), out_shape=(8, 8, 8))


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
@pytest.mark.parametrize("kw", [CONV, CIRC, CCONV], ids=["dense-conv", "circulant-linear", "circulant-conv"])
def test_noise_bound_covers_the_measured_noise(kw, extreme):
    """The flooding is sized from an analytic bound on the weight-dependent noise; measured with
    the client's secret key (SEAL's invariant noise budget) on every response before flooding,
    the real noise stays below it."""
    import math

    import tenseal.sealapi as seal

    rng = np.random.default_rng(7)
    wshape = {"conv": (8, 4, 3, 3), "fc": (4, 8, 4), "cconv": (3, 3, 2, 2, 4)}[kw["name"]]
    w = rng.choice([-127, 127], wshape) if extreme else rng.integers(-127, 128, wshape)  # extreme: the largest dense L1
    shape, client, server = _pair(kw, w, None)
    x = rng.integers(0, shape.t, shape.in_shape)  # a share: uniform modulo t
    cts = [server.ctx.to_ntt_inplace(rawct.load_bytes(seal.Ciphertext(), server.ctx.context, blob, server.path, "in")) for blob in client.encrypt(x)]
    plan, per = server.plan, (server.plan.col_tiles if shape.kind == "linear" else server.plan.chan_groups)
    bound = noise_bound_bits(w, shape, shape.t)
    for key, _, _, _ in server.outputs:
        acc = server.kernel._accumulate(server.ctx, [(cts[c], server.tiles[key[1], c]) for c in range(per)])
        ct = rawct.load_bytes(seal.Ciphertext(), client.ctx.context, rawct.save_bytes(acc, server.path), client.path, "acc")
        budget = client.ctx.noise_budget(ct)
        measured = sum(shape.params.coeff_modulus_bits[:-1]) - math.log2(shape.t) - 1 - budget
        # covers it, and not loosely: the flooding (hence the primes) is sized from this bound
        assert budget > 0 and measured < bound < measured + 12, (measured, bound)


def test_flooding_dominates_the_weight_dependent_noise():
    rng = np.random.default_rng(6)
    w = rng.integers(-127, 128, (8, 4, 3, 3))
    shape, client, server = _pair(CONV, w, None)
    need = noise_bound_bits(w, shape, shape.t) + 40
    assert shape.flood_bits >= need
    # and the flooded result still decrypts: t, the flooding and the product fit the data primes
    assert sum(shape.params.coeff_modulus_bits[:-1]) >= shape.t.bit_length() + shape.flood_bits + 3


# ---------------------------------------------------------------------------- channel
def _socketpair(timeout: float = 2.0):
    a, b = socket.socketpair()
    return Channel(a, timeout, "server"), Channel(b, timeout, "client")


def test_channel_refuses_replayed_wrong_and_malformed_messages():
    c, s = _socketpair()
    c.send("cts_in", b"abc")
    assert s.recv("cts_in") == b"abc" and c.sent == s.received == 20
    c.send("share", b"x")
    with pytest.raises(BackendError, match=r"expected message 'cts_in' #1, the client sent 'share'"):
        s.recv("cts_in")
    c._seq_out = 0  # a replayed frame carries an old number
    c.send("cts_in", b"again")
    with pytest.raises(BackendError, match=r"numbered 0, expected #1 \(replayed or reordered message\)"):
        s.recv("cts_in")
    c.sock.sendall(b"XXXX" + bytes(13))
    with pytest.raises(BackendError, match=r"bad magic"):
        s.recv("cts_in")


def test_channel_times_out_and_notices_a_dead_peer():
    c, s = _socketpair(timeout=0.3)
    with pytest.raises(BackendError, match=r"sent nothing for 0 s while message 'cts_out' #0 was expected"):
        c.recv("cts_out")
    s.close()
    with pytest.raises(BackendError, match=r"the server disconnected while message 'cts_out' #0 was expected"):
        c.recv("cts_out")


# ---------------------------------------------------------------------------- compiler
@pytest.fixture(scope="module")
def digits():
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    model, _ = train_digits_cnn(epochs=3)
    x_tr, _y, x_te, y_te = digits_data()
    graph = make_pass("fold-batchnorm", {})(Graph.capture(model, (x_tr[:2],))).graph
    graph.calibration = [(x_tr[i : i + 256],) for i in range(0, x_tr.shape[0], 256)]
    return {"graph": graph, "x_test": x_te, "y_test": y_te}


def _compile(graph: Graph, folder, **kw):
    hp, w, client = build_program(graph, encoding="coeff-circulant", protocol="secure")
    sp, arrays = compile_secure(hp, w, client, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    sp.save(folder)
    np.savez(folder / SERVER_FILE, **arrays)
    return sp, arrays


def test_fixed_point_program_matches_the_float_model(digits, tmp_path):
    sp, arrays = _compile(digits["graph"], tmp_path)
    kinds = [op["op"] for op in sp.ops]
    assert kinds[:2] == ["input", "he"] and kinds.count("he") == 4 and "maxpool" in kinds and kinds[-1] == "output"
    # the public program holds shapes and parameters, never an integer weight, bias or multiplier
    public = (tmp_path / "secure_program.json").read_text()
    assert not any(k in json.loads(public) for k in ("w0", "bias0", "m2")) and len(public) < 20000
    assert all(s["flood_bits"] >= 40 and s["params"]["poly_degree"] >= 4096 for s in sp.steps)
    x = digits["x_test"][:200]
    with torch.no_grad():
        ref = digits["graph"].gm(x).argmax(1).numpy()
    got = np.array([simulate(sp, arrays, x[i].numpy())["output"].argmax() for i in range(200)])
    assert np.mean(got == ref) >= 0.97
    # every shift starts a segment (its input arrives split), every segment ends before an HE layer
    sched = plan_segments(sp)
    assert all(seg.inputs[0][1].startswith("split:") for k, seg in sched if k == "spu" and seg.ops[0]["op"] == "shift")


def test_compiler_refuses_what_the_protocol_cannot_compute(digits, tmp_path):
    class Gelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    g = Graph.capture(Gelu().eval(), (torch.randn(2, 8),))
    with pytest.raises(BackendError, match=r"^he secure: node 'gelu' \(gelu\): not supported by the secure protocol"):
        _compile(g, tmp_path / "gelu")
    with pytest.raises(BackendError, match=r"secure protocol runs coefficient encodings"):
        get_backend("he", encoding="slot-dense")
    with pytest.raises(BackendError, match=r"stat_bits': 20 is below 40"):
        get_backend("he", stat_bits=20)
    assert get_backend("he").protocol == "secure"


# ---------------------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def spu_python():
    return str(launch.require_spu_python())


@pytest.mark.parametrize("block", [1, 4])
def test_two_parties_reveal_exactly_the_fixed_point_output(digits, tmp_path, spu_python, block):
    graph = digits["graph"] if block == 1 else make_pass("block-circulant", {"block_size": block})(digits["graph"]).graph
    sp, arrays = _compile(graph, tmp_path)
    x = digits["x_test"][:2].numpy()
    run = launch.run(tmp_path, x, timeout=120, python=spu_python)
    for i in range(2):
        ref = simulate(sp, arrays, x[i])
        assert np.array_equal(run.output_ints["output"][i], ref["output:int"])
        assert np.allclose(run.outputs["output"][i], ref["output"])
    summary = run.summary()
    assert summary["he_bytes_client_to_server"] > 100_000 and summary["spu_bytes_client_to_server"] > 100_000
    assert summary["messages"] >= 2 * 4 + 1  # per HE layer a request and a response, then the reveal
    he = [r for r in run.client["rows"] if r["kind"] == "he" and r["sample"] == 0]
    assert [r["name"] for r in he] == ["conv1", "conv2", "fc1", "fc2"] and all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in he)


def _party(spu_python: str, role: str, folder, port: int, out, timeout: float = 3.0, extra=()):
    env = launch.party_env()
    cmd = [spu_python, "-m", "graphpress.backends.he.secure.party", "--role", role, "--program", str(folder), "--port", str(port),
           "--spu", "127.0.0.1:1,127.0.0.1:2", "--out", str(out), "--timeout", str(timeout), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


def test_a_missing_or_different_peer_is_one_error_line(digits, tmp_path, spu_python):
    _compile(digits["graph"], tmp_path / "p")
    np.save(tmp_path / "x.npy", digits["x_test"][:1].numpy())
    port = launch._free_ports(1)[0]
    done = _party(spu_python, "client", tmp_path / "p", port, tmp_path / "c.json", extra=("--inputs", str(tmp_path / "x.npy")))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(f"error: he secure: cannot reach the server on port {port}")
    # a client running another program: the server refuses at the first message, both exit
    shutil.copytree(tmp_path / "p", tmp_path / "q")
    prog = json.loads((tmp_path / "q" / "secure_program.json").read_text())
    prog["ops"][-1]["scale"] *= 2
    (tmp_path / "q" / "secure_program.json").write_text(json.dumps(prog))
    res = {}
    srv = threading.Thread(target=lambda: res.__setitem__("s", _party(spu_python, "server", tmp_path / "p", port, tmp_path / "s.json")))
    srv.start()
    cli = _party(spu_python, "client", tmp_path / "q", port, tmp_path / "c.json", extra=("--inputs", str(tmp_path / "x.npy")))
    srv.join()
    assert res["s"].returncode == 2 and "different secure program (digest mismatch" in res["s"].stderr
    assert cli.returncode == 2 and "error: he secure:" in cli.stderr


def test_a_weakened_program_is_refused_by_the_server(digits, tmp_path, spu_python):
    _compile(digits["graph"], tmp_path)
    prog = json.loads((tmp_path / "secure_program.json").read_text())
    prog["stat_bits"] = 20
    (tmp_path / "secure_program.json").write_text(json.dumps(prog))
    with pytest.raises(BackendError, match=r"^he secure: stat_bits 20 is below 40: the flooding would not hide the weights"):
        launch.run(tmp_path, digits["x_test"][:1].numpy(), timeout=10, python=spu_python)
    prog["stat_bits"] = 40
    prog["steps"][1]["flood_bits"] = 30
    (tmp_path / "secure_program.json").write_text(json.dumps(prog))
    with pytest.raises(BackendError, match=r"layer 'conv2': flooding of 30 bits is below the \d+ its weights need"):
        launch.run(tmp_path, digits["x_test"][:1].numpy(), timeout=10, python=spu_python)


def test_backend_default_is_secure_and_runs_through_the_runtime(digits, tmp_path, spu_python, monkeypatch):
    from graphpress.runtime import load

    monkeypatch.setenv("GRAPHPRESS_SPU_PYTHON", spu_python)
    lowered = get_backend("he").lower(digits["graph"], tmp_path / "art")
    assert lowered.check["passed"] and lowered.info["protocol"] == "secure"
    assert lowered.check["secure"]["spu_bytes_server_to_client"] > 0
    head = json.loads((tmp_path / "art" / "he_program.json").read_text())
    assert head["security"]["name"] == "secure" and "never an intermediate value, a weight" in head["security"]["client_learns"]
    assert sorted(lowered.files) == ["he_program.json", "secure_check.json", "secure_program.json", "secure_server.npz"]
    check = json.loads((tmp_path / "art" / "secure_check.json").read_text())
    assert check["exact"] and check["samples"] == 2 and [r["name"] for r in check["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert SecureProgram.load(tmp_path / "art").output_names == ["output"]


# ---------------------------------------------------------------------------- cost model
@pytest.mark.parametrize("kw", [CONV, CIRC, CCONV, dict(CIRC, in_shape=(5, 32), out_shape=(5, 16))], ids=["conv-stride2", "circulant-linear", "circulant-conv", "linear-5-rows"])
def test_analytic_counts_match_the_steps(kw):
    """The search prices layers from lowering's counts (no SEAL there): they must be the steps' own."""
    from graphpress.backends.he.secure.hestep import _out_positions
    from graphpress.lowering.he.counts import secure_counts

    rng = np.random.default_rng(2)
    wshape = {"conv": (8, 4, 3, 3), "fc": (4, 8, 4), "cconv": (3, 3, 2, 2, 4)}[kw["name"]]
    shape, client, server = _pair(kw, rng.integers(-127, 128, wshape), None)
    c = secure_counts(shape.plan(), shape.rows)
    assert c["reads"] == [p.size for _, p, _, _ in _out_positions(shape, shape.plan())]
    assert c["inputs"] == server.n_inputs == len(client.encrypt(np.zeros(shape.in_shape, dtype=np.int64)))
    assert c["outputs"] == len(server.outputs) and sum(c["reads"]) == int(np.prod(shape.out_shape))


def test_cost_model_counts_and_prices_every_layer(digits, tmp_path, monkeypatch):
    from graphpress.backends.he.secure import costmodel

    monkeypatch.setenv("GRAPHPRESS_HE_COSTS", str(tmp_path / "he_op_costs.json"))
    sp, _ = _compile(digits["graph"], tmp_path / "p")
    # SPU costs fitted from two sizes: slope per element, intercept per segment call
    fit = costmodel.fit_spu([{"op": "relu", "n": 1000, "wall_s": 0.03}, {"op": "relu", "n": 5000, "wall_s": 0.07},
                             {"op": "mul", "n": 1000, "wall_s": 0.025}, {"op": "mul", "n": 5000, "wall_s": 0.045}])
    assert fit["per_element_s"]["relu"] == pytest.approx(1e-5) and fit["segment_s"] == pytest.approx(0.02)
    costmodel.store_spu_costs(fit)
    pred = costmodel.predict(sp)
    assert [l["name"] for l in pred["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    conv2 = pred["layers"][1]
    # conv2: 16 -> 32 channels on 8x8, stride 1: every output read once
    assert conv2["read"] == 32 * 8 * 8 and conv2["inputs"] >= 1 and conv2["products"] >= conv2["outputs"]
    # reading: one call per coefficient up to N/8 per response, else one bulk read
    cost = {"read": 1e-6, "read_bulk": 5e-4}
    assert op_costs.read_seconds([100, 2000], 8192, cost) == pytest.approx(100e-6 + 5e-4)
    assert all(l["predicted_s"] > 0 and l["predicted_bytes_up"] > 0 for l in pred["layers"])
    first = pred["segments"][0]
    assert first["elements"]["unwrap"] == 16 * 8 * 8 and first["elements"]["relu"] == 16 * 8 * 8
    assert first["elements"]["mul"] == 16 * 64 and first["predicted_s"] == pytest.approx(0.02 + 1024 * 1e-5 + 1024 * 5e-6)  # unwrap: not calibrated here
