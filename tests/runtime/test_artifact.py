"""Artifact folder: atomic write, overwrite rules, hash check, load + run, input validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graphpress
from graphpress.backends import get_backend
from graphpress.errors import ArtifactError
from graphpress.ir.graph import Graph
from graphpress.runtime import Artifact, load, make_manifest, read_artifact, register_loader, write_artifact
from graphpress.runtime import artifact as artifact_mod


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(graph, lowering folder, LoweredModel) for a small CNN; lowered once for the module."""
    torch.manual_seed(0)
    graph = Graph.capture(SmallCNN(), (torch.randn(2, 3, 8, 8),), input_names=["image"], output_names=["logits"])
    folder = tmp_path_factory.mktemp("lowered")
    return graph, folder, get_backend("onnxruntime").lower(graph, folder)


def _write(out: Path, lowered, *, overwrite=False, metrics=None, manifest_extra=None) -> Path:
    graph, folder, lm = lowered
    manifest = make_manifest(graph, lm, recipe={"name": "none"}, passes=[], metrics=metrics or {"size_bytes": 1})
    manifest.update(manifest_extra or {})
    files = {name: folder / name for name in lm.files}
    return write_artifact(out, files, manifest, "# report\n", overwrite=overwrite)


def _siblings(out: Path) -> list[str]:
    """Leftover temporary/aside folders next to OUT."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- round trip
def test_round_trip_runs_and_matches_torch(lowered, tmp_path):
    graph = lowered[0]
    out = _write(tmp_path / "art", lowered)
    assert out == tmp_path / "art"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "report.md"]
    assert _siblings(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "graphpress-artifact" and manifest["format_version"] == 1
    assert manifest["graphpress_version"] == graphpress.__version__
    assert manifest["backend"] == "onnxruntime" and manifest["model_file"] == "model.onnx"
    assert datetime.fromisoformat(manifest["created"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert manifest["inputs"] == [{"name": "image", "shape": ["batch", 3, 8, 8], "dtype": "float32"}]
    assert manifest["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert set(manifest["files"]) == {"model.onnx", "report.md"}
    assert manifest["manifest_sha256"] == artifact_mod.manifest_digest(manifest)
    assert manifest["files"]["model.onnx"]["bytes"] == (out / "model.onnx").stat().st_size
    assert manifest["files"]["model.onnx"]["sha256"] == artifact_mod.sha256_file(out / "model.onnx")
    assert manifest["lowering"]["check"]["passed"] is True

    model = load(out)
    assert [s.name for s in model.inputs] == ["image"] and model.inputs[0].shape == ("batch", 3, 8, 8)
    assert [s.name for s in model.outputs] == ["logits"]
    assert model.manifest["backend"] == "onnxruntime"
    for batch in (1, 3):
        (x,) = graph.random_inputs(seed=batch, batch=batch)
        (ref,) = graph.run(x)
        (got_np,) = model(x.numpy())
        (got_torch,) = model(x)
        assert got_np.shape == (batch, 10)
        assert np.abs(got_np - ref.numpy()).max() < 1e-5
        np.testing.assert_array_equal(got_np, got_torch)


def test_loading_and_running_needs_no_torch(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered)
    code = (
        "import sys, numpy as np; from graphpress.runtime import load; "
        f"m = load({str(out)!r}); (y,) = m(np.zeros((4, 3, 8, 8), np.float32)); "
        "assert y.shape == (4, 10), y.shape; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


def test_tampered_model_is_refused_naming_the_file(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered)
    path = out / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 mismatch") as err:
        load(out)
    assert "\n" not in str(err.value)


def test_tampered_report_is_refused_too(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered)
    (out / "report.md").write_text("# edited\n")
    with pytest.raises(ArtifactError, match=r"report\.md: sha256 mismatch"):
        read_artifact(out)
    assert isinstance(read_artifact(out, verify_hashes=False), Artifact)


# ----------------------------------------------------------------------------- overwrite rules
def test_existing_out_without_overwrite_is_untouched(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered, metrics={"v": 1})
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match=r"art exists; pass --overwrite to replace it"):
        _write(out, lowered, metrics={"v": 2})
    assert _snapshot(out) == before
    assert _siblings(out) == []


def test_overwrite_replaces_artifact(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered, metrics={"v": 1})
    _write(out, lowered, metrics={"v": 2}, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["metrics"] == {"v": 2}
    assert _siblings(out) == []
    load(out)


def test_user_folder_is_refused_even_with_overwrite(lowered, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ArtifactError, match=r"not a graphpress artifact \(no manifest.json\); refusing to replace it even with --overwrite"):
        _write(out, lowered, overwrite=True)
    assert _snapshot(out) == {"holiday.jpg": b"precious"}
    assert _siblings(out) == []


def test_foreign_manifest_and_extra_files_are_refused(lowered, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "someone else"}')
    with pytest.raises(ArtifactError, match="not a graphpress-artifact manifest"):
        _write(other, lowered, overwrite=True)
    # Our artifact, plus a file the user dropped in: replacing it would delete the user's file.
    out = _write(tmp_path / "art", lowered)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds 'notes.txt', which the manifest does not list"):
        _write(out, lowered, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_out_is_a_file_is_refused(lowered, tmp_path):
    out = tmp_path / "model"
    out.write_text("data")
    with pytest.raises(ArtifactError, match="exists and is not a folder"):
        _write(out, lowered, overwrite=True)
    assert out.read_text() == "data"
    # A symlink is not replaced either (its target may be anything).
    target = tmp_path / "target"
    target.mkdir()
    (target / "x").write_text("keep")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ArtifactError, match="exists and is a symlink"):
        _write(tmp_path / "link", lowered, overwrite=True)
    assert (target / "x").read_text() == "keep"


def test_empty_folder_is_fine_without_overwrite(lowered, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    _write(out, lowered)
    assert (out / "manifest.json").is_file()
    assert _siblings(out) == []


def test_failed_write_leaves_nothing_behind(lowered, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(ArtifactError, match="manifest is not JSON-serializable"):
        _write(out, lowered, manifest_extra={"bad": object()})
    assert not out.exists()
    assert _siblings(out) == []
    # Same failure while replacing: the old artifact stays as it was.
    _write(out, lowered, metrics={"v": 1})
    before = _snapshot(out)
    with pytest.raises(ArtifactError):
        _write(out, lowered, overwrite=True, manifest_extra={"bad": {1, 2}})
    assert _snapshot(out) == before and _siblings(out) == []


def test_failed_swap_restores_the_old_artifact(lowered, tmp_path, monkeypatch):
    out = _write(tmp_path / "art", lowered, metrics={"v": 1})
    before = _snapshot(out)
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".art.tmp-"):  # the new folder cannot be moved into place
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(artifact_mod.os, "rename", flaky_rename)
    with pytest.raises(ArtifactError, match="writing the artifact failed"):
        _write(out, lowered, metrics={"v": 2}, overwrite=True)
    monkeypatch.setattr(artifact_mod.os, "rename", real_rename)
    assert calls[0][0] == "art" and calls[0][1].startswith(".art.old-")  # old moved aside first
    assert _snapshot(out) == before
    assert _siblings(out) == []


def test_invalid_file_names_are_refused(lowered, tmp_path):
    graph, folder, lm = lowered
    for bad in ("../escape.onnx", "/abs.onnx", "manifest.json"):
        with pytest.raises(ArtifactError):
            write_artifact(tmp_path / "art", {bad: b"x"}, make_manifest(graph, lm), "")
    assert not (tmp_path / "art").exists() and not (tmp_path.parent / "escape.onnx").exists()


# ------------------------------------------------------------------------------- load errors
def test_load_errors_are_one_line(lowered, tmp_path):
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path / "empty")

    out = _write(tmp_path / "art", lowered)
    manifest_path = out / "manifest.json"
    good = manifest_path.read_text()

    manifest_path.write_text(good[:-10])
    with pytest.raises(ArtifactError, match="manifest.json: invalid JSON"):
        load(out)

    for change, pattern in [
        ({"format_version": 99}, "unknown format_version 99"),
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'; this graphpress loads: .*onnxruntime"),
        ({"model_file": "other.onnx"}, "model_file 'other.onnx' is not listed"),
        ({"files": {**json.loads(good)["files"], "weights.bin": {"sha256": "0", "bytes": 1}}}, r"weights\.bin: listed in manifest.json but missing"),
        ({"files": {**json.loads(good)["files"], "../x": {"sha256": "0", "bytes": 1}}}, "invalid artifact file name '../x'"),
    ]:
        # re-sealed, as a tool that knows the format would: the checks behind the seal still hold
        manifest_path.write_text(artifact_mod.sealed_manifest_text({**json.loads(good), **change}))
        with pytest.raises(ArtifactError, match=pattern) as err:
            load(out)
        assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- input validation
def test_wrong_inputs_are_one_line_errors(lowered, tmp_path):
    model = load(_write(tmp_path / "art", lowered))
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ArtifactError, match=r"got 2 inputs, expected 1: image \(batch, 3, 8, 8\) float32"):
        model(x, x)
    with pytest.raises(ArtifactError, match=r"input 'image': expected rank 4 \(batch, 3, 8, 8\) float32, got \(3, 8, 8\)"):
        model(x[0])
    with pytest.raises(ArtifactError, match=r"input 'image': expected \(batch, 3, 8, 8\) float32, got \(2, 3, 9, 8\) float32 \(dim 2\)"):
        model(np.zeros((2, 3, 9, 8), np.float32))
    with pytest.raises(ArtifactError, match=r"input 'image': expected dtype float32 \(batch, 3, 8, 8\), got \(2, 3, 8, 8\) float64"):
        model(x.astype(np.float64))
    assert model(x)[0].shape == (2, 10)


class _EchoRunner:
    """A fake backend runner: returns its inputs, records calls."""

    def __init__(self, input_names):
        self.input_names = list(input_names)
        self.output_names = ["y"]
        self.calls = []

    def __call__(self, *arrays):
        self.calls.append(arrays)
        return list(arrays)


def test_loader_registry_and_shared_batch_dim(tmp_path):
    @register_loader("echo-test")
    def _load_echo(artifact, *, providers=None, threads=None):
        # The runner lists its inputs in another order than the manifest.
        return _EchoRunner(["mask", "ids"])

    manifest = {
        "backend": "echo-test",
        "model_file": "model.bin",
        "inputs": [
            {"name": "ids", "shape": ["batch", 5], "dtype": "int64"},
            {"name": "mask", "shape": ["batch", 5], "dtype": "bool"},
        ],
        "outputs": [{"name": "y", "shape": ["batch", 5], "dtype": "int64"}],
    }
    out = write_artifact(tmp_path / "echo", {"model.bin": b"\x00"}, manifest, "")
    model = load(out)
    ids, mask = np.ones((3, 5), np.int64), np.ones((3, 5), bool)
    got = model(ids, torch.from_numpy(mask))
    assert [a.dtype for a in model.runner.calls[0]] == [np.bool_, np.int64]  # runner order
    assert [g.dtype for g in got] == [np.bool_, np.int64]
    with pytest.raises(ArtifactError, match=r"input 'mask': dim 0 \(batch\) is 4 but input 'ids' has 3"):
        model(ids, np.ones((4, 5), bool))
    with pytest.raises(ArtifactError, match="expected dtype int64"):
        model(ids.astype(np.int32), mask)


def test_unloadable_manifest_is_refused_before_writing(lowered, tmp_path):
    graph, folder, lm = lowered
    manifest = make_manifest(graph, lm)
    with pytest.raises(ArtifactError, match="model_file 'model.onnx' is not among the files written"):
        write_artifact(tmp_path / "art", {"other.onnx": b"x"}, manifest, "")
    del manifest["inputs"]
    with pytest.raises(ArtifactError, match="manifest lacks 'inputs'"):
        write_artifact(tmp_path / "art", {"model.onnx": folder / "model.onnx"}, manifest, "")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ manifest integrity (issue 15)
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["inputs"][0].update(shape=[4, 3, 8, 8]),
        lambda m: m.update(backend="torch"),
        lambda m: m["metrics"].update(size_bytes=0),
        lambda m: m.pop("manifest_sha256"),
    ],
    ids=["input-shape", "backend", "metric", "seal-removed"],
)
def test_edited_manifest_is_refused(lowered, tmp_path, edit):
    out = _write(tmp_path / "art", lowered)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError) as err:
        load(out)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and "manifest_sha256" in msg and "re-run 'compress'" in msg
    assert "\n" not in msg


def test_reformatted_manifest_still_loads(lowered, tmp_path):
    out = _write(tmp_path / "art", lowered)
    path = out / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None, sort_keys=True))
    assert load(out)(np.zeros((1, 3, 8, 8), np.float32))[0].shape == (1, 10)


def test_artifact_has_ordinary_permissions(lowered, tmp_path):
    old = os.umask(0o022)
    try:
        out = _write(tmp_path / "art", lowered)
        assert out.stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0o700
        for name in ("manifest.json", "model.onnx", "report.md"):
            assert (out / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        out2 = _write(tmp_path / "art2", lowered)
        assert out2.stat().st_mode & 0o777 == 0o750
        assert (out2 / "model.onnx").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    t = datetime.now().timestamp() - seconds
    os.utime(path, (t, t))


def test_killed_write_leftovers_are_cleaned_by_the_next_run(lowered, tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    leftovers = {
        f".art.tmp-{dead}-abcd1234": True,  # its writer is gone
        f".other.tmp-{dead}-zz9": True,  # another artifact's, same parent
        f".art.tmp-{alive}-live0001": False,  # a write in progress elsewhere
        ".art.tmp-legacy01": True,  # older graphpress, no pid: judged by age
        ".art.tmp-fresh001": False,
    }
    for name in leftovers:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"partial")
    _age(tmp_path / ".art.tmp-legacy01", 2 * 3600)
    _write(tmp_path / "art", lowered)
    left = {p.name for p in tmp_path.iterdir()}
    for name, stale in leftovers.items():
        assert (name not in left) == stale, name
    assert "art" in left


def test_aside_copy_of_a_killed_replace_is_restored(lowered, tmp_path):
    # killed between moving the old artifact aside and renaming the new one in: OUT is gone
    old = _write(tmp_path / "art", lowered)
    aside = tmp_path / f".art.old-{_dead_pid()}-q1w2e3r4"
    os.rename(old, aside)
    assert artifact_mod.clean_stale_siblings(tmp_path) == []
    assert not aside.exists() and read_artifact(tmp_path / "art").backend == "onnxruntime"


def test_stale_lowering_folders_are_cleaned(tmp_path):
    dead = _dead_pid()
    folders = {
        "graphpress-lower-dead0001": ("owner", dead, True),
        "graphpress-lower-live0001": ("owner", os.getppid(), False),
        "graphpress-baseline-old00001": ("age", 7 * 3600, True),
        "graphpress-lower-new00001": ("age", 60, False),
        "unrelated-old": ("age", 7 * 3600, False),
    }
    for name, (kind, value, _) in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"x")
        if kind == "owner":
            (tmp_path / name / artifact_mod.SCRATCH_OWNER).write_text(f"{value}\n")
        else:
            _age(tmp_path / name, value)
    removed = artifact_mod.clean_stale_scratch(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, (_, _, stale) in folders.items() if stale)
    # claiming a folder records this process and sweeps its neighbours
    mine = tmp_path / "graphpress-lower-mine0001"
    mine.mkdir()
    (tmp_path / "graphpress-lower-dead0002").mkdir()
    (tmp_path / "graphpress-lower-dead0002" / artifact_mod.SCRATCH_OWNER).write_text(f"{dead}\n")
    artifact_mod.claim_scratch(mine)
    assert (mine / artifact_mod.SCRATCH_OWNER).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "graphpress-lower-dead0002").exists() and mine.exists()
    assert artifact_mod.clean_stale_scratch(tmp_path) == []  # our own folder is never stale


def test_check_destination_sweeps_stale_scratch(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_mod.tempfile, "gettempdir", lambda: str(tmp_path))
    stale = tmp_path / "graphpress-lower-abandoned"
    stale.mkdir()
    _age(stale, 7 * 3600)
    assert artifact_mod.check_destination(tmp_path / "out", overwrite=False) == "new"
    assert not stale.exists()


# ------------------------------------------------------------------ half-precision inputs (issue 15)
@pytest.mark.parametrize(
    "make, dtype",
    [
        (lambda x: x.astype(np.float64), "float64"),
        (lambda x: x.astype(np.float16), "float16"),
        (lambda x: torch.from_numpy(x).to(torch.float16), "float16"),
        (lambda x: torch.from_numpy(x).to(torch.bfloat16), "bfloat16"),
        (lambda x: torch.from_numpy(x).double(), "float64"),
    ],
    ids=["np-f64", "np-f16", "torch-f16", "torch-bf16", "torch-f64"],
)
def test_float_inputs_of_the_wrong_width_get_one_dtype_error(lowered, tmp_path, make, dtype):
    model = load(_write(tmp_path / "art", lowered))
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ArtifactError) as err:
        model(make(x))
    assert str(err.value) == f"input 'image': expected dtype float32 (batch, 3, 8, 8), got (2, 3, 8, 8) {dtype}; cast it first"


def test_numpy_bfloat16_input_gets_the_dtype_error(lowered, tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    model = load(_write(tmp_path / "art", lowered))
    with pytest.raises(ArtifactError, match=r"expected dtype float32 \(batch, 3, 8, 8\), got \(2, 3, 8, 8\) bfloat16; cast it first"):
        model(np.zeros((2, 3, 8, 8), ml_dtypes.bfloat16))
