"""Everything that can be checked without the model is checked before any work: one `error:` line each.

Each case replaces the capture (or the demo's training) with a function that fails loudly, so a
check that ran only after the capture would show up as an internal error, not the expected line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import graphpress.frontends
import graphpress.zoo.digits
from graphpress.cli.main import app

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_capture(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("captured before the checks")

    monkeypatch.setattr(graphpress.frontends, "load", refuse)
    monkeypatch.setattr(graphpress.zoo.digits, "train_digits_cnn", refuse)


def one_error_line(args) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _read_only_parent(tmp_path: Path) -> Path:
    """A folder this process cannot create entries in: a chmod 555 folder, or -- for root, whom
    permission bits do not stop -- /sys, which refuses new entries to everyone."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = tempfile.mkdtemp(dir=ro)
    except OSError:
        return ro
    os.rmdir(probe)
    return Path("/sys")


def test_read_only_output_folder_fails_before_the_capture(tmp_path, no_capture):
    parent = _read_only_parent(tmp_path)
    out = parent / "graphpress-test-out" / "art"
    line = one_error_line(["run", ARCH, "-o", out])
    assert line.startswith(f"error: {out}: cannot write here (") and "choose an -o folder you can write to" in line
    assert not out.exists()


def test_output_below_a_file_fails_before_the_capture(tmp_path, no_capture):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    line = one_error_line(["run", ARCH, "-o", blocker / "art"])
    assert f"{blocker / 'art'}: cannot write here ({blocker} is not a folder)" in line
    assert blocker.read_text() == "mine"


def test_read_only_output_in_a_real_process(tmp_path):
    """The console entry point itself: one stderr line, exit 2, no traceback, no PermissionError."""
    parent = _read_only_parent(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", "from graphpress.cli.main import main; main()", "run", ARCH, "-o", str(parent / "x" / "art")],
        capture_output=True, text=True, cwd=str(ROOT), timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "cannot write here" in proc.stderr
    assert "PermissionError" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_demo_rejects_an_unknown_recipe_before_training(tmp_path, no_capture):
    line = one_error_line(["demo", "--recipe", "nosuch", "-o", tmp_path / "demo"])
    assert line.startswith("error: nosuch: recipe file not found") and "built-in recipes" in line
    assert not (tmp_path / "demo").exists()


def test_demo_rejects_a_bad_pass_option_before_training(tmp_path, no_capture):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - fold-batchnorm: {nonsense: 1}\n")
    line = one_error_line(["demo", "--recipe", recipe, "-o", tmp_path / "demo"])
    assert "pass 'fold-batchnorm': unknown option 'nonsense'" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--input-shape", "1xfoo"], "--input-shape '1xfoo': expected integers like 1x3x32x32"),
        (["--input-shape", "0x3"], "--input-shape '0x3': expected positive integers"),
        (["--calibration", "{tmp}/calib.pt"], "--calibration {tmp}/calib.pt: no such file; give a .pt/.pth/.npy/.npz/.safetensors file"),
        (["--finetune-data", "{tmp}/images.pt"], "--finetune-data {tmp}/images.pt: no such file"),
        (["--calibration", "{tmp}/calib.csv"], "--calibration {tmp}/calib.csv: unsupported extension .csv"),
        (["--finetune-trainable", "some"], "--finetune-trainable 'some': use one of auto, annotated, all"),
        (["--finetune-epochs", "-1"], "epochs must be >= 0"),
        (["-b", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--he-encoding", "coeff-dense"], "--he-encoding: only for --backend he"),
        (["--tvm-tune", "8"], "--tvm-tune: only for --backend tvm"),
        (["-r", "nosuch"], "nosuch: recipe file not found"),
    ],
)
def test_run_options_fail_before_the_capture(tmp_path, no_capture, args, expected):
    (tmp_path / "calib.csv").write_text("1,2,3\n")
    args = [a.format(tmp=tmp_path) for a in args]
    line = one_error_line(["run", ARCH, "-o", tmp_path / "out", *args])
    assert expected.format(tmp=tmp_path) in line, line
    assert not (tmp_path / "out").exists()


def test_bad_pass_option_fails_before_the_capture(tmp_path, no_capture):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - prune-weights: {sparsity: lots}\n")
    line = one_error_line(["run", ARCH, "-r", recipe, "-o", tmp_path / "out"])
    assert "prune-weights" in line and "sparsity" in line


def test_bench_dim_errors_are_one_line(tmp_path):
    out = tmp_path / "art"
    assert runner.invoke(app, ["run", ARCH, "-o", str(out), "--no-bench"]).exit_code == 0
    assert "expected NAME=INT" in one_error_line(["bench", out, "--dim", "seq"])
    assert "the artifact's inputs have no such dim (dynamic dims: batch)" in one_error_line(["bench", out, "--dim", "seq=4"])


def test_calibration_file_is_read_before_the_capture(tmp_path, no_capture):
    """A data file that exists is loaded (and refused if unreadable) before the capture too."""
    bad = tmp_path / "calib.pt"
    bad.write_bytes(b"not a torch file")
    line = one_error_line(["run", ARCH, "-o", tmp_path / "out", "--calibration", bad])
    assert line.startswith(f"error: --calibration {bad}: cannot read it as .pt")
    good = tmp_path / "ok.pt"
    torch.save(torch.randn(4, 3, 16, 16), good)
    res = runner.invoke(app, ["run", ARCH, "-o", str(tmp_path / "out"), "--calibration", str(good)])
    assert res.exit_code == 3 and "captured before the checks" in res.output  # got as far as the capture
