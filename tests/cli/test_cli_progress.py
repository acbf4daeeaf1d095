"""Progress of long stages: plain lines (stage, i/n, elapsed, ETA) when the output is not a terminal."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from graphpress.cli.main import app
from graphpress.cli.report import StageProgress, fmt_seconds, progress_interval
from graphpress.passes.base import PassResult, progress_hook, progress_iter, register, report_progress

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"


@dataclass(frozen=True)
class SlowLayersConfig:
    version: int = 1
    layers: int = 6
    seconds: float = 0.15


@register("test-slow-layers")
class SlowLayers:
    """A pass that takes a while per layer and says so (the hook the real per-layer passes use)."""

    exact = True
    Config = SlowLayersConfig

    def __init__(self, config: SlowLayersConfig = SlowLayersConfig()):
        self.config = config

    def __call__(self, graph):
        for _ in progress_iter([f"conv{i}" for i in range(self.config.layers)], str):
            time.sleep(self.config.seconds)
        return PassResult(graph, False, {})


def test_report_progress_reaches_the_hook_only_inside_it():
    seen = []
    report_progress(1, 2, "nobody listens")  # no hook: a no-op
    with progress_hook(lambda i, n, what: seen.append((i, n, what))):
        list(progress_iter(["a", "b"], str))
    report_progress(3, 4, "after")
    assert seen == [(0, 2, "a"), (1, 2, "b"), (2, 2, "")]


def test_plain_line_has_stage_counts_elapsed_and_eta():
    prog = StageProgress(terminal=False, interval=60, stream=io.StringIO())
    prog.stage("passes")
    prog.step(1, 4, "pass quantize-layerwise")
    prog._inner = None
    prog.inner(0, 10, "conv0")
    prog._inner.start -= 30.0  # 3 of 10 layers took 30 s: 70 s to go
    prog.inner(3, 10, "conv3")
    line = prog.line()
    assert re.fullmatch(r"\[\d+s\] passes: pass quantize-layerwise 1/4: layer 3/10 conv3 \(elapsed \d+s, ETA 1m1\ds\)", line), line
    assert fmt_seconds(3725) == "1h02m" and fmt_seconds(65) == "1m05s" and fmt_seconds(4.4) == "4s"


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRAPHPRESS_PROGRESS_INTERVAL", "0.5")
    assert progress_interval() == 0.5
    monkeypatch.setenv("GRAPHPRESS_PROGRESS_INTERVAL", "nonsense")
    assert progress_interval() == 20.0  # at least every 30 s, whatever the environment says
    monkeypatch.delenv("GRAPHPRESS_PROGRESS_INTERVAL")
    assert progress_interval() == 20.0


def test_run_in_a_pipe_prints_plain_progress_lines(tmp_path, monkeypatch):
    """A non-terminal run of a slow pass prints `progress` lines naming the pass, layer i/n and ETA."""
    monkeypatch.setenv("GRAPHPRESS_PROGRESS_INTERVAL", "0.2")
    recipe = tmp_path / "slow.yaml"
    recipe.write_text("name: slow\npasses:\n  - test-slow-layers: {layers: 8, seconds: 0.25}\n")
    res = runner.invoke(app, ["run", ARCH, "-r", str(recipe), "-o", str(tmp_path / "art"), "--no-bench"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("progress ")]
    assert len(lines) >= 4, res.output
    layer_lines = [ln for ln in lines if "passes: pass test-slow-layers 0/1: layer " in ln]
    assert layer_lines, lines
    counts = [int(m.group(1)) for ln in layer_lines if (m := re.search(r"layer (\d)/8 conv\d", ln))]
    assert counts == sorted(counts) and counts[-1] >= 3, layer_lines
    assert any(re.search(r"\(elapsed \d+s, ETA \d+s\)$", ln) for ln in layer_lines), layer_lines
    assert all(re.match(r"progress \[\d+s\] ", ln) for ln in lines)
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_fast_run_prints_no_plain_lines(tmp_path, monkeypatch):
    """A command shorter than one interval prints no plain line (the first comes after 20 s)."""
    monkeypatch.delenv("GRAPHPRESS_PROGRESS_INTERVAL", raising=False)
    res = runner.invoke(app, ["run", ARCH, "-o", str(tmp_path / "art"), "--no-bench"])
    assert res.exit_code == 0, res.output
    assert "progress [" not in res.output


@pytest.mark.parametrize("stage_total", [None, 5])
def test_stage_progress_ticks_without_updates(stage_total):
    """A stage that reports nothing (a capture, a lowering) still gets a line every interval."""
    out = io.StringIO()
    with StageProgress(terminal=False, interval=0.05, stream=out) as prog:
        prog.stage("capture", total=stage_total)
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(ln.startswith("progress [") and "capture" in ln and "elapsed" in ln for ln in lines), lines
