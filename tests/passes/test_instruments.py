"""Pass instruments and the pipeline's memory contract: passes run on snapshots that share
tensors, an undeclared in-place write is refused, replaced tensors are released, check sets
run stacked."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from graphpress.errors import PassError, VerificationError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline, PassResult, register
from graphpress.passes.instruments import Diagnose, Memory, PassInstrument, Progress, Timing, default_instruments
from graphpress.passes.pipeline import run_sets


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return Graph.capture(Net(), (torch.randn(2, 6),))


@dataclass(frozen=True)
class _Cfg:
    version: int = 1


@register("test-write-in-place")
class WriteInPlace:
    """Doubles fc1's weight by writing into it (and claims exactness: the pipeline must stop it
    before the verdict, naming the tensor)."""

    exact = True
    Config = _Cfg

    def __init__(self, config=_Cfg()):
        self.config = config

    def __call__(self, graph):
        with torch.no_grad():
            graph.get_tensor("fc1.weight").mul_(1.0)  # same values, but written
        return PassResult(graph, False, {})


@register("test-write-in-place-declared")
class WriteInPlaceDeclared(WriteInPlace):
    writes_in_place = True


@register("test-replace-fc1")
class ReplaceFc1:
    """Replaces fc1's weight by an equal copy (exact)."""

    exact = True
    Config = _Cfg

    def __init__(self, config=_Cfg()):
        self.config = config

    def __call__(self, graph):
        graph.set_tensor("fc1.weight", graph.get_tensor("fc1.weight").clone())
        return PassResult(graph, True, {})


class Log(PassInstrument):
    def __init__(self):
        self.calls = []

    def run_start(self, graph, passes):
        self.calls.append(("run_start", len(passes)))

    def pass_start(self, index, p, graph, record):
        self.calls.append(("pass_start", index, p.name))

    def pass_end(self, index, p, graph, record):
        self.calls.append(("pass_end", index, record.changed))

    def pass_failed(self, index, p, before, after, record):
        self.calls.append(("pass_failed", index))
        return "logged"

    def run_end(self, report):
        self.calls.append(("run_end", len(report.steps)))


def test_instrument_hooks_run_in_order(graph):
    log = Log()
    events = []
    report = Pipeline(["eliminate-dead-code", "test-replace-fc1"], instruments=[log]).run(
        graph, on_event=lambda kind, i, n, rec: events.append((kind, i, n)))
    assert log.calls == [("run_start", 2), ("pass_start", 0, "eliminate-dead-code"), ("pass_end", 0, False),
                         ("pass_start", 1, "test-replace-fc1"), ("pass_end", 1, True), ("run_end", 2)]
    assert events == [("start", 0, 2), ("end", 0, 2), ("start", 1, 2), ("end", 1, 2)]
    assert all(s.time_s > 0 for s in report.steps)
    assert {type(i) for i in default_instruments()} == {Timing, Memory, Diagnose}
    assert isinstance(Progress(lambda *a: None), PassInstrument)


def test_memory_instrument_records_resident_sizes(graph):
    report = Pipeline(["eliminate-dead-code"]).run(graph)
    mem = report.steps[0].memory
    assert mem["rss_after_mb"] > 0 and mem["process_peak_mb"] >= mem["rss_after_mb"]
    assert report.to_dict()["passes"][0]["memory"] == mem


def test_a_failure_is_annotated_by_instruments(graph):
    from tests.passes.test_pipeline import ScaleWeight  # noqa: F401 -- registers test-scale-weight

    log = Log()
    with pytest.raises(VerificationError, match=r"first diverging node: 'linear'; logged$"):
        Pipeline([("test-scale-weight", {"factor": 1.5, "target": "fc1.weight"})], instruments=[log]).run(graph)
    assert ("pass_failed", 0) in log.calls and not any(c[0] == "run_end" for c in log.calls)


def test_exact_passes_copy_no_weight(graph):
    report = Pipeline(["eliminate-dead-code", "fold-constants"]).run(graph)
    for target in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert report.graph.get_tensor(target) is graph.get_tensor(target)  # shared, not copied


def test_replaced_tensor_is_the_passes_and_the_input_keeps_its_own(graph):
    before = graph.get_tensor("fc1.weight")
    report = Pipeline(["test-replace-fc1"]).run(graph)
    assert report.graph.get_tensor("fc1.weight") is not before
    assert graph.get_tensor("fc1.weight") is before
    assert report.graph.get_tensor("fc2.weight") is graph.get_tensor("fc2.weight")


def test_an_undeclared_in_place_write_is_refused_by_name(graph):
    with pytest.raises(PassError, match=r"pass 'test-write-in-place' \(step 1 of 1, the first pass\) wrote into tensor 'fc1.weight' in place"):
        Pipeline(["test-write-in-place"]).run(graph)


def test_a_declared_in_place_writer_runs_on_a_deep_copy(graph):
    before = graph.get_tensor("fc1.weight")
    version = before._version
    report = Pipeline(["test-write-in-place-declared"]).run(graph)
    assert before._version == version  # the input's weight was never written
    assert report.graph.get_tensor("fc1.weight") is not before
    torch.testing.assert_close(report.graph.get_tensor("fc1.weight"), before, rtol=0, atol=0)


def test_run_sets_stacks_the_check_inputs(graph):
    sets = Pipeline([]).check_inputs(graph)
    assert [s[0].shape[0] for s in sets] == [2, 3, 4]
    stacked = run_sets(graph, sets)
    for got, x in zip(stacked, sets):
        torch.testing.assert_close(got[0], graph.run(*x)[0], rtol=1e-6, atol=1e-6)


class Reduce(nn.Module):
    def forward(self, x):
        return x.sum()  # the output is not batch-major: sets cannot be stacked


def test_run_sets_runs_each_set_when_outputs_are_not_batch_major():
    g = Graph.capture(Reduce(), (torch.randn(2, 4),))
    sets = Pipeline([]).check_inputs(g)
    outs = run_sets(g, sets)
    assert [float(o[0]) for o in outs] == pytest.approx([float(x[0].sum()) for x in sets])


def test_bitwise_unchanged_outputs_keep_the_previous_figures(graph):
    from tests.passes.test_pipeline import Noise  # noqa: F401 -- registers test-noise

    report = Pipeline([("test-noise", {"std": 1e-3, "min_sqnr_db": 20.0}), "eliminate-dead-code"]).run(graph)
    noise, dce = report.steps
    assert dce.step[0].max_abs == 0.0 and dce.step[0].sqnr_db == float("inf") and dce.step[0].within_tol
    assert dce.cumulative == noise.cumulative  # the same figures against the original, not recomputed
    assert noise.cumulative[0].max_abs > 0
    first = Pipeline(["eliminate-dead-code"]).run(graph).steps[0]
    assert first.cumulative == first.step and first.step[0].atol > 0  # the tolerance still scales with |ref|


def test_a_replaced_weight_is_not_kept_alive_by_the_result(graph):
    import gc
    import weakref

    from graphpress.ir.graph import Graph as G

    own = graph.clone()  # a graph whose weights only the pipeline holds once it starts
    ref = weakref.ref(own.get_tensor("fc1.weight"))
    report = Pipeline(["test-replace-fc1"]).run(own)
    del own
    gc.collect()
    assert ref() is None, "the replaced weight is still referenced (by the result's snapshot record?)"
    assert isinstance(report.graph, G) and report.graph.written_in_place() == []
