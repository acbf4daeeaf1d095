"""``quantize-kv-cache``: one ``kv_quant_write`` per returned cache, a searched per-cache mix that
holds the memory budget and measures no worse than uniform, prefill logits untouched, the
decode KL it reports, and refusals in one line."""

import pytest
import torch

from graphpress.errors import PassError
from graphpress.frontends.hf_kv import capture_kv_decoder, prefill_batches
from graphpress.ir.ops_kvcache import kv_bytes_per_token
from graphpress.passes.quant.kv_cache import QuantizeKVCache, QuantizeKVCacheConfig
from tests.frontends.test_hf_kv import _model

KVQ = torch.ops.graphpress.kv_quant_write.default


@pytest.fixture(scope="module")
def kv_graph():
    graph = capture_kv_decoder(_model("llama"), name="tiny")
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(3))
    graph.calibration = prefill_batches(graph, [(ids,)])
    return graph


def _writes(graph):
    out = next(n for n in graph.gm.graph.nodes if n.op == "output")
    return {name: a for name, a in zip(graph.output_names, out.args[0]) if name.startswith("present.")}


def test_uniform_bits_put_one_write_on_every_cache_and_leave_prefill_logits(kv_graph):
    before = kv_graph.run(*kv_graph.example_inputs)
    r = QuantizeKVCache(QuantizeKVCacheConfig(bits=8))(kv_graph.clone())
    writes = _writes(r.graph)
    assert len(writes) == 4 and all(n.target is KVQ and n.args[2] == 8 for n in writes.values())
    # each write reads the cache input of its own name
    assert all(n.args[0].name == r.graph.gm.graph.find_nodes(op="placeholder")[r.graph.input_names.index(k.replace("present.", "past_key_values."))].name
               for k, n in writes.items())
    after = r.graph.run(*r.graph.example_inputs)
    assert torch.equal(before[0], after[0])  # a prefill never reads the cache: same logits
    assert not torch.equal(before[1], after[1])  # but what it stores is rounded
    s = r.stats
    assert s["bits"] == {"0.key": 8, "0.value": 8, "1.key": 8, "1.value": 8} and 0 <= s["kl"] < 1e-3
    assert s["bytes_per_token"] == 4 * kv_bytes_per_token(2, 16, 8) and s["fp16_bytes_per_token"] == 4 * 2 * 16 * 2
    assert s["ratio_vs_fp16"] == pytest.approx((16 + 4) / 32)


def test_the_searched_mix_holds_the_budget_and_measures_no_worse_than_uniform(kv_graph):
    r = QuantizeKVCache(QuantizeKVCacheConfig(avg_bits=4, max_kl=None))(kv_graph.clone())
    s = r.stats
    assert s["bytes_per_token"] <= s["uniform_bytes_per_token"] + 1e-9
    assert s["kl"] <= s["uniform_kl"]
    assert set(s["bits"].values()) <= {2, 4, 8}
    for cache, by_bits in s["sensitivity_kl"].items():
        assert by_bits["2"] >= by_bits["8"]  # coarser codes cost at least as much, measured
    # the stored graph has the chosen widths
    assert {k.removeprefix("present."): n.args[2] for k, n in _writes(r.graph).items()} == s["bits"]
    # the values feel rounding more than the keys in this model: 2 bits on values costs more
    assert s["sensitivity_kl"]["0.value"]["2"] > s["sensitivity_kl"]["0.key"]["2"]


def test_the_decode_kl_is_measured_through_the_cache(kv_graph):
    coarse = QuantizeKVCache(QuantizeKVCacheConfig(bits=2, max_kl=None))(kv_graph.clone()).stats["kl"]
    fine = QuantizeKVCache(QuantizeKVCacheConfig(bits=8, max_kl=None))(kv_graph.clone()).stats["kl"]
    assert coarse > 10 * fine and coarse > 0


def test_refusals_are_one_line(kv_graph):
    with pytest.raises(PassError, match="exceeds max_kl=1e-09 at avg_bits=4"):
        QuantizeKVCache(QuantizeKVCacheConfig(bits=2, max_kl=1e-9))(kv_graph.clone())
    done = QuantizeKVCache(QuantizeKVCacheConfig(bits=8))(kv_graph.clone()).graph
    with pytest.raises(PassError, match="already quantized"):
        QuantizeKVCache(QuantizeKVCacheConfig(bits=8))(done)
    with pytest.raises(PassError, match="option 'choices' must be distinct widths"):
        QuantizeKVCacheConfig(choices=(3, 4))
    with pytest.raises(PassError, match="option 'avg_bits' must be between"):
        QuantizeKVCacheConfig(avg_bits=1)


def test_a_graph_without_a_cache_is_not_touched():
    from graphpress.ir.graph import Graph

    g = Graph.capture(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="has no KV cache; capture it with --kv-cache"):
        QuantizeKVCache()(g)


def test_given_cache_widths_are_kept_and_the_rest_searched_under_what_is_left(kv_graph):
    r = QuantizeKVCache(QuantizeKVCacheConfig(cache_bits={"0.key": 8}, avg_bits=4, max_kl=None))(kv_graph.clone())
    s = r.stats
    assert s["bits"]["0.key"] == 8 and "0.key" not in s["sensitivity_kl"] and len(s["sensitivity_kl"]) == 3
    assert s["bytes_per_token"] <= 4 * kv_bytes_per_token(2, 16, 4) + 1e-9  # the budget covers the fixed cache too
    replay = QuantizeKVCache(QuantizeKVCacheConfig(cache_bits=s["bits"], max_kl=None))(kv_graph.clone()).stats
    assert replay["bits"] == s["bits"] and replay["kl"] == s["kl"] and replay["kept"] == "given"
    with pytest.raises(PassError, match="option 'cache_bits' names \\['7.key'\\]"):
        QuantizeKVCache(QuantizeKVCacheConfig(cache_bits={"7.key": 4}))(kv_graph.clone())
    with pytest.raises(PassError, match="option 'cache_bits' entry 'k0'"):
        QuantizeKVCacheConfig(cache_bits={"k0": 4})
