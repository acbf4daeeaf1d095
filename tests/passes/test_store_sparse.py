"""``store-sparse``: pruned weights stored as bitmask + values. Where it fires (unstructured and
2:4 zeros, convs, a tied embedding stored once) and where it must not (below min_sparsity, skip,
computed weights), exact outputs in eager, and the ONNX file: below 0.6x of dense, same outputs
in ONNX Runtime, no unpacking ops left after ORT loads it."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch import nn

import graphpress.passes.prune.store  # noqa: F401 -- registers the pass
from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx  # noqa: E402

UNPACK = torch.ops.graphpress.sparse_unpack.default
UNPACK_OPS = {"Unsqueeze", "BitShift", "BitwiseAnd", "Cast", "CumSum", "Mul", "Concat", "Gather", "Slice", "Reshape"}


def unstructured(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero a random ``fraction`` of ``w``."""
    return w * (torch.rand_like(w) >= fraction)


def two_of_four(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest magnitudes in every group of four consecutive inputs (2:4)."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(w.shape)


def mlp(prune, width=512, depth=4) -> nn.Sequential:
    m = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()
    with torch.no_grad():
        for layer in m:
            layer.weight.copy_(prune(layer.weight))
    return m


def _optimized_ops(path, tmp_path):
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


@pytest.mark.parametrize("prune", [lambda w: unstructured(w, 0.5), two_of_four], ids=["unstructured", "2:4"])
def test_half_zero_mlp_lowers_below_0_6x_and_ort_runs_the_dense_graph(capture, assert_same_function, tmp_path, prune):
    graph = capture(mlp(prune), 4, 512)
    result = make_pass("store-sparse")(graph.clone())
    s = result.stats
    assert result.changed and s["stored"] == 4 and s["skipped"] == {}
    n = 512 * 512
    for entry in s["weights"].values():
        assert 0.48 < entry["zero_fraction"] < 0.52 and entry["bytes_before"] == 4 * n
        assert entry["bytes_after"] == n // 8 + round(n * (1 - entry["zero_fraction"])) * 4
    assert s["bytes_before"] == 4 * 4 * n and 0.52 < s["ratio"] < 0.545  # 1/32 + 1/2
    g = result.graph
    assert sum(1 for _ in g.call_nodes(UNPACK)) == 4 and sum(1 for _ in g.call_nodes(torch.ops.aten.linear)) == 4
    assert g.parameter_bytes() < 0.55 * graph.parameter_bytes()
    assert_same_function(graph, g, exact=True)

    dense = lower_to_onnx(graph, tmp_path / "dense")
    info = lower_to_onnx(g, tmp_path / "sparse")
    assert info["model_bytes"] < 0.6 * dense["model_bytes"]
    assert check_onnx(g, tmp_path / "sparse" / "model.onnx")["passed"]
    ops = _optimized_ops(tmp_path / "sparse" / "model.onnx", tmp_path)
    assert ops == collections.Counter({"Gemm": 4})  # the dense graph after load: nothing left of the unpacking
    x = torch.randn(3, 512)
    got = ort.InferenceSession(str(tmp_path / "sparse" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {g.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, graph.gm(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_weights_below_min_sparsity_are_left_dense(capture, tmp_path):
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    with torch.no_grad():
        m[0].weight.copy_(unstructured(m[0].weight, 0.1))
        m[2].weight.copy_(unstructured(m[2].weight, 0.6))
    graph = capture(m, 2, 64)
    r = make_pass("store-sparse")(graph.clone())
    assert r.changed and list(r.stats["weights"]) == ["2.weight"]
    assert r.stats["skipped"] == {"zero fraction below min_sparsity=0.3": 1}
    (unpack,) = r.graph.call_nodes(UNPACK)
    assert next(iter(unpack.users)).args[0].target == torch.ops.aten.relu.default

    only_light = capture(nn.Sequential(nn.Linear(64, 64)).eval(), 2, 64)
    with torch.no_grad():
        only_light.gm.get_parameter("0.weight").copy_(unstructured(only_light.get_tensor("0.weight"), 0.1))
    r = make_pass("store-sparse")(only_light.clone())
    assert not r.changed and r.stats["stored"] == 0 and r.stats["ratio"] is None
    assert not any(r.graph.call_nodes(UNPACK)) and r.graph.get_tensor("0.weight").dtype == torch.float32
    lowered = make_pass("store-sparse", {"min_sparsity": 0.05})(only_light.clone())
    zf = lowered.stats["weights"]["0.weight"]["zero_fraction"]
    assert lowered.changed and 0.08 < zf < 0.12
    # at 10% zeros the stored form is 1/32 + 0.9 of dense: smaller, but hardly worth a lookup at load
    assert lowered.stats["ratio"] == pytest.approx(1 / 32 + 1 - zf, abs=1e-4)


def test_skip_by_layer_or_weight_name_and_config_errors(capture):
    graph = capture(mlp(lambda w: unstructured(w, 0.5), width=32, depth=3), 2, 32)
    r = make_pass("store-sparse", {"skip": ["1", "2.weight"]})(graph.clone())
    assert list(r.stats["weights"]) == ["0.weight"] and r.stats["skipped"] == {"skipped by config": 2}
    for bad in (0, 1.5, -0.1):
        with pytest.raises(PassError, match="pass 'store-sparse': option 'min_sparsity' must be a fraction in \\(0, 1\\]"):
            make_pass("store-sparse", {"min_sparsity": bad})
    with pytest.raises(PassError, match="unknown option 'min_sparse'"):
        make_pass("store-sparse", {"min_sparse": 0.5})


class TiedLM(nn.Module):
    """Embedding -> linear -> classifier tied to the embedding."""

    def __init__(self, vocab=96, dim=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(h + torch.relu(self.up(h)))


def test_a_tied_weight_is_stored_once_and_read_by_both_ops(tmp_path):
    m = TiedLM().eval()
    with torch.no_grad():
        m.emb.weight.copy_(two_of_four(m.emb.weight))
        m.up.weight.copy_(unstructured(m.up.weight, 0.5))
    graph = Graph.capture(m, (torch.randint(0, 96, (2, 12)),))
    r = make_pass("store-sparse")(graph.clone())
    assert r.stats["stored"] == 2
    (tied,) = [e for e in r.stats["weights"].values() if len(e["layers"]) == 2]
    assert sorted(tied["layers"]) == ["emb", "out"] and tied["zero_fraction"] == 0.5
    g = r.graph
    unpacks = list(g.call_nodes(UNPACK))
    assert len(unpacks) == 2 and sorted(len(u.users) for u in unpacks) == [1, 2]
    assert not any(n.op == "get_attr" and n.target in ("emb.weight", "out.weight") for n in g.nodes)
    assert not hasattr(g.gm.get_submodule("emb"), "weight") and not hasattr(g.gm.get_submodule("out"), "weight")
    ids = torch.randint(0, 96, (3, 12))
    torch.testing.assert_close(g.gm(ids), graph.gm(ids), rtol=0, atol=0)
    lower_to_onnx(g, tmp_path)
    assert check_onnx(g, tmp_path / "model.onnx")["passed"]
    assert not (UNPACK_OPS - {"Gather", "Mul", "Reshape"}) & set(_optimized_ops(tmp_path / "model.onnx", tmp_path))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)) + torch.nn.functional.conv2d(x, self.scale * 2, padding=1)
        return self.fc(h.mean((2, 3)))


def test_conv_weights_are_stored_and_computed_weights_are_refused(capture, assert_same_function, tmp_path):
    m = ConvNet().eval()
    with torch.no_grad():
        m.conv.weight.copy_(unstructured(m.conv.weight, 0.5))
        m.scale.copy_(unstructured(m.scale, 0.5))
        m.fc.weight.copy_(unstructured(m.fc.weight, 0.5))
    graph = capture(m, 2, 3, 8, 8)
    r = Pipeline(["store-sparse"], random_inputs=1).run(graph.clone())
    step = r.steps[0]
    assert step.exact and step.changed and sorted(step.stats["weights"]) == ["conv.weight", "fc.weight"]
    assert step.stats["skipped"] == {"weight is computed in the graph, not a constant": 1}
    assert step.stats["weights"]["conv.weight"]["shape"] == [16, 3, 3, 3]
    assert_same_function(graph, r.graph, exact=True)
    lower_to_onnx(r.graph, tmp_path)
    assert check_onnx(r.graph, tmp_path / "model.onnx")["passed"]
    assert not {"BitShift", "CumSum", "Concat"} & set(_optimized_ops(tmp_path / "model.onnx", tmp_path))


def test_half_precision_weights_keep_their_dtype(assert_same_function):
    m = mlp(lambda w: unstructured(w, 0.5), width=64, depth=2).to(torch.bfloat16)
    graph = Graph.capture(m, (torch.randn(3, 64, dtype=torch.bfloat16),))
    r = make_pass("store-sparse")(graph.clone())
    for entry in r.stats["weights"].values():
        assert entry["dtype"] == "bfloat16" and entry["bytes_before"] == 64 * 64 * 2
        assert entry["bytes_after"] == 64 * 64 // 8 + round(64 * 64 * (1 - entry["zero_fraction"])) * 2
    values = [t for n, t in r.graph.gm.named_buffers() if n.endswith("_values")]
    assert len(values) == 2 and all(v.dtype == torch.bfloat16 for v in values)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(r.graph.gm(x), graph.gm(x), rtol=0, atol=0)


def test_offline_ort_optimization_keeps_the_packed_weights(tmp_path):
    from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).eval()
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.weight.mul_((torch.rand_like(layer.weight) > 0.5).float())
    g = make_pass("store-sparse", {})(Graph.capture(m, (torch.randn(2, 256),)))
    sizes = {}
    for opt in (False, True):
        folder = tmp_path / str(opt)
        lower_to_onnx(g.graph, folder, optimize=opt)
        sizes[opt] = (folder / "model.onnx").stat().st_size
        assert check_onnx(g.graph, folder / "model.onnx")["passed"]
    dense = 2 * 256 * 256 * 4
    assert sizes[False] < 0.6 * dense and sizes[True] < 0.6 * dense
