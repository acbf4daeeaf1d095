"""graphpress::qlinear / qconv2d / wlinear_nbits: eager numbers vs the dequantize-then-compute
reference, fake kernels, and the ONNX lowerings in ONNX Runtime (fused integer kernels, outputs,
file sizes, the check's SQNR floor)."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphpress.ir  # noqa: F401 -- registers the ops
from graphpress.errors import BackendError
from graphpress.ir import quant as Q
from graphpress.ir.graph import Graph
from graphpress.ir.ops_quant import quantizes_activations

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx

OPS = torch.ops.graphpress


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _static_linear(out_f=24, in_f=40, relu=False, out_q=True):
    w = torch.randn(out_f, in_f) / in_f**0.5
    b = torch.randn(out_f)
    q, s = Q.symmetric_per_channel(w)
    a = Q.act_params(-3.0, 3.0)
    bq = torch.round(b / (torch.tensor(a.scale) * s)).to(torch.int32)
    o = Q.act_params(0.0 if relu else -4.0, 4.0) if out_q else Q.ActQuant(0.0, 0)
    return q, s, bq, a, o


# ---------------------------------------------------------------------------- eager numbers
def test_qlinear_static_matches_reference():
    q, s, bq, a, o = _static_linear(relu=True)
    x = torch.randn(2, 5, 40) * 1.5
    y = OPS.qlinear(x, q, s, bq, a.scale, a.zero_point, o.scale, o.zero_point, True)
    xh = Q.fake_quant_act(x, a.scale, a.zero_point)
    ref = F.linear(xh, Q.dequantize_per_channel(q, s), bq.float() * (a.scale * s)).relu()
    ref = Q.fake_quant_act(ref, o.scale, o.zero_point)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert y.shape == (2, 5, 24) and float(y.min()) >= 0.0
    # every output value is on the output grid
    codes = y / o.scale + o.zero_point
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)


def test_qlinear_dynamic_matches_reference():
    w = torch.randn(16, 32)
    b = torch.randn(16)
    q, s = Q.symmetric_per_channel(w)
    x = torch.randn(7, 32)
    y = OPS.qlinear(x, q, s, b, 0.0, 0, 0.0, 0, False)
    ref = F.linear(Q.fake_quant_act_dynamic(x), Q.dequantize_per_channel(q, s), b)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert Q.sqnr_db(x @ w.t() + b, y) > 30


def test_qconv2d_matches_reference():
    w = torch.randn(8, 4, 3, 3) / 6
    b = torch.randn(8)
    q, s = Q.symmetric_per_channel(w)
    a, o = Q.act_params(-3, 3), Q.act_params(0, 4)
    bq = torch.round(b / (a.scale * s)).to(torch.int32)
    x = torch.randn(2, 4, 9, 9)
    y = OPS.qconv2d(x, q, s, bq, [2, 2], [1, 1], [1, 1], 1, a.scale, a.zero_point, o.scale, o.zero_point, True)
    ref = F.conv2d(Q.fake_quant_act(x, a.scale, a.zero_point), Q.dequantize_per_channel(q, s), bq.float() * (a.scale * s), 2, 1).relu()
    torch.testing.assert_close(y, Q.fake_quant_act(ref, o.scale, o.zero_point), rtol=0, atol=1e-6)
    assert y.shape == (2, 8, 5, 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_wlinear_nbits_matches_dequantized_product(bits):
    w, b = torch.randn(12, 70), torch.randn(12)
    nb = Q.to_nbits(Q.groupwise(w, bits, 32))
    x = torch.randn(3, 70)
    y = OPS.wlinear_nbits(x, nb.packed, nb.scales, nb.zeros, b, 70, nb.bits, 32, 0)
    wh = Q.groupwise(w, bits, 32).dequantize()
    torch.testing.assert_close(y, x @ wh.t() + b, rtol=1e-5, atol=1e-5)
    y8 = OPS.wlinear_nbits(x, nb.packed, nb.scales, nb.zeros, b, 70, nb.bits, 32, 8)
    torch.testing.assert_close(y8, Q.fake_quant_act_blockwise(x, 32) @ wh.t() + b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y8, y, rtol=0, atol=1e-6)  # the int8 activations do change the numbers


def test_ops_reject_bad_inputs():
    q, s, bq, a, _o = _static_linear()
    x = torch.randn(3, 40)
    with pytest.raises(RuntimeError, match="bias must be torch.int32"):
        OPS.qlinear(x, q, s, bq.float(), a.scale, a.zero_point, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="does not match w_q"):
        OPS.qlinear(torch.randn(3, 41), q, s, bq, a.scale, a.zero_point, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="needs out_scale=0"):
        OPS.qlinear(x, q, s, None, 0.0, 0, 0.1, 0, False)
    with pytest.raises(RuntimeError, match="static input and output"):
        OPS.qconv2d(torch.randn(1, 4, 5, 5), torch.zeros(8, 4, 3, 3, dtype=torch.int8), torch.ones(8), None, [1, 1], [1, 1], [1, 1], 1, 0.1, 0, 0.0, 0, False)
    nb = Q.to_nbits(Q.groupwise(torch.randn(4, 64), 4, 32))
    with pytest.raises(RuntimeError, match="does not hold 70 inputs"):
        OPS.wlinear_nbits(torch.randn(2, 70), nb.packed, nb.scales, nb.zeros, None, 70, 4, 32, 0)


def test_fake_kernels_under_torch_export_dynamic_batch():
    q, s, bq, a, o = _static_linear()

    class M(torch.nn.Module):
        def forward(self, x):
            return OPS.qlinear(x, q, s, bq, a.scale, a.zero_point, o.scale, o.zero_point, False)

    ep = torch.export.export(M(), (torch.randn(3, 40),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in nodes] == ["graphpress.qlinear.default"]
    assert ep.module()(torch.randn(5, 40)).shape == (5, 24)


# ---------------------------------------------------------------------------- ONNX Runtime
class QuantNet(torch.nn.Module):
    """conv (static int8, relu fused) -> flatten -> linear (static int8) -> relu -> linear (4-bit groups)."""

    def __init__(self, act_bits: int = 0, dynamic: bool = False):
        super().__init__()
        conv, fc1, fc2 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Linear(16 * 8 * 8, 256), torch.nn.Linear(256, 10)
        self.act_bits, self.dynamic = act_bits, dynamic
        x = torch.randn(16, 3, 8, 8)
        with torch.no_grad():
            y = conv(x).relu()
            h = fc1(y.flatten(1)).relu()
        self.a, self.o = Q.act_params(float(x.min()), float(x.max())), Q.act_params(0.0, float(y.max()))
        self.oh = Q.act_params(0.0, float(h.max()))
        cq, cs = Q.symmetric_per_channel(conv.weight)
        lq, ls = Q.symmetric_per_channel(fc1.weight)
        nb = Q.to_nbits(Q.groupwise(fc2.weight, 4, 32))
        lb = fc1.bias.detach().clone() if dynamic else torch.round(fc1.bias / (self.o.scale * ls)).to(torch.int32)
        tensors = {"cq": cq, "cs": cs, "cb": torch.round(conv.bias / (self.a.scale * cs)).to(torch.int32), "lq": lq, "ls": ls, "lb": lb,
                   "p": nb.packed, "ps": nb.scales, "pz": nb.zeros, "pb": fc2.bias.detach().clone()}
        for name, t in tensors.items():
            self.register_buffer(name, t)

    def forward(self, x):
        y = OPS.qconv2d(x, self.cq, self.cs, self.cb, [1, 1], [1, 1], [1, 1], 1, self.a.scale, self.a.zero_point, self.o.scale, self.o.zero_point, True)
        if self.dynamic:
            h = OPS.qlinear(y.flatten(1), self.lq, self.ls, self.lb, 0.0, 0, 0.0, 0, True)
        else:
            h = OPS.qlinear(y.flatten(1), self.lq, self.ls, self.lb, self.o.scale, self.o.zero_point, self.oh.scale, self.oh.zero_point, True)
        return OPS.wlinear_nbits(h, self.p, self.ps, self.pz, self.pb, 256, 4, 32, self.act_bits)


def _optimized_ops(path: Path) -> collections.Counter:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_name("optimized.onnx"))
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(path.with_name("optimized.onnx"))).graph.node)


@pytest.mark.parametrize("act_bits,dynamic", [(0, False), (8, False), (8, True)], ids=["static+weight-only", "static+int8-block", "dynamic"])
def test_onnx_lowering_runs_integer_kernels_and_matches_eager(tmp_path, act_bits, dynamic):
    net = QuantNet(act_bits=act_bits, dynamic=dynamic).eval()
    graph = Graph.capture(net, (torch.randn(4, 3, 8, 8),))
    lower_to_onnx(graph, tmp_path)
    path = tmp_path / "model.onnx"
    model = onnx.load(str(path))
    init = {i.name: i for i in model.graph.initializer}
    nbytes = collections.Counter()
    for i in init.values():
        nbytes[onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name] += int(np.prod(i.dims)) * onnx.helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
    int8_sizes = [int(np.prod(i.dims)) for i in init.values() if i.data_type == onnx.TensorProto.INT8]
    assert max(int8_sizes) == 256 * 1024 and init["p"].data_type == onnx.TensorProto.UINT8
    assert nbytes["float32"] < 0.05 * sum(nbytes.values())  # only scales and small biases stay float
    ops = _optimized_ops(path)
    assert ops["QLinearConv"] == 1 and ops["MatMulNBits"] == 1 and ops["Conv"] == 0
    assert ops["DynamicQuantizeMatMul" if dynamic else "QGemm"] == 1
    nb = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in nb.attribute}["accuracy_level"] == (4 if act_bits else 0)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        want = net(x)
        # equal up to float rounding, except a rare value moved one grid step by a rounding tie
        assert float((got - want).abs().median()) < 1e-5 and Q.sqnr_db(want, got) > 50
    assert quantizes_activations(graph.gm)
    report = check_onnx(graph, path)
    assert report["passed"] and "SQNR >= 15" in report["tolerance"]


def test_onnx_file_is_smaller_than_fp32(tmp_path):
    big = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)).eval()
    w1, w2 = big[0].weight, big[2].weight
    q1, s1 = Q.symmetric_per_channel(w1)
    a = Q.act_params(-4, 4)
    nb = Q.to_nbits(Q.groupwise(w2, 4, 32))

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("q1", q1)
            self.register_buffer("s1", s1)
            self.register_buffer("b1", torch.round(big[0].bias / (a.scale * s1)).to(torch.int32))
            for n, t in {"p": nb.packed, "ps": nb.scales, "pz": nb.zeros, "b2": big[2].bias.detach().clone()}.items():
                self.register_buffer(n, t)

        def forward(self, x):
            h = OPS.qlinear(x, self.q1, self.s1, self.b1, a.scale, a.zero_point, 0.0, 0, False).relu()
            return OPS.wlinear_nbits(h, self.p, self.ps, self.pz, self.b2, 512, 4, 32, 0)

    x = torch.randn(2, 512)
    fp32 = lower_to_onnx(Graph.capture(big, (x,)), tmp_path / "fp32")["model_bytes"]
    small = lower_to_onnx(Graph.capture(Small().eval(), (x,)), tmp_path / "q")["model_bytes"]
    weights_fp32 = 4 * 2 * 512 * 512
    assert fp32 >= weights_fp32
    # int8 layer: 1 byte + 4/512 per weight; int4 layer: 0.5 + (4 + 0.5) / 32 bytes per weight
    expected = Q.weight_bytes(512, 512, 8, None) + Q.weight_bytes(512, 512, 4, 32) + 2 * 4 * 512
    assert expected <= small < expected + 16_384, (small, expected)
    assert small < 0.22 * fp32  # (1 + 0.64) / 8 of the float weights


def test_check_catches_a_broken_lowering(tmp_path):
    net = QuantNet().eval()
    graph = Graph.capture(net, (torch.randn(4, 3, 8, 8),))
    lower_to_onnx(graph, tmp_path)
    path = tmp_path / "model.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name.endswith("ps") or init.name == "ps":  # the 4-bit layer's group scales
            arr = onnx.numpy_helper.to_array(init) * 3.0
            init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
            break
    else:
        pytest.fail("scales initializer not found")
    onnx.save(model, str(path))
    with pytest.raises(BackendError, match="differs from torch"):
        check_onnx(graph, path)


def test_quantize_act_is_the_activation_grid_and_rejects_bad_grids():
    x = torch.randn(4, 7) * 3
    y = OPS.quantize_act(x, 0.05, 128)
    assert torch.equal(y, Q.fake_quant_act(x, 0.05, 128))
    assert torch.equal(OPS.quantize_act(y, 0.05, 128), y)  # requantizing on the same grid is exact
    with pytest.raises(RuntimeError, match="in_zero_point must be a uint8 value"):
        OPS.quantize_act(x, 0.05, 300)
    with pytest.raises(RuntimeError, match="scale must be > 0"):
        OPS.quantize_act(x, 0.0, 0)


def test_wlinear_nbits_in_row_chunks_equals_one_piece(monkeypatch):
    import graphpress.ir.ops_quant as oq
    from graphpress.ir.quant import groupwise, to_nbits

    gen = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(300, 96, generator=gen), torch.randn(5, 96, generator=gen), torch.randn(300, generator=gen)
    for bits in (4, 8):
        nb = to_nbits(groupwise(w, bits, 32))
        whole = torch.ops.graphpress.wlinear_nbits(x, nb.packed, nb.scales, nb.zeros, b, 96, nb.bits, 32, 0)
        monkeypatch.setattr(oq, "DEQUANT_CHUNK_BYTES", 4 * 96 * 64)  # 64 rows a chunk: 5 chunks, the last partial
        chunked = torch.ops.graphpress.wlinear_nbits(x, nb.packed, nb.scales, nb.zeros, b, 96, nb.bits, 32, 0)
        monkeypatch.undo()
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


def test_groupwise_in_row_chunks_equals_one_piece(monkeypatch):
    import graphpress.ir.quant as q

    w = torch.randn(700, 100, generator=torch.Generator().manual_seed(1))
    for symmetric in (False, True):
        whole = q.groupwise(w, 4, 32, symmetric=symmetric)
        monkeypatch.setattr(q, "GROUPWISE_CHUNK", 128 * 10)
        part = q.groupwise(w, 4, 32, symmetric=symmetric)
        monkeypatch.undo()
        assert torch.equal(whole.q, part.q) and torch.equal(whole.scale, part.scale) and torch.equal(whole.zero, part.zero)
