"""fold-batchnorm: fires on conv/linear + inference BN, refuses the unsafe cases with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass

aten = torch.ops.aten
BN_OPS = (aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.native_batch_norm, aten._native_batch_norm_legit)


def randomize_bn(module: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters for every BN in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.uniform_(-1.0, 1.0)
                    m.running_var.uniform_(0.3, 3.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return module


class ConvBN(nn.Module):
    def __init__(self, dim: int = 2, bias: bool = False, affine: bool = True):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        self.conv = conv(3, 8, 3, padding=1, bias=bias)
        self.bn = bn(8, affine=affine)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class LinearBN(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(6, 10, bias=bias)
        self.bn = nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.fc(x))


class ResBlock(nn.Module):
    """ResNet-20 style basic block: conv-bn-relu-conv-bn + identity, relu."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


def fold(graph: Graph, config=None):
    return make_pass("fold-batchnorm", config)(graph)


# ---------------------------------------------------------------------------- rule fires
def test_conv2d_bn_folds_into_new_weight_and_bias(capture, op_count, tensor_names, assert_same_function):
    graph = capture(randomize_bn(ConvBN(2)), 2, 3, 8, 8)
    before = graph.clone()
    result = fold(graph)

    assert result.graph is graph and result.changed
    assert result.stats["folded"] == 1
    assert result.stats["skipped"] == {}
    assert op_count(graph, *BN_OPS) == 0
    (conv,) = graph.call_nodes(aten.conv2d)
    w_node, b_node = conv.args[1], conv.args[2]
    assert w_node.op == "get_attr" and b_node.op == "get_attr"  # bias created for a bias-free conv
    assert graph.get_tensor(b_node.target).shape == (8,)
    assert graph.annotations(conv)["folded_batchnorm"] == ["bn"]
    # old weight and all BN tensors read by the BN are gone; only num_batches_tracked (unread) stays
    names = tensor_names(graph)
    assert "conv.weight" not in names and not any(n.startswith("bn.") and n != "bn.num_batches_tracked" for n in names)
    assert graph.parameter_count() == 8 * 3 * 9 + 8
    assert result.stats["params_removed"] == before.parameter_count() - graph.parameter_count() == 4 * 8 - 8
    assert result.stats["tensors_removed"] == 5  # conv.weight + bn weight/bias/mean/var
    # net: 4 BN vectors of 8 floats gone, one bias of 8 floats added (the weight is replaced 1:1)
    assert result.stats["bytes_saved"] == before.parameter_bytes() - graph.parameter_bytes() == (4 * 8 - 8) * 4
    # original tensors of the reference graph untouched
    assert torch.equal(before.get_tensor("conv.weight"), before.gm.conv.weight)
    assert_same_function(before, graph)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_nd_bn_numerics(capture, op_count, assert_same_function, dim, bias):
    shape = {1: (2, 3, 16), 2: (2, 3, 8, 8), 3: (2, 3, 4, 5, 6)}[dim]
    graph = capture(randomize_bn(ConvBN(dim, bias=bias)), *shape)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 1 and op_count(graph, *BN_OPS) == 0
    assert_same_function(before, graph)


def test_bn_without_affine_folds(capture, op_count, assert_same_function):
    graph = capture(randomize_bn(ConvBN(2, affine=False)), 2, 3, 8, 8)
    before = graph.clone()
    assert fold(graph).stats["folded"] == 1
    assert op_count(graph, *BN_OPS) == 0
    assert_same_function(before, graph)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn1d_on_2d_input_folds(capture, op_count, assert_same_function, bias):
    graph = capture(randomize_bn(LinearBN(bias)), 4, 6)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 1 and op_count(graph, *BN_OPS) == 0
    (lin,) = graph.call_nodes(aten.linear)
    assert lin.args[2].op == "get_attr"
    assert_same_function(before, graph)


def test_conv1d_bn1d_on_ncl_input_folds(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 3)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, x):  # (N, C, L)
            return self.bn(self.conv(x))

    graph = capture(randomize_bn(M()), 2, 4, 10)
    before = graph.clone()
    assert fold(graph).stats["folded"] == 1
    assert op_count(graph, *BN_OPS) == 0
    assert_same_function(before, graph)


def test_resnet_block_with_running_stats(capture, op_count, assert_same_function):
    graph = capture(randomize_bn(ResBlock(8)), 2, 8, 8, 8)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 2
    assert op_count(graph, *BN_OPS) == 0
    assert op_count(graph, aten.conv2d) == 2 and op_count(graph, aten.add) == 1
    assert result.stats["params_removed"] == 2 * 4 * 8 - 2 * 8  # BN tensors gone, two biases added
    assert_same_function(before, graph)


def test_resnet20_reference_model():
    from graphpress.zoo.resnet20 import ResNet20

    model = randomize_bn(ResNet20())
    graph = Graph.capture(model, (torch.randn(2, 3, 32, 32),))
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 19 and result.stats["skipped"] == {}
    assert sum(1 for _ in graph.call_nodes(*BN_OPS)) == 0
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(graph.run(x), before.run(x), rtol=1e-4, atol=1e-4)
    graph.verify()


