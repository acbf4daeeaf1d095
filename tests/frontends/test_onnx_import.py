"""Tests for graphpress's ONNX -> torch.fx importer (``graphpress.frontends.onnx_import``).

Three layers:

* whole models exported from torch (dynamo exporter at opset 18 with a dynamic batch, legacy
  exporter at opsets 11 and 13) must match onnxruntime and the torch model at batch 2 and 5;
* hand-built graphs cover opset-9 attribute forms, constant folding of computed weights and the
  error paths (unsupported ops, missing/truncated files);
* a table of single-op graphs compares individual converters (attribute corner cases) against
  onnxruntime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

from graphpress.errors import FrontendError
from graphpress.frontends.onnx_import import ImportedOnnx, import_onnx, supported_ops
from graphpress.frontends.onnx_import.loader import fold_constants

TOL = 1e-5
INT_MAX = 2**63 - 1


# --------------------------------------------------------------------------- torch models


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.avg(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class ResidualBlock(nn.Module):
    """ResNet "option A" block: strided convs, shortcut subsampled and zero-padded in channels."""

    def __init__(self, cin: int = 4, cout: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.extra = cout - cin

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(y + shortcut)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        return torch.softmax(self.fc2(self.norm(F.gelu(self.fc1(x)))), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


MODELS = {
    "cnn": (CNN, (3, 16, 16)),
    "residual": (ResidualBlock, (4, 8, 8)),
    "mlp": (MLP, (16,)),
    "attention": (Attention, (6, 16)),
}
EXPORTERS = ["dynamo18", "legacy11", "legacy13"]


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name][0]()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial BN statistics, so folding mistakes show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Lazily export (model, exporter) pairs once per module; returns (torch model, path)."""
    folder = tmp_path_factory.mktemp("onnx_import")
    cache: dict[tuple[str, str], tuple[nn.Module, str]] = {}

    def get(name: str, exporter: str):
        key = (name, exporter)
        if key not in cache:
            model = _build(name)
            x = torch.randn(2, *MODELS[name][1])  # batch 1 would be specialized by torch.export
            path = str(folder / f"{name}_{exporter}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if exporter == "dynamo18":
                    torch.onnx.export(
                        model, (x,), path, dynamo=True, opset_version=18, verbose=False,
                        dynamic_shapes=({0: torch.export.Dim("batch")},),
                    )
                else:
                    torch.onnx.export(
                        model, (x,), path, dynamo=False, opset_version=int(exporter[-2:]),
                        input_names=["x"], output_names=["y"],
                        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                        # opset 13: keep BatchNormalization/Constant nodes (no exporter folding)
                        do_constant_folding=exporter == "legacy11",
                    )
            cache[key] = (model, path)
        return cache[key]

    return get


def _ort(path_or_model, *inputs: np.ndarray) -> list[np.ndarray]:
    model = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), inputs)})


def _run(imported: ImportedOnnx, *inputs: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = imported.module(*inputs)
    assert isinstance(outputs, tuple)
    return [o.numpy() for o in outputs]


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.dtype == bool or b.dtype == bool:
        return float((a != b).sum())
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


# --------------------------------------------------------------------------- exported models


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_matches_onnxruntime_and_torch(exported, name, exporter):
    model, path = exported(name, exporter)
    imported = import_onnx(path)
    assert isinstance(imported.module, torch.fx.GraphModule)
    assert len(imported.input_names) == 1 and len(imported.output_names) == 1
    dims, dtype = imported.input_specs[0]
    assert dtype == torch.float32 and isinstance(dims[0], str) and dims[1:] == MODELS[name][1]
    for batch in (2, 5):
        (x,) = imported.example_inputs(batch, seed=batch)
        assert x.shape[0] == batch
        (got,) = _run(imported, x)
        (want,) = _ort(path, x.numpy())
        with torch.no_grad():
            reference = model(x).numpy()
        assert _max_err(got, want) < TOL
        assert _max_err(got, reference) < TOL


def test_parameters_keep_initializer_names(exported):
    model, path = exported("residual", "legacy13")
    imported = import_onnx(path)
    params = dict(imported.module.named_parameters())
    buffers = dict(imported.module.named_buffers())
    # Hierarchical names survive, so the state dict lines up with the torch model's.
    assert "conv1.weight" in params and "bn1.weight" in params
    assert "bn1.running_mean" in buffers and "bn1.running_var" in buffers  # statistics are buffers
    torch.testing.assert_close(params["conv1.weight"].detach(), model.conv1.weight.detach())
    assert imported.attr_names["bn1.running_var"] == "bn1.running_var"
    assert "batch_norm" in imported.module.code


def test_shape_chains_stay_symbolic(exported):
    """Legacy exports compute reshape targets with Shape/Gather/Concat: no baked-in batch size."""
    _, path = exported("attention", "legacy11")
    imported = import_onnx(path)
    code = imported.module.code
    assert "sym_size" in code
    assert "tolist" not in code and "item()" not in code


@pytest.mark.parametrize("exporter", ["dynamo18", "legacy13"])
@pytest.mark.parametrize("name", ["cnn", "attention"])
def test_torch_export_with_dynamic_batch(exported, name, exporter):
    model, path = exported(name, exporter)
    imported = import_onnx(path)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        imported.module, imported.example_inputs(2), dynamic_shapes=tuple({0: batch} for _ in imported.input_names)
    )
    (x,) = imported.example_inputs(3, seed=7)
    with torch.no_grad():
        got = program.module()(x)[0]
        reference = model(x)
    assert got.shape[0] == 3
    torch.testing.assert_close(got, reference, atol=TOL, rtol=0)


