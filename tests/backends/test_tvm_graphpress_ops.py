"""tvm backend on graphpress ops: each op family, produced by its real pass on a tiny model, is
expanded into ATen ops and constants (graphpress.backends.tvm.expand_ops), builds, and matches the graph;
an op with no expansion, or a weight that is not a constant, is refused in one line.

Tolerances: the backend's own check (fp32: rtol 1e-4, atol 1e-5 x max(1, max|ref|)) must pass, and
its worst error must be <= 1e-4. The quantized graphs keep their activation rounding as ops, so a
value that TVM's summation order put on the other side of a rounding tie would cost a whole grid
step; on these seeded inputs none does (measured worst 0 to 3e-8), and the tie rule itself (half
to even, as eager and ONNX QuantizeLinear) is tested on exact ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tvm", reason='apache-tvm not installed (pip install -e ".[tvm]")')

import graphpress.passes.circulant  # registers the passes used below
import graphpress.passes.fusion
import graphpress.passes.prune
import graphpress.passes.quant
import graphpress.passes.sparsity  # noqa: F401
from graphpress.backends import get_backend
from graphpress.errors import BackendError
from graphpress.backends.tvm.expand_ops import expand_graphpress_ops, graphpress_nodes
from graphpress.ir.graph import Graph, op_name
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass

OPS = torch.ops.graphpress


@torch.library.custom_op("graphpress_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _twice_fake(x):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------- models
def mlp_graph() -> Graph:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(approximate="tanh"), nn.Linear(48, 40), nn.SiLU(), nn.Linear(40, 10))
    g = Graph.capture(m.eval(), (torch.randn(4, 32),), name="mlp")
    g.calibration = [(torch.randn(128, 32),)]
    return g


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc, self.out = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.c1(x))))
        return self.out(F.relu(self.fc(h.mean((2, 3)))))


class TwoBlocks(nn.Module):
    """stem -> identity block -> downsampling block with a padded shortcut -> head (quantize_act sites)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b, self.head = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        h0 = F.relu(self.stem(x))
        h1 = F.relu(self.a(h0) + h0)
        h2 = F.relu(self.b(h1) + F.pad(h1[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4)))
        return self.head(h2.mean((2, 3)))


class TiedLM(nn.Module):
    def __init__(self, vocab=96, dim=64, hidden=160):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim, bias=False)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(h + self.down(torch.relu(self.up(h))))


def images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=8, mode="bilinear", align_corners=False)


def cnn_graph(module: nn.Module) -> Graph:
    torch.manual_seed(0)
    g = Graph.capture(module.eval(), (images(2, 0),), name=type(module).__name__)
    g.calibration = [(images(64, 1),)]
    return g


# ---------------------------------------------------------------------------- helpers
def ops_of(graph: Graph) -> set[str]:
    return {op_name(n) for n in graphpress_nodes(graph)}


def lower_and_check(g: Graph, folder, ops: set[str], torch_atol: float):
    """Lower ``g`` (it holds exactly ``ops``) and assert: TVM matches the graph within 1e-4, the
    expanded graph holds no graphpress op and matches in torch within ``torch_atol``."""
    assert ops_of(g) == ops
    lowered = get_backend("tvm").lower(g, folder)
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
    assert set(lowered.info["expanded_ops"]) == ops
    expanded, report = expand_graphpress_ops(g)
    assert graphpress_nodes(expanded) == [] and set(report) == ops and ops_of(g) == ops  # the input graph is untouched
    for inputs in (g.example_inputs, g.random_inputs(3)):
        for ref, got in zip(g.run(*inputs), expanded.run(*inputs)):
            assert float((ref - got).abs().max()) <= torch_atol
    return lowered, expanded


# ---------------------------------------------------------------------------- op families
def test_fused_linear_activations(tmp_path):
    g = make_pass("fuse-linear-activation", {})(mlp_graph()).graph
    assert sorted(n.args[3] for n in g.call_nodes(OPS.linear_act)) == ["gelu_tanh", "relu", "silu"]
    lowered, _ = lower_and_check(g, tmp_path / "fused", {"graphpress.linear_act"}, torch_atol=0.0)
    assert lowered.info["expanded_ops"]["graphpress.linear_act"].endswith("3 nodes")


