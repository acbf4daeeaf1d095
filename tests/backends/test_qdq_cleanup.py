"""The exact ONNX QDQ clean-ups: each rewrite fires where it should, leaves the graph alone where
it must not, and keeps ONNX Runtime's outputs bit-identical."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ir = pytest.importorskip("onnx_ir")

from onnx import TensorProto, helper, numpy_helper

from graphpress.backends.onnxruntime.qdq_cleanup import clean_qdq


def _model(nodes, inits):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _grid(s1=0.05, z1=0, s2=0.05, z2=0):
    return {"s1": np.array([s1], np.float32), "z1": np.array([z1], np.uint8), "s2": np.array([s2], np.float32), "z2": np.array([z2], np.uint8)}


def _chain(relu: bool, **grid):
    """x -> [Relu] -> Q1 -> DQ1 -> Q2 -> DQ2 -> Add(DQ1) = y: a requantization on a second grid and a second reader of DQ1."""
    first = "r" if relu else "x"
    nodes = [helper.make_node("Relu", ["x"], ["r"])] if relu else []
    nodes += [
        helper.make_node("QuantizeLinear", [first, "s1", "z1"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"]),
        helper.make_node("QuantizeLinear", ["d1", "s2", "z2"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"]),
        helper.make_node("Add", ["d1", "d2"], ["y"]),
    ]
    return _model(nodes, _grid(**grid))


def _clean(proto):
    model = ir.serde.deserialize_model(proto)
    counts = clean_qdq(model)
    return ir.serde.serialize_model(model), counts


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


X = np.random.default_rng(0).normal(0, 3, (2, 6)).astype(np.float32)


def test_same_grid_requantization_and_relu_go_and_outputs_stay_identical():
    before = _chain(relu=True)
    after, counts = _clean(before)
    assert counts == {"requantizations": 1, "relus": 1, "scalar_grids": 2}
    assert _ops(after) == ["QuantizeLinear", "DequantizeLinear", "Add"]  # one DQ, read twice
    assert all(list(i.dims) == [] for i in after.graph.initializer)
    np.testing.assert_array_equal(_run(before, X), _run(after, X))


def test_other_grid_or_nonzero_zero_point_is_left_alone():
    before = _chain(relu=True, z1=3, s2=0.07)
    after, counts = _clean(before)
    # the relu matters when zero point 3 can code negatives; the second grid differs in scale
    assert counts["requantizations"] == 0 and counts["relus"] == 0
    assert _ops(after) == _ops(before)
    np.testing.assert_array_equal(_run(before, X), _run(after, X))


def test_different_zero_point_alone_blocks_the_requantization_drop():
    after, counts = _clean(_chain(relu=False, z2=1))
    assert counts["requantizations"] == 0 and _ops(after).count("QuantizeLinear") == 2


def test_shared_scale_used_outside_qdq_stays_one_dimensional():
    proto = _chain(relu=False)
    proto.graph.node.append(helper.make_node("Mul", ["y", "s1"], ["y2"]))
    proto.graph.output[0].name = "y2"
    after, counts = _clean(proto)
    shapes = {i.name: list(i.dims) for i in after.graph.initializer}
    assert shapes["s1"] == [1] and counts["requantizations"] == 1
    np.testing.assert_array_equal(_run(proto, X), _run(after, X))