# --------------------------------------------------------------------------- hand-built graphs


def _model(nodes, inputs, outputs, initializers=(), opset=13, domains=()):
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [oh.make_opsetid("", opset), *[oh.make_opsetid(d, 1) for d in domains]]
    return oh.make_model(graph, opset_imports=opsets, ir_version=8)


def test_opset9_attribute_forms():
    """Slice/Unsqueeze/Pad/Clip/ReduceMean with attributes, and an opset-9 reshape chain."""
    i64 = lambda name, vals: onnx.numpy_helper.from_array(np.array(vals, dtype=np.int64), name)  # noqa: E731
    nodes = [
        oh.make_node("Slice", ["x"], ["s"], starts=[1], ends=[INT_MAX], axes=[2]),  # [N,3,7]
        oh.make_node("Unsqueeze", ["s"], ["u"], axes=[1]),  # [N,1,3,7]
        oh.make_node("Pad", ["u"], ["p"], pads=[0, 0, 1, 0, 0, 0, 1, 2], value=1.5),  # [N,1,5,9]
        oh.make_node("Clip", ["p"], ["c"], min=-0.5, max=1.0),
        oh.make_node("Upsample", ["c", "scales"], ["up"], mode="nearest"),  # [N,1,10,18]
        oh.make_node("ReduceMean", ["up"], ["r"], axes=[2], keepdims=1),  # [N,1,1,18]
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        oh.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
        oh.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        oh.make_node("Reshape", ["r", "target"], ["y"]),  # [N,18]
        oh.make_node("Squeeze", ["u"], ["z"], axes=[1]),
    ]
    model = _model(
        nodes,
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 18]), oh.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3, 7])],
        [i64("zero", 0), i64("minus1", [-1]), onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")],
        opset=9,
    )
    imported = import_onnx(model)
    assert imported.input_specs == [(("N", 3, 8), torch.float32)]
    for batch in (2, 5):
        (x,) = imported.example_inputs(batch)
        got = _run(imported, x)
        want = _ort(model, x.numpy())
        assert got[0].shape == (batch, 18)
        for g, w in zip(got, want):
            assert _max_err(g, w) < TOL