def test_block_circulant_linear_and_conv_expand_to_dense_weights(tmp_path):
    g = make_pass("block-circulant", {"block_size": 4})(cnn_graph(CNN())).graph
    lowered, expanded = lower_and_check(g, tmp_path / "circ", {"graphpress.circulant_linear", "graphpress.circulant_conv2d"}, torch_atol=1e-6)
    report = lowered.info["expanded_ops"]
    assert "dense expansion" in report["graphpress.circulant_conv2d"] and "16x8x3x3 float32" in report["graphpress.circulant_conv2d"]
    assert "32x16 float32 (2.0 KiB, stored 0.5 KiB)" in report["graphpress.circulant_linear"]  # b = 4 times the compact c
    # the compact vectors are gone from the expanded graph: its conv/linear read dense constants
    assert {tuple(expanded.tensor_of(n.args[1]).shape) for n in expanded.call_nodes(torch.ops.aten.conv2d)} >= {(16, 8, 3, 3)}


@pytest.mark.parametrize("model,config,ops", [
    ("mlp", {"bits": [4], "target_bits": 4, "activations": "none"}, {"graphpress.wlinear_nbits"}),
    ("mlp", {"bits": [8, 4], "target_bits": 6, "activations": "int8-dynamic"}, {"graphpress.qlinear", "graphpress.wlinear_nbits"}),
    ("blocks", {"bits": [8], "target_bits": 8, "activations": "int8"}, {"graphpress.qconv2d", "graphpress.qlinear", "graphpress.quantize_act"}),
], ids=["nbits-weight-only", "int8-dynamic+int8-block", "static-int8-shortcuts"])
def test_quantized_ops_dequantize_weights_and_keep_activation_rounding(tmp_path, model, config, ops):
    g = mlp_graph() if model == "mlp" else cnn_graph(TwoBlocks())
    q = make_pass("quantize-layerwise", config)(g).graph
    # the same constants and float32 steps as eager: bit-identical in torch
    lowered, expanded = lower_and_check(q, tmp_path / "q", ops, torch_atol=0.0)
    counts = expanded.op_counts()
    if ops == {"graphpress.wlinear_nbits"}:
        assert "aten.round" not in counts  # weight-only: no activation rounding
        assert "stored" in lowered.info["expanded_ops"]["graphpress.wlinear_nbits"]
    else:
        assert counts["aten.round"] >= 2 and counts["aten.clamp"] >= 2
    # the batch stays symbolic through the per-(row, group) and per-tensor activation quantizers
    runner = get_backend("tvm").runner(tmp_path / "q" / "model.so")
    x = g.random_inputs(7, batch=3)[0]
    np.testing.assert_allclose(runner(x.numpy())[0], q.run(x)[0].numpy(), rtol=1e-4, atol=1e-5)


class TieQuant(nn.Module):
    def forward(self, x):
        return OPS.quantize_act(x, 0.5, 3)


def test_rounding_ties_go_to_even_as_in_eager(tmp_path):
    # x / 0.5 lands exactly on k + 0.5: half-to-even and half-away-from-zero differ on every one
    ties = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 2.75, 126.25]])
    g = Graph.capture(TieQuant(), (ties.repeat(2, 1),), name="ties")
    lower_and_check(g, tmp_path / "ties", {"graphpress.quantize_act"}, torch_atol=0.0)
    got = get_backend("tvm").runner(tmp_path / "ties" / "model.so")(ties.numpy())[0]
    np.testing.assert_array_equal(got, g.run(ties)[0].numpy())
    np.testing.assert_array_equal(got[0], [0.0, 1.0, 1.0, 0.0, -1.0, -1.0, 3.0, 126.0])


@pytest.mark.parametrize("method,op", [("teal", "graphpress.sparse_linear"), ("wina", "graphpress.sparse_linear_pc")])
def test_activation_sparse_linears_mask_then_multiply_densely(tmp_path, method, op):
    torch.manual_seed(0)
    g = Graph.capture(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 10)).eval(), (torch.randn(4, 64),), name="s")
    g.calibration = [(torch.randn(256, 64),)]
    s = make_pass("sparsify-activations", {"method": method, "target_sparsity": 0.4, "allocation": "uniform", "include_classifier": True})(g).graph
    # the eager op sums in its own kernel's order: equal to float rounding
    _, expanded = lower_and_check(s, tmp_path / method, {op}, torch_atol=1e-6)
    counts = expanded.op_counts()
    assert counts["aten.where"] == counts["aten.matmul"] == 3 and counts["aten.abs"] == 3


def test_bitmask_stored_weights_are_materialized_once(tmp_path):
    torch.manual_seed(0)
    g = Graph.capture(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval(), (torch.randn(4, 64),), name="p")
    g.calibration = [(torch.randn(256, 64),)]
    stored = make_pass("store-sparse", {})(make_pass("prune-weights", {"sparsity": 0.5})(g).graph).graph
    lowered, expanded = lower_and_check(stored, tmp_path / "sp", {"graphpress.sparse_unpack"}, torch_atol=0.0)
    assert "128x64 float32, 10x128 float32" in lowered.info["expanded_ops"]["graphpress.sparse_unpack"]
    # the expanded graph reads dense float weights again, and no packed bytes
    assert not any(t.dtype == torch.uint8 for t in expanded._read_tensors())
    assert expanded.parameter_count() == 64 * 128 + 128 + 128 * 10 + 10 > stored.parameter_count()


