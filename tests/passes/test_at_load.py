"""Stored k-bit weights computed in float: graphpress::wlinear_load / wembedding_load, the
``dequantize-at-load`` and ``quantize-embeddings`` passes, and their ONNX files (packed weights in
the file, plain float MatMul / Gather after ONNX Runtime loads them, same outputs)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import graphpress.passes.quant  # noqa: F401 -- registers the passes
from graphpress.errors import PassError
from graphpress.ir import quant as Q
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphpress.backends.onnxruntime.lower import lower_to_onnx  # noqa: E402

OPS = torch.ops.graphpress


class TiedLM(nn.Module):
    """Embedding -> two linears -> classifier tied to the embedding (as stories260K)."""

    def __init__(self, vocab=96, dim=64, hidden=160):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim, bias=False)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.out(h)


@pytest.fixture
def lm():
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 12))
    g = Graph.capture(TiedLM().eval(), (ids,))
    g.calibration = [(torch.randint(0, 96, (16, 12)),)]
    return g


def _weight(out_f, in_f, bits, g, symmetric=False):
    w = torch.randn(out_f, in_f)
    return w, Q.to_nbits(Q.groupwise(w, bits, g, symmetric=symmetric))


@pytest.mark.parametrize("bits,g,sym,in_f", [(8, 32, False, 64), (4, 16, False, 72), (4, 32, True, 64), (2, 16, False, 48), (3, 32, False, 80)])
def test_wlinear_load_equals_wlinear_nbits_in_eager(bits, g, sym, in_f):
    _w, nb = _weight(24, in_f, bits, g, sym)
    x, b = torch.randn(5, in_f), torch.randn(24)
    ref = OPS.wlinear_nbits(x, nb.packed, nb.scales, nb.zeros, b, in_f, nb.bits, g, 0)
    got = OPS.wlinear_load(x, nb.packed, nb.scales, nb.zeros, b, in_f, nb.bits, g)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_wembedding_load_is_a_lookup_in_the_dequantized_table():
    w, nb = _weight(50, 40, 4, 16)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    table = Q.dequantize_nbits(nb.packed, nb.scales, nb.zeros, nb.bits, 16, 40)
    torch.testing.assert_close(OPS.wembedding_load(ids, nb.packed, nb.scales, nb.zeros, 40, nb.bits, 16), table[ids], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ids must be int32/int64"):
        OPS.wembedding_load(ids.float(), nb.packed, nb.scales, nb.zeros, 40, nb.bits, 16)
    with pytest.raises(RuntimeError, match="does not hold 50 values"):
        OPS.wembedding_load(ids, nb.packed, nb.scales, nb.zeros, 50, nb.bits, 16)


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _optimized_ops(path, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_pipeline_is_smaller_on_disk_float_after_load_and_matches_eager(lm, tmp_path, bits):
    quant = {"bits": [bits], "target_bits": bits, "activations": "none", "group_size": 32, "min_sqnr_db": 5}
    report = Pipeline([("quantize-layerwise", quant), "dequantize-at-load", ("quantize-embeddings", {"bits": bits, "min_sqnr_db": 5})],
                      random_inputs=0).run(lm)
    g = report.graph
    at_load, emb = report.steps[1], report.steps[2]
    assert at_load.stats["rewritten"] == 3 and at_load.exact
    assert emb.stats["quantized"] == 1 and not emb.exact
    # the tied classifier and the embedding share one stored copy
    table = next(iter(emb.stats["tables"].values()))
    assert table["reuses"] is not None and table["bytes_after"] == 0
    counts = g.op_counts()
    assert counts.get("graphpress.wlinear_load", 0) == 3 and counts.get("graphpress.wembedding_load", 0) == 1
    assert not any("wlinear_nbits" in k or k.endswith("embedding") for k in counts)

    info = lower_to_onnx(g, tmp_path / "q")
    base = lower_to_onnx(lm, tmp_path / "f")
    model = onnx.load(str(tmp_path / "q" / "model.onnx"))
    float_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    packed_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    n_weights = 96 * 64 + 64 * 160 + 160 * 64
    assert packed_bytes >= n_weights * bits // 8  # the codes are in the file, packed
    assert float_bytes < n_weights * 4 * 0.2  # scales, zero points' floats and biases only: no float weight matrix
    assert info["model_bytes"] < base["model_bytes"] * (0.45 if bits == 8 else 0.35)
    ops = _optimized_ops(tmp_path / "q" / "model.onnx", tmp_path)
    assert "MatMulNBits" not in ops and ops["MatMul"] == 3  # the linears: dequantized at load (constant-folded)
    # the embedding gathers its rows' codes, scales and zero points and dequantizes those rows only:
    # its table stays in k bits in the session (nothing vocab x dim in float32 folded for it)
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    inits = {t.name: t for t in opt.graph.initializer}
    gathered = [n.input[0] for n in opt.graph.node if n.op_type == "Gather"]
    assert any(name in inits and inits[name].data_type == onnx.TensorProto.UINT8 and inits[name].dims[0] == 96 for name in gathered)
    assert not any(name in inits and inits[name].data_type == onnx.TensorProto.FLOAT and list(inits[name].dims) == [96, 64] for name in gathered)
    assert ops.get("BitShift", 0) == (0 if bits == 8 else 4)  # 4 bits: the gathered rows' codes and zero points are unpacked
    ids = torch.randint(0, 96, (3, 12))
    got = _ort(tmp_path / "q" / "model.onnx").run(None, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, g.gm(ids).detach().numpy(), rtol=1e-4, atol=1e-4)
    ref = lm.gm(ids)
    assert sqnr_db(ref, torch.from_numpy(got)) > (35 if bits == 8 else 12)


def test_dequantize_at_load_leaves_int8_activation_layers_and_respects_max_weights(lm):
    q8 = Pipeline([("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8-block", "min_sqnr_db": 5})], random_inputs=0).run(lm).graph
    r = make_pass("dequantize-at-load", {})(q8.clone())
    assert not r.changed and r.stats["skipped"] == {"int8 activations (its kernel is the point)": 3}
    w8 = Pipeline([("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "none", "min_sqnr_db": 5})], random_inputs=0).run(lm).graph
    r = make_pass("dequantize-at-load", {"max_weights": 96 * 64})(w8.clone())
    assert r.stats["rewritten"] == 1 and r.stats["layers"] == ["out"]
    assert r.stats["skipped"] == {f"more than max_weights={96 * 64} weights": 2}
    ids = torch.randint(0, 96, (2, 12))
    torch.testing.assert_close(r.graph.gm(ids), w8.gm(ids), rtol=0, atol=0)


def test_quantize_embeddings_refusals_and_options(lm):
    r = make_pass("quantize-embeddings", {"min_rows": 200})(lm.clone())
    assert not r.changed and r.stats["skipped"] == {"fewer than min_rows=200 rows": 1}
    # without a quantized tied layer the table gets its own stored copy; the float table stays for the classifier
    r = make_pass("quantize-embeddings", {"bits": 8})(lm.clone())
    (name, table), = r.stats["tables"].items()  # the tied parameter, under export's name for it
    assert name in ("emb.weight", "out.weight")
    skipped = make_pass("quantize-embeddings", {"skip": [name]})(lm.clone())
    assert not skipped.changed and skipped.stats["skipped"] == {"skipped by config": 1}
    assert table["reuses"] is None and table["shared_with_other_ops"] and table["sqnr_db"] > 40
    for bad, match in (({"bits": 9}, "option 'bits'"), ({"group_size": 24}, "option 'group_size'"), ({"min_rows": 0}, "option 'min_rows'")):
        with pytest.raises(PassError, match=match):
            make_pass("quantize-embeddings", bad)
    with pytest.raises(PassError, match="option 'max_weights'"):
        make_pass("dequantize-at-load", {"max_weights": -1})
