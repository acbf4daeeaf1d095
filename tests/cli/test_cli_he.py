"""``compress run --backend he``, ``compress bench`` on an HE artifact, ``compress he-calibrate``."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from graphpress.cli.main import app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tenseal") is None, reason="tenseal is not installed: the HE backend cannot run; pip install 'graphpress[he]'"
)
runner = CliRunner()
ARCH = "graphpress.zoo.digits:digits_cnn"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRESS_HE_COSTS", str(tmp_path / "he_op_costs.json"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from graphpress.zoo.digits import digits_data, train_digits_cnn

    d = tmp_path_factory.mktemp("digits")
    model, _acc = train_digits_cnn(epochs=4)
    torch.save(model.state_dict(), d / "digits.pt")
    x_tr, _, _, _ = digits_data()
    torch.save(x_tr[:256], d / "calib.pt")
    return d


@pytest.fixture(scope="module")
def artifact(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "he"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRAPHPRESS_HE_COSTS", str(tmp_path_factory.mktemp("costs") / "c.json"))
        res = invoke(
            "run", files / "digits.pt", "--arch", ARCH, "--input-shape", "2x1x8x8", "--recipe", "fold-batchnorm",
            "--calibration", files / "calib.pt", "--backend", "he", "--he-protocol", "interactive", "--he-encoding", "coeff-dense", "-o", out,
        )
    return out, res


def test_run_writes_he_artifact(artifact):
    out, res = artifact
    assert res.exit_code == 0, res.output
    assert "encrypted layers, check run on example inputs (batch 2)" in res.output
    for name in ("conv1", "conv2", "fc1", "fc2", "pred/meas", "coeff-dense"):
        assert name in res.output
    assert "the client learns every linear/conv layer's pre-activation output" in res.output
    assert "latency" not in res.output  # no latency bench by default for HE
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "he" and manifest["model_file"] == "he_program.json"
    program = json.loads((out / "he_program.json").read_text())
    assert program["encoding"] == "coeff-dense" and [s["name"] for s in program["steps"]] == ["conv1", "conv2", "fc1", "fc2"]
    cost = json.loads((out / "he_cost.json").read_text())
    assert cost["total_predicted_s"] > 0 and cost["total_measured_s"] > 0


def test_bench_he_artifact(artifact):
    out, _ = artifact
    res = invoke("bench", out, "--batch", "3", "--repeat", "1")
    assert res.exit_code == 0, res.output
    assert "median of 1 encrypted runs" in res.output and "batch 3" in res.output
    assert "end to end" in res.output and "key generation" in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip("│ ").startswith("fc1")]
    assert lines and "coeff-dense" in lines[0]


def test_he_calibrate_and_show(tmp_path):
    res = invoke("he-calibrate", "--show")
    assert res.exit_code == 2 and "no HE costs cached" in res.output
    res = invoke("he-calibrate", "-N", "4096", "--repeat", "3")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "he_op_costs.json").read_text())
    (machine,) = data["machines"].values()
    assert machine["entries"] and all(e["poly_degree"] == 4096 for e in machine["entries"].values())
    assert any("rotate" in e["seconds"] for e in machine["entries"].values())  # a rotation chain too
    res = invoke("he-calibrate", "--show")
    assert res.exit_code == 0 and "4096" in res.output and "download-s" in res.output
    rows = [ln for ln in res.output.splitlines() if ln.startswith("│ 4096")]
    assert len(rows) == len(machine["entries"])


def test_he_calibrate_secure_and_show(tmp_path):
    res = invoke("he-calibrate", "--secure", "--show")
    assert res.exit_code == 2 and "no secure-protocol costs cached" in res.output and "--secure'" in res.output
    res = invoke("he-calibrate", "--secure", "-N", "4096")
    assert res.exit_code == 0, res.output
    (machine,) = json.loads((tmp_path / "he_op_costs.json").read_text())["machines"].values()
    (key,) = machine["secure"]["he"]
    assert key.startswith("N4096-") and len(key.split("-")) == 4  # two data primes and the special one
    res = invoke("he-calibrate", "--secure", "--show")
    assert res.exit_code == 0 and key in res.output and "read-all" in res.output
    res = invoke("he-calibrate", "--secure", "-N", "2048")
    assert res.exit_code == 2 and "--poly-degree 2048" in res.output


def test_he_option_errors(files, tmp_path):
    common = ["run", files / "digits.pt", "--arch", ARCH, "--input-shape", "2x1x8x8"]
    res = invoke(*common, "--backend", "he", "--he-encoding", "coeff-sparse", "-o", tmp_path / "a")
    assert res.exit_code == 2 and "unknown encoding 'coeff-sparse'" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    res = invoke(*common, "--he-encoding", "coeff-dense", "-o", tmp_path / "b")
    assert res.exit_code == 2 and "--he-encoding: only for --backend he" in res.output
    res = invoke(*common, "--backend", "he", "--he-protocol", "polynomial", "--no-baseline", "-o", tmp_path / "c")
    assert res.exit_code == 2 and "polynomial-activations" in res.output
    res = invoke("he-calibrate", "-N", "3000")
    assert res.exit_code == 2 and "--poly-degree 3000" in res.output


def test_run_defaults_to_the_secure_two_party_protocol(files, tmp_path):
    from graphpress.backends.he.secure.launch import require_spu_python

    require_spu_python()  # the parties' environment: 'compress secure-setup' (the README's test command runs it)
    out = tmp_path / "secure"
    res = invoke("run", files / "digits.pt", "--arch", ARCH, "--input-shape", "2x1x8x8", "--recipe", "fold-batchnorm",
                 "--calibration", files / "calib.pt", "--backend", "he", "-o", out)
    assert res.exit_code == 0, res.output
    assert "secure check: 2 sample(s) between two processes" in res.output and "bit-exact vs the fixed-point" in res.output
    assert "protocol secure (BFV + SPU (Cheetah 2PC)): the client learns the output" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend_options"]["protocol"] == "secure" and manifest["backend_options"]["stat_bits"] == 40
    assert {"secure_program.json", "secure_server.npz", "secure_check.json"} <= {p.name for p in out.iterdir()}
    res = invoke("bench", out, "--repeat", "1")
    assert res.exit_code == 0, res.output
    assert "(he, secure two-party" in res.output and "SPU segments" in res.output and "fc2" in res.output
