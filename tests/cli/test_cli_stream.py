"""`compress run --stream`: a decoder-LLM folder compressed block by block from the CLI, and the
streaming refusals as one `error:` line."""

from __future__ import annotations

import torch
import yaml
from typer.testing import CliRunner

from graphpress.cli.main import app
from graphpress.runtime import load
from tests.cli.test_cli_checks import ARCH, one_error_line
from tests.stream.tiny import write_llama

runner = CliRunner()


def _folder(path):
    write_llama(path)
    return path


def _recipe(tmp_path):
    path = tmp_path / "int4.yaml"
    path.write_text(yaml.safe_dump({"name": "int4", "passes": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32}}]}))
    return path


def test_stream_on_writes_a_verified_artifact_and_reports_per_block(tmp_path):
    folder = _folder(tmp_path / "m")
    res = runner.invoke(app, ["run", str(folder), "-r", str(_recipe(tmp_path)), "-o", str(tmp_path / "out"), "--stream", "on"])
    assert res.exit_code == 0, res.output
    assert "--stream on: llama, 2 blocks" in res.output
    assert "ONNX Runtime check passed" in res.output and "held-out KL" in res.output
    (logits,) = load(tmp_path / "out")(torch.zeros(1, 5, dtype=torch.long).numpy())
    assert logits.shape == (1, 5, 128)


def test_stream_auto_keeps_a_small_model_on_the_whole_graph_path(tmp_path):
    from graphpress.api import stream_choice

    folder = _folder(tmp_path / "m")
    assert stream_choice(folder, "auto") is None  # 0.1 MB of weights: below the 1 GB threshold
    assert stream_choice(folder, "on").startswith("--stream on: llama")
    assert stream_choice(folder, "off") is None
    assert stream_choice(ARCH, "auto") is None


def test_stream_refusals_are_one_line(tmp_path):
    folder = _folder(tmp_path / "m")
    recipe = _recipe(tmp_path)
    assert "use auto, on or off" in one_error_line(["run", folder, "-r", recipe, "-o", tmp_path / "o1", "--stream", "sometimes"])
    assert "not a Hugging Face folder" in one_error_line(["run", ARCH, "-o", tmp_path / "o2", "--stream", "on"])
    assert "drop --backend tvm" in one_error_line(["run", folder, "-r", recipe, "-o", tmp_path / "o3", "--stream", "on", "-b", "tvm"])
    assert "add --stream on" in one_error_line(["run", ARCH, "-o", tmp_path / "o4", "--workers", "2", "--no-bench"])
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))
