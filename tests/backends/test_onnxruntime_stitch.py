"""OnnxStitcher: per-unit ONNX models -> one model with external data, checked against running the units in turn."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from graphpress.backends.onnxruntime import stitch
from graphpress.backends.onnxruntime.stitch import DATA_FILE, MODEL_FILE, OnnxStitcher
from graphpress.errors import ArtifactError, BackendError

VOCAB, HIDDEN = 50, 16


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)

    def forward(self, ids):
        return self.emb(ids)


class Block(nn.Module):
    """Pre-norm MLP block with a residual; ``mask`` is fed to every block (a shared graph input)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.up = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x, mask):
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln(x)))) * mask


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x):
        return self.out(self.ln(x))


def _export(module: nn.Module, args: tuple, names: list[str], out: list[str], tmp: Path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp / f"{type(module).__name__}.onnx"
    dyn = {n: {0: "batch", 1: "seq"} for n in names + out}
    torch.onnx.export(module, args, str(path), dynamo=False, input_names=names, output_names=out, dynamic_axes=dyn, opset_version=18)
    return onnx.load(str(path))


def _rebind(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The same graph with other weights: what a streamed block captured once looks like for block i."""
    rng = np.random.default_rng(seed)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    for t in new.graph.initializer:
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32 and arr.size > 1:
            t.CopyFrom(numpy_helper.from_array(rng.standard_normal(arr.shape).astype(np.float32) * 0.3, t.name))
    return new


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("units")
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 5))
    x = torch.randn(2, 5, HIDDEN)
    mask = torch.ones(2, 5, 1)
    embed = _export(Embed(), (ids,), ["ids"], ["h"], tmp)
    block = _export(Block(), (x, mask), ["x", "mask"], ["y"], tmp)
    head = _export(Head(), (x,), ["x"], ["logits"], tmp)
    return embed, _rebind(block, 1), _rebind(block, 2), head


def _run(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(batch=3, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
    mask = (rng.random((batch, seq, 1)) > 0.3).astype(np.float32)
    return ids, mask


def _reference(units, ids, mask) -> np.ndarray:
    embed, block0, block1, head = units
    (h,) = _run(embed, {"ids": ids})
    (h,) = _run(block0, {"x": h, "mask": mask})
    (h,) = _run(block1, {"x": h, "mask": mask})
    (logits,) = _run(head, {"x": h})
    return logits


def _stitch(units, dest: Path, **kw) -> dict:
    embed, block0, block1, head = units
    with OnnxStitcher(dest, **kw) as st:
        out = st.add_unit(embed, prefix="embed/", inputs={"ids": "input_ids"})
        assert out == {"h": "embed/h"}
        y0 = st.add_unit(block0, prefix="layers.0/", inputs={"x": "embed/h", "mask": "mask"})["y"]
        y1 = st.add_unit(block1, prefix="layers.1/", inputs={"x": y0, "mask": "mask"})["y"]
        st.add_unit(head, prefix="head/", inputs={"x": y1})
        return st.close({"logits": "head/logits"})


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _external(model: onnx.ModelProto) -> list[dict]:
    return [
        {e.key: e.value for e in t.external_data} | {"name": t.name}
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    ]


@pytest.mark.parametrize("data_files", ["one", "per-unit"])
def test_stitched_chain_equals_units_run_in_turn(units, tmp_path, data_files):
    dest = tmp_path / "onnx"
    files = _stitch(units, dest, data_files=data_files)
    ids, mask = _feeds()
    (got,) = _run(dest / MODEL_FILE, {"input_ids": ids, "mask": mask})
    want = _reference(units, ids, mask)
    assert got.shape == (3, 7, VOCAB)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Two blocks with different weights: the second block's weights were not mixed up with the first's.
    assert np.abs(want - _reference((units[0], units[1], units[1], units[3]), ids, mask)).max() > 1e-2

    # Files: exactly what was returned, hashed while writing, equal to hashing the files now.
    on_disk = sorted(p.name for p in dest.iterdir())
    assert on_disk == sorted(files)
    for name, entry in files.items():
        data = (dest / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    data_names = [n for n in files if n != MODEL_FILE]
    if data_files == "one":
        assert data_names == [DATA_FILE]
    else:
        assert data_names == ["0000_embed.data", "0001_layers.0.data", "0002_layers.1.data", "0003_head.data"]
    total_data = sum(files[n]["bytes"] for n in data_names)
    assert files[MODEL_FILE]["bytes"] < 16_000 < total_data

    # The stitched graph: prefixed names, aligned int64 offsets, symbolic dims kept.
    model = onnx.load(str(dest / MODEL_FILE), load_external_data=False)
    ext = _external(model)
    names = {e["name"] for e in ext}
    assert "embed/emb.weight" in names and {n.split("/")[0] for n in names} == {"embed", "layers.0", "layers.1", "head"}
    assert len(ext) == 1 + 2 * 2 + 1  # embedding, two MatMul weights per block, head weight (biases/norms < 1 KiB stay inline)
    assert all(int(e["offset"]) % 4096 == 0 and int(e["length"]) > 0 for e in ext)
    assert len({e["name"] for e in ext}) == len(ext)
    assert [i.name for i in model.graph.input] == ["input_ids", "mask"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims == [["batch", "seq"], ["batch", "seq", 1]]
    out_dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", "seq", VOCAB]
    assert all(n.name.startswith(("embed/", "layers.0/", "layers.1/", "head/", "output/")) for n in model.graph.node if n.name)
    assert _leftovers(tmp_path, "onnx") == []
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)


def test_units_with_external_data_are_copied_in_chunks(units, tmp_path, monkeypatch):
    # Save every unit with its weights external, and copy them in chunks of 1000 bytes (not page-sized).
    monkeypatch.setattr(stitch, "_CHUNK", 1000)
    paths = []
    for i, unit in enumerate(units):
        folder = tmp_path / f"unit{i}"
        folder.mkdir()
        copy = onnx.ModelProto()
        copy.CopyFrom(unit)
        onnx.save(copy, str(folder / "u.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
        paths.append(folder / "u.onnx")
    dest = tmp_path / "out"
    with OnnxStitcher(dest, align=64) as st:
        st.add_unit(paths[0], prefix="embed/", inputs={"ids": "input_ids"})
        # A proto loaded without its data needs base_dir.
        block0 = onnx.load(str(paths[1]), load_external_data=False)
        st.add_unit(block0, prefix="b0/", inputs={"x": "embed/h", "mask": "mask"}, base_dir=paths[1].parent)
        st.add_unit(paths[2], prefix="b1/", inputs={"x": "b0/y", "mask": "mask"})
        st.add_unit(paths[3], prefix="head/", inputs={"x": "b1/y"})
        st.close({"logits": "head/logits"})
    ids, mask = _feeds(batch=2, seq=4, seed=3)
    (got,) = _run(dest / MODEL_FILE, {"input_ids": ids, "mask": mask})
    np.testing.assert_allclose(got, _reference(units, ids, mask), rtol=0, atol=1e-6)
    ext = _external(onnx.load(str(dest / MODEL_FILE), load_external_data=False))
    assert all(int(e["offset"]) % 64 == 0 for e in ext) and len(ext) == 6

    with pytest.raises(BackendError, match=r"^unit 0 \(prefix 'b0/'\): tensor '.*' is external \(w.bin\); pass base_dir="):
        with OnnxStitcher(tmp_path / "nobase") as st:
            st.add_unit(block0, prefix="b0/", inputs={"x": "x", "mask": "mask"})
    assert not (tmp_path / "nobase").exists() and _leftovers(tmp_path, "nobase") == []


def _matmulnbits_unit(k=64, n=64, block=32, seed=0) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    blob = block // 2
    packed = rng.integers(0, 256, (n, k // block, blob), dtype=np.uint8)
    scales = (rng.random(n * (k // block)) * 0.1 + 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["a", "w_q", "w_scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block, name="mm")
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(packed, "w_q"), numpy_helper.from_array(scales, "w_scales")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=9)
    return model, packed, scales


def _dense_unit(k=64, opset=18, seed=0, name="proj") -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["out"], name="relu")],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", k])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def test_matmulnbits_unit_com_microsoft(tmp_path):
    dense = _dense_unit()
    nbits, packed, _ = _matmulnbits_unit()
    dest = tmp_path / "q"
    with OnnxStitcher(dest) as st:
        h = st.add_unit(dense, prefix="proj/", inputs={"x": "x"})["out"]
        st.add_unit(nbits, prefix="q/", inputs={"a": h})
        files = st.close({"y": "q/y"})
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    (got,) = _run(dest / MODEL_FILE, {"x": x})
    (mid,) = _run(dense, {"x": x})
    (want,) = _run(nbits, {"a": mid})
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    model = onnx.load(str(dest / MODEL_FILE), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("com.microsoft", 1)}
    # The packed uint8 weight (2 KiB) went external with its bytes unchanged.
    (w_q,) = [e for e in _external(model) if e["name"] == "q/w_q"]
    raw = (dest / DATA_FILE).read_bytes()[int(w_q["offset"]) : int(w_q["offset"]) + int(w_q["length"])]
    assert raw == packed.tobytes()
    assert set(files) == {MODEL_FILE, DATA_FILE}


def test_conflicting_opset_is_one_line_and_leaves_nothing(tmp_path):
    dest = tmp_path / "conflict"
    with pytest.raises(BackendError) as info:
        with OnnxStitcher(dest) as st:
            st.add_unit(_dense_unit(opset=18), prefix="a/", inputs={"x": "x"})
            st.add_unit(_dense_unit(opset=17), prefix="b/", inputs={"x": "a/out"})
    msg = str(info.value)
    assert msg == "unit 1 (prefix 'b/'): imports opset ai.onnx version 17 but earlier units use version 18; export every unit with the same opset"
    assert "\n" not in msg
    assert not dest.exists() and _leftovers(tmp_path, "conflict") == []


def test_exception_midway_leaves_no_destination_and_no_temp(units, tmp_path):
    dest = tmp_path / "mid"
    with pytest.raises(RuntimeError, match="calibration blew up"):
        with OnnxStitcher(dest) as st:
            st.add_unit(units[0], prefix="embed/", inputs={"ids": "input_ids"})
            assert (st.tmp / DATA_FILE).stat().st_size > 0  # bytes were streamed out already
            raise RuntimeError("calibration blew up")
    assert not dest.exists() and _leftovers(tmp_path, "mid") == []


def test_disk_full_leaves_no_partial_artifact(units, tmp_path, monkeypatch):
    real_write = stitch._DataFile._write

    def write(self, data):
        if self.size > 4096:  # the second tensor hits a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, data)

    monkeypatch.setattr(stitch._DataFile, "_write", write)
    dest = tmp_path / "full"
    st = OnnxStitcher(dest)
    st.add_unit(units[0], prefix="embed/", inputs={"ids": "input_ids"})
    with pytest.raises(BackendError) as info:
        st.add_unit(units[1], prefix="b0/", inputs={"x": "embed/h", "mask": "mask"})
    assert str(info.value) == f"{dest}: writing the ONNX external data failed: no space left on device; nothing was written, free disk space and re-run"
    assert not dest.exists() and _leftovers(tmp_path, "full") == []
    with pytest.raises(BackendError, match=r"add_unit after the stitcher was aborted$"):
        st.add_unit(units[3], prefix="head/", inputs={"x": "b0/y"})


def test_existing_destination_is_not_overwritten(units, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"dest exists; pass overwrite=True to replace it$"):
        OnnxStitcher(dest)
    with pytest.raises(ArtifactError, match=r"holds 'notes.txt', which a stitcher does not write; refusing to replace it even with overwrite=True$"):
        OnnxStitcher(dest, overwrite=True)
    assert (dest / "notes.txt").read_text() == "mine"

    # A previous stitcher output: refused without overwrite, replaced with it (and the old data file gone).
    old = tmp_path / "old"
    _stitch(units, old, data_files="per-unit")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(ArtifactError, match="pass overwrite=True"):
        OnnxStitcher(old)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    files = _stitch(units, old, data_files="one", overwrite=True)
    assert sorted(p.name for p in old.iterdir()) == sorted(files) == [MODEL_FILE, DATA_FILE]
    assert _leftovers(tmp_path, "old") == []
    # An empty folder is used as is.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert set(_stitch(units, empty)) == {MODEL_FILE, DATA_FILE}


def test_bad_mappings_are_one_line(units, tmp_path):
    embed, block0, _, _ = units
    cases = [
        (lambda st: st.add_unit(block0, prefix="b/", inputs={"x": "x"}), r"^unit 0 \(prefix 'b/'\): graph input 'mask' is not mapped; add it to inputs="),
        (
            lambda st: st.add_unit(block0, prefix="b/", inputs={"x": "x", "mask": "m", "maks": "m"}),
            r"^unit 0 \(prefix 'b/'\): inputs= names 'maks', which is not a graph input of the unit; did you mean 'mask'\?$",
        ),
        (
            lambda st: (st.add_unit(embed, prefix="e/", inputs={"ids": "ids"}), st.add_unit(embed, prefix="e/", inputs={"ids": "ids"})),
            r"prefix 'e/' is already used by an earlier unit",
        ),
        (
            # int64 ids mapped to a float value
            lambda st: (st.add_unit(block0, prefix="b/", inputs={"x": "x", "mask": "m"}), st.add_unit(embed, prefix="e/", inputs={"ids": "b/y"})),
            r"^unit 1 \(prefix 'e/'\): input 'ids' is int64 but 'b/y' is float; map it to a value of its type$",
        ),
        (
            lambda st: (st.add_unit(embed, prefix="e/", inputs={"ids": "ids"}), st.close({"logits": "e/hh"})),
            r"output 'logits' maps to 'e/hh', which no unit defines; did you mean 'e/h'\?$",
        ),
    ]
    for i, (act, pattern) in enumerate(cases):
        dest = tmp_path / f"bad{i}"
        with pytest.raises(BackendError, match=pattern) as info:
            with OnnxStitcher(dest) as st:
                act(st)
        assert "\n" not in str(info.value)
        assert not dest.exists() and _leftovers(tmp_path, f"bad{i}") == []
    with pytest.raises(BackendError, match="data_files='two'; use 'one' or 'per-unit'"):
        OnnxStitcher(tmp_path / "x", data_files="two")
    with pytest.raises(BackendError, match="align=100; use a power of two >= 64"):
        OnnxStitcher(tmp_path / "x", align=100)


def test_prefix_collision_is_refused(tmp_path):
    # 'a' + '/out' and 'a/' + 'out' name the same value: the second unit must not silently alias it.
    unit = _dense_unit()
    with pytest.raises(BackendError, match=r"^unit 1 \(prefix 'a'\): name 'a/h' \(prefix \+ '/h'\) already exists in the stitched graph; end every unit's prefix with a separator, e.g. 'layers.3/'$"):
        with OnnxStitcher(tmp_path / "c") as st:
            st.add_unit(unit, prefix="a/", inputs={"x": "x"})
            renamed = onnx.ModelProto()
            renamed.CopyFrom(unit)
            for node in renamed.graph.node:
                node.output[:] = ["/" + o for o in node.output]
                node.input[:] = [i if i in ("x", "w") else "/" + i for i in node.input]
            renamed.graph.output[0].name = "/out"
            st.add_unit(renamed, prefix="a", inputs={"x": "a/out"})


def test_large_constant_nodes_go_external(tmp_path):
    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 4096
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    dest = tmp_path / "const"
    with OnnxStitcher(dest) as st:
        st.add_unit(model, prefix="c/", inputs={"x": "x"})
        files = st.close({"y": "c/y"})
    stitched = onnx.load(str(dest / MODEL_FILE), load_external_data=False)
    assert [n.op_type for n in stitched.graph.node] == ["MatMul", "Identity"]
    assert [e["name"] for e in _external(stitched)] == ["c/w"]
    assert files[MODEL_FILE]["bytes"] < 1024
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(_run(dest / MODEL_FILE, {"x": x})[0], x @ w, rtol=1e-6)


@pytest.mark.slow
def test_external_data_beyond_2gb(tmp_path):
    """A 2.2 GB tensor (a sparse file: no real disk) followed by a small one at an offset past 2**31."""
    big_len = 2_200_000_000
    src = tmp_path / "unit"
    src.mkdir()
    with open(src / "w.bin", "wb") as f:
        f.truncate(big_len)
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[big_len // 4], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "0"), ("length", str(big_len))):
        e = big.external_data.add()
        e.key, e.value = k, v
    unit0 = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["x"], ["h"])], "u0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])], [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 64])], [big]),
        opset_imports=[helper.make_opsetid("", 18)],
        ir_version=9,
    )
    unit1 = _dense_unit()
    dest = tmp_path / "big"
    with OnnxStitcher(dest) as st:
        st.add_unit(unit0, prefix="u0/", inputs={"x": "x"}, base_dir=src)
        st.add_unit(unit1, prefix="u1/", inputs={"x": "u0/h"})
        files = st.close({"out": "u1/out"})
    assert files[DATA_FILE]["bytes"] > 2**31
    ext = {e["name"]: e for e in _external(onnx.load(str(dest / MODEL_FILE), load_external_data=False))}
    assert int(ext["u1/w"]["offset"]) > 2**31
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    # ORT drops the unused 2.2 GB initializer and reads the small one past 2 GB.
    np.testing.assert_allclose(_run(dest / MODEL_FILE, {"x": x})[0], _run(unit1, {"x": x})[0], rtol=0, atol=1e-6)


def _rss_mb() -> float:
    # Current (not peak) RSS, from /proc: the suite runs on Linux.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


def test_memory_holds_one_unit_not_all(tmp_path):
    """After each unit only its external-data references stay: RSS does not grow by a unit per unit."""
    k = 1024  # 3 weights of 4 MiB: 12 MiB per unit

    def unit(seed):
        rng = np.random.default_rng(seed)
        ws = [numpy_helper.from_array(rng.standard_normal((k, k), dtype=np.float32), f"w{i}") for i in range(3)]
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["a", "w1"], ["b"]), helper.make_node("MatMul", ["b", "w2"], ["y"])]
        graph = helper.make_graph(
            nodes, "u", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])], ws
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)

    rss = []
    with OnnxStitcher(tmp_path / "mem") as st:
        prev = "x"
        for i in range(10):
            prev = st.add_unit(unit(i), prefix=f"u{i}/", inputs={"x": prev})["y"]
            rss.append(_rss_mb())
        files = st.close({"y": prev})
    assert files[DATA_FILE]["bytes"] >= 10 * 12 * 2**20
    # Keeping each unit alive (e.g. through a reference to one of its submessages) would add 12 MiB per unit: 96 MiB over 8 units.
    assert rss[-1] - rss[1] < 20, rss


def test_typed_field_initializer_and_short_external_file(tmp_path):
    # An initializer stored in float_data (not raw_data) is written as little-endian bytes.
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    unit = _dense_unit()
    unit.graph.initializer[0].CopyFrom(helper.make_tensor("w", TensorProto.FLOAT, [64, 64], w.ravel().tolist()))
    assert not unit.graph.initializer[0].HasField("raw_data")
    with OnnxStitcher(tmp_path / "typed") as st:
        st.add_unit(unit, prefix="a/", inputs={"x": "x"})
        st.close({"out": "a/out"})
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "typed" / MODEL_FILE, {"x": x})[0], np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)

    # An external tensor whose file is shorter than the tensor: one line naming the file and the bytes.
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(_dense_unit(), str(src / "u.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    with open(src / "w.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BackendError, match=r"^unit 0 \(prefix 'a/'\): tensor 'w': .*w\.bin has 1000 bytes, the tensor needs bytes 0\.\.16384$"):
        with OnnxStitcher(tmp_path / "short") as st:
            st.add_unit(src / "u.onnx", prefix="a/", inputs={"x": "x"})
    (src / "w.bin").unlink()
    with pytest.raises(BackendError, match=r"^unit 0 \(prefix 'a/'\): tensor 'w': external data file .*w\.bin not found$"):
        with OnnxStitcher(tmp_path / "short") as st:
            st.add_unit(src / "u.onnx", prefix="a/", inputs={"x": "x"})
    assert not (tmp_path / "short").exists() and _leftovers(tmp_path, "short") == []


def test_units_without_large_weights_write_no_data_file(tmp_path):
    small = _dense_unit(k=8)  # an 8x8 weight: 256 bytes, stays inline
    for mode in ("one", "per-unit"):
        dest = tmp_path / mode
        with OnnxStitcher(dest, data_files=mode) as st:
            h = st.add_unit(small, prefix="a/", inputs={"x": "x"})["out"]
            st.add_unit(small, prefix="b/", inputs={"x": h})
            files = st.close({"out": "b/out"})
        assert list(files) == [MODEL_FILE] and sorted(p.name for p in dest.iterdir()) == [MODEL_FILE]
        x = np.ones((1, 8), np.float32)
        (mid,) = _run(small, {"x": x})
        np.testing.assert_allclose(_run(dest / MODEL_FILE, {"x": x})[0], _run(small, {"x": mid})[0], rtol=0, atol=1e-6)


def test_identical_weights_of_two_units_are_stored_once(tmp_path):
    # the same 64x64 weight (16 KiB) in two units: the second unit reads the first one's
    same, other = _dense_unit(seed=0, name="a"), _dense_unit(seed=0, name="b")
    third = _dense_unit(seed=1, name="c")  # other bytes: must not be shared
    dest = tmp_path / "s"
    with OnnxStitcher(dest) as st:
        h = st.add_unit(same, prefix="a/", inputs={"x": "x"})["out"]
        h = st.add_unit(other, prefix="b/", inputs={"x": h})["out"]
        st.add_unit(third, prefix="c/", inputs={"x": h})
        st.close({"y": "c/out"})
        shared = st.shared_tensors
    assert shared == 1
    model = onnx.load(str(dest / MODEL_FILE), load_external_data=False)
    assert sorted(t.name for t in model.graph.initializer) == ["a/w", "c/w"]
    assert [n.input[1] for n in model.graph.node if n.op_type == "MatMul"] == ["a/w", "a/w", "c/w"]
    assert (dest / DATA_FILE).stat().st_size < 3 * 64 * 64 * 4  # two weights (with alignment), not three
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    (want,) = _run(third, {"x": _run(other, {"x": _run(same, {"x": x})[0]})[0]})
    np.testing.assert_allclose(_run(dest / MODEL_FILE, {"x": x})[0], want, rtol=0, atol=1e-6)


def test_equal_bytes_of_another_shape_are_not_shared(tmp_path):
    square = _dense_unit(k=64, name="sq")
    w = numpy_helper.to_array(square.graph.initializer[0]).reshape(32, 128)
    flat = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["out"])], "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 128])],
        [numpy_helper.from_array(w, "w")]), opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    with OnnxStitcher(tmp_path / "s") as st:
        st.add_unit(square, prefix="sq/", inputs={"x": "x"})
        st.add_unit(flat, prefix="flat/", inputs={"x": "x2"})
        st.close({"y": "sq/out", "z": "flat/out"})
        assert st.shared_tensors == 0