def test_k_bit_tables_and_weights_dequantized_at_load_tied_table_expanded_once(tmp_path):
    torch.manual_seed(0)
    lm = Graph.capture(TiedLM().eval(), (torch.randint(0, 96, (2, 12)),), name="lm")
    lm.calibration = [(torch.randint(0, 96, (16, 12)),)]
    quant = {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32, "min_sqnr_db": 5}
    q = Pipeline([("quantize-layerwise", quant), "dequantize-at-load", ("quantize-embeddings", {"bits": 4, "min_sqnr_db": 5})],
                 random_inputs=0).run(lm).graph
    _, expanded = lower_and_check(q, tmp_path / "lm", {"graphpress.wlinear_load", "graphpress.wembedding_load"}, torch_atol=0.0)
    # one dense float copy of the shared 4-bit table, read by the embedding and by the tied classifier
    (emb,) = expanded.call_nodes(torch.ops.aten.embedding)
    table = emb.args[0]
    assert sorted(op_name(u) for u in table.users) == ["aten.embedding", "aten.linear"]
    assert expanded.tensor_of(table).dtype == torch.float32 and tuple(expanded.tensor_of(table).shape) == (96, 64)


class QuantOps(nn.Module):
    """The quantized ops called directly on an input of any float dtype (the passes emit float32)."""

    def __init__(self):
        super().__init__()
        from graphpress.ir import quant as Q

        w = torch.randn(24, 72)
        q, scale = Q.symmetric_per_channel(w)
        nb = Q.to_nbits(Q.groupwise(w, 4, 32))  # 72 inputs: the last group is padded
        for name, t in (("w_q", q), ("w_s", scale), ("b32", torch.randint(-99, 99, (24,), dtype=torch.int32)), ("b", torch.randn(24)),
                        ("packed", nb.packed), ("scales", nb.scales), ("zeros", nb.zeros)):
            self.register_buffer(name, t)

    def forward(self, x):
        return (OPS.qlinear(x, self.w_q, self.w_s, self.b32, 0.05, 128, 0.1, 100, True),
                OPS.qlinear(x, self.w_q, self.w_s, self.b.to(x.dtype), 0.0, 0, 0.0, 0, False),
                OPS.wlinear_nbits(x, self.packed, self.scales, self.zeros, None, 72, 4, 32, 8),
                OPS.quantize_act(x, 0.02, 10),
                OPS.wlinear_load(x, self.packed, self.scales, self.zeros, self.b, 72, 4, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_expanded_quantized_ops_are_bit_identical_in_torch_for_every_input_dtype(dtype):
    # eager returns the fake-quantized input in x's dtype and reads it back in float32: so must the expansion
    torch.manual_seed(0)
    g = Graph.capture(QuantOps().eval(), (torch.randn(3, 72).to(dtype),), name="q")
    expanded, report = expand_graphpress_ops(g)
    assert graphpress_nodes(expanded) == [] and len(report) == 4
    for inputs in (g.example_inputs, g.random_inputs(1), g.random_inputs(2, batch=5)):
        for ref, got in zip(g.run(*inputs), expanded.run(*inputs), strict=True):
            assert got.dtype == ref.dtype and torch.equal(got, ref)


# ---------------------------------------------------------------------------- refusals
class ComputedCirculant(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.randn(2, 2, 4))

    def forward(self, x):
        return OPS.circulant_linear(x, self.c * 2, None)


class UnknownOp(nn.Module):
    def forward(self, x):
        return torch.ops.graphpress_test.twice(x) + 1


def test_unexpandable_ops_are_refused_in_one_line(tmp_path):
    x = torch.randn(2, 8)
    for module, match in ((ComputedCirculant(), r"^tvm: 'm': graphpress\.circulant_linear node '\w+': its compact weight c is not a constant"),
                          (UnknownOp(), r"^tvm: 'm': graphpress_test\.twice node '\w+' has no ATen expansion")):
        g = Graph.capture(module.eval(), (x,), name="m")
        with pytest.raises(BackendError, match=match) as err:
            get_backend("tvm").lower(g, tmp_path / "m")
        assert "\n" not in str(err.value) and "onnxruntime" in str(err.value)
        assert not (tmp_path / "m").exists()
    plain = Graph.capture(nn.Linear(8, 4).eval(), (x,), name="plain")
    assert expand_graphpress_ops(plain) == (plain, {})  # nothing to expand: the graph itself, no copy
