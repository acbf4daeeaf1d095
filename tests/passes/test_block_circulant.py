"""block-circulant: projection of linear/conv layers onto compact circulant ops (PrivCirNet)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import PassError, VerificationError
from graphpress.ir.circulant import expand, project
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.ir.ops_circulant import conv_weight
from graphpress.passes.base import config_from_dict, make_pass
from graphpress.passes.circulant import projection
from graphpress.passes.circulant.layers import find_layers
from graphpress.passes.fisher import fisher_diagonal
from graphpress.passes.pipeline import Pipeline

aten = torch.ops.aten
CONV = torch.ops.graphpress.circulant_conv2d.default
LINEAR = torch.ops.graphpress.circulant_linear.default
BNS = (aten.batch_norm, aten._native_batch_norm_legit_no_training)


class SmallCNN(nn.Module):
    """conv(3->16)-bn-relu, conv(16->32, stride 2)-bn-relu, 1x1 conv(32->32, bias)-relu,
    depthwise conv, pool, linear 32->64-relu, linear 64->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.dw(F.relu(self.conv3(x)))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


def small_cnn() -> SmallCNN:
    m = SmallCNN().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m


CONVERTED_AT_4 = ["conv2", "conv3", "fc1"]


def run_pass(graph: Graph, **config):
    return make_pass("block-circulant", config)(graph)


def folded(graph: Graph) -> Graph:
    return make_pass("fold-batchnorm")(graph.clone()).graph


def projected_dense_reference(graph: Graph, blocks: dict[str, int]) -> Graph:
    """``graph`` with each named layer's dense weight replaced by expand(project(W)) (still dense ops)."""
    ref = graph.clone()
    layers, _ = find_layers(ref)
    for layer in layers:
        b = blocks.get(layer.name)
        if not b:
            continue
        w = ref.get_tensor(layer.weight_target)
        if layer.kind == "linear":
            new = expand(project(w, b))
        else:
            new = conv_weight(project(w.permute(2, 3, 0, 1), b))
        ref.set_tensor(layer.weight_target, new.contiguous())
    return ref


