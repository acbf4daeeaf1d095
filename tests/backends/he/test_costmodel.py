"""Measured HE cost model: the cache, the counts-x-seconds arithmetic, predictions vs real runs,
and the ``he-measured`` cost model of the block-size search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from graphpress.backends.he.costmodel import measure_entry, predict_step, step_counts
from graphpress.errors import PassError
from graphpress.lowering.he import counts as he_counts, op_costs as he_op_costs
from graphpress.ir.graph import Graph

SECONDS = {  # a synthetic per-op table (seconds): the arithmetic below must reproduce it exactly
    "upload_coeffs": 2e-3,
    "upload_slots": 3e-3,
    "download": 1e-3,
    "download_slots": 1.5e-3,
    "decode_coeff": 1e-6,
    "ntt": 3e-4,
    "intt": 2e-4,
    "mul_plain": 1e-4,
    "add": 2e-5,
    "add_plain": 3e-5,
    "rotate": 5e-4,
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "he_op_costs.json"
    monkeypatch.setenv("GRAPHPRESS_HE_COSTS", str(path))
    return path


def test_layer_terms_price_every_count():
    counts = he_counts.counts_linear("coeff-dense", 64, 512, 4096, vectors=8)
    # 64x512 at N=4096: 8 products per vector group, tiles 4 x 2 (see he_counts.plan_coeff_linear)
    terms = he_op_costs.layer_terms("coeff-dense", counts, SECONDS, values=8 * 64)
    assert terms["upload_coeffs"]["count"] == counts["encryptions"] and terms["download"]["count"] == counts["decryptions"]
    assert terms["ntt"]["count"] == counts["encryptions"] and terms["intt"]["count"] == counts["ntts"] - counts["encryptions"]
    want = (
        counts["encryptions"] * (2e-3 + 3e-4)
        + counts["decryptions"] * (1e-3 + 2e-4)
        + counts["plain_mults"] * 1e-4
        + counts["ct_adds"] * 2e-5
        + 512 * 1e-6
    )
    assert he_op_costs.total_seconds(terms) == pytest.approx(want, rel=1e-12)
    assert "rotate" not in terms and "upload_slots" not in terms
    slot = he_counts.counts_linear("slot-dense", 64, 512, 4096, vectors=8)
    inv = he_op_costs.slot_inverse_ntts(64, 512, 4096, slot["decryptions"])
    st = he_op_costs.layer_terms("slot-dense", slot, SECONDS, inverse_ntts=inv)
    assert st["rotate"]["count"] == slot["rotations"] > 0 and st["download_slots"]["count"] == slot["decryptions"]
    assert st["intt"]["count"] + st["ntt"]["count"] == slot["ntts"]
    with pytest.raises(KeyError, match="he-calibrate"):
        he_op_costs.layer_terms("slot-dense", slot, {k: v for k, v in SECONDS.items() if k != "rotate"}, inverse_ntts=inv)


def test_values_read():
    assert he_op_costs.values_read("linear", 10, 7) == 70
    # a 3x3 'same' conv on 8x8: the stride-1 map of the padded input is 8x8 per output channel
    assert he_op_costs.values_read("conv2d", 16, 2, {"h": 8, "w": 8, "kh": 3, "kw": 3, "padding": [1, 1]}) == 2 * 16 * 64


def test_cache_round_trip_and_reference_entry(cache):
    assert he_op_costs.find_entry(4096) is None and he_op_costs.machine_entries() == {}
    a = {"poly_degree": 4096, "coeff_modulus_bits": [45, 44, 20], "plain_modulus": 1, "plain_bits": 20, "batching": False, "seconds": SECONDS}
    b = {**a, "coeff_modulus_bits": [60, 49], "plain_bits": 16}
    c = {**a, "coeff_modulus_bits": [36, 36, 36], "plain_bits": 24, "batching": True}
    he_op_costs.write_entries({he_op_costs.entry_key(4096, e["coeff_modulus_bits"]): e for e in (a, b, c)})
    data = json.loads(cache.read_text())
    assert list(data["machines"]) == [he_op_costs.machine_key()] and "tenseal" in he_op_costs.machine_key()
    assert he_op_costs.find_entry(4096, [60, 49])["plain_bits"] == 16
    # reference at N: rotation-free, plaintext bits closest to 24 (the batching entry is skipped)
    assert he_op_costs.find_entry(4096)["coeff_modulus_bits"] == [45, 44, 20]
    assert he_op_costs.find_entry(8192) is None


def test_measured_entry_predicts_a_real_layer(cache):
    from graphpress.backends.he.bfv import BFVParams
    from graphpress.backends.he.program import EncryptedExecutor, build_program, run_client

    class Lin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(256, 64)

        def forward(self, x):
            return self.fc(x)

    torch.manual_seed(0)
    graph = Graph.capture(Lin().eval(), (torch.randn(4, 256),))
    program, weights, client = build_program(graph, encoding="coeff-dense", poly_degree=4096)
    step = program.steps[0]
    params = BFVParams.from_dict(step.params)
    entry = measure_entry(params, plain_bits=step.plain_bits, repeat=3)
    s = entry["seconds"]
    assert set(s) | {"rotate"} == set(he_op_costs.OPS)  # rotate only where the chain can key-switch
    assert all(v >= 0 for v in s.values()) and s["mul_plain"] > 0 and s["upload_coeffs"] > s["add"]
    assert predict_step(step, 16) is None  # nothing cached yet
    he_op_costs.write_entries({he_op_costs.entry_key(4096, params.coeff_modulus_bits): entry})
    ex = EncryptedExecutor(program, weights)
    x = torch.randn(16, 256)
    for _ in range(3):
        run_client(client.gm, ex, (x,))
    measured = float(np.median([r.seconds for r in ex.records]))
    pred = predict_step(step, 16)
    assert pred["counts"] == {k: ex.records[-1].counts[k] for k in pred["counts"]}  # exact counts
    assert step_counts(step, 16) == pred["counts"]
    # timing on a shared machine: only a loose sanity bound here; benchmarks/he_digits.py checks 30%
    assert 0.2 < pred["seconds"] / measured < 5.0, (pred["seconds"], measured)


def _digits_layers():
    from graphpress.passes.circulant.layers import find_layers
    from graphpress.zoo.digits import digits_cnn

    model = digits_cnn()
    graph = Graph.capture(model, model.example_inputs())
    layers, _ = find_layers(graph)
    return {l.name: l for l in layers}


def test_he_measured_cost_model_needs_the_cache(cache):
    from graphpress.passes.circulant.cost import get_cost_model

    layers = _digits_layers()
    model = get_cost_model("he-measured")
    with pytest.raises(PassError, match="compress he-calibrate -N 4096"):
        model(layers["fc1"], 1, poly_degree=4096)


def test_he_measured_cost_model_prices_counts(cache):
    from graphpress.passes.circulant.cost import get_cost_model

    entry = {"poly_degree": 4096, "coeff_modulus_bits": [45, 44, 20], "plain_modulus": 1, "plain_bits": 24, "batching": False, "seconds": SECONDS}
    he_op_costs.write_entries({he_op_costs.entry_key(4096, [45, 44, 20]): entry})
    layers = _digits_layers()
    model = get_cost_model("he-measured")
    fc1 = [model(layers["fc1"], b, poly_degree=4096) for b in (1, 2, 4, 8)]
    counts = he_counts.counts_linear("coeff-dense", 64, 512, 4096)
    want = 1e3 * he_op_costs.total_seconds(he_op_costs.layer_terms("coeff-dense", counts, SECONDS, values=64))
    assert fc1[0] == pytest.approx(want, rel=1e-12)
    assert fc1 == sorted(fc1, reverse=True) and fc1[2] < fc1[0]  # fewer products at larger b
    conv2 = [model(layers["conv2"], b, poly_degree=4096) for b in (1, 4, 16)]
    assert conv2[0] > conv2[1] > conv2[2]
    # conv1 (C_in = 1) admits b = 1 only: the model prices it like any dense conv
    assert model(layers["conv1"], 1, poly_degree=4096) > 0


SECURE = {"input": 2e-3, "product": 1e-4, "output": 2.5e-3, "read": 3e-7, "read_bulk": 4e-4, "input_bytes": 1e5, "output_nbytes": 6.0}


def test_he_secure_cost_model_needs_the_cache(cache):
    from graphpress.passes.circulant.cost import get_cost_model

    with pytest.raises(PassError, match="compress he-calibrate --secure -N 8192"):
        get_cost_model("he-secure")(_digits_layers()["fc1"], 1)


def test_he_secure_cost_model_prices_the_protocols_counts(cache):
    from graphpress.passes.circulant.cost import get_cost_model

    he_op_costs.write_secure_section({"he": {"N8192-50-50-20": SECURE, "N8192-40-40-40-20": {**SECURE, "input": 1.0}}, "transfer_s_per_byte": 1e-9})
    layers = _digits_layers()
    model = get_cost_model("he-secure")
    conv2 = [model(layers["conv2"], b) for b in (1, 2, 4, 8, 16)]
    # exactly counts x seconds, with the two-data-prime entry (not the three-prime one)
    plan = he_counts.plan_coeff_conv(32, 16, 8, 8, 3, 3, 8192, 4, (1, 1), (1, 1), "conv2", he_counts.SECURE_PLAN_WEIGHTS)
    c = he_counts.secure_counts(plan)
    want = c["inputs"] * 2e-3 + c["products"] * 1e-4 + c["outputs"] * 2.5e-3 + he_op_costs.read_seconds(c["reads"], 8192, SECURE)
    up, down = c["inputs"] * 1e5, (c["outputs"] * 8192 + sum(c["reads"])) * 6.0
    assert conv2[2] == pytest.approx(1e3 * (want + (up + down) * 1e-9), rel=1e-12)
    # per-ciphertext costs dominate: it falls with b, and far slower than the products do
    assert conv2[0] >= conv2[2] >= conv2[4] and conv2[0] / conv2[4] < 16
