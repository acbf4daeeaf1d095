"""tvm backend + fuse-blocks: every fused region becomes one Relax "Primitive" function and one TIR
kernel, the outputs still match the graph, and regions that cannot be grouped are left to TVM's
default fusion with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tvm", reason='apache-tvm not installed (pip install -e ".[tvm]")')

from graphpress.backends import get_backend
from graphpress.backends.tvm.lower import host_target
from graphpress.backends.tvm.regions import (
    RegionRecorder,
    apply_regions,
    count_kernels,
    kernel_calls,
)
from graphpress.ir.graph import Graph
from graphpress.ir.regions import set_region
from graphpress.passes.base import make_pass
from graphpress.zoo.resnet20 import BasicBlock, resnet20


class SwiGLU(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(d, h), nn.Linear(h, d), nn.LayerNorm(d)

    def forward(self, x):
        return self.ln(x + self.fc2(F.gelu(self.fc1(x))))


class MiniResNet(nn.Module):
    """Stem + an identity block + an option-A (stride 2, zero-padded channels) block."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.blocks(F.relu(self.bn(self.conv(x)))).mean((2, 3)))


def _import(graph: Graph):
    from tvm.relax.frontend.torch import from_exported_program

    with RegionRecorder() as recorder:
        mod = from_exported_program(graph.export_program())
    return mod, recorder


def test_small_resnet_regions_lower_to_one_kernel_each_and_match(tmp_path):
    torch.manual_seed(0)
    model = MiniResNet().eval()
    for m in model.modules():  # non-trivial folded biases
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    graph = make_pass("fold-batchnorm")(Graph.capture(model, (torch.randn(2, 3, 16, 16),))).graph
    fused = make_pass("fuse-blocks")(graph).graph
    lowered = get_backend("tvm", check_seeds=(0,)).lower(fused, tmp_path / "mini")
    # default: stem, 2 per block, the option-A pad, mean, linear; regions: 3 + mean + linear
    assert lowered.info["kernels"] == {"default": 8, "regions": 5}
    assert lowered.info["regions"]["by_kind"] == {"conv_bn_relu": 1, "residual_block": 2}
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
    calls = kernel_calls(*_grouped(fused), host_target())
    assert [c for c in calls if c.startswith("region")] == ["region0_conv_bn_relu", "region1_residual_block", "region2_residual_block"]


def _grouped(graph: Graph):
    mod, recorder = _import(graph)
    return (apply_regions(mod, recorder)[0],)


@pytest.mark.slow  # ~12 s: capture, two kernel counts, build and check of ResNet-20
def test_resnet20_regions_lower_to_one_kernel_each_and_match(tmp_path):
    torch.manual_seed(0)
    model = resnet20()
    graph = make_pass("fold-batchnorm")(Graph.capture(model, model.example_inputs(2), name="resnet20")).graph
    fused = make_pass("fuse-blocks")(graph).graph
    lowered = get_backend("tvm", check_seeds=(0,)).lower(fused, tmp_path / "r20")
    # default fusion: stem conv+bias+relu, 2 kernels per basic block (conv+bias+relu, conv+bias+add+relu)
    # plus the option-A pads, mean, linear; with regions: 10 regions + mean + linear
    assert lowered.info["kernels"] == {"default": 23, "regions": 12}
    assert lowered.info["regions"] == {"functions": 10, "by_kind": {"conv_bn_relu": 1, "residual_block": 9}, "skipped": {}}
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
    x = torch.randn(1, 3, 32, 32)  # batch 1: the batch stays symbolic inside the region kernels
    out = get_backend("tvm").runner(tmp_path / "r20" / "model.so")(x.numpy())[0]
    assert np.abs(out - fused.run(x)[0].numpy()).max() <= 1e-4


@pytest.mark.parametrize("model, default, regions", [(SwiGLU, 5, 2), (GeluMLP, 5, 3)])
def test_mlp_block_is_one_primitive_function_and_one_prim_func(model, default, regions):
    torch.manual_seed(0)
    graph = make_pass("fuse-blocks")(Graph.capture(model().eval(), (torch.randn(2, 8, 32),))).graph
    mod, recorder = _import(graph)
    grouped, report = apply_regions(mod, recorder)
    assert report == {"functions": 1, "by_kind": {"mlp_block": 1}, "skipped": {}}
    primitive = [gv.name_hint for gv, f in grouped.functions_items() if f.attrs and "Primitive" in f.attrs]
    assert primitive == ["region0_mlp_block"]
    target = host_target()
    calls = kernel_calls(grouped, target)
    # the whole block (2 or 3 matmuls, activation, reshapes) is one call_tir of one PrimFunc
    assert calls.count("region0_mlp_block") == 1 and len(calls) == regions
    assert count_kernels(mod, target) == default


def test_mlp_lowering_matches_the_graph(tmp_path):
    torch.manual_seed(0)
    graph = make_pass("fuse-blocks")(Graph.capture(SwiGLU().eval(), (torch.randn(2, 8, 32),))).graph
    lowered = get_backend("tvm", check_seeds=(0,)).lower(graph, tmp_path / "mlp")
    assert lowered.info["kernels"] == {"default": 5, "regions": 2}
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4


def test_a_region_with_two_outputs_is_left_to_default_fusion(tmp_path):
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            h = torch.relu(self.fc(x))
            return torch.tanh(h) + h.sum(-1, keepdim=True)

    graph = Graph.capture(TwoOut().eval(), (torch.randn(4, 16),))
    tanh, total = [n for n in graph.nodes if n.op == "call_function" and str(n.target) in ("aten.tanh.default", "aten.sum.dim_IntList")]
    for node in (tanh, total):  # a hand-made "region" whose two members are both read outside it
        set_region(graph, node, 0, "mlp_block")
    lowered = get_backend("tvm", check_seeds=(0,)).lower(graph, tmp_path / "two")
    assert lowered.info["regions"]["skipped"] == {"region has 2 values read outside it": 1}
    assert lowered.info["regions"]["functions"] == 0
    assert lowered.info["kernels"]["default"] == lowered.info["kernels"]["regions"]
    assert lowered.check["passed"]


def test_recorder_restores_the_importer_and_ignores_graphs_without_regions():
    from tvm.relax.frontend.torch.exported_program_translator import (
        ExportedProgramImporter,
    )

    original = ExportedProgramImporter._translate_fx_graph
    with pytest.raises(RuntimeError, match="boom"), RegionRecorder():
        assert ExportedProgramImporter._translate_fx_graph is not original
        raise RuntimeError("boom")
    assert ExportedProgramImporter._translate_fx_graph is original
    graph = Graph.capture(GeluMLP().eval(), (torch.randn(2, 8, 32),))  # not annotated
    mod, recorder = _import(graph)
    assert len(recorder) == 0
    grouped, report = apply_regions(mod, recorder)
    assert grouped is mod and report == {"functions": 0, "by_kind": {}, "skipped": {}}
