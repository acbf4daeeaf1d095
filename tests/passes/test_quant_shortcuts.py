"""Quantized residual shortcuts (``shortcuts="quantized"`` of quantize-layerwise): where the
rewrite inserts ``quantize_act``, that the option-A chain is requantized exactly, where it must
not fire, and the fusion it buys in ONNX Runtime (``QLinearAdd``)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.passes.quant  # noqa: F401 -- registers the passes
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.passes.base import make_pass
from graphpress.passes.layers import record

OPS = torch.ops.graphpress
INT8 = {"bits": [8], "target_bits": 8, "activations": "int8"}


class TwoBlocks(nn.Module):
    """stem -> identity block -> downsampling block with ResNet's option-A shortcut -> head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h0 = F.relu(self.stem(x))
        h1 = F.relu(self.a(h0) + h0)
        short = F.pad(h1[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        h2 = F.relu(self.b(h1) + short)
        return self.head(h2.mean((2, 3)))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=8, mode="bilinear", align_corners=False)


@pytest.fixture
def blocks_graph() -> Graph:
    torch.manual_seed(0)
    g = Graph.capture(TwoBlocks().eval(), (smooth_images(2, 0),))
    g.calibration = [(smooth_images(64, 1),), (smooth_images(64, 2),)]
    return g


def _quantize(graph: Graph, **cfg):
    return make_pass("quantize-layerwise", {**INT8, **cfg})(graph.clone())


def test_shortcut_reads_the_next_layers_grid_and_the_pad_chain_is_requantized_exactly(blocks_graph):
    r = _quantize(blocks_graph)
    acts = list(r.graph.call_nodes(OPS.quantize_act))
    # h0 is the stem's quantized output already (no rewrite); h1 gets one, the end of its pad chain another
    assert len(acts) == 2
    conv_b = next(n for n in r.graph.call_nodes(OPS.qconv2d) if n.args[1].target.startswith("b_"))
    q1 = conv_b.args[0]
    assert q1.target is OPS.quantize_act.default and (q1.args[1], q1.args[2]) == (conv_b.args[-5], conv_b.args[-4])
    q_end = next(a for a in acts if a is not q1)
    assert q_end.args[0].target is torch.ops.aten.pad.default and (q_end.args[1], q_end.args[2]) == (q1.args[1], q1.args[2])
    assert [u.target for u in q_end.users] == [torch.ops.aten.add.Tensor]
    assert r.stats["layers"]["b"]["shortcut_quantized"] and "shortcut_quantized" not in r.stats["layers"]["a"]
    values = record(r.graph, [q_end, q_end.args[0]])
    for before, after in zip(values[q_end.args[0].name], values[q_end.name]):
        assert torch.equal(before, after)  # sliced, zero-padded grid values stay on the grid
    x = smooth_images(256, 3)
    assert sqnr_db(blocks_graph.run(x)[0], r.graph.run(x)[0]) > 25


def test_float_shortcuts_leave_the_sums_alone(blocks_graph):
    r = _quantize(blocks_graph, shortcuts="float")
    assert not list(r.graph.call_nodes(OPS.quantize_act))
    assert all("shortcut_quantized" not in e for e in r.stats["layers"].values())


def test_no_static_layer_no_shortcut_rewrite(blocks_graph):
    # weight-only 4-bit linears and float convs: no static grid to share
    r = make_pass("quantize-layerwise", {"bits": [4], "target_bits": 4, "activations": "none"})(blocks_graph.clone())
    assert not list(r.graph.call_nodes(OPS.quantize_act))


def test_onnx_runtime_fuses_the_quantized_sum(blocks_graph, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from graphpress.backends.onnxruntime.lower import OnnxRuntimeBackend

    counts = {}
    for mode in ("quantized", "float"):
        g = _quantize(blocks_graph, shortcuts=mode).graph
        folder = tmp_path / mode
        lowered = OnnxRuntimeBackend().lower(g, folder)
        assert lowered.check["passed"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(folder / "opt.onnx")
        ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        counts[mode] = collections.Counter(n.op_type for n in onnx.load(str(folder / "opt.onnx")).graph.node)
    # block 1's sum (both inputs dequantized, its relu'd output quantized for conv b) fuses;
    # block 2's sum feeds a float mean and stays float in both modes
    assert counts["quantized"]["QLinearAdd"] == 1 and counts["float"]["QLinearAdd"] == 0
    assert counts["quantized"]["Add"] == 1 and counts["float"]["Add"] == 2