def test_decomposed_graph_native_bn_and_convolution(op_count, assert_same_function):
    """After run_decompositions the BN is _native_batch_norm_legit_no_training and the conv aten.convolution."""
    model = randomize_bn(ConvBN(2, bias=True)).eval()
    x = torch.randn(2, 3, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).run_decompositions()
    graph = Graph(ep.module(), (x,))
    assert op_count(graph, aten._native_batch_norm_legit_no_training) == 1
    assert op_count(graph, aten.convolution) == 1
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 1, result.stats
    assert op_count(graph, *BN_OPS) == 0
    assert not any(n.target is __import__("operator").getitem for n in graph.call_nodes())
    assert_same_function(before, graph)


# ---------------------------------------------------------------------------- rule must not fire
def test_bn_flipped_to_training_mode_is_not_folded(capture, op_count):
    graph = capture(randomize_bn(ConvBN(2)), 2, 3, 8, 8)
    (bn,) = graph.call_nodes(aten.batch_norm)
    args = list(bn.args)
    args[5] = True  # training
    bn.args = tuple(args)
    graph.recompile()
    result = fold(graph)
    assert not result.changed and result.stats["folded"] == 0
    assert result.stats["skipped"] == {"batch-norm in training mode (uses batch statistics)": 1}
    assert op_count(graph, aten.batch_norm) == 1


def test_bn_without_running_stats_is_not_folded(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            return self.bn(self.conv(x))

    graph = capture(M(), 2, 3, 8, 8)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {"batch-norm in training mode (uses batch statistics)": 1}
    assert op_count(graph, aten.batch_norm) == 1
    assert_same_function(before, graph, exact=True)


def test_conv_output_used_twice_is_not_folded(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    graph = capture(randomize_bn(M()), 2, 3, 8, 8)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {"conv/linear output has other users": 1}
    assert op_count(graph, aten.batch_norm) == 1
    assert_same_function(before, graph, exact=True)


def test_shared_conv_weight_is_not_folded(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn1 = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.conv(x * 2))

    graph = capture(randomize_bn(M()), 2, 3, 8, 8)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["folded"] == 0
    assert result.stats["skipped"] == {"conv/linear weight is shared with another op": 2}
    assert op_count(graph, aten.batch_norm) == 2
    assert_same_function(before, graph, exact=True)


def test_linear_then_bn1d_over_sequence_dim_is_not_folded(capture, op_count, assert_same_function):
    """(N, L, C) -> linear -> BatchNorm1d(L): BN normalizes dim 1 (L), not the linear's features."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(7)

        def forward(self, x):
            return self.bn(self.fc(x))

    graph = capture(randomize_bn(M()), 2, 7, 6)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {"batch-norm channel dim is not the linear's output-feature dim": 1}
    assert op_count(graph, aten.batch_norm) == 1
    assert_same_function(before, graph, exact=True)


def test_transposed_conv_and_non_constant_bn_params_are_not_folded(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.deconv = nn.ConvTranspose2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.deconv(x))
            b2 = self.bn2
            # weight computed at run time: not a constant tensor
            return F.batch_norm(self.conv(y), b2.running_mean, b2.running_var, b2.weight * 2, b2.bias, False, 0.1, 1e-5)

    graph = capture(randomize_bn(M()), 2, 3, 6, 6)
    before = graph.clone()
    result = fold(graph)
    assert result.stats["skipped"] == {
        "producer is a transposed convolution": 1,
        "batch-norm parameters are not constants": 1,
    }
    assert op_count(graph, aten.batch_norm) == 2
    assert_same_function(before, graph, exact=True)


def test_bn_after_non_producer_is_explained(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(torch.relu(x))

    result = fold(capture(randomize_bn(M()), 2, 3, 4, 4))
    assert result.stats["skipped"] == {"input is not produced by a conv or linear": 1}


# ---------------------------------------------------------------------------- re-export
def test_folded_graph_reexports_and_lowers_to_onnx(capture, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    graph = capture(randomize_bn(ResBlock(4)), 2, 4, 6, 6)
    fold(graph)
    ep = graph.export_program()
    assert not any(n.op == "call_function" and "batch_norm" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(ep.module()(x), graph.run(x)[0])

    program = torch.onnx.export(ep, dynamo=True, verbose=False)
    path = tmp_path / "folded.onnx"
    program.save(str(path))
    assert not any("BatchNorm" in n.op_type for n in program.model_proto.graph.node)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (2, 5):
        xb = torch.randn(batch, 4, 6, 6)
        (out,) = session.run(None, {name: xb.numpy()})
        np.testing.assert_allclose(out, graph.run(xb)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_registered_and_exact():
    p = make_pass("fold-batchnorm", {})
    assert p.exact is True and p.config.version == 1
