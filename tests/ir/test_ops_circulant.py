"""graphpress::circulant_linear / circulant_conv2d: numbers vs dense references, both execution
paths, autograd, fake kernels under torch.export, and ONNX lowerings in ONNX Runtime."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphpress.ir  # noqa: F401 -- registers the ops
from graphpress.ir import ops_circulant as oc
from graphpress.ir.circulant import expand
from graphpress.lowering.onnx import circulant as onnx_circulant
from graphpress.lowering.onnx import translation_table

LINEAR = torch.ops.graphpress.circulant_linear
CONV = torch.ops.graphpress.circulant_conv2d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def dense_linear(x, c, bias=None):
    """Reference in float64: ``x @ expand(c).T + bias``."""
    y = x.double() @ expand(c.double()).T
    return y + bias.double() if bias is not None else y


def dense_conv_weight(c: torch.Tensor) -> torch.Tensor:
    """``(C_out, C_in, kh, kw)`` built entry by entry from the definition W[i*b+r, j*b+s] = c[i, j, (r-s) mod b]."""
    kh, kw, p, q, b = c.shape
    w = torch.empty(p * b, q * b, kh, kw, dtype=c.dtype)
    for i in range(p):
        for j in range(q):
            for r in range(b):
                for s in range(b):
                    w[i * b + r, j * b + s] = c[:, :, i, j, (r - s) % b]
    return w


# ---------------------------------------------------------------------------- linear numbers
@pytest.mark.parametrize("pqb", [(3, 5, 4), (64, 64, 16), (128, 64, 8)], ids=["dense-path", "fft-1024", "fft-split-shape"])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_matches_dense_reference(pqb, lead, with_bias):
    p, q, b = pqb
    c = torch.randn(p, q, b) / (q * b) ** 0.5
    x = torch.randn(*lead, q * b)
    bias = torch.randn(p * b) if with_bias else None
    y = LINEAR(x, c, bias)
    assert y.shape == (*lead, p * b) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), dense_linear(x, c, bias), rtol=1e-4, atol=1e-5)


def test_path_rule_and_fft_equals_dense_path():
    assert oc.use_dense_path(256, 256, 2) and oc.use_dense_path(32, 32, 16)  # b <= 2; 512 x 512
    assert not oc.use_dense_path(64, 64, 16) and not oc.use_dense_path(256, 256, 4)  # 1024 x 1024
    assert oc.use_dense_path(64, 64, 16, torch.bfloat16)
    c = torch.randn(64, 64, 16) / 32
    bias = torch.randn(1024)
    for rows in (1, 64):  # 64 rows cross SPLIT_REAL_MIN_WORK: the real frequencies run apart
        x = torch.randn(rows, 1024)
        fft = LINEAR(x, c, bias)
        dense = oc.circulant_linear_reference(x, c, bias, path="dense")
        ref_fft = oc.circulant_linear_reference(x, c, bias, path="fft")
        torch.testing.assert_close(fft, dense, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ref_fft, dense, rtol=1e-4, atol=1e-5)
    assert 64 * 64 * 64 * 9 >= oc.SPLIT_REAL_MIN_WORK > 64 * 64 * 9


def test_float64_and_split_path_at_b4():
    c = torch.randn(256, 256, 4, dtype=torch.float64) / 32
    x = torch.randn(16, 1024, dtype=torch.float64)  # 16 * 256 * 256 * 3 >= SPLIT_REAL_MIN_WORK
    y = LINEAR(x, c, None)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, dense_linear(x, c), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------- spectrum cache
def test_cached_spectrum_follows_inplace_updates_and_is_released():
    oc.clear_cache()
    c = torch.randn(64, 64, 16) / 32
    x = torch.randn(2, 1024)
    LINEAR(x, c, None)
    assert len(oc._CACHE) == 1
    with torch.no_grad():
        c.mul_(-2.0)  # bumps the version counter: the cached spectrum is stale
    torch.testing.assert_close(LINEAR(x, c, None).double(), dense_linear(x, c), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():  # cached weights are usable under inference mode
        torch.testing.assert_close(LINEAR(x, c, None).double(), dense_linear(x, c), rtol=1e-4, atol=1e-5)
    del c
    assert len(oc._CACHE) == 0
    trained = torch.randn(64, 64, 16, requires_grad=True)
    LINEAR(x, trained, None)
    assert len(oc._CACHE) == 0  # weights that require grad are never cached


# ---------------------------------------------------------------------------- conv numbers
@pytest.mark.parametrize(
    "stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (1, 1)), ((1, 2), (2, 1), (2, 1))], ids=["same", "strided", "dilated"]
)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_conv2d_matches_dense_reference(stride, padding, dilation, with_bias):
    c = torch.randn(3, 3, 2, 3, 4) / 6
    x = torch.randn(2, 12, 9, 8)
    bias = torch.randn(8) if with_bias else None
    w = dense_conv_weight(c)
    torch.testing.assert_close(oc.conv_weight(c), w)
    y = CONV(x, c, bias, list(stride), list(padding), list(dilation))
    ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), stride, padding, dilation)
    assert y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)


def test_shape_errors_are_one_line():
    with pytest.raises(RuntimeError, match="does not match c"):
        LINEAR(torch.randn(2, 10), torch.randn(2, 3, 4), None)
    with pytest.raises(RuntimeError, match="bias"):
        CONV(torch.randn(1, 8, 4, 4), torch.randn(1, 1, 2, 2, 4), torch.randn(3), [1, 1], [0, 0], [1, 1])


# ---------------------------------------------------------------------------- autograd
def test_gradcheck_linear_both_paths(monkeypatch):
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert oc.use_dense_path(2, 2, 4)
    assert torch.autograd.gradcheck(LINEAR, (x, c, bias))
    monkeypatch.setattr(oc, "DENSE_MAX_WEIGHTS", 0)  # same sizes through the FFT path
    assert not oc.use_dense_path(2, 2, 4)
    assert torch.autograd.gradcheck(LINEAR, (x, c, bias))
    assert torch.autograd.gradcheck(LINEAR, (x, c, None))


def test_gradcheck_conv2d():
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 2, 1, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w, bb: CONV(a, w, bb, [2, 1], [1, 0], [1, 2]), (x, c, bias))


def test_training_gradients_match_dense_autograd():
    """What fine-tuning relies on: grads of c and bias through the op equal those of the dense form."""
    c = (torch.randn(64, 64, 16) / 32).requires_grad_()
    bias = torch.randn(1024).requires_grad_()
    x = torch.randn(8, 1024)
    target = torch.randn(8, 1024)
    F.mse_loss(LINEAR(x, c, bias), target).backward()
    c2, b2 = c.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.mse_loss(F.linear(x, expand(c2), b2), target).backward()
    torch.testing.assert_close(c.grad, c2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-4, atol=1e-6)


def test_opcheck_schema_and_fake():
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(LINEAR.default, (torch.randn(3, 1024), torch.randn(64, 64, 16), torch.randn(1024)), test_utils=utils)
    torch.library.opcheck(CONV.default, (torch.randn(2, 8, 5, 5), torch.randn(3, 3, 2, 2, 4), None, [1, 1], [1, 1], [1, 1]), test_utils=utils)


# ---------------------------------------------------------------------------- export and ONNX
class CirculantNet(torch.nn.Module):
    """circulant conv (strided, no bias) -> pooled -> circulant linear (two sizes)."""

    def __init__(self):
        super().__init__()
        self.cc = torch.nn.Parameter(torch.randn(3, 3, 2, 1, 4) / 6, requires_grad=False)
        self.c_small = torch.nn.Parameter(torch.randn(4, 2, 4) / 3, requires_grad=False)  # 16 x 8, dense path
        self.c_big = torch.nn.Parameter(torch.randn(64, 1, 16) / 4, requires_grad=False)  # 1024 x 16
        self.bias = torch.nn.Parameter(torch.randn(1024), requires_grad=False)

    def forward(self, img):
        z = CONV(img, self.cc, None, [2, 2], [1, 1], [1, 1])  # (N, 8, H', W')
        h = LINEAR(z.mean((2, 3)), self.c_small, None)  # (N, 16)
        return LINEAR(h, self.c_big, self.bias)  # (N, 1024)


def _export(module, example):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(module, (example,), dynamic_shapes=({0: batch},))


def test_register_fake_under_torch_export_with_dynamic_batch():
    m = CirculantNet().eval()
    ep = _export(m, torch.randn(3, 4, 9, 9))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(LINEAR.default) == 2 and targets.count(CONV.default) == 1
    out = next(n for n in ep.graph.nodes if n.op == "output").args[0][0].meta["val"]
    assert isinstance(out.shape[0], torch.SymInt) and out.shape[1] == 1024
    for batch in (1, 6):
        x = torch.randn(batch, 4, 9, 9)
        torch.testing.assert_close(ep.module()(x), m(x))


def _to_onnx(ep, path, lowering):
    table = translation_table(circulant_linear=lowering)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, verbose=False)
    program.save(str(path))
    return {n.op_type for n in program.model_proto.graph.node}


@pytest.mark.parametrize("lowering", ["auto", "dft", "dft-matmul"])  # "dense": see the compact-file test
def test_onnx_lowerings_match_torch_with_dynamic_batch(tmp_path, lowering):
    ort = pytest.importorskip("onnxruntime")
    m = CirculantNet().eval()
    ep = _export(m, torch.randn(3, 4, 9, 9))
    ops = _to_onnx(ep, tmp_path / "m.onnx", lowering)
    assert "Conv" in ops and "Gather" in ops  # the conv's dense expansion is in the graph, not in the file
    assert ("DFT" in ops) == (lowering in ("dft", "dft-matmul"))  # the spectrum of c is always a DFT
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        x = torch.randn(batch, 4, 9, 9)
        (out,) = session.run(None, {name: x.numpy()})
        np.testing.assert_allclose(out, m(x).numpy(), rtol=1e-4, atol=1e-4)


def test_auto_lowering_rule():
    assert onnx_circulant.linear_lowering_for(256, 256, 16, "auto") == "dft-matmul"  # 4096^2, b=16
    assert onnx_circulant.linear_lowering_for(1024, 1024, 4, "auto") == "dense"  # b=4: dense measured faster
    assert onnx_circulant.linear_lowering_for(32, 32, 16, "auto") == "dense"  # 512^2: small
    assert onnx_circulant.linear_lowering_for(256, 256, 16, "dft") == "dft"
    with pytest.raises(ValueError, match="lowering"):
        onnx_circulant.linear_lowering_for(4, 4, 4, "fft")


def test_lowering_is_an_option_of_the_table_not_module_state(tmp_path):
    """Two tables with different circulant lowerings coexist; building one changes no other."""
    pytest.importorskip("onnxruntime")
    m = CirculantNet().eval()
    ep = _export(m, torch.randn(3, 4, 9, 9))
    dft = translation_table(circulant_linear="dft")
    dense = translation_table(circulant_linear="dense")
    assert _to_onnx(ep, tmp_path / "auto.onnx", "auto") >= {"Conv", "Gather"}
    # "dft": a DFT of c's spectrum and one of the input blocks per linear (2 linears); "dense": none
    for table, expected_dfts in ((dft, 4), (dense, 0)):
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(ep, dynamo=True, custom_translation_table=table, verbose=False)
        dfts = [n for n in program.model_proto.graph.node if n.op_type == "DFT"]
        assert len(dfts) == expected_dfts, [n.name for n in dfts]
    with pytest.raises(ValueError, match=r"circulant ONNX lowering must be one of .* got 'fft'"):
        translation_table(circulant_linear="fft")


@pytest.mark.parametrize("lowering", ["dense", "dft-matmul"])
def test_onnx_file_stores_compact_weights_and_ort_folds_the_expansion(tmp_path, lowering):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.randn(64, 64, 16) / 32, requires_grad=False)

        def forward(self, x):
            return LINEAR(x, self.c, None)

    m = Big().eval()
    path = tmp_path / "big.onnx"
    _to_onnx(_export(m, torch.randn(2, 1024)), path, lowering)
    dense_bytes = 1024 * 1024 * 4
    size = path.stat().st_size
    assert 64 * 64 * 16 * 4 <= size < dense_bytes / 12, size  # ~16x smaller than the dense weight
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runtime_ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    # the expansion / spectrum of c was constant-folded at session creation
    assert "Gather" not in runtime_ops and "ConstantOfShape" not in runtime_ops
    if lowering == "dense":
        assert runtime_ops == {"MatMul"}
    x = torch.randn(3, 1024)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(out, m(x).numpy(), rtol=1e-4, atol=1e-4)
