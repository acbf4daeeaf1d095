"""TVM tuning: MetaSchedule in a torch-free subprocess, the database kept and reused, the tuned
library dispatched by shape, and `compress tune` on an artifact (few trials: these tests check
the mechanism and the numbers' agreement, not the speed -- that is benchmarks/tvm_speed.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm", reason='apache-tvm not installed (pip install -e ".[tvm]")')

from graphpress.backends import get_backend
from graphpress.backends.tvm.build import DB_FILES, symbolic_bindings
from graphpress.backends.tvm.tune import tune_folder, tuning_shapes
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph


def _mlp_graph() -> Graph:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return Graph.capture(m, (torch.randn(2, 16),), name="mlp")


def test_tune_folder_dispatches_by_shape_and_the_database_is_reused(tmp_path):
    g = _mlp_graph()
    get_backend("tvm").lower(g, tmp_path / "a")
    events = []
    summary = tune_folder(tmp_path / "a", 6, progress=events.append)
    assert events[0]["event"] == "tasks" and len(events[0]["tasks"]) == summary["tasks"].__len__() >= 2
    assert any(e["event"] == "progress" for e in events)
    assert summary["records"] >= 1 and summary["records_before"] == 0 and summary["tuned_kernels"] >= 1
    assert summary["check"]["passed"] and summary["shapes"] == [[1, 16]]
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert meta["static_shapes"] == [[1, 16]] and meta["tuning"]["trials"] == 6
    assert all((tmp_path / "a" / "tuning" / f).is_file() for f in DB_FILES)

    runner = get_backend("tvm").runner(tmp_path / "a" / "model.so")
    x1, x3 = torch.randn(1, 16), torch.randn(3, 16)
    # batch 1 runs the tuned main_static, batch 3 the symbolic main; both equal the graph
    np.testing.assert_allclose(runner(x1)[0], g.run(x1)[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner(x3)[0], g.run(x3)[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runner.run_function("main_static", x1)[0], runner.run_function("main", x1)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="no function 'other'"):
        runner.run_function("other", x1)

    # the next build of the same model applies the stored database without tuning
    low = get_backend("tvm", tuning_db=tmp_path / "a").lower(g, tmp_path / "b")
    assert low.info["tuned"] and low.info["tuned_kernels"] >= 1 and low.info["tuning_db"]["shapes"] == [[1, 16]]
    assert low.check["passed"] and any("tuned shapes" in r["inputs"] for r in low.check["runs"])
    assert "tuning/database_tuning_record.json" in low.files

    # a second tuning run starts from the stored records
    again = tune_folder(tmp_path / "a", 0)
    assert again["records_before"] == again["records"] == summary["records"]


def test_tuning_inputs_are_refused_in_one_line(tmp_path):
    g = _mlp_graph()
    get_backend("tvm").lower(g, tmp_path / "a", check=False)
    with pytest.raises(BackendError, match="trials must be >= 0"):
        tune_folder(tmp_path / "a", -1)
    meta = json.loads((tmp_path / "a" / "model.json").read_text())
    assert tuning_shapes(meta, batch=4) == [[4, 16]]
    with pytest.raises(BackendError, match=r"unknown dim\(s\) seq; the model's dynamic dims are batch"):
        tuning_shapes(meta, dims={"seq": 8})
    with pytest.raises(BackendError, match="no MetaSchedule database there"):
        get_backend("tvm", tuning_db=tmp_path / "a")
    (tmp_path / "a" / "model.relax.json").write_text("{not json")
    with pytest.raises(BackendError, match=r"tuning .* failed: BackendError: .*model.relax.json: cannot read the Relax module") as err:
        tune_folder(tmp_path / "a", 2)
    assert "\n" not in str(err.value)


def test_symbolic_bindings_check_ranks_and_fixed_dims(tmp_path):
    import tvm  # noqa: F401

    from graphpress.backends.tvm.build import load_module

    g = _mlp_graph()
    get_backend("tvm").lower(g, tmp_path / "a", check=False)
    main = load_module(tmp_path / "a" / "model.relax.json")["main"]
    assert list(symbolic_bindings(main, [[5, 16]]).values()) == [5]
    with pytest.raises(BackendError, match="dim 1 is fixed at 16"):
        symbolic_bindings(main, [[5, 17]])
    with pytest.raises(BackendError, match="rank 2 but the tuning shape"):
        symbolic_bindings(main, [[5, 16, 1]])


def test_compress_tune_updates_the_artifact_atomically(tmp_path):
    from typer.testing import CliRunner

    from graphpress.cli.main import app
    from graphpress.runtime import load
    from graphpress.runtime.artifact import read_artifact
    from graphpress.zoo.digits import digits_cnn

    torch.manual_seed(0)
    ckpt = tmp_path / "digits.pt"
    torch.save(digits_cnn().state_dict(), ckpt)
    cli = CliRunner()
    out = tmp_path / "art"
    res = cli.invoke(app, ["run", str(ckpt), "--arch", "graphpress.zoo.digits:digits_cnn", "--input-shape", "2x1x8x8",
                           "--recipe", "fuse", "--backend", "tvm", "--no-bench", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "model.relax.json" in read_artifact(out).manifest["files"]
    res = cli.invoke(app, ["tune", str(out), "--trials", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    art = read_artifact(out)  # hashes verified
    info = art.manifest["lowering"]["info"]
    assert info["tuned"] and info["tuning"]["shapes"] == [[1, 1, 8, 8]] and "tuning/database_workload.json" in art.manifest["files"]
    assert "## TVM tuning (MetaSchedule)" in art.report_md and "speed-up" in res.output
    model = load(out)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype("float32")
    ref = digits_cnn()
    ref.load_state_dict(torch.load(ckpt, weights_only=True))
    np.testing.assert_allclose(model(x)[0], ref.eval()(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-5)

    # refusals: one line each, the artifact untouched
    before = sorted(p.name for p in out.rglob("*"))
    res = cli.invoke(app, ["tune", str(out), "--dim", "seq"])
    assert res.exit_code == 2 and "--dim 'seq': expected NAME=INT" in res.output
    res = cli.invoke(app, ["tune", str(out), "--dim", "seq=8"])
    assert res.exit_code == 2 and "unknown dim(s) seq" in res.output
    assert sorted(p.name for p in out.rglob("*")) == before
    onnx_out = tmp_path / "onnx"
    assert cli.invoke(app, ["run", str(ckpt), "--arch", "graphpress.zoo.digits:digits_cnn", "--input-shape", "2x1x8x8",
                            "--no-bench", "-o", str(onnx_out)]).exit_code == 0
    res = cli.invoke(app, ["tune", str(onnx_out)])
    assert res.exit_code == 2 and "only --backend tvm artifacts can be tuned" in res.output
    res = cli.invoke(app, ["run", str(ckpt), "--arch", "graphpress.zoo.digits:digits_cnn", "--input-shape", "2x1x8x8",
                           "--tvm-tune", "4", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--tvm-tune: only for --backend tvm" in res.output
