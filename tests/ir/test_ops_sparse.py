"""graphpress::sparse_linear / sparse_linear_pc and the C++ kernel behind them: numbers vs the dense
reference (batch 1, 3, 17; odd sizes; all-zero and fully dense inputs; 1 and 2 threads; AVX-512
and portable loops; union and per-row batch modes; bf16 storage), thresholding semantics, the
torch fallback, the batch crossover, bad inputs and build failures, fake kernels under
torch.export, and the ONNX lowering in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphpress.ir  # noqa: F401 -- registers the ops
from graphpress.errors import BackendError
from graphpress.ir import sparse_kernel as sk
from graphpress.ir.graph import Graph

OPS = torch.ops.graphpress


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def kernel():
    try:
        return sk.load_kernel()
    except BackendError as err:  # pragma: no cover -- machines without a C++ toolchain
        pytest.skip(str(err))


def _layer(n_in: int, n_out: int):
    w = torch.randn(n_out, n_in) / n_in**0.5
    return w, w.t().contiguous(), torch.randn(n_out)


def _sparse(shape, sparsity: float) -> torch.Tensor:
    x = torch.randn(*shape)
    return torch.where(torch.rand(*shape) < sparsity, 0.0, x)


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- kernel numbers
@pytest.mark.parametrize("n_in,n_out", [(37, 53), (300, 1000)])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_kernel_matches_dense_reference(kernel, n_in, n_out, batch):
    w, wt, b = _layer(n_in, n_out)
    x = _sparse((batch, n_in), 0.5)
    ref = F.linear(x, w, b)
    for mode in sk.BATCH_MODES:
        for simd in (True, False):
            for threads in (1, 2):
                y = sk.sparse_linear(x, wt, b, dense_above_batch=None, num_threads=threads, batch_mode=mode, simd=simd, backend="kernel")
                _close(y, ref)
    assert kernel.AVX512 in (True, False)


def test_kernel_all_zero_and_fully_dense_inputs(kernel):
    w, wt, b = _layer(37, 53)
    zero = torch.zeros(3, 37)
    y = sk.sparse_linear(zero, wt, b, dense_above_batch=None, backend="kernel")
    assert torch.equal(y, b.expand(3, 53))  # no row read: exactly the bias
    assert torch.equal(sk.sparse_linear(zero[:1], wt, None, backend="kernel"), torch.zeros(1, 53))
    dense = torch.randn(17, 37)
    assert bool((dense != 0).all())
    _close(sk.sparse_linear(dense, wt, b, dense_above_batch=None, backend="kernel"), F.linear(dense, w, b))


def test_kernel_large_layer_sparsities_and_leading_dims(kernel):
    w, wt, b = _layer(1024, 1024)
    for sparsity in (0.0, 0.4, 0.7, 0.9, 0.999):
        x = _sparse((1, 1024), sparsity)
        _close(sk.sparse_linear(x, wt, b, backend="kernel"), F.linear(x, w, b))
    x3 = _sparse((2, 3, 1024), 0.5)  # leading dims flatten to a batch of 6
    y = sk.sparse_linear(x3, wt, b, dense_above_batch=None, backend="kernel")
    assert y.shape == (2, 3, 1024)
    _close(y, F.linear(x3, w, b))


def test_bf16_storage_matches_its_rounded_weights(kernel):
    w, wt, b = _layer(300, 1000)
    x = _sparse((1, 300), 0.5)
    wt16 = wt.bfloat16()
    y16 = sk.sparse_linear(x, wt16, b, backend="kernel")
    # exact w.r.t. the bf16-rounded weights (accumulation in fp32) ...
    _close(y16, F.linear(x, wt16.float().t(), b))
    _close(sk.sparse_linear(x, wt16, b, simd=False, backend="kernel"), y16)
    # ... and within bf16's rounding of the fp32 layer, but not equal to it
    y32 = F.linear(x, w, b)
    rel = float((y16 - y32).norm() / y32.norm())
    assert 1e-5 < rel < 1e-2, rel


# ---------------------------------------------------------------------------- semantics
def test_threshold_drops_small_entries_ties_and_nan(kernel):
    w, wt, b = _layer(37, 53)
    x = torch.randn(3, 37)
    x[0, :4] = torch.tensor([0.5, -0.5, 0.5000001, -0.4999999])  # ties are dropped (strict >)
    x[1, 5] = float("nan")  # dropped, as ONNX Where(Abs(x) > t, x, 0) does
    keep = (x.abs() > 0.5) & ~x.isnan()
    ref = F.linear(torch.where(keep, x, 0.0), w, b)
    for backend in ("kernel", "torch"):
        y = sk.sparse_linear(x, wt, b, threshold=0.5, dense_above_batch=None, backend=backend)
        _close(y, ref)
        assert bool(y.isfinite().all())
    assert keep[0, :4].tolist() == [False, False, True, False]
    # the threshold does change the numbers: not the unthresholded product
    x_clean = torch.nan_to_num(x)
    assert not torch.allclose(sk.sparse_linear(x_clean, wt, b, threshold=0.5, backend="kernel"),
                              sk.sparse_linear(x_clean, wt, b, backend="kernel"), atol=1e-3)


def test_per_channel_thresholds_and_wina_scores(kernel):
    w, wt, b = _layer(37, 53)
    x = torch.randn(5, 37)
    thresholds = torch.rand(37)
    scores = w.norm(dim=0)  # WINA: |x_i| * ||W[:, i]||
    for sc in (None, scores):
        a = x.abs() if sc is None else x.abs() * sc
        ref = F.linear(torch.where(a > thresholds, x, 0.0), w, b)
        y = sk.sparse_linear(x, wt, b, thresholds=thresholds, scores=sc, dense_above_batch=None, backend="kernel")
        _close(y, ref)
        _close(OPS.sparse_linear_pc(x, wt, b, thresholds, sc), ref)
    # scores move the decision: some entry kept by one rule is dropped by the other
    assert not torch.equal(x.abs() > thresholds, x.abs() * scores > thresholds)


def test_fallback_equals_kernel(kernel):
    _, wt, b = _layer(300, 1000)
    x = _sparse((3, 300), 0.6)
    thresholds, scores = torch.rand(300) * 0.5, torch.rand(300) + 0.5
    for kw in ({}, {"threshold": 0.3}, {"thresholds": thresholds, "scores": scores}):
        for weight in (wt, wt.bfloat16()):
            got = sk.sparse_linear(x, weight, b, dense_above_batch=None, backend="kernel", **kw)
            _close(got, sk.sparse_linear(x, weight, b, backend="torch", **kw))
            _close(got, sk.sparse_linear_torch(x, weight, b, **kw))
    # float16 input: computed in float32, returned in float16
    y16 = sk.sparse_linear(x.half(), wt, b, backend="kernel")
    assert y16.dtype == torch.float16
    _close(y16.float(), sk.sparse_linear_torch(x.half().float(), wt, b), tol=2e-2)


def test_batch_crossover_picks_dense_above_it(kernel):
    one = torch.randn(1, 8)
    many = torch.randn(sk.DENSE_ABOVE_BATCH + 1, 8)
    assert sk.choose_path(one) == "kernel"
    assert sk.choose_path(many) == "dense"
    assert sk.choose_path(many, dense_above_batch=None) == "kernel"
    assert sk.choose_path(torch.randn(2, sk.DENSE_ABOVE_BATCH, 8)) == "dense"  # leading dims multiply
    assert sk.choose_path(one, backend="torch") == "dense"
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.choose_path(one, backend="cuda")
    # both sides of the crossover give the same numbers
    w, wt, b = _layer(8, 24)
    _close(sk.sparse_linear(many, wt, b), F.linear(many, w, b))


def test_bad_inputs_are_refused_with_one_line():
    w, wt, b = _layer(37, 53)
    x = torch.randn(2, 37)
    cases = [
        (lambda: OPS.sparse_linear(torch.randn(2, 38), wt, b, 0.0), "has 38 features but wt"),
        (lambda: OPS.sparse_linear(x, w.t(), b, 0.0), "must be contiguous; store W.t\\(\\).contiguous\\(\\)"),
        (lambda: OPS.sparse_linear(x, wt, torch.randn(37), 0.0), "bias \\(37,\\) is not \\(53,\\)"),
        (lambda: OPS.sparse_linear(x, wt, b, -0.1), "threshold must be a finite number >= 0"),
        (lambda: OPS.sparse_linear(x.long(), wt, b, 0.0), "x must be a floating tensor"),
        (lambda: OPS.sparse_linear(x, wt.half(), b, 0.0), "float32 or bfloat16"),
        (lambda: OPS.sparse_linear_pc(x, wt, b, torch.rand(53), None), "thresholds \\(53,\\) is not \\(37,\\)"),
        (lambda: OPS.sparse_linear_pc(x, wt, b, torch.rand(37), torch.rand(3)), "scores \\(3,\\) is not \\(37,\\)"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_failed_build_raises_one_line_backend_error(tmp_path):
    src = tmp_path / "broken_kernel.cpp"
    src.write_text("#error graphpress test: this kernel does not compile\nint main() {}\n")
    with pytest.raises(BackendError, match=r"building broken_kernel.cpp failed: .*error: #error graphpress test") as info:
        sk.build(src, name="graphpress_sparse_kernel_broken", build_directory=str(tmp_path))
    assert "\n" not in str(info.value)


def test_build_prints_nothing(capfd):
    sk.build()  # compiles on a fresh machine, else loads the cached build: silent either way
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ---------------------------------------------------------------------------- export and ONNX
class SparseMLP(torch.nn.Module):
    """TEAL-style threshold on the first layer, CHESS/WINA per-channel rule on the second."""

    def __init__(self, bf16: bool = False):
        super().__init__()
        _, wt1, b1 = _layer(37, 53)
        w2, wt2, _ = _layer(53, 29)
        dtype = torch.bfloat16 if bf16 else torch.float32
        self.register_buffer("wt1", wt1.to(dtype))
        self.register_buffer("b1", b1)
        self.register_buffer("wt2", wt2.to(dtype))
        self.register_buffer("t2", torch.rand(53) * 0.3)
        self.register_buffer("s2", w2.norm(dim=0))

    def forward(self, x):
        h = OPS.sparse_linear(x, self.wt1, self.b1, 0.4).relu()
        return OPS.sparse_linear_pc(h, self.wt2, None, self.t2, self.s2)

    def reference(self, x):
        w1, w2 = self.wt1.float(), self.wt2.float()
        h = (torch.where(x.abs() > 0.4, x, 0.0) @ w1 + self.b1).relu()
        return torch.where(h.abs() * self.s2 > self.t2, h, 0.0) @ w2


def test_fake_kernels_under_torch_export_dynamic_batch():
    net = SparseMLP().eval()
    ep = torch.export.export(net, (torch.randn(3, 37),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["graphpress.sparse_linear.default", "aten.relu.default", "graphpress.sparse_linear_pc.default"]
    x = torch.randn(5, 37)
    y = ep.module()(x)
    assert y.shape == (5, 29)
    _close(y, net.reference(x))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_onnx_lowering_matches_eager(tmp_path, bf16):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx

    net = SparseMLP(bf16=bf16).eval()
    graph = Graph.capture(net, (torch.randn(4, 37),))
    lower_to_onnx(graph, tmp_path)
    path = tmp_path / "model.onnx"
    import onnx

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Where") == 2 and ops.count("Greater") == 2 and ops.count("MatMul") == 2 and "Gemm" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        x = torch.randn(batch, 37)
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        _close(got, net(x))
        _close(got, net.reference(x))
        assert np.isfinite(got.numpy()).all()
    assert check_onnx(graph, path)["passed"]
