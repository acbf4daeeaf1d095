"""The ONNX side of a streamed run: the units ONNX is written for directly (the embedding table,
the concatenation of the head slices) and the re-use of one export across units that share a
compressed structure (:class:`OnnxTemplates`)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from graphpress.ir.graph import Graph

EMBED_FILE = "embed_tokens.bin"
#: Rows of the table converted and written at a time.
_EMBED_ROWS = 8192


def embedding_model(table: torch.Tensor, dtype: torch.dtype, folder: Path):
    """The embedding unit as ONNX, built directly: ``Gather(table, input_ids)`` then a cast to
    float32 (for a float16 table). Not through the exporter, which holds two more copies of the
    table (the largest tensor of most LLMs) while it works: the table is converted a block of
    rows at a time into ``folder/embed_tokens.bin`` and the model refers to it as external data,
    which the stitcher copies in chunks."""
    import onnx
    from onnx import TensorProto, helper

    from graphpress.backends.onnxruntime.lower import DEFAULT_OPSET

    path = folder / EMBED_FILE
    with open(path, "wb") as fh:
        for i in range(0, table.shape[0], _EMBED_ROWS):
            fh.write(table[i:i + _EMBED_ROWS].to(dtype).contiguous().numpy().tobytes())
    weight = TensorProto(name="embed_tokens.weight", dims=list(table.shape),
                         data_type=TensorProto.FLOAT16 if dtype == torch.float16 else TensorProto.FLOAT)
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", EMBED_FILE), ("offset", "0"), ("length", str(path.stat().st_size))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", int(table.shape[1])])
    if dtype == torch.float32:
        nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["hidden"], axis=0)]
    else:
        nodes = [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["rows"], axis=0),
                 helper.make_node("Cast", ["rows"], ["hidden"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "embed", [ids], [out], initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)], ir_version=onnx.IR_VERSION)


def export_unit(lower, graph: Graph, scratch: Path):
    """``lower_to_onnx`` into a scratch folder, loaded back as one in-memory model."""
    import shutil

    import onnx

    unit_dir = Path(tempfile.mkdtemp(prefix="unit-", dir=scratch))
    try:
        lower(graph, unit_dir)
        return onnx.load(str(unit_dir / "model.onnx"), load_external_data=True)
    finally:
        shutil.rmtree(unit_dir, ignore_errors=True)


class OnnxTemplates:
    """ONNX exports re-used across units with the same compressed structure.

    Every block of a model compressed by one recipe has the same graph code and the same tensor
    shapes: only the tensors differ. The first such unit is exported (``torch.export`` and the ONNX
    exporter: 2-5 s per block, most of a block's time); a later one copies that model and puts
    its own tensors into the initializers of the same names (the exporter names a weight's
    initializer after its graph target). The second unit of each structure is the test: its
    re-bound copy is run in ONNX Runtime on the unit's check input and must give the unit's own
    compressed outputs (max abs error <= 1e-3 x max(1, max |expected|)); re-binding is used for
    the rest only when it does, so a tensor the exporter had folded into a constant of another
    name cannot carry the first unit's values into the others unnoticed. The streamed run's
    end-to-end ONNX Runtime check then covers every unit.
    """

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.trusted: dict[str, bool] = {}
        self.exports = 0
        self.rebound = 0
        self.checked: dict[str, float] = {}  # per structure: the re-bound second unit's max abs error

    @staticmethod
    def key(graph: Graph) -> str:
        import hashlib

        tensors = sorted((n.target, tuple(graph.get_tensor(n.target).shape), str(graph.get_tensor(n.target).dtype))
                         for n in graph.nodes if n.op == "get_attr")
        return hashlib.sha256((graph.gm.code + repr(tensors)).encode()).hexdigest()

    def lower(self, graph: Graph, export: Callable[[Graph], Any], check: tuple[dict[str, torch.Tensor], torch.Tensor]):
        """The unit's ONNX model. ``check = (feeds, expected)``: the unit's inputs by ONNX name
        and its first output, used to test re-binding on the second unit of a structure."""
        key = self.key(graph)
        template = self.models.get(key)
        if template is None:
            self.exports += 1
            model = export(graph)
            self.models[key] = model
            return model
        rebound = _rebind(template, graph)
        if key not in self.trusted:
            error = _max_error(rebound, *check)
            self.checked[key] = error
            self.trusted[key] = error <= 1e-3 * max(1.0, float(check[1].abs().max()))
        if not self.trusted[key]:
            self.exports += 1
            return export(graph)
        self.rebound += 1
        return rebound


def check_session(model: str | bytes):
    """A CPU ONNX Runtime session for a check that runs once on a few inputs (``model``: a path
    or serialized bytes): no pre-packed second copy of every int4 weight, and no arena kept at
    its high-water mark."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.enable_cpu_mem_arena = False
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _max_error(model, feeds: dict[str, torch.Tensor], expected: torch.Tensor) -> float:
    """Max abs difference between ONNX Runtime's first output of ``model`` (in memory) on
    ``feeds`` and ``expected``; inf when it does not run or the shapes differ."""
    try:
        sess = check_session(model.SerializeToString())
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    except Exception:  # noqa: BLE001 -- any failure means: do not re-bind, export
        return float("inf")
    got_t = torch.from_numpy(got)
    if got_t.shape != expected.shape:
        return float("inf")
    return float((got_t - expected).abs().max())


def _rebind(template, graph: Graph):
    """A copy of ``template`` whose initializers named after a graph tensor hold this graph's."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(template)
    targets = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    for init in model.graph.initializer:
        if init.name in targets:
            value = graph.get_tensor(init.name).detach().contiguous().numpy()
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return model


def concat_model(n: int):
    """An ONNX model concatenating ``x0..x{n-1}`` (batch, seq, rows_k) along the last axis."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, ["batch", "seq", None]) for k in range(n)]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", None])
    node = helper.make_node("Concat", [f"x{k}" for k in range(n)], ["logits"], axis=-1)
    from graphpress.backends.onnxruntime.lower import DEFAULT_OPSET

    graph = helper.make_graph([node], "concat", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)], ir_version=onnx.IR_VERSION)


__all__ = ["EMBED_FILE", "OnnxTemplates", "check_session", "concat_model", "embedding_model", "export_unit"]
