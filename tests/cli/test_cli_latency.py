"""Write first, measure after: the artifact survives the latency stage; figures carry their spread."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import graphpress.runtime.bench as bench_mod
from graphpress.api import LatencyInterrupted, compress, export
from graphpress.cli.main import app, bench_shapes
from graphpress.cli.report import latency_table
from graphpress.errors import GraphpressError
from graphpress.frontends import load
from graphpress.runtime import load as load_artifact
from graphpress.runtime.artifact import read_artifact
from graphpress.runtime.bench import is_busy, latency_warnings

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"
ROOT = Path(__file__).resolve().parents[2]


def _raise(exc):
    def fn(*args, **kwargs):
        raise exc

    return fn


def test_bench_failure_keeps_the_verified_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "compare_latency", _raise(RuntimeError("timer exploded")))
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "not measured: RuntimeError: timer exploded" in res.output
    art = read_artifact(out)  # every hash checks
    m = art.manifest["metrics"]
    assert m["latency_error"] == "RuntimeError: timer exploded" and "latency_ms" not in m
    assert m["vs_original"][0]["max_abs"] < 1e-5
    assert "Latency not measured: RuntimeError: timer exploded" in art.report_md
    x = torch.randn(3, 3, 16, 16)
    assert load_artifact(out)(x.numpy())[0].shape == (3, 4)


def test_interrupt_during_latency_keeps_the_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_mod, "compare_latency", _raise(KeyboardInterrupt()))
    out = tmp_path / "art"
    with pytest.raises(LatencyInterrupted) as err:
        compress(ARCH, out=out)
    assert err.value.folder == out.resolve() or err.value.folder == out
    art = read_artifact(out)
    assert "latency_ms" not in art.manifest["metrics"] and art.manifest["metrics"]["vs_original"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.")]  # no temporary sibling left
    # and from the command line: exit 130 with the artifact named
    out2 = tmp_path / "art2"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out2)])
    assert res.exit_code == 130
    assert f"interrupted: the verified artifact is complete at {out2}" in res.output
    read_artifact(out2)


def test_latency_is_written_with_spreads_threads_and_load(tmp_path):
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out)])
    assert res.exit_code == 0, res.output
    art = read_artifact(out)  # rewritten after the latency stage, hashes re-computed
    m = art.manifest["metrics"]
    names = {"torch eager (original)", "onnxruntime (original)", "onnxruntime (compressed)"}
    assert set(m["latency_ms"]) == set(m["latency_spread_ms"]) == names
    for name, (p10, p90) in m["latency_spread_ms"].items():
        assert 0 < p10 <= m["latency_ms"][name] <= p90
    assert m["latency_threads"] == torch.get_num_threads()
    assert m["latency_load"]["cpus"] >= 1 and m["latency_load"]["loadavg_1m"] >= 0
    assert "p10-p90" in res.output and "p10-p90 ms" in art.report_md
    assert art.manifest["example_shapes"] == {"x": [2, 3, 16, 16]} or list(art.manifest["example_shapes"].values()) == [[2, 3, 16, 16]]


def test_torch_eager_gets_the_backend_thread_count(monkeypatch, tmp_path):
    seen = {}
    real = bench_mod.compare_latency

    def spy(variants, *args, **kwargs):
        seen["threads"] = torch.get_num_threads()
        seen["ort"] = {name: getattr(getattr(fn, "__closure__", None) and fn.__closure__[-1].cell_contents, "threads", None) for name, fn in variants.items()}
        return real(variants, *args, rounds=3, **{k: v for k, v in kwargs.items() if k != "rounds"})

    monkeypatch.setattr(bench_mod, "compare_latency", spy)
    before = torch.get_num_threads()
    graph = load(ARCH)
    result = export(graph, tmp_path / "art", threads=1, baseline=False)
    assert seen["threads"] == 1 and torch.get_num_threads() == before
    assert result.metrics["latency_threads"] == 1
    assert seen["ort"]["onnxruntime (compressed)"] == 1  # the ORT session was made with the same count


def _manifest(spread=None, load=None, threads=2):
    m = {"latency_ms": {"torch eager (original)": 2.0, "onnxruntime (original)": 1.0, "onnxruntime (compressed)": 0.5}, "latency_batch": 1}
    if spread is not None:
        m["latency_spread_ms"] = spread
        m["latency_threads"] = threads
        m["latency_load"] = load or {"cpus": 2, "loadavg_1m": 0.5}
    return {"metrics": m}


def _render(table) -> str:
    con = Console(width=200, record=True)
    con.print(table)
    return " ".join(con.export_text().split())  # captions wrap at the table's width


TIGHT = {"torch eager (original)": [1.9, 2.2], "onnxruntime (original)": [0.95, 1.1], "onnxruntime (compressed)": [0.48, 0.55]}


def test_table_prints_ratios_and_spreads_when_figures_are_tight():
    text = _render(latency_table(_manifest(TIGHT)))
    assert "1.900-2.200" in text and "2.00x" in text and "4.00x" in text and "warning" not in text
    assert latency_warnings(_manifest(TIGHT)["metrics"]) == ([], set())


def test_table_withholds_ratios_on_a_wide_spread():
    wide = dict(TIGHT, **{"onnxruntime (compressed)": [0.3, 0.9]})
    text = _render(latency_table(_manifest(wide)))
    assert "4.00x" not in text and "2.00x" in text  # only the wide row loses its ratio
    assert "speed-ups withheld: wide spread (p90/p10 > 1.5): onnxruntime (compressed) 3.0x" in text
    # a wide reference row makes every ratio meaningless
    wide_first = dict(TIGHT, **{"torch eager (original)": [1.0, 30.0]})
    reasons, rows = latency_warnings(_manifest(wide_first)["metrics"])
    assert rows == set(TIGHT) and "torch eager (original) 30.0x" in reasons[0]


def test_table_withholds_ratios_on_a_busy_machine():
    busy = _manifest(TIGHT, load={"cpus": 2, "loadavg_1m": 5.3})
    text = _render(latency_table(busy))
    assert "2.00x" not in text and "4.00x" not in text
    assert "the machine was busy (load average 5.3 on 2 CPUs, 2 used for timing)" in text
    assert is_busy(3.1, 2, 2) and not is_busy(2.9, 2, 2) and not is_busy(20.0, 16, 16)


def test_old_manifests_without_spreads_still_print_ratios():
    text = _render(latency_table(_manifest()))
    assert "2.00x" in text and "4.00x" in text and "warning" not in text


def test_bench_shapes_fill_dynamic_dims():
    manifest = {"inputs": [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int64"}], "example_shapes": {"tokens": [2, 32]}}
    assert bench_shapes(manifest, 3, {}) == [[3, 32]]
    assert bench_shapes(manifest, 1, {"seq": 7}) == [[1, 7]]
    with pytest.raises(GraphpressError, match=r"tokens: dynamic dim 'seq' has no recorded size; pass --dim seq=N"):
        bench_shapes({"inputs": manifest["inputs"]}, 1, {})


def test_no_torch_output_reaches_stderr_without_debug(tmp_path):
    """torch.export prints partial graphs on stderr when it fails: the user sees one line."""
    (tmp_path / "ddmod.py").write_text(
        textwrap.dedent(
            """
            import torch

            class DataDependent(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = torch.nn.Linear(4, 4)

                def forward(self, x):
                    if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
                        return self.lin(x)
                    return -self.lin(x)

                def example_inputs(self, batch=2):
                    return (torch.randn(batch, 4),)

            def dd():
                return DataDependent()
            """
        )
    )
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    cmd = [sys.executable, "-c", "from graphpress.cli.main import main; main()"]
    proc = subprocess.run([*cmd, "run", "ddmod:dd", "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: dd: torch.export failed"), proc.stderr
    assert "def forward" not in proc.stderr + proc.stdout
    debug = subprocess.run([*cmd, "--debug", "run", "ddmod:dd", "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode != 0 and "def forward" in debug.stderr and "Traceback" in debug.stderr


def test_library_logging_is_silenced_and_restored(tmp_path, monkeypatch, capfd):
    """An ERROR record from a torch logger (bound to the real stderr) prints nothing during a command."""
    import logging

    import graphpress.frontends

    def noisy_load(*args, **kwargs):
        logging.getLogger("torch.fx.experimental.recording").error("failed while running evaluate_expr(*(u0 > 0,))")
        print("partial graph dump", file=sys.stderr)
        raise GraphpressError("model: torch.export failed: data-dependent")

    monkeypatch.setattr(graphpress.frontends, "load", noisy_load)
    res = runner.invoke(app, ["run", ARCH, "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output == "error: model: torch.export failed: data-dependent\n"
    captured = capfd.readouterr()
    assert "evaluate_expr" not in captured.err + captured.out
    assert logging.root.manager.disable == logging.NOTSET  # restored after the command
