"""``--backend-option KEY=VALUE``, the recipe's ``backend:`` section and the ``--he-*`` / ``--tvm-*``
aliases: one table of options per backend, validated before any work, written to the manifest."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import graphpress.api
import graphpress.backends
import graphpress.frontends
from graphpress.backends.torch import TorchBackend
from graphpress.cli.main import BACKEND_OPTION_ALIASES, app, backend_options_from_flags, parse_backend_options
from graphpress.errors import GraphpressError
from tests.cli.test_cli_checks import one_error_line

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"


@pytest.fixture
def no_capture(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("captured before the checks")

    monkeypatch.setattr(graphpress.frontends, "load", refuse)


@pytest.fixture
def spy_compress(monkeypatch):
    """Record what the CLI hands to graphpress.api.compress instead of compressing."""
    calls: list[dict] = []

    def fake(source, **kwargs):
        calls.append(kwargs)
        raise GraphpressError("stopped by the test")

    monkeypatch.setattr(graphpress.api, "compress", fake)
    return calls


def test_backend_option_round_trip_into_the_manifest(tmp_path):
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-o", str(out), "--no-bench", "--backend-option", "opset=20", "-B", "optimize=true"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime"
    assert manifest["backend_options"] == {"version": 1, "opset": 20, "optimize": True, "check_seeds": [0, 1]}
    assert manifest["lowering"]["info"]["opset"] == 20  # the option reached the lowering
    # the manifest's options rebuild the same frozen options
    opts = graphpress.api.backend_options("onnxruntime", manifest["backend_options"])
    assert (opts.opset, opts.optimize, opts.check_seeds) == (20, True, (0, 1))
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "opset=20, optimize=True" in shown.output


def test_recipe_backend_section_chooses_backend_and_options(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - fold-batchnorm\nbackend:\n  name: torch\n  options: {check_seeds: [3]}\n")
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-r", str(recipe), "-o", str(out), "--no-bench"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "torch" and manifest["model_file"] == "model.pt2"
    assert manifest["backend_options"] == {"version": 1, "check_seeds": [3]}


def test_command_line_options_override_the_recipe_key_by_key(tmp_path, spy_compress):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [fold-batchnorm]\nbackend: {name: he, options: {encoding: coeff-dense, act_bits: 6}}\n")
    one_error_line(["run", ARCH, "-r", recipe, "-o", tmp_path / "out", "--he-act-bits", "7"])
    (call,) = spy_compress
    assert call["backend"] is None and call["backend_options"] == {"act_bits": 7}
    assert call["bench"] is False  # the recipe's backend is he: no latency stage by default
    be = graphpress.api.resolve_backend(call["backend"], call["backend_options"], recipe=graphpress.api.check_recipe(str(recipe)))
    assert (be.name, be.options.encoding, be.options.act_bits) == ("he", "coeff-dense", 7)


def test_alias_flags_equal_backend_options(tmp_path, spy_compress):
    common = ["run", ARCH, "-o", tmp_path / "out"]
    one_error_line([*common, "-b", "he", "--he-encoding", "slot-dense", "--he-protocol", "interactive", "--he-act-bits", "6", "--he-weight-bits", "5"])
    one_error_line([*common, "-b", "he", "-B", "encoding=slot-dense", "-B", "protocol=interactive", "-B", "act_bits=6", "-B", "weight-bits=5"])
    one_error_line([*common, "-b", "tvm", "--tvm-tune", "4", "--tvm-db", tmp_path / "db"])
    one_error_line([*common, "-b", "tvm", "-B", "tune_trials=4", "-B", f"tuning_db={tmp_path / 'db'}"])
    aliases, options, tvm_aliases, tvm_options = spy_compress
    assert aliases["backend_options"] == options["backend_options"] == {"encoding": "slot-dense", "protocol": "interactive", "act_bits": 6, "weight_bits": 5}
    assert tvm_aliases["backend_options"] == tvm_options["backend_options"] == {"tune_trials": 4, "tuning_db": str(tmp_path / "db")}
    # every alias names an option its backend has
    for flag, (backend, key) in BACKEND_OPTION_ALIASES.items():
        assert key in graphpress.api.backend_options(backend).__dataclass_fields__, flag


def test_values_are_read_as_yaml():
    assert parse_backend_options(["opset=20", "optimize=false", "check_seeds=[0, 4]", "target={kind: llvm}", "encoding=coeff-dense", "poly_degree="]) == {
        "opset": 20,
        "optimize": False,
        "check_seeds": [0, 4],
        "target": {"kind": "llvm"},
        "encoding": "coeff-dense",
        "poly_degree": None,
    }


@pytest.mark.parametrize(
    "args, expected",
    [
        (["-B", "opsett=20"], "error: backend 'onnxruntime': unknown option 'opsett': did you mean 'opset'?"),
        (["-b", "he", "-B", "encodng=coeff-dense"], "error: backend 'he': unknown option 'encodng': did you mean 'encoding'?"),
        (["-B", "opset=lots"], "error: backend 'onnxruntime': option 'opset': expected an integer, got 'lots'"),
        (["-b", "tvm", "-B", "tune_trials=[1"], "error: --backend-option 'tune_trials=[1': the value is not valid YAML"),
        (["-B", "opset"], "error: --backend-option 'opset': expected KEY=VALUE, e.g. --backend-option opset=20"),
        (["-B", "opset=20", "-B", "opset=21"], "error: --backend-option opset given twice (20 and 21); keep one"),
        (["-b", "he", "--he-act-bits", "6", "-B", "act_bits=7"], "error: --he-act-bits 6 and --backend-option act_bits=7 disagree; keep one"),
        (["-b", "torch", "--he-encoding", "coeff-dense", "--he-act-bits", "6"], "error: --he-encoding, --he-act-bits: only for --backend he (got --backend torch)"),
        (["-b", "onnxruntime", "-B", "opset=12"], "error: onnxruntime: opset 12 is not supported"),
    ],
)
def test_bad_backend_options_fail_before_the_capture(tmp_path, no_capture, args, expected):
    line = one_error_line(["run", ARCH, "-o", tmp_path / "out", *args])
    assert line.startswith(expected), line
    assert not (tmp_path / "out").exists()


def test_recipe_backend_errors_name_the_recipe(tmp_path, no_capture):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [fold-batchnorm]\nbackend: {name: torch, options: {check_seed: [1]}}\n")
    line = one_error_line(["run", ARCH, "-r", recipe, "-o", tmp_path / "out"])
    assert line == f"error: {recipe}: backend: backend 'torch': unknown option 'check_seed': did you mean 'check_seeds'?"
    recipe.write_text("passes: [fold-batchnorm]\nbackend: {name: tvm, options: {tune_trials: 8}}\n")
    line = one_error_line(["run", ARCH, "-r", recipe, "-o", tmp_path / "out", "-b", "onnxruntime"])
    assert line.startswith(f"error: {recipe}: the recipe's backend section configures 'tvm' (tune_trials) but the backend is 'onnxruntime'")
    recipe.write_text("passes: [fold-batchnorm]\nbackend: {nmae: tvm}\n")
    line = one_error_line(["run", ARCH, "-r", recipe, "-o", tmp_path / "out"])
    assert line == f"error: {recipe}: unknown backend key 'nmae': did you mean 'name'?"


def test_alias_mapping_is_table_driven():
    """A backend's options need no CLI code: the aliases are one table, read by parameter name."""
    params = {"he_encoding": None, "he_protocol": "polynomial", "he_act_bits": None, "he_weight_bits": None, "tvm_tune": None, "tvm_db": None}
    assert backend_options_from_flags("he", ["poly_degree=8192"], params) == {"poly_degree": 8192, "protocol": "polynomial"}
    with pytest.raises(GraphpressError, match=r"^--he-protocol: only for --backend he \(got --backend mine\)$"):
        backend_options_from_flags("mine", [], params)


