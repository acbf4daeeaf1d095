"""graphpress::sparse_unpack: the bitmask + values storage format (round trips, bit order, sizes,
errors), the eager cache, the fake kernel under torch.export, and the ONNX lowering (packed bytes
in the file, rebuilt by ONNX Runtime at session creation, same numbers as eager)."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.ir  # noqa: F401 -- registers the ops
from graphpress.ir.graph import Graph
from graphpress.ir.ops_sparse_store import pack_sparse, packed_bytes, unpack_sparse

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx  # noqa: E402

OPS = torch.ops.graphpress
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _pruned(shape, zero_fraction=0.5, dtype=torch.float32):
    w = torch.randn(shape).to(dtype)
    return w * (torch.rand(shape) >= zero_fraction).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 7), (5,), (1, 1), (3, 4, 5, 6), (17, 3, 3, 3), (8, 8)])
def test_pack_unpack_round_trip_is_exact(dtype, shape):
    w = _pruned(shape, 0.5, dtype)
    bitmask, values = pack_sparse(w)
    n, kept = w.numel(), int((w != 0).sum())
    assert bitmask.dtype == torch.uint8 and tuple(bitmask.shape) == (math.ceil(n / 8),)
    assert values.dtype == dtype and tuple(values.shape) == (kept,)
    assert torch.equal(values, w.reshape(-1)[w.reshape(-1) != 0])
    assert bitmask.numel() + values.numel() * values.element_size() == packed_bytes(n, kept, w.element_size())
    got = unpack_sparse(bitmask, values, list(shape))
    assert got.dtype == dtype and got.shape == w.shape and torch.equal(got, w)
    assert torch.equal(OPS.sparse_unpack(bitmask, values, list(shape)), w)


@pytest.mark.parametrize("fill", ["zeros", "dense"])
def test_all_zero_and_no_zero_tensors(fill):
    w = torch.zeros(11, 3) if fill == "zeros" else torch.rand(11, 3) + 0.5
    bitmask, values = pack_sparse(w)
    assert values.numel() == (0 if fill == "zeros" else 33)
    # 33 elements: four full bytes and one with a single valid bit; the padding bits stay 0
    assert bitmask.tolist() == ([0] * 5 if fill == "zeros" else [255] * 4 + [1])
    assert torch.equal(OPS.sparse_unpack(bitmask, values, [11, 3]), w)


def test_bit_order_is_row_major_least_significant_bit_first_and_negative_zero_is_a_zero():
    w = torch.tensor([[1.0, 0, 0, -0.0, 0, 0, 0, 0, 0], [2.0, 0, 0, 0, 0, 0, 0, 0, -3.0]])
    bitmask, values = pack_sparse(w)
    # flat indices 0, 9 and 17 are kept: byte 0 bit 0, byte 1 bit 1, byte 2 bit 1
    assert bitmask.tolist() == [0b1, 0b10, 0b10]
    assert values.tolist() == [1.0, 2.0, -3.0]
    back = unpack_sparse(bitmask, values, [2, 9])
    assert torch.equal(back, w) and not torch.signbit(back[0, 3])  # -0.0 comes back as +0.0


def test_bad_inputs_are_one_line_errors():
    bitmask, values = pack_sparse(_pruned((6, 5)))
    with pytest.raises(RuntimeError, match=r"bitmask must be uint8 \(5,\) for shape \[6, 6\]"):
        OPS.sparse_unpack(bitmask, values, [6, 6])
    with pytest.raises(RuntimeError, match="bitmask sets .* bits but values holds"):
        OPS.sparse_unpack(bitmask, values[:-1], [6, 5])
    with pytest.raises(RuntimeError, match="values must be a 1-D float32/float16/bfloat16"):
        OPS.sparse_unpack(bitmask, values.double(), [6, 5])
    with pytest.raises(ValueError, match="pack_sparse: weights must be float32"):
        pack_sparse(torch.ones(3, dtype=torch.int32))


def test_eager_result_is_cached_per_stored_tensor_and_rebuilt_after_a_write():
    w = _pruned((64, 32))
    bitmask, values = pack_sparse(w)
    first = OPS.sparse_unpack(bitmask, values, [64, 32])
    assert OPS.sparse_unpack(bitmask, values, [64, 32]) is first  # built once, not per call
    values.mul_(2)  # bumps the version counter: the cached weight is stale
    again = OPS.sparse_unpack(bitmask, values, [64, 32])
    assert again is not first and torch.equal(again, 2 * w)


def test_a_weight_first_built_under_inference_mode_serves_later_autograd_calls():
    w = _pruned((16, 8))
    bitmask, values = pack_sparse(w)
    with torch.inference_mode():
        first = OPS.sparse_unpack(bitmask, values, [16, 8])
    assert not first.is_inference()
    x = torch.randn(3, 8, requires_grad=True)
    F.linear(x, OPS.sparse_unpack(bitmask, values, [16, 8])).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 8))


class Stored(nn.Module):
    """``F.linear`` on a weight held as bitmask + values buffers."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.shape = list(w.shape)
        bitmask, values = pack_sparse(w)
        self.register_buffer("bitmask", bitmask)
        self.register_buffer("values", values)

    def forward(self, x):
        return F.linear(x, OPS.sparse_unpack(self.bitmask, self.values, self.shape).float())


def test_fake_kernel_under_torch_export():
    w = _pruned((21, 13), 0.6, torch.float16)
    m = Stored(w).eval()
    ep = torch.export.export(m, (torch.randn(4, 13),))
    (node,) = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == OPS.sparse_unpack.default]
    assert tuple(node.meta["val"].shape) == (21, 13) and node.meta["val"].dtype == torch.float16
    x = torch.randn(4, 13)
    torch.testing.assert_close(ep.module()(x), F.linear(x, w.float()), rtol=0, atol=0)


def _optimized_ops(path, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (37, 29)), (torch.float16, (24, 40)), (torch.bfloat16, (19, 11))])
def test_onnx_keeps_the_packed_bytes_and_ort_rebuilds_the_same_weight_at_load(tmp_path, dtype, shape):
    w = _pruned(shape, 0.5, dtype)
    g = Graph.capture(Stored(w).eval(), (torch.randn(3, shape[1]),))
    lower_to_onnx(g, tmp_path)
    report = check_onnx(g, tmp_path / "model.onnx")
    assert report["passed"] and report["worst"]["max_abs"] < 1e-4
    model = onnx.load(str(tmp_path / "model.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    mask = max((a for a in inits.values() if a.dtype == np.uint8), key=lambda a: a.size)
    assert mask.shape == (math.ceil(w.numel() / 8),)  # the bitmask is in the file, packed
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    assert sum(math.prod(t.dims) for t in floats) == int((w != 0).sum()) + 1  # the kept values and the zero: no dense weight
    ops = _optimized_ops(tmp_path / "model.onnx", tmp_path)
    assert not {"BitShift", "CumSum", "Gather", "Concat"} & set(ops)  # unpacked by constant folding at load
    x = torch.randn(5, shape[1])
    got = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {g.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, F.linear(x, w.float()).numpy(), rtol=1e-5, atol=1e-5)
