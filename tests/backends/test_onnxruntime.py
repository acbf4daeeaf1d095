"""ONNX Runtime backend: lowered outputs vs torch (max abs < 1e-5), dynamic batch, errors."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphpress.backends import available_backends, get_backend
from graphpress.backends.onnxruntime import OrtRunner, default_providers
from graphpress.backends.onnxruntime.lower import check_onnx, optimize_onnx
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph

ATOL = 1e-5


class SmallCNN(nn.Module):
    """conv-bn-relu-pool-linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        # Non-trivial BN statistics so that the BN is not an identity.
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


class TinyBlock(nn.Module):
    """Transformer-ish MLP block: pre-LayerNorm, Linear-GELU-Linear, residual, head."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = x + self.down(nn.functional.gelu(self.up(self.ln(x))))
        return self.head(x)


class TokenModel(nn.Module):
    """Integer token ids -> embedding -> linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 7)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def _lower(graph: Graph, folder):
    return get_backend("onnxruntime").lower(graph, folder)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    graph = Graph.capture(SmallCNN(), (torch.randn(2, 3, 8, 8),))
    folder = tmp_path_factory.mktemp("cnn")
    return graph, folder, _lower(graph, folder)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    torch.manual_seed(1)
    graph = Graph.capture(TinyBlock(), (torch.randn(2, 6, 16),))
    folder = tmp_path_factory.mktemp("block")
    return graph, folder, _lower(graph, folder)


def _max_abs_vs_torch(graph: Graph, runner: OrtRunner, inputs) -> float:
    refs = graph.run(*inputs)
    outs = runner(*[x.numpy() for x in inputs])
    assert len(outs) == len(refs)
    return max(float(np.abs(o - r.numpy()).max()) for o, r in zip(outs, refs))


@pytest.mark.parametrize("name", ["cnn", "block"])
def test_ort_matches_torch_at_batch_2_and_7(name, request):
    graph, folder, lowered = request.getfixturevalue(name)
    assert graph.dynamic_batch
    runner = OrtRunner(folder / lowered.model_file)
    for batch in (2, 7):
        x = graph.random_inputs(seed=10 + batch, batch=batch)
        assert x[0].shape[0] == batch
        err = _max_abs_vs_torch(graph, runner, x)
        assert err < ATOL, f"batch {batch}: max abs {err}"
    # The check ran on the example inputs plus two random sets at other batch sizes.
    assert lowered.check["passed"] is True
    labels = [r["inputs"] for r in lowered.check["runs"]]
    assert labels[0] == "example inputs" and "batch 1" in labels[1] and "batch 5" in labels[2]
    assert lowered.check["worst"]["max_abs"] < ATOL


@pytest.mark.parametrize("name", ["cnn", "block"])
def test_onnx_has_symbolic_batch_dim(name, request):
    graph, folder, lowered = request.getfixturevalue(name)
    model = onnx.load(str(folder / lowered.model_file))
    assert [i.name for i in model.graph.input] == graph.input_names
    assert [o.name for o in model.graph.output] == graph.output_names
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", value.name
        assert all(d.HasField("dim_value") for d in dims[1:])
    assert model.opset_import[0].version == 18
    assert lowered.info["dynamic_dims"] == ["batch"] and lowered.info["opset"] == 18
    assert lowered.files == ["model.onnx"] and lowered.info["external_data"] is False
    # Weights are inline: the file holds at least the fp32 parameters.
    assert (folder / "model.onnx").stat().st_size >= graph.parameter_bytes()


def test_integer_token_inputs(tmp_path):
    torch.manual_seed(2)
    ids = torch.randint(0, 50, (2, 5))
    graph = Graph.capture(TokenModel(), (ids,), input_names=["ids"], output_names=["logits"])
    lowered = _lower(graph, tmp_path)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    runner = OrtRunner(tmp_path / "model.onnx")
    assert runner.input_names == ["ids"] and runner.output_names == ["logits"]
    for batch in (2, 7):
        x = graph.random_inputs(seed=batch, batch=batch)
        assert x[0].dtype == torch.int64
        assert _max_abs_vs_torch(graph, runner, x) < ATOL
    assert lowered.check["passed"]


def test_runner_accepts_torch_and_numpy(cnn):
    graph, folder, lowered = cnn
    runner = OrtRunner(folder / lowered.model_file, threads=1)
    x = graph.example_inputs[0]
    (a,) = runner(x)
    (b,) = runner(x.numpy())
    np.testing.assert_array_equal(a, b)
    assert runner.providers == default_providers() == ["CPUExecutionProvider"] or "CUDAExecutionProvider" in runner.providers
    with pytest.raises(BackendError, match="got 2 inputs, expected 1"):
        runner(x, x)


