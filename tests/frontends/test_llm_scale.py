"""benchmarks/llm_scale.py's harness logic: per-process peak RSS, timeouts, kills, failures, the table
and the memory-bound check (no model is compressed here; the benchmark itself does that)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("llm_scale", ROOT / "benchmarks" / "llm_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# holds ~mb MB of touched memory for a moment
def _hold(mb: int) -> str:
    return f"import time; b = bytearray({mb} * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"


def test_each_measurement_gets_its_own_peak(scale, tmp_path):
    big = scale.run_measured(_py(_hold(300)), timeout=60, log=tmp_path / "big.log")
    small = scale.run_measured(_py(_hold(20)), timeout=60, log=tmp_path / "small.log")
    assert big["status"] == small["status"] == "ok"
    assert big["peak_rss_mb"] >= 300
    # RUSAGE_CHILDREN would report the earlier 300 MB again; wait4 gives this process's own peak
    assert small["peak_rss_mb"] < 100
    assert big["tree_rss_sampled_mb"] >= 250  # sampled every 0.25 s while it held the memory
    assert big["wall_s"] >= 0.6


def test_timeout_kill_and_failure_are_recorded_not_raised(scale, tmp_path):
    slow = scale.run_measured(_py("import time; time.sleep(60)"), timeout=1.0, log=tmp_path / "slow.log")
    assert slow["status"] == "timeout" and slow["wall_s"] < 20
    killed = scale.run_measured(_py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"), timeout=60)
    assert killed["status"] == "killed (signal 9)" and killed["returncode"] == -9
    failed = scale.run_measured(_py("print('working'); raise SystemExit('error: shard model-00002 is missing')"),
                                timeout=60, log=tmp_path / "fail.log")
    assert failed["status"] == "error: shard model-00002 is missing" and failed["returncode"] == 1
    trace = scale.run_measured(_py("import json; json.loads('{')"), timeout=60, log=tmp_path / "trace.log")
    assert trace["status"].startswith("json.decoder.JSONDecodeError: Expecting property name")
    capped = scale.run_measured(_py("import time; b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)"),
                                timeout=60, max_rss_kb=150 * 1024, log=tmp_path / "cap.log")
    assert capped["status"] == "killed (rss cap 0.1 GB)" and capped["wall_s"] < 20
    missing = scale.run_measured(["/nonexistent/tool"], timeout=5, log=tmp_path / "missing.log")
    assert missing["status"].startswith("could not start:")


def test_stream_option_detection(scale):
    assert scale.stream_available("│ --stream  <str>  auto|on|off │")
    assert scale.stream_available("--stream auto|on|off")
    assert not scale.stream_available("--streaming-chunk  <int>\n--stream-size  <int>")
    assert not scale.stream_available("--out  -o  <path>")


def test_bound_summary_and_table(scale):
    facts = {"largest_block_fp32_bytes": 100 * 2**20, "memory_bound_bytes": int(2 * 100 * 2**20 + 1.5e9)}
    ok = {"status": "ok", "wall_s": 40.0, "peak_rss_mb": 1500.0, "artifact_bytes": 70 * 2**20,
          "stages": {"compress": {"wall_s": 40.0, "peak_rss_mb": 1500.0}}}
    scale.add_bound(ok, facts)
    assert ok["memory_bound_mb"] == pytest.approx(200 + 1.5e9 / 2**20, abs=0.1)
    assert ok["within_memory_bound"] is True
    over = dict(ok, peak_rss_mb=1800.0)
    scale.add_bound(over, facts)
    assert over["within_memory_bound"] is False
    failed = {"status": "compress: timeout", "wall_s": 1800.0, "peak_rss_mb": 900.0, "stages": {"compress": {"wall_s": 1800.0}}}
    scale.add_bound(failed, facts)
    assert failed["within_memory_bound"] is None

    second = dict(ok, wall_s=50.0, peak_rss_mb=1400.0, stages={"compress": {"wall_s": 50.0, "peak_rss_mb": 1400.0}})
    third = dict(ok, wall_s=44.0, peak_rss_mb=1600.0, stages={"compress": {"wall_s": 44.0, "peak_rss_mb": 1600.0}})
    folded = scale.summarize([ok, second, third])
    assert folded["repeats"] == 3 and folded["wall_s"] == 44.0 and folded["wall_s_range"] == [40.0, 50.0]
    assert folded["peak_rss_mb"] == 1500.0 and folded["peak_rss_mb_range"] == [1400.0, 1600.0]
    assert folded["stages"]["compress"]["wall_s_range"] == [40.0, 50.0]
    assert scale.summarize([ok, failed])["status"] == "compress: timeout"

    results = {"sizes": {"0.1b": {"tools": {"graphpress": ok, "graphpress-stream": {"status": scale.NOT_AVAILABLE, "stages": {}}}}}}
    lines = scale.format_table(results).splitlines()
    assert lines[0].split()[:3] == ["size", "tool", "wall"]
    row = lines[2].split()
    assert row[:4] == ["0.1b", "graphpress", "40.0", "compress"] and "1500" in row and "70.0" in row and "pass" in row
    assert lines[3].split()[:3] == ["0.1b", "graphpress-stream", "-"] and lines[3].endswith(scale.NOT_AVAILABLE)


def test_folder_arguments(scale, tmp_path):
    assert scale.parse_folders([f"8b={tmp_path}"]) == {"8b": tmp_path}
    with pytest.raises(SystemExit, match=r"--folder '8b': expected SIZE=PATH"):
        scale.parse_folders(["8b"])
    with pytest.raises(SystemExit, match=r"--folder 8b=/no/such/dir: no such folder"):
        scale.parse_folders(["8b=/no/such/dir"])
    assert not scale.folder_complete(tmp_path)


def test_tool_commands(scale, tmp_path):
    folder, recipe = tmp_path / "m", tmp_path / "r.yaml"
    (build,) = scale.tool_commands("builder", folder, tmp_path, recipe)
    assert build[0] == "build" and build[1][1:3] == ["-m", "onnxruntime_genai.models.builder"]
    assert build[1][3:] == ["-i", str(folder), "-o", str(tmp_path / "builder"), "-p", "int4", "-e", "cpu", "-c", str(tmp_path / "builder-cache")]
    export, quant = scale.tool_commands("dynamo", folder, tmp_path, recipe)
    assert (export[0], quant[0]) == ("export", "quantize") and quant[1][-4:] == ["--stage-in", str(export[2]), "--stage-out", str(quant[2])]
    # whole graph: --stream off where the option exists (its auto default streams from 1 GB of fp32 weights)
    (whole,) = scale.tool_commands("graphpress", folder, tmp_path, recipe, stream_ok=True)
    assert whole[1][1:] == ["run", str(folder), "--recipe", str(recipe), "--out", str(tmp_path / "graphpress"), "--no-bench", "--stream", "off"]
    (old,) = scale.tool_commands("graphpress", folder, tmp_path, recipe, stream_ok=False)
    assert "--stream" not in old[1]
    (stream,) = scale.tool_commands("graphpress-stream", folder, tmp_path, recipe, stream_ok=True)
    assert stream[1][-2:] == ["--stream", "on"]
    row = scale.measure_tool("graphpress-stream", folder, tmp_path, recipe, timeout=5, max_rss_kb=None, keep=False, stream_ok=False)
    assert row == {"status": scale.NOT_AVAILABLE, "stages": {}}
    with pytest.raises(ValueError, match="unknown tool 'llama.cpp'"):
        scale.tool_commands("llama.cpp", folder, tmp_path, recipe)


def test_table_orders_merged_sizes_by_parameters(scale, tmp_path):
    row = {"status": "ok", "wall_s": 1.0, "peak_rss_mb": 10.0, "artifact_bytes": 2**20, "stages": {"build": {"wall_s": 1.0}}}
    results = {"sizes": {"1b": {"model": {"params": 1_104_218_112}, "tools": {"builder": row}},
                         "0.1b": {"model": {"params": 124_668_672}, "tools": {"builder": row}}}}
    lines = scale.format_table(results).splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == ["0.1b", "1b"]
    path = tmp_path / "r.json"
    path.write_text(__import__("json").dumps(results))
    import subprocess
    shown = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "llm_scale.py"), "--table", str(path)],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and shown.stdout.splitlines() == lines
