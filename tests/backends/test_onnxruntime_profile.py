"""Per-layer latency in context: ORT's node profiler summed back to graphpress layer names."""

from __future__ import annotations

import torch
from torch import nn

from graphpress.backends.onnxruntime.lower import OnnxRuntimeBackend
from graphpress.backends.onnxruntime.profile import UNATTRIBUTED, _exported_name, profile_layers
from graphpress.frontends import load
from graphpress.passes.pipeline import Pipeline


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(x.mean((2, 3)))


def _graph():
    torch.manual_seed(0)
    return load(Net().eval(), example_inputs=(torch.randn(2, 3, 12, 12),))


def test_kernel_names_map_back_to_exported_nodes():
    assert _exported_name("node_Conv_10_token_1_kernel_time") == "node_Conv_10"
    assert _exported_name("node_quantize_act_9/duplicated_kernel_time") == "node_quantize_act_9"
    assert _exported_name("relu_3_nchwc_kernel_time") == "relu_3"
    assert _exported_name("fused node_linear_kernel_time") == "node_linear"
    assert _exported_name("Transpose_token_87_kernel_time") == "Transpose"


def test_fp32_profile_charges_each_conv_its_fused_kernels(tmp_path):
    g = Pipeline.from_recipe("default").run(_graph()).graph
    lowered = OnnxRuntimeBackend().lower(g, tmp_path, check=False)
    # the exporter's name scopes reach every node; a relu and the residual sum after a conv are charged to it
    assert set(lowered.node_layers.values()) >= {"conv1", "conv2", "fc"}
    prof = profile_layers(tmp_path / lowered.model_file, [torch.randn(1, 3, 12, 12)], lowered.node_layers, runs=10, threads=1)
    us = prof["layers_us"]
    assert us["conv1"] > 0 and us["conv2"] > 0 and us["fc"] > 0
    assert prof["runs"] == 10
    assert "Conv" in prof["kernels"]["conv2"] or "FusedConv" in prof["kernels"]["conv2"]
    # the per-layer times add up to the per-run total (the unattributed kernels included)
    assert abs(sum(us.values()) - prof["total_us"]) <= 0.25 * prof["total_us"] + 5
    assert set(us) - {"conv1", "conv2", "fc", UNATTRIBUTED} <= {"mean"}


def test_int8_profile_names_the_quantized_layers(tmp_path):
    g = _graph()
    g.calibration = [(torch.randn(16, 3, 12, 12),)]
    q = Pipeline.from_recipe({"passes": ["fold-batchnorm", {"quantize-layerwise": {"bits": [8], "target_bits": 8, "activations": "int8",
                                                                                   "min_sqnr_db": None}}]}).run(g).graph
    lowered = OnnxRuntimeBackend().lower(q, tmp_path, check=False)
    prof = profile_layers(tmp_path / lowered.model_file, [torch.randn(1, 3, 12, 12)], lowered.node_layers, runs=5, threads=1)
    kernels = prof["kernels"]
    assert "QLinearConv" in kernels["conv1"] and "QLinearConv" in kernels["conv2"]


def test_node_layers_are_not_written_to_the_manifest(tmp_path):
    lowered = OnnxRuntimeBackend().lower(_graph(), tmp_path, check=False)
    assert lowered.node_layers and "node_layers" not in lowered.info
