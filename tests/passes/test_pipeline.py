"""Pipeline contract: verification after every pass, budgets, and errors that name the pass."""

import json
import math
import re
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from graphpress.errors import PassError, VerificationError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline, PassResult, config_from_dict, config_to_dict, make_pass, register, registered
from graphpress.passes.recipes import Recipe, load_recipe


@dataclass(frozen=True)
class ScaleConfig:
    version: int = 1
    factor: float = 1.0
    target: str = "fc.weight"


@register("test-scale-weight")
class ScaleWeight:
    """Multiply one weight by a factor (claims exactness: a factor != 1 must be caught)."""

    exact = True
    Config = ScaleConfig

    def __init__(self, config=ScaleConfig()):
        self.config = config

    def __call__(self, graph):
        w = graph.get_tensor(self.config.target)
        graph.set_tensor(self.config.target, w * self.config.factor)
        return PassResult(graph, self.config.factor != 1.0, {"scaled": 1})


@dataclass(frozen=True)
class NoiseConfig:
    version: int = 1
    std: float = 1e-4
    min_sqnr_db: float | None = 30.0


@register("test-noise")
class Noise:
    """Add seeded Gaussian noise to every weight (lossy)."""

    exact = False
    Config = NoiseConfig

    def __init__(self, config=NoiseConfig()):
        self.config = config

    def __call__(self, graph):
        gen = torch.Generator().manual_seed(0)
        for name, p in list(graph.gm.named_parameters()):
            graph.set_tensor(name, p + self.config.std * torch.randn(p.shape, generator=gen))
        return PassResult(graph, True, {})


@dataclass(frozen=True)
class BoomConfig:
    version: int = 1


@register("test-boom")
class Boom:
    exact = True
    Config = BoomConfig

    def __init__(self, config=BoomConfig()):
        self.config = config

    def __call__(self, graph):
        raise ZeroDivisionError("division by zero in the rule")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return Graph.capture(Net(), (torch.randn(2, 1, 8, 8),))


def test_exact_identity_pass_records_numbers(graph):
    report = Pipeline([("test-scale-weight", {"factor": 1.0})]).run(graph)
    (step,) = report.steps
    assert step.name == "test-scale-weight" and not step.changed
    assert step.step[0].max_abs == 0.0 and step.cumulative[0].within_tol
    assert report.params_before == report.params_after == graph.parameter_count()
    assert step.time_s >= 0
    json.dumps(report.to_dict())  # the report is JSON-serialisable for the manifest


def test_broken_exact_pass_is_named_with_predecessors(graph):
    pipe = Pipeline([("test-noise", {"std": 1e-4}), ("test-scale-weight", {"factor": 1.5})])
    with pytest.raises(VerificationError) as err:
        pipe.run(graph)
    msg = str(err.value)
    assert "pass 'test-scale-weight' (step 2 of 2, after test-noise)" in msg
    assert "output 'output'" in msg and "first diverging node: 'linear'" in msg


def test_input_graph_is_untouched(graph):
    before = graph.run(*graph.example_inputs)[0].clone()
    Pipeline(["test-noise"]).run(graph)
    torch.testing.assert_close(graph.run(*graph.example_inputs)[0], before, rtol=0, atol=0)


def test_lossy_pass_checked_against_its_budget(graph):
    ok = Pipeline([("test-noise", {"std": 1e-4, "min_sqnr_db": 30.0})]).run(graph)
    assert ok.steps[0].step[0].sqnr_db > 30 and ok.steps[0].kl is not None
    with pytest.raises(VerificationError, match=r"SQNR .* below the pass budget min_sqnr_db=60"):
        Pipeline([("test-noise", {"std": 1e-2, "min_sqnr_db": 60.0})]).run(graph)


def test_pass_exception_names_pass(graph):
    with pytest.raises(PassError, match=r"pass 'test-boom' \(step 1 of 1, the first pass\) failed: ZeroDivisionError"):
        Pipeline(["test-boom"]).run(graph)


def test_invalid_graph_after_pass_is_caught(graph):
    with pytest.raises(VerificationError, match="test-scale-weight.*invalid graph"):
        # a (10, 256) weight replaced by (10, 255): fails shape propagation in 'linear'
        class Bad(ScaleWeight):
            def __call__(self, g):
                g.set_tensor("fc.weight", torch.randn(10, 255))
                return PassResult(g, True, {})

        Pipeline([Bad()]).run(graph)


def test_check_inputs_include_other_batch(graph):
    sets = Pipeline([], random_inputs=2).check_inputs(graph)
    assert [s[0].shape[0] for s in sets] == [2, 3, 4]


def test_unknown_pass_and_misspelled_option():
    with pytest.raises(PassError, match="unknown pass 'test-scale-wieght': did you mean 'test-scale-weight'"):
        make_pass("test-scale-wieght")
    with pytest.raises(PassError, match="unknown option 'factr': did you mean 'factor'"):
        make_pass("test-scale-weight", {"factr": 2})
    with pytest.raises(PassError, match="option 'factor': expected a number"):
        make_pass("test-scale-weight", {"factor": "two"})
    with pytest.raises(PassError, match="newer than this graphpress supports"):
        make_pass("test-scale-weight", {"version": 7})


