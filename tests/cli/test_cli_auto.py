"""The speed-up guard of 'compress run' and the command line of 'compress auto'."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from graphpress.api import speedup_verdict
from graphpress.cli.main import app
from graphpress.runtime.artifact import read_artifact

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"


def test_run_records_the_speedup_and_per_layer_times(tmp_path):
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out)])
    assert res.exit_code == 0, res.output
    m = read_artifact(out).manifest["metrics"]
    sp = m["speedup"]
    assert sp["vs"] == "onnxruntime (original)" and sp["ratio"] > 0 and isinstance(sp["faster"], bool)
    # the default recipe folds the batch norm: the conv is profiled on both sides under one name
    layers = m["layer_latency_us"]
    assert {"conv", "fc"} <= set(layers) and all(len(v) == 2 for v in layers.values())
    assert layers["conv"][0] > 0 and layers["conv"][1] > 0


def test_require_speedup_fails_in_one_line_and_keeps_the_artifact(tmp_path):
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out), "--require-speedup", "1000"])
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert "--require-speedup 1000: measured" in res.output and "vs onnxruntime (original)" in res.output
    assert "artifact kept at" in res.output and read_artifact(out).manifest["metrics"]["speedup"]
    res = runner.invoke(app, ["run", ARCH, "-o", str(tmp_path / "b"), "--require-speedup", "2", "--no-bench"])
    assert res.exit_code == 2 and "--require-speedup needs the latency stage" in res.output
    assert not (tmp_path / "b").exists() and line


def test_verdict_names_the_layers_that_grew():
    metrics = {"speedup": {"vs": "onnxruntime (original)", "ratio": 0.8, "faster": False, "slower": True},
               "layer_latency_us": {"conv1": [5.0, 12.0], "conv2": [10.0, 8.0], "fc": [2.0, 3.0]}}
    v = speedup_verdict(metrics)
    assert v.startswith("the compressed artifact is slower than the original on onnxruntime (0.80x")
    assert "conv1 (+7.0 us), fc (+1.0 us)" in v and "conv2" not in v
    metrics["speedup"].update(faster=True)
    assert speedup_verdict(metrics) is None
    assert speedup_verdict({}) is None


def test_auto_bad_input_is_one_error_line(tmp_path):
    x = tmp_path / "x.pt"
    torch.save(torch.randn(8, 3, 16, 16), x)
    res = runner.invoke(app, ["auto", ARCH, "-o", str(tmp_path / "a"), "--calibration", str(x), "--objective", "he-latency"])
    assert res.exit_code == 2 and res.output.count("error") == 1
    assert "--objective he-latency: the onnxruntime backend cannot measure encrypted latency" in res.output
    res = runner.invoke(app, ["auto", ARCH, "-o", str(tmp_path / "a"), "--calibration", str(x), "--metric", "accuracy"])
    assert res.exit_code == 2 and "needs --labels" in res.output
    assert not (tmp_path / "a").exists()
