"""compress auto: the frontier, the measured search, the artifact and its Pareto report, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from graphpress.api import AUTO_RECORD, auto, auto_frontier
from graphpress.auto.pareto import JSON
from graphpress.auto.search import AutoConfig, Evaluated, _fastest, frontier, pareto_indices, search
from graphpress.auto.space import Candidate, Choice, LayerInfo
from graphpress.auto.trials import Job, SerialTrials
from graphpress.cli.main import app
from graphpress.errors import GraphpressError
from graphpress.runtime.artifact import read_artifact
from graphpress.zoo.digits import digits_data, train_digits_cnn


@pytest.fixture(scope="module")
def digits():
    model, _acc = train_digits_cnn(epochs=4)
    x_tr, _y_tr, x_te, y_te = digits_data(seed=0)
    return model, x_tr[:256], x_te, y_te


@pytest.fixture(autouse=True)
def _cost_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRESS_CACHE", str(tmp_path / "cache"))


def _table(costs):
    return {"objective": "latency", "cost": {n: {c.label: v for c, v in row.items()} for n, row in costs.items()}}


def test_frontier_runs_from_fastest_to_all_float():
    layers = [LayerInfo("a", "conv2d", 10), LayerInfo("b", "conv2d", 10)]
    table = _table({"a": {Choice(): 10.0, Choice(8): 4.0}, "b": {Choice(): 10.0, Choice(8): 6.0}})
    sens = {"a": {"int8": 0.5}, "b": {"int8": 0.01}}
    fr = frontier(layers, table, sens, grid=12)
    assert fr[0].to_dict() == {"a": "int8", "b": "int8"}  # everything allowed: the cheapest
    assert fr[1].to_dict() == {"b": "int8"}  # the sensitive layer goes back to float first
    assert fr[-1] == Candidate()  # budget 0: nothing changes
    # a choice whose sensitivity could not be measured (the pass refused it) is never offered
    fr2 = frontier(layers, table, {"a": {"int8": math.inf}, "b": {"int8": 0.01}}, grid=12)
    assert all("a" not in c.to_dict() for c in fr2)


def _ev(drop, ms, spread=None, predicted=0.0, label="x"):
    return Evaluated(Candidate.of({label: Choice(8)}), "frontier", predicted, {"drop": drop}, True, ms, spread)


def test_pareto_keeps_only_undominated_points():
    evs = [_ev(0.0, 10.0), _ev(0.01, 5.0), _ev(0.02, 6.0), _ev(0.03, 2.0), _ev(0.0, 11.0)]
    assert pareto_indices(evs, "latency") == [0, 1, 3]


def test_fastest_breaks_ties_within_the_spread_by_prediction():
    a = _ev(0.0, 1.00, (0.95, 1.10), predicted=50.0, label="a")
    b = _ev(0.0, 1.05, (1.00, 1.20), predicted=40.0, label="b")  # inside a's spread, predicted cheaper
    c = _ev(0.0, 1.50, (1.40, 1.60), predicted=10.0, label="c")  # clearly slower: its prediction does not matter
    assert _fastest([a, b, c]) is b
    assert _fastest([a, c]) is a


def test_auto_latency_writes_a_verified_artifact_and_pareto_report(tmp_path, digits):
    model, x_cal, x_te, y_te = digits
    out = tmp_path / "art"
    res = auto(model, out=out, calibration=x_cal, eval_data=x_te, labels=y_te, metric="accuracy", max_drop=0.01,
               example_inputs=(x_cal[:2],), threads=1)
    art = read_artifact(out)  # every hash checks, the extra files included
    assert {"auto.json", "pareto.png", "pareto.html", "model.onnx"} <= set(art.manifest["files"])
    record = json.loads((out / JSON).read_text())
    chosen = record["candidates"][record["chosen"]]
    assert chosen["feasible"] and chosen["quality"]["drop"] <= 0.01 and chosen["choices"]
    origins = {c["origin"] for c in record["candidates"]}
    assert {"float", "uniform:int8", "uniform:prune50"} <= origins and "frontier" in origins
    # the peers' own quantizers are measured and timed as reference points, never chosen
    assert {"peer:ORT quantize_static U8S8", "peer:ORT quantize_dynamic"} <= origins and not chosen["origin"].startswith("peer")
    peer = next(c for c in record["candidates"] if c["origin"] == "peer:ORT quantize_static U8S8")
    assert peer["latency_ms"] > 0 and peer["quality"]["model_bytes"] > 0 and peer["label"] == "ORT quantize_static U8S8"
    # every measured candidate was timed; the frontier is undominated and includes the float model or a faster one
    assert all(c["latency_ms"] > 0 for c in record["candidates"] if "error" not in c["quality"])
    assert record["pareto"] and record["chosen"] in range(len(record["candidates"]))
    assert set(record["cost_table"]["cost"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert record["profile"]["layers"]["conv2"]["measured_us"] >= 0
    assert record["trials"]["sensitivity"] == sum(len(v) for v in record["sensitivity"].values())
    au = res.manifest["auto"]
    assert au["choices"] == chosen["choices"] and au["metric"] == "accuracy"
    assert "[pareto.html](pareto.html)" in art.report_md and "compress auto" in art.report_md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table>" in (out / "pareto.html").read_text()
    # the artifact's recipe rebuilds the chosen candidate
    names = [next(iter(p)) for p in art.manifest["recipe"]["passes"]]
    assert names and set(names) <= {"prune-channels", "quantize-layerwise"}
    rows = auto_frontier(record)
    assert any(r["chosen"] for r in rows)
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "Pareto frontier" in shown.output


def test_serial_and_ray_searches_agree(digits):
    pytest.importorskip("ray")
    from graphpress.auto.trials import RayTrials

    model, x_cal, x_te, y_te = digits
    job = Job(model, [(x_cal,)], (x_te,), metric="accuracy", labels=y_te, example_inputs=(x_cal[:2],))
    cfg = AutoConfig(objective="size", max_drop=0.01, metric="accuracy")
    serial = search(job, cfg, SerialTrials()).to_dict()
    trials = RayTrials(workers=2)
    try:
        assert trials.workers == 2
        ray = search(job, cfg, trials).to_dict()
    finally:
        trials.close()
    for key in ("timings_s", "trials"):
        serial.pop(key), ray.pop(key)
    serial["cost_table"].pop("cached"), ray["cost_table"].pop("cached")
    assert ray == serial
    assert serial["candidates"][serial["chosen"]]["quality"]["model_bytes"] < serial["candidates"][0]["quality"]["model_bytes"] / 3


def test_budget_no_candidate_meets_writes_nothing(tmp_path, digits):
    model, x_cal, x_te, _y = digits
    out = tmp_path / "art"
    with pytest.raises(GraphpressError, match=r"--max-drop 0 \(kl\): no compressed candidate stays within it; the closest candidate .* reached KL"):
        auto(model, out=out, calibration=x_cal, eval_data=x_te, metric="kl", max_drop=0.0, objective="size",
             example_inputs=(x_cal[:2],))
    assert not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "he-latency"}, "--objective he-latency: the onnxruntime backend cannot measure encrypted latency"),
    ({"metric": "accuracy"}, "--metric accuracy needs --labels"),
    ({"objective": "speed"}, "--objective 'speed': use one of latency, size, he-latency"),
    ({"max_drop": 5.0}, "--max-drop 5: agreement drops are fractions"),
    ({"ray_address": "127.0.0.1:1"}, "--ray-address 127.0.0.1:1: unreachable"),
    ({"backend": "tvm"}, "auto measures its latency costs on onnxruntime only"),
])
def test_bad_input_is_one_line_before_any_search(tmp_path, kwargs, message):
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(GraphpressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        auto("no-such-model.pt", out=tmp_path / "a", calibration=x, **kwargs)
    assert not (tmp_path / "a").exists()


def test_record_name_is_the_pareto_modules():
    assert AUTO_RECORD == JSON


def test_auto_he_latency_picks_block_sizes_on_the_he_backend(tmp_path, digits):
    pytest.importorskip("tenseal", reason="the HE backend needs tenseal (pip install 'graphpress[he]')")
    model, x_cal, x_te, y_te = digits
    out = tmp_path / "he"
    res = auto(model, out=out, calibration=x_cal, eval_data=x_te, labels=y_te, metric="accuracy", max_drop=0.02,
               objective="he-latency", backend="he", example_inputs=(x_cal[:2],), finetune_data=x_cal, finetune={"epochs": 2})
    assert res.manifest["backend"] == "he"
    # every measured candidate was distilled first (the compact vectors train), and so was the written one
    assert res.manifest["finetune"]["epochs_run"] == 2 and res.manifest["finetune"]["params_trained"] > 0
    record = json.loads((out / JSON).read_text())
    by_origin = {c["origin"]: c for c in record["candidates"]}
    assert {"float", "uniform:circ2", "uniform:circ4"} <= set(by_origin)
    assert by_origin["uniform:circ4"]["quality"]["finetune"]["epochs_run"] == 2 and "finetune" not in by_origin["float"]["quality"]
    # costs are predicted HE milliseconds per layer, falling with the block size
    fc1 = record["cost_table"]["cost"]["fc1"]
    assert fc1["float"] > fc1["circ2"] > fc1["circ4"] > 0
    chosen = record["candidates"][record["chosen"]]
    assert chosen["feasible"] and all(v.startswith("circ") for v in chosen["choices"].values())
    # measured: one encrypted inference of each; the choice is faster than the dense model, and predicted within 50%
    assert chosen["latency_ms"] < by_origin["float"]["latency_ms"]
    assert 0.5 < record["profile"]["predicted_total_ms"] / record["profile"]["measured_total_ms"] < 1.5