def test_config_round_trip():
    cfg = ScaleConfig(factor=2.5, target="conv.weight")
    assert config_from_dict(ScaleConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert "test-scale-weight" in registered()


def test_recipe_yaml_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: mine\npasses:\n  - test-noise: {std: 0.0001}\n  - test-scale-weight\nverify: {random_inputs: 1}\n")
    recipe = load_recipe(path)
    assert recipe.passes == [("test-noise", {"std": 0.0001}), ("test-scale-weight", {})]
    again = Recipe.from_dict(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()
    assert again.to_dict()["passes"][0]["test-noise"]["min_sqnr_db"] == 30.0
    pipe = Pipeline.from_recipe(path)
    assert pipe.random_inputs == 1 and [p.name for p in pipe.passes] == ["test-noise", "test-scale-weight"]


@pytest.mark.parametrize(
    "text, match",
    [
        ("passes: [no-such-pass]\n", r"passes\[0\]: unknown pass 'no-such-pass'"),
        ("pases: [test-noise]\n", "unknown recipe key 'pases': did you mean 'passes'"),
        ("passes:\n  - test-noise: {stdd: 1}\n", "unknown option 'stdd': did you mean 'std'"),
        ("passes: [test-noise\n", "invalid YAML at line"),
        ("passes: []\n", "non-empty list"),
    ],
)
def test_recipe_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PassError, match=match) as err:
        load_recipe(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_builtin_recipe_by_name_and_missing_file():
    assert load_recipe("default").name == "default"
    with pytest.raises(PassError, match="recipe file not found"):
        load_recipe("no/such/recipe.yaml")


# ---------------------------------------------------------------------------- on_budget
@dataclass(frozen=True)
class SoftNoiseConfig:
    version: int = 1
    std: float = 1e-1
    min_sqnr_db: float | None = 30.0
    max_kl: float | None = None
    on_budget: str = "adapt"


@register("test-soft-noise")
class SoftNoise:
    """Lossy noise that can back off: level k divides the noise by 2**k (up to 10 levels)."""

    exact = False
    Config = SoftNoiseConfig

    def __init__(self, config=SoftNoiseConfig(), level=0):
        self.config, self.level = config, level

    def __call__(self, graph):
        std = self.config.std / 2**self.level
        gen = torch.Generator().manual_seed(0)
        for name, p in list(graph.gm.named_parameters()):
            graph.set_tensor(name, p + std * torch.randn(p.shape, generator=gen))
        return PassResult(graph, True, {"std": std})

    def adapt_levels(self):
        return 10

    def back_off(self, level):
        return SoftNoise(self.config, level)

    def achieved(self, stats):
        return f"std {stats['std']:g}"

    def advice(self):
        return "lower std"


@dataclass(frozen=True)
class NoBudgetConfig:
    version: int = 1


@register("test-no-budget")
class NoBudget:
    exact = False
    Config = NoBudgetConfig

    def __init__(self, config=NoBudgetConfig()):
        self.config = config

    def __call__(self, graph):
        return PassResult(graph, False, {})


def test_adapt_finds_the_least_back_off_that_meets_the_budget(graph):
    report = Pipeline([("test-soft-noise", {"min_sqnr_db": 40.0})]).run(graph)
    step = report.steps[0]
    ob = step.stats["on_budget"]
    assert step.worst_step_sqnr_db >= 40.0 and ob["met"] and ob["first_try"].startswith("output")
    k = ob["backed_off_moves"]
    assert step.stats["std"] == 0.1 / 2**k
    by_level = {t["moves"]: t["sqnr_db"] for t in ob["tries"]}
    assert by_level[k] >= 40.0 and (k - 1) in by_level and by_level[k - 1] < 40.0  # one less fails
    assert len(ob["tries"]) <= 8  # gallop 1, 4, 10 then bisect: not all 11 levels
    # a second run is the same (deterministic search)
    again = Pipeline([("test-soft-noise", {"min_sqnr_db": 40.0})]).run(graph)
    assert again.steps[0].stats["on_budget"]["backed_off_moves"] == k


def test_a_budget_no_back_off_meets_is_one_line_with_the_best_value(graph):
    with pytest.raises(VerificationError) as err:
        Pipeline([("test-soft-noise", {"min_sqnr_db": 200.0})]).run(graph)
    msg = str(err.value)
    assert "\n" not in msg
    assert "below the pass budget min_sqnr_db=200.0 at std 0.1; backing off" in msg
    assert re.search(r"backing off \(\d+ more tries, up to 10 moves\) reached at best SQNR [0-9.]+ dB at std 9\.7656[0-9]e-05; lower std or change min_sqnr_db", msg)
    with pytest.raises(VerificationError, match=r"at std 0.1; lower std, set on_budget: adapt, or change min_sqnr_db"):
        Pipeline([("test-soft-noise", {"min_sqnr_db": 40.0, "on_budget": "fail"})]).run(graph)


def test_a_lossy_pass_without_a_budget_is_refused_before_any_work():
    with pytest.raises(PassError, match="pass 'test-no-budget' is lossy but its config declares no budget"):
        Pipeline(["test-no-budget"])


# ---------------------------------------------------------------------------- NaN KL
@dataclass(frozen=True)
class NanLogitConfig:
    version: int = 1
    min_sqnr_db: float | None = None
    max_kl: float | None = 1.0


@register("test-nan-logit")
class NanLogit:
    """Lossy pass that makes one logit NaN (fc.bias[3]); only a KL budget can see it."""

    exact = False
    Config = NanLogitConfig

    def __init__(self, config=NanLogitConfig()):
        self.config = config

    def __call__(self, graph):
        b = graph.get_tensor("fc.bias").detach().clone()
        b[3] = float("nan")
        graph.set_tensor("fc.bias", b)
        return PassResult(graph, True, {})


def test_a_nan_kl_fails_the_max_kl_budget(graph):
    # before: `kl > max_kl` is False for NaN, so the NaN model passed its KL budget
    with pytest.raises(VerificationError) as err:
        Pipeline(["test-nan-logit"]).run(graph)
    msg = str(err.value)
    assert "\n" not in msg and "pass 'test-nan-logit'" in msg
    assert "KL divergence is NaN" in msg and "fails the pass budget max_kl=1.0" in msg


def test_logits_kl_leaves_out_nan_rows_the_reference_has_and_keeps_others():
    from graphpress.passes.pipeline import _logits_kl

    ref = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 0.0, 1.0]])
    same = ref.clone()
    same[0, 0] = 1.5
    # row 1 is NaN in both: inherited, left out; row 0 alone gives the KL
    kl = _logits_kl([(ref,)], [(same,)])
    from graphpress.ir.compare import kl_divergence

    assert kl == pytest.approx(kl_divergence(ref[:1], same[:1])) and kl > 0
    # a NaN the pass introduces, in any set, is NaN (max over sets must not hide it)
    new_nan = ref.clone()
    new_nan[0, 1] = float("nan")
    assert math.isnan(_logits_kl([(ref,), (ref,)], [(new_nan,), (ref,)]))
    assert math.isnan(_logits_kl([(ref,), (ref,)], [(ref,), (new_nan,)]))
    assert _logits_kl([(ref[:1],)], [(ref[:1],)]) == 0.0