def test_constant_computed_weight_becomes_parameter():
    """Constant -> Mul -> Conv weight: folded before conversion into one real parameter."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [
        oh.make_node("Constant", [], ["w0"], value=onnx.numpy_helper.from_array(w, "w0")),
        oh.make_node("Constant", [], ["scale"], value=onnx.numpy_helper.from_array(np.array(0.5, np.float32), "scale")),
        oh.make_node("Mul", ["w0", "scale"], ["w_scaled"]),
        oh.make_node("Conv", ["x", "w_scaled"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(
        nodes,
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
    )
    folded = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.initializer[0].name == "w_scaled"

    imported = import_onnx(model)
    tensors = dict(imported.module.named_parameters()) | dict(imported.module.named_buffers())
    assert list(tensors) == ["w_scaled"]
    torch.testing.assert_close(tensors["w_scaled"].detach(), torch.from_numpy(w * 0.5))
    assert "mul" not in imported.module.code.lower()
    (x,) = imported.example_inputs(3)
    assert _max_err(_run(imported, x)[0], _ort(model, x.numpy())[0]) < TOL


def test_unsupported_ops_are_listed_in_one_error():
    nodes = [
        oh.make_node("FusedConv", ["x"], ["a"], domain="com.microsoft"),
        oh.make_node("Relu", ["a"], ["b"]),
        oh.make_node("FusedConv", ["b"], ["c"], domain="com.microsoft"),
        oh.make_node("NonMaxSuppression", ["c", "c"], ["y"]),
    ]
    model = _model(
        nodes,
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [oh.make_tensor_value_info("y", TensorProto.INT64, None)],
        domains=["com.microsoft"],
    )
    with pytest.raises(FrontendError) as info:
        import_onnx(model)
    message = str(info.value)
    assert "\n" not in message
    assert "3 unsupported ONNX op(s): com.microsoft::FusedConv (x2), NonMaxSuppression (x1)" in message
    assert "Relu" not in message


def test_unknown_default_domain_op_is_reported_not_checker_noise():
    model = _model(
        [oh.make_node("NoSuchOp", ["x"], ["y"])],
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(FrontendError, match=r"1 unsupported ONNX op\(s\): NoSuchOp \(x1\)"):
        import_onnx(model)


def test_missing_and_broken_files(tmp_path, exported):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FrontendError, match="nope.onnx: no such file"):
        import_onnx(missing)

    _, path = exported("mlp", "legacy11")
    data = open(path, "rb").read()
    for name, content in [("truncated.onnx", data[: len(data) // 2]), ("empty.onnx", b""), ("text.onnx", b"not a model")]:
        broken = tmp_path / name
        broken.write_bytes(content)
        with pytest.raises(FrontendError) as info:
            import_onnx(broken)
        assert str(info.value).startswith(str(broken)) and "\n" not in str(info.value)


def test_supported_ops_lists_the_registry():
    ops = supported_ops()
    assert ops == sorted(ops)
    for op in ["Conv", "Gemm", "Resize", "Slice", "Squeeze", "ReduceMean", "Einsum", "Trilu", "CumSum", "Mod"]:
        assert op in ops


def test_example_inputs_dtypes_and_symbolic_dims():
    model = _model(
        [oh.make_node("Gather", ["table", "ids"], ["y"])],
        [
            oh.make_tensor_value_info("table", TensorProto.FLOAT, [5, 3]),
            oh.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"]),
        ],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 3])],
    )
    imported = import_onnx(model)
    assert imported.input_names == ["table", "ids"]
    with pytest.raises(FrontendError, match="ids.*symbolic dimension 1"):
        imported.example_inputs()
    imported.input_specs[1] = (("N", 4), torch.int64)
    table, ids = imported.example_inputs(batch=3)
    assert ids.dtype == torch.int64 and ids.shape == (3, 4) and set(ids.unique().tolist()) <= {0, 1}
    assert _max_err(_run(imported, table, ids)[0], _ort(model, table.numpy(), ids.numpy())[0]) == 0


# --------------------------------------------------------------------------- single-op table


class Init:
    """Marks a test input as initializer (constant) instead of graph input."""

    def __init__(self, value):
        self.value = np.asarray(value)


_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
}

R = np.random.default_rng(42)


def f32(*shape):
    return R.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


# (id, op, inputs, attributes, opset, number of outputs)
CASES = [
    ("conv1d_same_upper_stride2", "Conv", [f32(2, 3, 11), Init(f32(4, 3, 3))], dict(auto_pad="SAME_UPPER", strides=[2], dilations=[1]), 13, 1),
    ("conv2d_asym_pads_groups", "Conv", [f32(2, 4, 7, 6), Init(f32(6, 2, 3, 2)), Init(f32(6))], dict(pads=[0, 1, 2, 0], group=2, dilations=[2, 1]), 13, 1),
    ("conv2d_same_lower", "Conv", [f32(1, 2, 6, 6), Init(f32(3, 2, 2, 2))], dict(auto_pad="SAME_LOWER"), 11, 1),
    ("conv2d_valid", "Conv", [f32(1, 2, 6, 6), Init(f32(3, 2, 3, 3))], dict(auto_pad="VALID", strides=[2, 2]), 11, 1),
    ("conv_transpose", "ConvTranspose", [f32(2, 4, 5, 5), Init(f32(4, 3, 3, 3)), Init(f32(3))], dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 13, 1),
    ("conv_transpose_asym", "ConvTranspose", [f32(1, 2, 4, 4), Init(f32(2, 2, 3, 3))], dict(strides=[2, 2], pads=[0, 1, 1, 0]), 13, 1),
    ("conv_transpose_output_shape", "ConvTranspose", [f32(1, 2, 4, 4), Init(f32(2, 3, 3, 3))], dict(strides=[2, 2], output_shape=[8, 8]), 13, 1),
    ("gemm_transA_alpha_beta", "Gemm", [f32(4, 3), Init(f32(4, 5)), Init(f32(3, 5))], dict(transA=1, alpha=0.5, beta=2.0), 13, 1),
    ("gemm_transB_scalar_c", "Gemm", [f32(3, 4), Init(f32(5, 4)), Init(np.float32(0.3))], dict(transB=1), 13, 1),
    ("matmul_batched", "MatMul", [f32(2, 3, 4), f32(4, 5)], {}, 13, 1),
    ("maxpool_ceil_pads", "MaxPool", [f32(2, 3, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), 13, 1),
    ("maxpool_asym", "MaxPool", [f32(1, 2, 6, 6)], dict(kernel_shape=[2, 2], pads=[0, 0, 1, 1]), 13, 1),
    ("maxpool1d_dilated", "MaxPool", [f32(2, 3, 12)], dict(kernel_shape=[3], dilations=[2]), 13, 1),
    ("avgpool_exclude_pad", "AveragePool", [f32(2, 3, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 13, 1),
    ("avgpool_include_pad", "AveragePool", [f32(2, 3, 7, 7)], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), 13, 1),
    ("avgpool_asym_exclude", "AveragePool", [f32(1, 2, 6, 6)], dict(kernel_shape=[3, 3], pads=[0, 0, 2, 2]), 13, 1),
    ("avgpool_ceil", "AveragePool", [f32(1, 2, 7, 7)], dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), 13, 1),
    ("global_avg", "GlobalAveragePool", [f32(2, 3, 5, 4)], {}, 13, 1),
    ("global_max", "GlobalMaxPool", [f32(2, 3, 5)], {}, 13, 1),
    ("batchnorm", "BatchNormalization", [f32(2, 3, 4, 4), Init(f32(3)), Init(f32(3)), Init(f32(3)), Init(np.abs(f32(3)) + 0.5)], dict(epsilon=1e-3), 15, 1),
    ("instancenorm", "InstanceNormalization", [f32(2, 3, 5, 5), Init(f32(3)), Init(f32(3))], {}, 13, 1),
    ("layernorm_axis", "LayerNormalization", [f32(2, 3, 4, 5), Init(f32(4, 5)), Init(f32(4, 5))], dict(axis=-2), 17, 1),
    ("layernorm_broadcast_scale", "LayerNormalization", [f32(2, 3, 4), Init(f32(1, 4))], dict(epsilon=1e-3), 17, 1),
    ("resize_nearest_scales", "Resize", [f32(1, 2, 3, 4), "", Init(np.array([1, 1, 2, 3], np.float32))], dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), 13, 1),
    ("resize_linear_sizes", "Resize", [f32(1, 2, 3, 4), "", "", Init(i64(1, 2, 5, 7))], dict(mode="linear"), 13, 1),
    ("resize_nearest_half_pixel", "Resize", [f32(1, 2, 3, 4), "", Init(np.array([1, 1, 2, 2], np.float32))], dict(mode="nearest", nearest_mode="round_prefer_ceil"), 13, 1),
    ("resize_align_corners", "Resize", [f32(1, 2, 3, 4), Init(np.zeros(0, np.float32)), Init(np.array([1, 1, 2, 2], np.float32))], dict(mode="linear", coordinate_transformation_mode="align_corners"), 11, 1),
    ("resize_nearest_half_pixel_floor_down", "Resize", [f32(1, 2, 5, 6), "", Init(np.array([1, 1, 0.6, 0.5], np.float32))], dict(mode="nearest"), 13, 1),
    ("resize_nearest_sizes_align_corners", "Resize", [f32(1, 2, 5, 6), "", "", Init(i64(1, 2, 11, 4))], dict(mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="ceil"), 13, 1),
    ("resize_v10", "Resize", [f32(1, 2, 3, 4), Init(np.array([1, 1, 3, 0.5], np.float32))], dict(mode="nearest"), 10, 1),
    ("pad_reflect", "Pad", [f32(2, 3, 5, 5), Init(i64(0, 0, 1, 2, 0, 0, 2, 1))], dict(mode="reflect"), 13, 1),
    ("pad_edge", "Pad", [f32(2, 3, 5), Init(i64(0, 0, 2, 0, 0, 3))], dict(mode="edge"), 13, 1),
    ("pad_constant_value", "Pad", [f32(2, 3), Init(i64(1, 0, 0, 2)), Init(np.float32(-2.5))], {}, 11, 1),
    ("pad_axes", "Pad", [f32(2, 3, 4), Init(i64(1, 2)), "", Init(i64(-2))], {}, 18, 1),
    ("pad_negative_crop", "Pad", [f32(2, 6), Init(i64(0, -1, 0, 2))], {}, 13, 1),
    ("slice_negative_step", "Slice", [f32(3, 8), Init(i64(-2)), Init(i64(0)), Init(i64(1)), Init(i64(-2))], {}, 13, 1),
    ("slice_reverse_all", "Slice", [f32(3, 5), Init(i64(-1)), Init(i64(-INT_MAX)), Init(i64(1)), Init(i64(-1))], {}, 13, 1),
    ("slice_multi_axes", "Slice", [f32(4, 6, 8), Init(i64(1, -5)), Init(i64(INT_MAX, -1)), Init(i64(0, -1)), Init(i64(2, 1))], {}, 13, 1),
    ("gather_2d_indices", "Gather", [f32(3, 5, 2), Init(np.array([[0, -1], [2, 3]], np.int64))], dict(axis=1), 13, 1),
    ("gather_scalar", "Gather", [f32(3, 5), Init(np.array(-1, np.int64))], dict(axis=0), 13, 1),
    ("gather_runtime_indices", "Gather", [f32(6, 3), np.array([[1, 5], [0, 0]], np.int64)], {}, 13, 1),
    ("gather_elements", "GatherElements", [f32(3, 4), Init(np.array([[0, -1, 2, 1], [3, 3, -4, 0]], np.int64))], dict(axis=1), 13, 1),
    ("split_sizes", "Split", [f32(2, 7), Init(i64(3, 4))], dict(axis=1), 13, 2),
    ("split_attr", "Split", [f32(6, 2)], dict(split=[1, 5]), 11, 2),
    ("split_num_outputs", "Split", [f32(2, 7)], dict(axis=1, num_outputs=3), 18, 3),
    ("squeeze_axes", "Squeeze", [f32(1, 3, 1, 2), Init(i64(0, -2))], {}, 13, 1),
    ("unsqueeze_axes", "Unsqueeze", [f32(3, 2), Init(i64(0, -1))], {}, 13, 1),
    ("reduce_mean_v18", "ReduceMean", [f32(2, 3, 4), Init(i64(0, 2))], dict(keepdims=0), 18, 1),
    ("reduce_sum_v13", "ReduceSum", [f32(2, 3, 4), Init(i64(-1))], {}, 13, 1),
    ("reduce_sum_noop", "ReduceSum", [f32(2, 3)], dict(noop_with_empty_axes=1), 13, 1),
    ("reduce_max_all", "ReduceMax", [f32(2, 3, 4)], dict(keepdims=0), 13, 1),
    ("reduce_min", "ReduceMin", [f32(2, 3, 4)], dict(axes=[1]), 13, 1),
    ("reduce_prod", "ReduceProd", [f32(2, 3, 4)], dict(axes=[0, 2]), 13, 1),
    ("reduce_l2", "ReduceL2", [f32(2, 3, 4)], dict(axes=[1], keepdims=0), 13, 1),
    ("reduce_logsumexp", "ReduceLogSumExp", [f32(2, 3, 4), Init(i64(1, 2))], {}, 18, 1),
    ("argmax_last", "ArgMax", [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], dict(axis=1, keepdims=0, select_last_index=1), 13, 1),
    ("argmin", "ArgMin", [f32(3, 4)], dict(axis=0), 13, 1),
    ("where", "Where", [f32(3, 4) > 0, f32(3, 4), Init(np.float32(0.25))], {}, 13, 1),
    ("equal", "Equal", [np.array([1, 2, 3], np.int64), Init(i64(1, 0, 3))], {}, 13, 1),
    ("less", "Less", [f32(3, 4), Init(np.float32(0.0))], {}, 13, 1),
    ("greater", "Greater", [f32(3, 4), f32(4)], {}, 13, 1),
    ("not", "Not", [f32(5) > 0], {}, 13, 1),
    ("and", "And", [f32(5) > 0, f32(5) > 0], {}, 13, 1),
    ("or", "Or", [f32(5) > 0, f32(5) > 0], {}, 13, 1),
    ("expand_bidirectional", "Expand", [f32(3, 1), Init(i64(2, 1, 4))], {}, 13, 1),
    ("tile", "Tile", [f32(2, 3), Init(i64(2, 1))], {}, 13, 1),
    ("range", "Range", [np.array(1, np.int64), np.array(9, np.int64), Init(np.array(3, np.int64))], {}, 13, 1),
    ("max_variadic", "Max", [f32(3, 4), f32(4), f32(1, 4)], {}, 13, 1),
    ("min_variadic", "Min", [f32(3, 4), f32(3, 1)], {}, 13, 1),
    ("sum_variadic", "Sum", [f32(3, 4), f32(4), f32(3, 4)], {}, 13, 1),
    ("mean_variadic", "Mean", [f32(3, 4), f32(4)], {}, 13, 1),
    ("div_int_trunc", "Div", [np.array([7, -7, 5], np.int64), Init(i64(2, 2, -3))], {}, 13, 1),
    ("mod_int", "Mod", [np.array([7, -7, 5], np.int64), Init(i64(3, 3, -3))], {}, 13, 1),
    ("mod_fmod", "Mod", [f32(5) * 4, Init(np.float32(1.5))], dict(fmod=1), 13, 1),
    ("pow", "Pow", [np.abs(f32(3, 4)), Init(np.float32(1.7))], {}, 13, 1),
    ("sqrt", "Sqrt", [np.abs(f32(5))], {}, 13, 1),
    ("log", "Log", [np.abs(f32(5)) + 0.1], {}, 13, 1),
    ("reciprocal", "Reciprocal", [np.abs(f32(5)) + 0.5], {}, 13, 1),
    ("sub_neg_abs_exp", "Sub", [f32(5), Init(np.float32(1.0))], {}, 13, 1),
    ("neg", "Neg", [f32(5)], {}, 13, 1),
    ("abs", "Abs", [f32(5)], {}, 13, 1),
    ("exp", "Exp", [f32(5)], {}, 13, 1),
    ("sin", "Sin", [f32(5)], {}, 13, 1),
    ("cos", "Cos", [f32(5)], {}, 13, 1),
    ("floor", "Floor", [f32(5) * 3], {}, 13, 1),
    ("ceil", "Ceil", [f32(5) * 3], {}, 13, 1),
    ("round", "Round", [np.array([0.5, 1.5, 2.5, -0.5, 1.2], np.float32)], {}, 13, 1),
    ("sign", "Sign", [np.array([-2, 0, 3], np.float32)], {}, 13, 1),
    ("erf", "Erf", [f32(5)], {}, 13, 1),
    ("einsum", "Einsum", [f32(2, 3, 4), f32(2, 4, 5)], dict(equation="bij, bjk -> bik"), 13, 1),
    ("trilu_upper_k", "Trilu", [f32(2, 4, 4), Init(np.array(1, np.int64))], {}, 14, 1),
    ("trilu_lower", "Trilu", [f32(4, 5)], dict(upper=0), 14, 1),
    ("cumsum_exclusive_reverse", "CumSum", [f32(3, 4), Init(np.array(1, np.int64))], dict(exclusive=1, reverse=1), 14, 1),
    ("cumsum", "CumSum", [f32(3, 4), Init(np.array(0, np.int32))], {}, 14, 1),
    ("softmax_v11_axis1", "Softmax", [f32(2, 3, 4)], dict(axis=1), 11, 1),
    ("logsoftmax_v13_axis1", "LogSoftmax", [f32(2, 3, 4)], dict(axis=1), 13, 1),
    ("hardsigmoid", "HardSigmoid", [f32(10) * 4], {}, 13, 1),
    ("hardswish", "HardSwish", [f32(10) * 4], {}, 14, 1),
    ("elu", "Elu", [f32(10)], dict(alpha=0.7), 13, 1),
    ("selu", "Selu", [f32(10)], {}, 13, 1),
    ("softplus", "Softplus", [f32(10)], {}, 13, 1),
    ("softsign", "Softsign", [f32(10)], {}, 13, 1),
    ("leakyrelu", "LeakyRelu", [f32(10)], dict(alpha=0.2), 13, 1),
    ("prelu", "PRelu", [f32(2, 3, 2, 2), Init(f32(3, 1, 1))], {}, 13, 1),
    ("sigmoid", "Sigmoid", [f32(10)], {}, 13, 1),
    ("tanh", "Tanh", [f32(10)], {}, 13, 1),
    ("gelu_tanh", "Gelu", [f32(10)], dict(approximate="tanh"), 20, 1),
    ("clip_v11_min_only", "Clip", [f32(10), Init(np.float32(-0.1))], {}, 13, 1),
    ("clip_v6_attrs", "Clip", [f32(10)], dict(min=-0.5, max=0.5), 9, 1),
    ("clip_int", "Clip", [np.array([-5, 0, 5], np.int64), Init(np.array(-1, np.int64)), Init(np.array(2, np.int64))], {}, 13, 1),
    ("cast_float_to_int", "Cast", [f32(5) * 3], dict(to=TensorProto.INT64), 13, 1),
    ("flatten_axis2", "Flatten", [f32(2, 3, 4, 5)], dict(axis=2), 13, 1),
    ("flatten_axis0", "Flatten", [f32(2, 3)], dict(axis=0), 13, 1),
    ("transpose_default", "Transpose", [f32(2, 3, 4)], {}, 13, 1),
    ("reshape_zero_minus1", "Reshape", [f32(2, 3, 4), Init(i64(0, -1))], {}, 13, 1),
    ("reshape_allowzero", "Reshape", [f32(2, 0, 4), Init(i64(0, 8))], dict(allowzero=1), 14, 1),
    ("size", "Size", [f32(2, 3, 4)], {}, 13, 1),
    ("shape_start_end", "Shape", [f32(2, 3, 4)], dict(start=1, end=-1), 15, 1),
    ("constant_of_shape", "ConstantOfShape", [Init(i64(2, 3))], dict(value=onnx.numpy_helper.from_array(np.array([7], np.int32))), 13, 1),
    ("topk", "TopK", [f32(3, 6), Init(i64(2))], dict(axis=1), 13, 2),
    ("dropout_mask", "Dropout", [f32(3, 4)], {}, 13, 2),
    ("identity", "Identity", [f32(3)], {}, 13, 1),
    ("concat", "Concat", [f32(2, 3), f32(2, 1)], dict(axis=-1), 13, 1),
    # issue 15, point 8: classic model-zoo ops
    ("lrn_alexnet", "LRN", [np.abs(f32(2, 7, 5, 5)) * 30], dict(size=5, alpha=1e-4, beta=0.75, bias=1.0), 13, 1),
    ("lrn_size3_custom", "LRN", [f32(2, 6, 3, 4) * 4], dict(size=3, alpha=0.3, beta=0.6, bias=2.0), 13, 1),
    ("lrn_defaults_opset1", "LRN", [f32(1, 4, 3, 3) * 10], dict(size=3), 7, 1),
    ("add_size1_both_sides", "Add", [f32(2, 3, 1, 5), Init(f32(1, 1, 4, 1))], {}, 13, 1),
    ("mul_size1_leading", "Mul", [f32(2, 1, 4), Init(f32(3, 1))], {}, 13, 1),
    ("sub_size1_rank_grow", "Sub", [f32(2, 3), Init(f32(4, 1, 1))], {}, 13, 1),
    ("div_size1_input", "Div", [f32(1, 3), Init(np.abs(f32(4, 1)) + 1)], {}, 13, 1),
    ("pow_size1", "Pow", [np.abs(f32(2, 1, 3)) + 0.5, Init(f32(4, 1))], {}, 13, 1),
    ("equal_size1", "Equal", [np.array([[1, 2, 3]], np.int64), Init(np.array([[1], [2]], np.int64))], {}, 13, 1),
    ("prelu_size1_batch", "PRelu", [f32(1, 3, 4, 4), Init(f32(3, 1, 1))], {}, 9, 1),
]


def _single_op_model(op, inputs, attrs, opset, n_outputs):
    """One-node model; graph inputs get a symbolic leading dim to exercise the dynamic paths."""
    graph_inputs, feeds, initializers, names = [], [], [], []
    for i, value in enumerate(inputs):
        if isinstance(value, str):
            names.append(value)  # "" = absent optional input
            continue
        name = f"in{i}"
        names.append(name)
        if isinstance(value, Init):
            initializers.append(onnx.numpy_helper.from_array(value.value, name))
        else:
            value = np.asarray(value)
            shape = ["N", *value.shape[1:]] if value.ndim else []
            graph_inputs.append(oh.make_tensor_value_info(name, _NP_TO_ONNX[value.dtype], shape))
            feeds.append(value)
    outputs = [f"out{i}" for i in range(n_outputs)]
    node = oh.make_node(op, names, outputs, **attrs)
    graph = oh.make_graph([node], op, graph_inputs, [oh.make_value_info(o, onnx.TypeProto()) for o in outputs], initializer=initializers)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    # Give the outputs their inferred types so onnxruntime accepts the model.
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {vi.name: vi for vi in inferred.graph.output}
    for out in model.graph.output:
        out.type.CopyFrom(known[out.name].type)
    return model, feeds


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_single_op_matches_onnxruntime(case):
    _, op, inputs, attrs, opset, n_outputs = case
    model, feeds = _single_op_model(op, inputs, attrs, opset, n_outputs)
    imported = import_onnx(model)
    got = _run(imported, *[torch.from_numpy(np.ascontiguousarray(f)) for f in feeds])
    want = _ort(model, *feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert _max_err(g, w) < TOL


# ---------------------------------------------------- opset < 7: broadcast / axis and PRelu slopes


def _legacy_model(op, x_shape, b, attrs, opset):
    """One ``op`` node at ``opset`` with a constant second input; IR 3 lists initializers as inputs."""
    init = onnx.numpy_helper.from_array(b, "b")
    graph = oh.make_graph(
        [oh.make_node(op, ["x", "b"], ["y"], **attrs)],
        op,
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), oh.make_tensor_value_info("b", TensorProto.FLOAT, list(b.shape))],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, list(x_shape))],
        initializer=[init],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=3)


# (id, op, x shape, B, attributes, B as the opset-13 reference model must see it)
LEGACY = [
    ("add_axis1_bias", "Add", (2, 3, 4, 5), f32(3), dict(broadcast=1, axis=1), (3, 1, 1)),
    ("mul_axis1_2d", "Mul", (2, 3, 4, 5), f32(3, 4), dict(broadcast=1, axis=1), (3, 4, 1)),
    ("sub_axis0", "Sub", (2, 3, 4), f32(2), dict(broadcast=1, axis=0), (2, 1, 1)),
    ("div_suffix", "Div", (2, 3, 4, 5), np.abs(f32(4, 5)) + 1, dict(broadcast=1), (4, 5)),
    ("add_size1_axis1", "Add", (2, 3, 4, 5), f32(1), dict(broadcast=1, axis=1), (1, 1, 1)),
    ("mul_negative_axis", "Mul", (2, 3, 4, 5), f32(3, 4), dict(broadcast=1, axis=-3), (3, 4, 1)),
    ("pow_axis1", "Pow", (2, 3, 4), f32(3), dict(broadcast=1, axis=1), (3, 1)),
    ("prelu6_channel_vector", "PRelu", (2, 3, 4, 5), np.array([0.1, 0.2, 0.3], np.float32), {}, (3, 1, 1)),
    ("prelu6_channel_c11", "PRelu", (2, 3, 4, 5), np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1), {}, (3, 1, 1)),
    ("prelu6_1d_input", "PRelu", (4, 3), np.array([0.1, 0.2, 0.3], np.float32), {}, (3,)),
    ("prelu6_shared", "PRelu", (2, 3, 4, 5), np.array([0.25], np.float32), {}, (1,)),
]


@pytest.mark.parametrize("opset", [1, 6])
@pytest.mark.parametrize("case", LEGACY, ids=[c[0] for c in LEGACY])
def test_legacy_broadcast_matches_onnxruntime(case, opset):
    """onnxruntime runs no opset < 7 models, so its reference is the same op at opset 13 with B
    reshaped as the old rules place it; graphpress must import the old model to the same values."""
    _, op, x_shape, b, attrs, ref_shape = case
    if op == "Pow" and opset < 7:
        attrs = dict(attrs)  # Pow-1 has broadcast/axis too
    model = _legacy_model(op, x_shape, b, attrs, opset)
    x = (np.abs(f32(*x_shape)) + 0.5) if op == "Pow" else f32(*x_shape)
    imported = import_onnx(model)
    got = _run(imported, torch.from_numpy(x))[0]
    ref_b = b.reshape(ref_shape)
    reference, _ = _single_op_model(op, [x, Init(ref_b)], {}, 13, 1)
    want = _ort(reference, x)[0]
    assert got.shape == want.shape == x.shape
    assert _max_err(got, want) < TOL
    if op != "PRelu" and b.size > 1 and ref_shape != b.shape:
        # and the plain numpy reading of B would have been wrong (or not even broadcastable)
        try:
            naive = _ort(_single_op_model(op, [x, Init(b)], {}, 13, 1)[0], x)[0]
        except Exception:  # noqa: BLE001 -- shapes that do not broadcast at all
            naive = None
        assert naive is None or naive.shape != want.shape or _max_err(naive, want) > 1e-3


def test_opset6_prelu_slope_is_per_channel_not_per_column():
    """A [C] slope on NCHW input at opset 6 scales channels; at opset 9 the same file means
    numpy broadcasting over the last dim (W == C here), which onnxruntime confirms."""
    x = -np.abs(f32(1, 3, 2, 3))  # all negative: y = slope * x everywhere
    slope = np.array([1.0, 2.0, 3.0], np.float32)
    got6 = _run(import_onnx(_legacy_model("PRelu", x.shape, slope, {}, 6)), torch.from_numpy(x))[0]
    np.testing.assert_allclose(got6, x * slope.reshape(3, 1, 1), rtol=1e-6)
    model9 = _legacy_model("PRelu", x.shape, slope, {}, 9)
    model9.ir_version = 8
    got9 = _run(import_onnx(model9), torch.from_numpy(x))[0]
    np.testing.assert_allclose(got9, _ort(model9, x)[0], rtol=1e-6)
    np.testing.assert_allclose(got9, x * slope, rtol=1e-6)


def test_input_with_a_fixed_size1_leading_dim_broadcasts(tmp_path):
    """A (1, C, 1) graph input added to (N, C, L) activations: loads (static shapes, reason
    recorded) and matches onnxruntime, instead of tying its size-1 dim to the batch."""
    from graphpress.frontends import load

    graph = oh.make_graph(
        [oh.make_node("Add", ["x", "bias"], ["s"]), oh.make_node("Mul", ["s", "gain"], ["y"])],
        "g",
        [
            oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4]),
            oh.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3, 1]),
            oh.make_tensor_value_info("gain", TensorProto.FLOAT, [1, 1, 4]),
        ],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4])],
    )
    path = tmp_path / "bias_input.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8), str(path))
    captured = load(path)
    assert "static_batch" in captured.source
    x, bias, gain = captured.example_inputs
    assert tuple(bias.shape) == (1, 3, 1) and tuple(gain.shape) == (1, 1, 4)
    want = _ort(str(path), x.numpy(), bias.numpy(), gain.numpy())[0]
    assert _max_err(captured.run(x, bias, gain)[0].numpy(), want) < TOL


def _lrn_reference(x, size, alpha, beta, bias):
    """The ONNX spec formula, element by element over the channel window."""
    c = x.shape[1]
    square_sum = np.zeros_like(x, dtype=np.float64)
    for i in range(c):
        lo, hi = max(0, i - (size - 1) // 2), min(c - 1, i + int(np.ceil((size - 1) / 2)))
        square_sum[:, i] = (x[:, lo : hi + 1].astype(np.float64) ** 2).sum(axis=1)
    return (x / (bias + alpha / size * square_sum) ** beta).astype(np.float32)


@pytest.mark.parametrize("size", [2, 4, 5])
@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (2, 5, 7), (3, 4)])
def test_lrn_window_matches_the_spec(size, shape):
    """onnxruntime only runs odd sizes (see the single-op table); even windows reach one channel
    further after than before, which the spec formula checks, on 2-D to 4-D inputs."""
    x = f32(*shape) * 3
    model, feeds = _single_op_model("LRN", [x], dict(size=size, alpha=0.2, beta=0.7, bias=1.5), 13, 1)
    got = _run(import_onnx(model), torch.from_numpy(x))[0]
    assert _max_err(got, _lrn_reference(x, size, 0.2, 0.7, 1.5)) < TOL
    if size % 2 and len(shape) == 4:
        assert _max_err(got, _ort(model, *feeds)[0]) < TOL
