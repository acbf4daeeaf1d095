"""fuse-linear-activation: linear/addmm/mm + activation -> graphpress::linear_act."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import PassError
from graphpress.ir.ops import LINEAR_ACTIVATIONS
from graphpress.lowering.onnx import ONNX_TRANSLATIONS
from graphpress.passes.base import make_pass

aten = torch.ops.aten
LINEAR_ACT = torch.ops.graphpress.linear_act.default
ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 16, bias=False)
        self.fc4 = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        x = F.silu(self.fc3(x))
        return self.fc4(x)


def fuse(graph, config=None):
    return make_pass("fuse-linear-activation", config)(graph)


def fused_acts(graph):
    return [n.args[3] for n in graph.call_nodes(LINEAR_ACT)]


# ---------------------------------------------------------------------------- the op itself
@pytest.mark.parametrize("act", LINEAR_ACTIVATIONS)
@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_op_matches_unfused(act, shape, bias):
    x, w = torch.randn(*shape), torch.randn(6, 8)
    b = torch.randn(6) if bias else None
    out = torch.ops.graphpress.linear_act(x, w, b, act)
    torch.testing.assert_close(out, ACTS[act](F.linear(x, w, b)))


def test_linear_act_op_passes_opcheck():
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    torch.library.opcheck(torch.ops.graphpress.linear_act.default, (x, w, b, "gelu"), test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------- rule fires
def test_mlp_fuses_default_activations(capture, op_count, assert_same_function):
    graph = capture(MLP(), 2, 8)
    before = graph.clone()
    result = fuse(graph)
    assert result.changed and result.stats["fused"] == 3
    assert result.stats["by_activation"] == {"relu": 1, "gelu": 1, "silu": 1}
    assert result.stats["skipped"] == {}
    assert fused_acts(graph) == ["relu", "gelu", "silu"]
    assert op_count(graph, aten.linear) == 1  # fc4 has no activation
    assert op_count(graph, aten.relu, aten.gelu, aten.silu) == 0
    fc3 = [n for n in graph.call_nodes(LINEAR_ACT) if n.args[3] == "silu"][0]
    assert fc3.args[2] is None and fc3.args[1].target == "fc3.weight"
    assert graph.annotations(fc3)["fused"] == ["linear", "silu"]
    assert_same_function(before, graph)


def test_3d_input_and_gelu_tanh(capture, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 12)

        def forward(self, x):  # (N, L, C)
            return F.gelu(self.fc(x), approximate="tanh")

    graph = capture(M(), 2, 5, 8)
    before = graph.clone()
    assert fuse(graph).stats["by_activation"] == {"gelu": 1}
    assert fused_acts(graph) == ["gelu_tanh"]
    assert_same_function(before, graph)


def test_addmm_mm_and_inplace_forms(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
            self.w2 = nn.Parameter(torch.randn(16, 4))  # used as mat2 directly: needs a transposed weight
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(torch.addmm(self.b1, x, self.w1.t()))
            h = torch.tanh(torch.mm(h, self.w2))
            return F.relu(self.fc(h), inplace=True)

    graph = capture(M(), 3, 8)
    before = graph.clone()
    assert op_count(graph, aten.addmm) == 1 and op_count(graph, aten.mm) == 1 and op_count(graph, aten.relu_) == 1
    result = fuse(graph, {"activations": ["relu", "tanh"]})
    assert result.stats["fused"] == 3 and result.stats["skipped"] == {}
    assert fused_acts(graph) == ["relu", "tanh", "relu"]
    assert op_count(graph, aten.addmm, aten.mm, aten.linear, aten.relu, aten.relu_, aten.tanh) == 0
    first, second, _ = graph.call_nodes(LINEAR_ACT)
    assert first.args[1].op == "get_attr" and first.args[1].target == "w1"  # t(w1) unwrapped
    assert second.args[1].target == aten.t.default  # t(w2) inserted for mm(h, w2)
    assert_same_function(before, graph)


# ---------------------------------------------------------------------------- rule must not fire
def test_linear_output_with_other_user_is_not_fused(capture, op_count, assert_same_function):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            y = self.fc(x)
            return F.relu(y) + y

    graph = capture(M(), 2, 8)
    before = graph.clone()
    result = fuse(graph)
    assert not result.changed
    assert result.stats["skipped"] == {"linear output has other users": 1}
    assert op_count(graph, aten.linear) == 1 and op_count(graph, LINEAR_ACT) == 0
    assert_same_function(before, graph, exact=True)


def test_activation_not_in_config_is_not_fused(capture, op_count, assert_same_function):
    graph = capture(MLP(), 2, 8)
    before = graph.clone()
    result = fuse(graph, {"activations": ["relu"]})
    assert result.stats["fused"] == 1
    assert result.stats["skipped"] == {"activation 'gelu' not enabled in config": 1, "activation 'silu' not enabled in config": 1}
    assert op_count(graph, aten.gelu) == 1 and op_count(graph, aten.silu) == 1
    assert_same_function(before, graph)


def test_sigmoid_is_off_by_default_and_bad_names_are_rejected(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    graph = capture(M(), 2, 8)
    assert fuse(graph).stats["skipped"] == {"activation 'sigmoid' not enabled in config": 1}
    assert fuse(graph, {"activations": ["sigmoid"]}).stats["fused"] == 1
    with pytest.raises(PassError, match="unknown activation"):
        fuse(graph, {"activations": ["swish"]})


# ---------------------------------------------------------------------------- backends see the op
class AllActs(nn.Module):
    """One linear per activation form, the third without bias."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(8, 8, bias=(i != 2)) for i in range(len(ACTS)))

    def forward(self, x):
        for fc, act in zip(self.fcs, ACTS.values()):
            x = act(fc(x))
        return x


def test_fused_graph_reexports_and_runs_in_onnxruntime(capture, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    graph = capture(AllActs(), 2, 8)
    result = fuse(graph, {"activations": ["relu", "gelu", "silu", "sigmoid", "tanh"]})
    assert fused_acts(graph) == list(ACTS)
    assert result.stats["fused"] == len(ACTS)
    ep = graph.export_program()
    assert sum(1 for n in ep.graph.nodes if n.target is LINEAR_ACT) == len(ACTS)
    x = torch.randn(4, 8)
    torch.testing.assert_close(ep.module()(x), graph.run(x)[0])

    program = torch.onnx.export(ep, dynamo=True, custom_translation_table=ONNX_TRANSLATIONS, verbose=False)
    path = tmp_path / "fused.onnx"
    program.save(str(path))
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert {"MatMul", "Relu", "Erf", "Sigmoid", "Tanh"} <= ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (2, 7):
        xb = torch.randn(batch, 8)
        (out,) = session.run(None, {name: xb.numpy()})
        np.testing.assert_allclose(out, graph.run(xb)[0].numpy(), rtol=1e-4, atol=1e-5)