def test_unknown_provider_is_one_line_error(cnn):
    _, folder, lowered = cnn
    with pytest.raises(BackendError, match="'NoSuchExecutionProvider' is not available"):
        OrtRunner(folder / lowered.model_file, providers=["NoSuchExecutionProvider"])


def test_check_names_the_diverging_output(cnn, tmp_path):
    graph, folder, lowered = cnn
    changed = graph.clone()
    # Perturb the classifier bias after lowering: ORT (old weights) must now disagree with torch.
    target = next(n.target for n in changed.nodes if n.op == "get_attr" and str(n.target).endswith("fc.bias"))
    changed.set_tensor(target, changed.get_tensor(target) + 1e-2)
    with pytest.raises(BackendError) as err:
        check_onnx(changed, folder / lowered.model_file)
    msg = str(err.value)
    assert "\n" not in msg
    assert "output 'output'" in msg and "example inputs" in msg and "max abs err 0.01" in msg


def test_unsupported_op_is_one_line_error_and_quiet(tmp_path, capfd):
    @torch.library.custom_op("gptest_ort::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    class UsesCustomOp(nn.Module):
        def forward(self, x):
            return twice(x) + 1

    graph = Graph.capture(UsesCustomOp(), (torch.randn(2, 3),))
    capfd.readouterr()
    with pytest.raises(BackendError) as err:
        _lower(graph, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert msg.startswith("onnxruntime: ONNX export of 'UsesCustomOp' failed")
    assert "gptest_ort.twice" in msg and "No ONNX function found" in msg
    out, errs = capfd.readouterr()
    assert "[torch.onnx]" not in out and "[torch.onnx]" not in errs


def test_lowering_prints_nothing(tmp_path, capfd):
    graph = Graph.capture(TinyBlock(dim=8, hidden=8), (torch.randn(2, 3, 8),), dynamic_batch=False)
    capfd.readouterr()
    lowered = _lower(graph, tmp_path)
    out, errs = capfd.readouterr()
    assert out == "" and "torch.onnx" not in errs
    # A static graph keeps a fixed dim 0, and the check ran at the example batch only.
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert lowered.info["dynamic_dims"] == []
    assert all("batch" not in r["inputs"] for r in lowered.check["runs"][1:])


def test_offline_optimized_model_still_matches(cnn, tmp_path):
    graph, folder, lowered = cnn
    path = tmp_path / "model.onnx"
    shutil.copyfile(folder / lowered.model_file, path)
    optimize_onnx(path)
    model = onnx.load(str(path))
    # BatchNormalization is folded into the Conv by the extended level.
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    report = check_onnx(graph, path)
    assert report["passed"] and report["worst"]["max_abs"] < ATOL
    assert not list(tmp_path.glob("*.tmp"))


def test_registry_errors():
    assert "onnxruntime" in available_backends()
    with pytest.raises(BackendError, match=r"unknown backend 'tensorrt'; known backends: .*onnxruntime"):
        get_backend("tensorrt")
    with pytest.raises(BackendError, match="opset 17 is not supported"):
        get_backend("onnxruntime", opset=17)
    assert get_backend("onnxruntime", opset=19).opset == 19


def test_debug_metadata_is_dropped_unless_asked(cnn, tmp_path):
    from graphpress.backends.onnxruntime.lower import lower_to_onnx

    graph = cnn[0]
    lean = lower_to_onnx(graph, tmp_path / "lean")
    full = lower_to_onnx(graph, tmp_path / "full", debug_metadata=True)
    m_lean, m_full = onnx.load(str(tmp_path / "lean" / "model.onnx")), onnx.load(str(tmp_path / "full" / "model.onnx"))
    assert lean["metadata_entries_dropped"] > 0
    assert all(len(n.metadata_props) == 0 and not n.doc_string for n in m_lean.graph.node)
    assert any(len(n.metadata_props) > 0 for n in m_full.graph.node)
    assert lean["model_bytes"] < full["model_bytes"]
    # the model itself is untouched: same nodes, same outputs
    assert [n.op_type for n in m_lean.graph.node] == [n.op_type for n in m_full.graph.node]
    x = graph.example_inputs[0].numpy()
    import onnxruntime as ort

    outs = [ort.InferenceSession(str(tmp_path / f / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {m_lean.graph.input[0].name: x})[0]
            for f in ("lean", "full")]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert {p.key for p in m_lean.metadata_props} >= {"graphpress_version", "graphpress_model"}