# ---------------------------------------------------------------------------- a new backend, no CLI change
@dataclasses.dataclass(frozen=True)
class LevelOptions:
    version: int = 1
    check_seeds: tuple[int, ...] = (0, 1)
    level: int = 2


class LevelBackend(TorchBackend):
    """The torch backend under another name, with one option of its own."""

    name = "level"
    Options = LevelOptions

    def __init__(self, check_seeds=(0, 1), level: int = 2):
        super().__init__(check_seeds)
        self.options = LevelOptions(check_seeds=tuple(check_seeds), level=level)

    def lower(self, graph, folder, *, check=True):
        lowered = super().lower(graph, folder, check=check)
        lowered.info["level"] = self.options.level
        return lowered


@pytest.fixture
def level_backend(monkeypatch):
    monkeypatch.setitem(graphpress.backends._BACKENDS, "level", f"{__name__}:LevelBackend")
    monkeypatch.setitem(graphpress.backends._OPTIONS, "level", f"{__name__}:LevelOptions")


def test_a_registered_backend_gets_options_without_cli_changes(tmp_path, level_backend):
    out = tmp_path / "art"
    res = runner.invoke(app, ["run", ARCH, "-b", "level", "-B", "level=3", "-o", str(out), "--no-bench"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend_options"] == {"version": 1, "check_seeds": [0, 1], "level": 3}
    assert manifest["lowering"]["info"]["level"] == 3
    line = one_error_line(["run", ARCH, "-b", "level", "-B", "levl=3", "-o", tmp_path / "out2"])
    assert line == "error: backend 'level': unknown option 'levl': did you mean 'level'?"
