"""Graph.snapshot / release / swap_tensors / written_in_place and the bounded weight caches."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn

import graphpress.ir.ops_circulant as oc
from graphpress.ir.graph import Graph


@pytest.fixture
def graph():
    torch.manual_seed(0)
    return Graph.capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(2, 4),))


def test_snapshot_shares_tensors_but_not_structure(graph):
    snap = graph.snapshot()
    assert snap.get_tensor("0.weight") is graph.get_tensor("0.weight")
    assert snap.gm is not graph.gm and snap.gm.graph is not graph.gm.graph
    node = next(n for n in snap.gm.graph.nodes if n.op == "call_function")
    with snap.gm.graph.inserting_after(node):
        snap.gm.graph.call_function(torch.ops.aten.relu.default, (node,))
    assert len(snap.gm.graph.nodes) == len(graph.gm.graph.nodes) + 1
    assert snap.written_in_place() == [] and graph.written_in_place() == []


def test_written_in_place_names_the_tensor(graph):
    snap = graph.snapshot()
    graph.set_tensor("2.bias", torch.zeros(2))  # replaced: the snapshot keeps its own
    assert snap.written_in_place() == []
    with torch.no_grad():
        graph.get_tensor("0.weight").add_(1.0)
    assert snap.written_in_place() == ["0.weight"]


def test_swap_tensors_restores_the_same_objects_even_on_error(graph):
    x = torch.randn(3, 4)
    ref = graph.run(x)[0]
    w = graph.get_tensor("0.weight")
    version = w._version
    with graph.swap_tensors({"0.weight": torch.zeros_like(w), "0.bias": torch.zeros(8)}):
        swapped = graph.run(x)[0]
    assert graph.get_tensor("0.weight") is w and isinstance(graph.gm.get_submodule("0")._parameters["weight"], nn.Parameter)
    assert not torch.equal(swapped, ref)
    with pytest.raises(RuntimeError, match="boom"), graph.swap_tensors({"0.weight": torch.ones_like(w)}):
        raise RuntimeError("boom")
    assert graph.get_tensor("0.weight") is w and w._version == version  # swapped, never written
    torch.testing.assert_close(graph.run(x)[0], ref, rtol=0, atol=0)


def test_release_frees_the_tensors_a_snapshot_alone_holds(graph):
    snap = graph.snapshot()
    old = graph.get_tensor("0.weight")
    graph.set_tensor("0.weight", old.clone())
    ref = weakref.ref(old)
    del old
    gc.collect()  # the captured nn.Module (a cycle) still holds the weight until a collection
    assert ref() is not None  # the snapshot holds it
    gc.disable()  # from here: freed by the release, not by a collection
    try:
        snap.release()
        assert ref() is None
    finally:
        gc.enable()
    assert graph.run(torch.randn(1, 4))[0].shape == (1, 2)


def test_weight_caches_stop_growing_at_their_bound(monkeypatch):
    monkeypatch.setattr(oc, "CACHE_BYTES", 3 * 4 * 100)
    monkeypatch.setattr(oc._WeightCache, "_held", 0)
    cache = oc._WeightCache()
    weights = [torch.randn(10) for _ in range(5)]
    made = []

    def make(w):
        made.append(1)
        return torch.zeros(100)  # 400 bytes each: three fit

    for w in weights:
        cache.get(w, "k", lambda w=w: make(w))
    assert cache.nbytes() == 1200 and len(made) == 5
    for w in weights:
        cache.get(w, "k", lambda w=w: make(w))
    assert len(made) == 7  # the three cached were hits, the two over the bound recomputed
    del weights[0]
    gc.collect()
    assert cache.nbytes() == 800 and oc._WeightCache._held == 800


def test_a_bad_cache_size_is_one_clear_error(monkeypatch):
    from graphpress.errors import GraphpressError

    monkeypatch.setattr(oc, "CACHE_BYTES", None)
    monkeypatch.setenv("GRAPHPRESS_WEIGHT_CACHE_MB", "lots")
    with pytest.raises(GraphpressError, match=r"^GRAPHPRESS_WEIGHT_CACHE_MB='lots': expected a size in MiB >= 0"):
        oc._cache_bytes()
    monkeypatch.setenv("GRAPHPRESS_WEIGHT_CACHE_MB", "0.5")
    assert oc._cache_bytes() == 2**19