@dataclass(frozen=True)
class DeadConfig:
    version: int = 1


@register("test-add-dead-node")
class AddDeadNode:
    """Adds a node nothing reads: the outputs' computation is unchanged."""

    exact = True
    Config = DeadConfig

    def __init__(self, config=DeadConfig()):
        self.config = config

    def __call__(self, graph):
        x = next(n for n in graph.gm.graph.nodes if n.op == "placeholder")
        with graph.gm.graph.inserting_after(x):
            graph.gm.graph.call_function(torch.ops.aten.neg.default, (x,))
        graph.recompile()
        return PassResult(graph, True, {})


def test_a_pass_that_leaves_the_outputs_computation_is_verified_without_a_forward(graph, monkeypatch):
    import graphpress.passes.pipeline as pl

    forwards = []
    real = pl.run_sets
    monkeypatch.setattr(pl, "run_sets", lambda g, sets: forwards.append(g) or real(g, sets))
    report = Pipeline(["test-add-dead-node", ("test-scale-weight", {"factor": 1.0})]).run(graph)
    dead, scale = report.steps
    # the reference forward and the scale pass's: the dead node cost none
    assert len(forwards) == 2
    assert dead.verified_by == "same computation" and dead.changed and dead.step[0].max_abs == 0.0
    assert dead.to_dict()["verified_by"] == "same computation"
    # a replaced weight (even with the same values) is run and compared: the rule must not match
    assert scale.verified_by == "run" and scale.step[0].max_abs == 0.0


def test_same_computation_skips_only_the_propagation_of_the_structure_check(graph, monkeypatch):
    from graphpress.ir.graph import Graph

    calls = []
    real = Graph.verify
    monkeypatch.setattr(Graph, "verify", lambda self, *a, **k: calls.append(k.get("propagate", True)) or real(self, *a, **k))
    Pipeline(["test-add-dead-node", ("test-scale-weight", {"factor": 1.0})]).run(graph)
    # the input graph and the scale pass's result are propagated; the dead node's result is not
    assert calls == [True, False, True]


@register("test-make-cycle")
class MakeCycle:
    """Makes the first relu read its own user: a malformed graph."""

    exact = True
    Config = DeadConfig

    def __init__(self, config=DeadConfig()):
        self.config = config

    def __call__(self, graph):
        relu = next(n for n in graph.gm.graph.nodes if n.target == torch.ops.aten.relu.default)
        relu.args = (next(iter(relu.users)),) + tuple(relu.args[1:])
        return PassResult(graph, True, {})


def test_a_pass_that_makes_a_cycle_is_named_not_taken_for_the_same_computation(graph):
    with pytest.raises(VerificationError, match="test-make-cycle.*produced an invalid graph"):
        Pipeline(["test-make-cycle"]).run(graph)