# ---------------------------------------------------------------------------- rule fires
def test_small_cnn_converts_fitting_layers_and_lists_the_rest(capture, op_count):
    graph = folded(capture(small_cnn(), 2, 3, 8, 8))
    before = graph.clone()
    result = run_pass(graph, block_size=4)
    stats = result.stats
    assert result.changed and stats["converted"] == 3
    assert stats["blocks"] == {"conv1": 1, "conv2": 4, "conv3": 4, "fc1": 4, "fc2": 1}
    assert stats["kept_dense"] == {
        "dw": "grouped conv (groups=32)",
        "conv1": "b=4 does not divide 16x3",
        "fc2": "b=4 does not divide 10x64",
    }
    assert stats["bn_handling"] == "folded before projection"
    # structure: only the non-fitting conv (3 input channels) and the depthwise conv stay aten convs
    assert op_count(graph, aten.conv2d) == 2 and op_count(graph, CONV) == 2
    assert op_count(graph, aten.linear) == 1 and op_count(graph, LINEAR) == 1
    shapes = {}
    for node in graph.call_nodes(CONV, LINEAR):
        ann = graph.annotations(node)
        c = graph.tensor_of(node.args[1])
        shapes[ann["circulant"]["layer"]] = tuple(c.shape)
        assert ann["trainable_inputs"] == [1, 2]
        assert ann["circulant"]["compact_params"] * 4 == ann["circulant"]["dense_params"] == c.numel() * 4
        assert isinstance(graph.gm.get_parameter(str(node.args[1].target)), nn.Parameter)
    assert shapes == {"conv2": (3, 3, 8, 4, 4), "conv3": (1, 1, 8, 8, 4), "fc1": (16, 8, 4)}
    assert graph.annotations(next(graph.call_nodes(CONV)))["circulant"]["block"] == 4
    dense = 32 * 16 * 9 + 32 * 32 + 64 * 32
    assert (stats["params_before"], stats["params_after"]) == (dense, dense // 4)
    assert before.parameter_count() - graph.parameter_count() == dense - dense // 4  # dense weights removed
    names = {n for n, _ in graph.gm.named_parameters()}
    assert not {"conv2.weight_bnfold", "conv3.weight", "fc1.weight"} & names
    assert set(stats["projection_error"]) == set(CONVERTED_AT_4)
    assert all(0.0 < e < 1.0 for e in stats["projection_error"].values())


def test_outputs_equal_dense_model_with_projected_weights(capture, assert_same_function):
    graph = folded(capture(small_cnn(), 2, 3, 8, 8))
    ref = projected_dense_reference(graph, {"conv2": 4, "conv3": 4, "fc1": 4})
    run_pass(graph, block_size=4)
    assert_same_function(ref, graph, batches=(1, 5), rtol=1e-4, atol=1e-5)


def test_per_layer_blocks_and_skip(capture, op_count, assert_same_function):
    graph = folded(capture(small_cnn(), 2, 3, 8, 8))
    ref = projected_dense_reference(graph, {"conv2": 16, "fc1": 8})
    result = run_pass(graph, block_size=4, blocks={"conv2": 16, "fc1": 8, "fc2": 2}, skip=("conv3",))
    stats = result.stats
    assert stats["blocks"] == {"conv1": 1, "conv2": 16, "conv3": 1, "fc1": 8, "fc2": 2}
    assert stats["kept_dense"]["conv3"] == "skipped by config"
    assert stats["params_after"] == 32 * 16 * 9 // 16 + 64 * 32 // 8 + 10 * 64 // 2
    c_shapes = sorted(tuple(graph.tensor_of(n.args[1]).shape) for n in graph.call_nodes(CONV, LINEAR))
    assert c_shapes == [(3, 3, 2, 1, 16), (5, 32, 2), (8, 4, 8)]
    ref = projected_dense_reference(ref, {"fc2": 2})
    assert_same_function(ref, graph, rtol=1e-4, atol=1e-5)


def test_exact_on_already_block_circulant_weights(capture):
    model = small_cnn()
    with torch.no_grad():  # make every convertible weight block-circulant at b=4
        for conv in (model.conv2, model.conv3):
            k = conv.weight.shape[2:]
            conv.weight.copy_(conv_weight(torch.randn(*k, conv.out_channels // 4, conv.in_channels // 4, 4) / 8))
        model.fc1.weight.copy_(expand(torch.randn(16, 8, 4) / 8))
    graph = capture(model, 2, 3, 8, 8)
    before = graph.clone()
    result = run_pass(graph, block_size=4)  # BN not folded: it stays a separate op, still exact
    assert result.stats["converted"] == 3
    assert all(e == 0.0 for e in result.stats["projection_error"].values())
    for batch in (1, 4):
        x = before.random_inputs(seed=batch, batch=batch)
        ref, out = before.run(*x)[0], graph.run(*x)[0]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert sqnr_db(ref, out) == math.inf  # same dense products on identical weights


# ---------------------------------------------------------------------------- fisher
def test_fisher_projection_has_lower_fisher_weighted_error_than_mean(capture):
    graph = folded(capture(small_cnn(), 2, 3, 8, 8))
    graph.calibration = [(torch.randn(8, 3, 8, 8),) for _ in range(2)]
    targets = {layer.name: layer.weight_target for layer in find_layers(graph)[0]}
    fisher = fisher_diagonal(graph, [targets["conv2"], targets["fc1"]], micro_batch=2)

    compact = {}
    for method in ("mean", "fisher"):
        g = graph.clone()
        result = run_pass(g, block_size=4, method=method, fisher_micro_batch=2)
        assert result.stats["method"] == method
        for node in g.call_nodes(CONV, LINEAR):
            compact[(method, g.annotations(node)["circulant"]["layer"])] = g.tensor_of(node.args[1]).clone()
            assert g.annotations(node)["circulant"]["method"] == method

    for name, to_matrix in (("conv2", lambda t: t.permute(2, 3, 0, 1)), ("fc1", lambda t: t)):
        w = to_matrix(graph.get_tensor(targets[name])).detach().double()
        f = to_matrix(fisher[targets[name]]).double()
        err = {m: float((f * (w - expand(compact[(m, name)].double())) ** 2).sum()) for m in ("mean", "fisher")}
        assert err["fisher"] < 0.9 * err["mean"], (name, err)
        torch.testing.assert_close(compact[("fisher", name)], project(to_matrix(graph.get_tensor(targets[name])), 4, to_matrix(fisher[targets[name]])))


# ---------------------------------------------------------------------------- must not fire
def test_nothing_fits_leaves_graph_unchanged(capture, op_count, assert_same_function):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 12, 3)
            self.dw = nn.Conv2d(12, 12, 3, groups=4)
            self.fc = nn.Linear(12, 10)

        def forward(self, x):
            return self.fc(self.dw(self.conv(x)).mean((2, 3)))

    graph = capture(Odd(), 2, 6, 9, 9)
    before = graph.clone()
    result = run_pass(graph, block_size=8, skip=("fc",))
    assert not result.changed and result.stats["converted"] == 0
    assert result.stats["kept_dense"] == {
        "dw": "grouped conv (groups=4)",
        "conv": "b=8 does not divide 12x6",
        "fc": "skipped by config",
    }
    assert result.stats["bn_handling"] == "no layer converted"
    assert op_count(graph, aten.conv2d) == 2 and op_count(graph, aten.linear) == 1
    assert_same_function(before, graph, exact=True)
    # b=1 everywhere is dense too
    assert run_pass(graph, block_size=1).stats["kept_dense"]["conv"] == "b=1 requested"


def test_unknown_layer_names_and_bad_options_are_one_line_errors(capture):
    graph = capture(small_cnn(), 2, 3, 8, 8)
    with pytest.raises(PassError, match=r"option 'blocks': names unknown layer 'fc_1': did you mean 'fc1'\?") as err:
        run_pass(graph, blocks={"fc_1": 4})
    assert "\n" not in str(err.value)
    with pytest.raises(PassError, match="option 'skip': names unknown layer 'conv9'"):
        run_pass(graph, skip=("conv9",))
    with pytest.raises(PassError, match="power of two"):
        run_pass(graph, block_size=6)
    with pytest.raises(PassError, match=r"blocks\['fc1'\] must be a power of two"):
        run_pass(graph, blocks={"fc1": 3})
    with pytest.raises(PassError, match="did you mean 'block_size'"):
        config_from_dict(projection.BlockCirculantConfig, {"blocksize": 4}, owner="block-circulant")
    with pytest.raises(PassError, match="not one of"):
        make_pass("block-circulant", {"method": "median"})


# ---------------------------------------------------------------------------- batch-norm
def test_bn_not_folded_stays_separate_and_fold_batchnorm_leaves_circulant_convs(capture, op_count, assert_same_function):
    graph = capture(small_cnn(), 2, 3, 8, 8)
    ref = projected_dense_reference(graph, {"conv2": 4, "conv3": 4, "fc1": 4})
    result = run_pass(graph, block_size=4)
    assert result.stats["bn_handling"] == "kept separate after 1 circulant conv(s); run fold-batchnorm first to fold it exactly"
    assert op_count(graph, *BNS) == 2  # bn1 (after the dense conv1) and bn2 (after circulant conv2)
    assert_same_function(ref, graph, rtol=1e-4, atol=1e-5)

    # fold-batchnorm matches aten convs only: bn1 folds into dense conv1, bn2 stays after the circulant conv
    after = make_pass("fold-batchnorm")(graph.clone())
    assert after.stats["folded"] == 1
    assert after.stats["skipped"] == {"input is not produced by a conv or linear": 1}
    assert op_count(after.graph, CONV) == 2 and op_count(after.graph, *BNS) == 1
    for node in after.graph.call_nodes(CONV):
        assert after.graph.tensor_of(node.args[1]).dim() == 5  # still compact
    assert_same_function(graph, after.graph, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- training, pipeline, backends
def test_compact_vectors_train_through_the_graph(capture):
    graph = folded(capture(small_cnn(), 2, 3, 8, 8))
    run_pass(graph, block_size=4)
    x = torch.randn(4, 3, 8, 8)
    params = []
    for node in graph.call_nodes(CONV, LINEAR):
        for i in graph.annotations(node)["trainable_inputs"]:
            if node.args[i] is not None:
                params.append(graph.gm.get_parameter(str(node.args[i].target)))
    assert len(params) == 6  # 3 compact weights + 3 biases (conv2: the folded BN bias)
    for p in params:
        p.requires_grad_(True)
    graph.gm(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    c_fc = next(graph.tensor_of(n.args[1]) for n in graph.call_nodes(LINEAR))
    assert c_fc.grad.shape == c_fc.shape == (16, 8, 4)


def test_pipeline_checks_the_budget(capture):
    graph = capture(small_cnn(), 2, 3, 8, 8)
    report = Pipeline(["fold-batchnorm", ("block-circulant", {"block_size": 4, "min_sqnr_db": -20.0})]).run(graph)
    step = report.steps[1]
    assert step.name == "block-circulant" and not step.exact and step.changed
    assert step.stats["converted"] == 3 and step.stats["bn_handling"] == "folded before projection"
    assert -20.0 <= step.worst_step_sqnr_db < 60.0
    assert report.params_after < report.params_before
    with pytest.raises(VerificationError, match="below the pass budget min_sqnr_db=200"):
        Pipeline(["fold-batchnorm", ("block-circulant", {"block_size": 4, "min_sqnr_db": 200.0})]).run(graph)


def test_onnx_artifact_runs_in_ort_and_stores_compact_weights(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from graphpress.backends.onnxruntime.lower import OnnxRuntimeBackend, lower_to_onnx

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.fc1 = nn.Linear(16, 1024)
            self.fc2 = nn.Linear(1024, 1024)
            self.head = nn.Linear(1024, 10)

        def forward(self, x):
            h = F.relu(self.conv(x)).mean((2, 3))
            return self.head(F.relu(self.fc2(F.relu(self.fc1(h)))))

    graph = Graph.capture(Wide().eval(), (torch.randn(3, 16, 6, 6),))
    dense_info = lower_to_onnx(graph, tmp_path / "dense")
    result = run_pass(graph, block_size=16)
    assert result.stats["converted"] == 3 and result.stats["kept_dense"] == {"head": "b=16 does not divide 10x1024"}
    lowered = OnnxRuntimeBackend().lower(graph, tmp_path / "circ")  # checks example, batch 1 and batch 6 inputs
    assert lowered.check["passed"]
    # fc2 (1024x1024) dominates: the artifact shrinks about 16x
    assert lowered.info["model_bytes"] < dense_info["model_bytes"] / 10
    session = ort.InferenceSession(str(tmp_path / "circ" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 16, 6, 6)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(out, graph.run(x)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_resnet20_checkpoint(shared_models):
    from graphpress.frontends import load

    graph = load(str(shared_models / "resnet20_cifar10" / "resnet20-12fca82f.th"), arch="graphpress.zoo.resnet20:resnet20")
    report = Pipeline(["fold-batchnorm", ("block-circulant", {"block_size": 8, "min_sqnr_db": -10.0})]).run(graph)
    stats = report.steps[1].stats
    assert stats["converted"] == 18  # every 3x3 conv but the stem
    assert stats["kept_dense"] == {"conv1": "b=8 does not divide 16x3", "linear": "b=8 does not divide 10x64"}
    assert stats["params_before"] == 8 * stats["params_after"]
    g = report.graph
    assert sum(1 for _ in g.call_nodes(aten.conv2d)) == 1 and sum(1 for _ in g.call_nodes(CONV)) == 18
