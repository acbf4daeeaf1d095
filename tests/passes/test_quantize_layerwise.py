"""quantize-layerwise: budgets, demotion orders, the ILP, importance scores and their cache, the
rewritten graph (ops, fused relus, numbers), refusals, and the digits CNN end to end in ONNX Runtime."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.passes.quant  # noqa: F401 -- registers the passes
from graphpress.errors import PassError, VerificationError
from graphpress.ir.compare import sqnr_db
from graphpress.ir.graph import Graph
from graphpress.ir.quant import symmetric_per_channel
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.passes.quant import importance as imp
from graphpress.passes.layers import find_layers
from graphpress.passes.quant.layerwise import QuantizeLayerwiseConfig, stored_bytes

aten = torch.ops.aten
OPS = torch.ops.graphpress


class MLP(nn.Module):
    """Five linears of different sizes (params 2048, 4096, 4096, 3072, 480)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64)
        self.fc4, self.fc5 = nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = F.relu(fc(x))
        return self.fc5(x)


@pytest.fixture
def mlp_graph():
    torch.manual_seed(0)
    g = Graph.capture(MLP().eval(), (torch.randn(4, 32),))
    g.calibration = [(torch.randn(64, 32),)]
    return g


def run(graph, **cfg):
    return make_pass("quantize-layerwise", cfg)(graph.clone())


PARAMS = {"fc1": 2048, "fc2": 4096, "fc3": 4096, "fc4": 3072, "fc5": 480}


# ---------------------------------------------------------------------------- budgets and orders
@pytest.mark.parametrize("target", [7.0, 6.0, 5.0, 4.5])
def test_order_allocation_hits_target_average(mlp_graph, target):
    r = run(mlp_graph, bits=[8, 4], target_bits=target, importance="zd", activations="none")
    bits = r.stats["bits"]
    total = sum(PARAMS.values())
    avg = sum(bits[n] * PARAMS[n] for n in PARAMS) / total
    assert r.stats["average_bits"] == pytest.approx(avg, abs=1e-4) and avg <= target
    # the demoted layers are a prefix of the importance order, and it is the shortest prefix that fits
    imps = {n: r.stats["layers"][n]["importance"] for n in PARAMS}
    order = sorted(PARAMS, key=lambda n: (imps[n], list(PARAMS).index(n)))
    k = sum(1 for n in PARAMS if bits[n] == 4)
    assert {n for n in PARAMS if bits[n] == 4} == set(order[:k])
    assert k >= 1
    shorter = sum((4 if n in order[: k - 1] else 8) * PARAMS[n] for n in PARAMS) / total
    assert shorter > target


def test_orders_demote_opposite_ends_and_random_is_seeded(mlp_graph):
    by = {o: run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="measured", order=o, activations="none").stats for o in ("importance", "reverse", "random")}
    imps = {n: by["importance"]["layers"][n]["importance"] for n in PARAMS}
    low = {n for n, b in by["importance"]["bits"].items() if b == 4}
    high = {n for n, b in by["reverse"]["bits"].items() if b == 4}
    assert max(imps[n] for n in low) <= min(imps[n] for n in PARAMS if n not in low)
    assert min(imps[n] for n in high) >= max(imps[n] for n in PARAMS if n not in high)
    assert low != high
    shuffled = list(PARAMS)
    random.Random(0).shuffle(shuffled)
    rand = [n for n in shuffled]
    demoted = {n for n, b in by["random"]["bits"].items() if b == 4}
    assert demoted == set(rand[: len(demoted)])
    again = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="measured", order="random", activations="none").stats["bits"]
    assert again == by["random"]["bits"]


def test_three_widths_demote_step_by_step(mlp_graph):
    r = run(mlp_graph, bits=[8, 4, 2], target_bits=3.5, importance="zd", activations="none")
    bits = r.stats["bits"]
    assert set(bits.values()) <= {8, 4, 2} and r.stats["average_bits"] <= 3.5
    assert 2 in bits.values()


def test_ilp_respects_size_budget_and_beats_order_on_its_objective(mlp_graph):
    imp.clear_cache()  # the cache entry read below must be this graph's (other tests fill the cache too)
    cfg_bytes = 12_000
    r = run(mlp_graph, bits=[8, 4, 2], size_budget=cfg_bytes, allocation="ilp", importance="measured", activations="none")
    assert r.stats["bytes_after"] <= cfg_bytes
    layers = r.stats["layers"]
    assert r.stats["bytes_after"] == sum(v["bytes_after"] for v in layers.values())
    cached = next(iter(imp._CACHE.values()))
    sens = cached["sensitivity"]
    ilp_value = sum(sens[n][b] for n, b in r.stats["bits"].items())
    o = run(mlp_graph, bits=[8, 4, 2], size_budget=cfg_bytes, importance="measured", activations="none")
    assert o.stats["bytes_after"] <= cfg_bytes
    order_value = sum(sens[n][b] for n, b in o.stats["bits"].items())
    assert ilp_value <= order_value + 1e-12


def test_ilp_target_bits(mlp_graph):
    r = run(mlp_graph, bits=[8, 4], target_bits=5.0, allocation="ilp", importance="fisher", activations="none")
    assert r.stats["average_bits"] <= 5.0 and r.stats["allocation"] == "ilp"


# ---------------------------------------------------------------------------- importance
def test_importance_is_cached_per_graph_and_calibration(mlp_graph):
    imp.clear_cache()
    before = dict(imp.COUNTERS)
    a = run(mlp_graph, importance="measured", activations="none")
    b = run(mlp_graph, importance="measured", activations="none")
    assert imp.COUNTERS["computed"] == before["computed"] + 1 and imp.COUNTERS["hits"] == before["hits"] + 1
    assert a.stats["bits"] == b.stats["bits"]
    other = mlp_graph.clone()
    other.calibration = [(torch.randn(64, 32),)]
    run(other, importance="measured", activations="none")
    assert imp.COUNTERS["computed"] == before["computed"] + 2  # new calibration, new key


def test_zd_and_measured_rank_an_outlier_layer_first(mlp_graph):
    g = mlp_graph.clone()
    w = g.get_tensor("fc3.weight")
    with torch.no_grad():
        w[::7, ::5] *= 25.0  # outlier weights: more z-score mass, and much worse 4-bit groups
    layers, _ = find_layers(g)
    opts = {l.name: [8, 4] for l in layers}
    cfg = QuantizeLayerwiseConfig(activations="none")
    from graphpress.passes.quant.layerwise import fake_weight

    quant = lambda l, b: fake_weight(l, g.get_tensor(l.weight_target), b, cfg)
    zd = imp.sensitivities(g, layers, opts, "zd", quant)["importance"]
    assert max(zd, key=zd.get) == "fc3"
    rel = {l.name: imp.sensitivities(g, layers, opts, "measured", quant)["sensitivity"][l.name][4] for l in layers}
    assert rel["fc3"] == max(rel.values()) and all(v >= 0 for v in rel.values())


class Block(nn.Module):
    """``x + gain * down(relu(up(x)))``: a residual block whose add lives inside the module, as in a transformer."""

    def __init__(self, gain: float):
        super().__init__()
        self.up, self.down, self.gain = nn.Linear(16, 32), nn.Linear(32, 16), gain

    def forward(self, x):
        return x + self.gain * self.down(F.relu(self.up(x)))


class ResBlocks(nn.Module):
    """Two residual blocks ``blocks.i``, then a head."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(0.05), Block(3.0)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def test_lim_scores_blocks_and_flags_unmeasurable_ones():
    torch.manual_seed(0)
    g = Graph.capture(ResBlocks().eval(), (torch.randn(3, 16),))
    g.calibration = [(torch.randn(32, 16),)]
    layers, _ = find_layers(g)
    assert imp.block_of("blocks.1.up") == "blocks.1" and imp.block_of("head") == "head"
    scores, unmeasured = imp.lim_scores(g, layers)
    assert scores["blocks.0.up"] == scores["blocks.0.down"] and scores["blocks.1.up"] == scores["blocks.1.down"]
    assert scores["blocks.0.up"] < scores["blocks.1.up"]  # block 0 barely changes its input (x 0.05)
    assert unmeasured == ["head"] and scores["head"] == max(scores["blocks.0.up"], scores["blocks.1.up"])


# ---------------------------------------------------------------------------- rewrites and numbers
def test_weight_only_rewrite_numbers_and_stats(mlp_graph, op_count):
    r = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="zd", activations="none")
    g = r.graph
    assert r.changed and op_count(g, aten.linear) == 0 and op_count(g, OPS.wlinear_nbits) == 5
    assert op_count(g, aten.relu) == 4  # weight-only ops keep their relus
    x = torch.randn(16, 32)
    assert sqnr_db(mlp_graph.run(x)[0], g.run(x)[0]) > 20
    for name, entry in r.stats["layers"].items():
        assert entry["op"] == "wlinear_nbits" and entry["sqnr_db"] > (14 if entry["bits"] == 4 else 35)
        assert entry["bytes_before"] == 4 * PARAMS[name]
    assert r.stats["bytes_before"] == 4 * sum(PARAMS.values())
    assert r.stats["compression"] > 4.5
    assert not any(isinstance(t, torch.nn.Parameter) and t.dtype.is_floating_point and t.dim() == 2 for t in g.gm.parameters())


def test_static_activations_on_random_inputs_fail_the_default_budget_in_a_pipeline():
    # in-distribution calibration, out-of-distribution check inputs: the pipeline names the pass
    torch.manual_seed(0)
    g = Graph.capture(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)).eval(), (torch.rand(4, 1, 6, 6) * 0.1,))
    g.calibration = [(torch.rand(64, 1, 6, 6) * 0.1,)]
    cfg = {"bits": [8], "target_bits": 8, "activations": "int8"}
    ok = Pipeline([("quantize-layerwise", cfg)], random_inputs=0).run(g)
    assert ok.steps[0].worst_step_sqnr_db > 30
    x_far = torch.randn(4, 1, 6, 6) * 5.0
    assert sqnr_db(g.run(x_far)[0], ok.graph.run(x_far)[0]) < 15.0  # clipped by the calibrated ranges


def test_int8_static_fuses_relus_and_reuses_grids(mlp_graph, op_count):
    r = run(mlp_graph, bits=[8], target_bits=8, activations="int8")
    g = r.graph
    nodes = list(g.call_nodes(OPS.qlinear))
    assert len(nodes) == 5 and op_count(g, aten.relu) == 0
    # fc2 reads fc1's quantized output: same (scale, zero point), so the requantization is exact
    out_q = [(n.args[6], n.args[7]) for n in nodes]
    in_q = [(n.args[4], n.args[5]) for n in nodes]
    assert in_q[1:] == out_q[:4] and out_q[4] == (0.0, 0)
    assert all(n.args[3].meta["val"].dtype == torch.int32 for n in nodes)
    x = torch.randn(16, 32)
    assert sqnr_db(mlp_graph.run(x)[0], g.run(x)[0]) > 30
    assert r.stats["layers"]["fc1"]["input_quant"]["zero_point"] > 0


def test_int8_dynamic_and_int8_block_ops(mlp_graph, op_count):
    d = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="zd", activations="int8-dynamic").graph
    assert {n.args[4] for n in d.call_nodes(OPS.qlinear)} == {0.0}
    assert op_count(d, OPS.wlinear_nbits) >= 1 and all(n.args[8] == 8 for n in d.call_nodes(OPS.wlinear_nbits))
    b = run(mlp_graph, bits=[8], target_bits=8, activations="int8-block").graph
    assert op_count(b, OPS.wlinear_nbits) == 5 and op_count(b, OPS.qlinear) == 0


def test_pipeline_checks_the_budget(mlp_graph):
    report = Pipeline([("quantize-layerwise", {"bits": [8, 4], "target_bits": 6.0, "importance": "zd", "activations": "none"})]).run(mlp_graph)
    assert report.steps[0].changed and report.steps[0].worst_step_sqnr_db > 15.0
    with pytest.raises(Exception, match="below the pass budget min_sqnr_db=60"):
        Pipeline([("quantize-layerwise", {"bits": [2], "target_bits": 2, "activations": "none", "min_sqnr_db": 60.0})]).run(mlp_graph)


# ---------------------------------------------------------------------------- on_budget
LOW = {"bits": [8, 2], "target_bits": 3.0, "importance": "measured", "activations": "none", "min_sqnr_db": 20.0}


def test_adapt_raises_the_most_important_layers_until_the_budget_holds(mlp_graph):
    report = Pipeline([("quantize-layerwise", LOW)], random_inputs=0).run(mlp_graph)
    step = report.steps[0]
    s = step.stats
    assert s["asked_bits"] == 3.0 and s["average_bits"] > 3.0  # achieved more bits than asked ...
    assert step.worst_step_sqnr_db >= 20.0  # ... and the budget holds
    assert s["backed_off_layers"] and all(v == {"asked": 2, "got": 8} for v in s["backed_off_layers"].values())
    assert all(s["bits"][n] == 8 for n in s["backed_off_layers"])
    ob = s["on_budget"]
    assert ob["met"] and ob["tries"][0]["sqnr_db"] < 20.0 and ob["backed_off_moves"] == len(s["backed_off_layers"])


def test_fail_is_one_line_with_the_bits_and_the_option(mlp_graph):
    with pytest.raises(VerificationError) as err:
        Pipeline([("quantize-layerwise", {**LOW, "on_budget": "fail"})], random_inputs=0).run(mlp_graph)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"below the pass budget min_sqnr_db=20.0 at [0-9.]+ average bits \(target_bits 3\)", msg)
    assert "raise target_bits, set on_budget: adapt, or change min_sqnr_db" in msg
    # out of reach even with every layer back at 8 bits: the best SQNR reached, and what to change
    with pytest.raises(VerificationError, match=r"reached at best SQNR [0-9.]+ dB at 8\.00 average bits \(target_bits 3\); raise target_bits or change min_sqnr_db"):
        Pipeline([("quantize-layerwise", {**LOW, "min_sqnr_db": 200.0})], random_inputs=0).run(mlp_graph)


def test_a_met_target_runs_once_and_is_unchanged_by_on_budget(mlp_graph):
    cfg = {"bits": [8, 4], "target_bits": 6.0, "importance": "zd", "activations": "none"}
    adapt = Pipeline([("quantize-layerwise", cfg)], random_inputs=0).run(mlp_graph)
    fail = Pipeline([("quantize-layerwise", {**cfg, "on_budget": "fail"})], random_inputs=0).run(mlp_graph)
    a, f = adapt.steps[0].stats, fail.steps[0].stats
    assert "on_budget" not in a and a["backed_off_layers"] == {} and a["bits"] == f["bits"] and a["average_bits"] <= 6.0
    x = torch.randn(8, 32)
    torch.testing.assert_close(adapt.graph.run(x)[0], fail.graph.run(x)[0])


def test_an_unreachable_bit_target_takes_the_lowest_widths_or_fails():
    # a conv takes 8 bits only with int8 activations: 6 average bits cannot be met
    torch.manual_seed(0)
    g = Graph.capture(nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 1)).eval(), (torch.randn(4, 8, 6, 6),))
    r = run(g, bits=[8, 4], target_bits=6.0)  # 2304 conv weights at 8 bits, 1152 linear ones at 4: 6.67 bits at least
    assert r.stats["bits"] == {"0": 8, "3": 4} and "out of reach" in r.stats["budget_unreachable"]
    assert r.stats["asked_bits"] == 6.0 and abs(r.stats["average_bits"] - 20 / 3) < 1e-3
    with pytest.raises(PassError, match="cannot be met: the lowest allocation takes .* set on_budget: adapt"):
        run(g, bits=[8, 4], target_bits=6.0, on_budget="fail")


# ---------------------------------------------------------------------------- refinement and MSE ranges
class ResCNN(nn.Module):
    """conv -> relu -> conv (no bias) -> + residual -> relu -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(self.conv(h) + h)
        return self.head(h.mean((2, 3)))


def smooth_images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """Upsampled noise: neighbouring pixels correlate, as in photos (and im2col rows)."""
    gen = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=size, mode="bilinear", align_corners=False)


@pytest.fixture
def res_graph():
    torch.manual_seed(0)
    g = Graph.capture(ResCNN().eval(), (smooth_images(2, 0),))
    g.calibration = [(smooth_images(64, 1),), (smooth_images(64, 2),)]
    return g


INT8 = {"bits": [8], "target_bits": 8, "activations": "int8"}
PLAIN = {"weight_rounding": "nearest", "bias_correction": False}


def test_gptq_and_bias_correction_lower_the_error_and_unbias_the_output(res_graph, op_count):
    plain = run(res_graph, **INT8, **PLAIN)
    gptq = run(res_graph, **INT8, bias_correction=False)
    bc = run(res_graph, **INT8, weight_rounding="nearest")
    both = run(res_graph, **INT8)  # the defaults
    x = smooth_images(512, 3)
    ref = res_graph.run(x)[0]
    sq = {k: sqnr_db(ref, r.graph.run(x)[0]) for k, r in (("plain", plain), ("gptq", gptq), ("bc", bc), ("both", both))}
    assert sq["gptq"] > sq["plain"] and sq["bc"] > sq["plain"] and sq["both"] > sq["plain"] + 0.3
    # GPTQ: same grid (scales), other grid points, a lower error per layer (input quantization included)
    for name in ("stem", "conv", "head"):
        assert gptq.stats["layers"][name]["sqnr_db"] >= plain.stats["layers"][name]["sqnr_db"]
        assert gptq.stats["layers"][name]["weight_rounding"] == "gptq" and "bias_shift_rms" not in gptq.stats["layers"][name]
    assert gptq.stats["layers"]["head"]["sqnr_db"] > plain.stats["layers"]["head"]["sqnr_db"] + 1.0
    qn = {n.args[1].target: n for n in both.graph.call_nodes(OPS.qconv2d, OPS.qlinear)}
    w_stem = res_graph.get_tensor("stem.weight")
    q_rtn, s_rtn = symmetric_per_channel(w_stem, 8)
    stem = next(n for t, n in qn.items() if t.startswith("stem"))
    assert torch.equal(both.graph.tensor_of(stem.args[2]), s_rtn) and not torch.equal(both.graph.tensor_of(stem.args[1]), q_rtn)
    # bias correction: the output's mean error on the calibration set vanishes (up to the int32 bias step)
    cal = torch.cat([b[0] for b in res_graph.calibration])
    bias_err = {k: float((r.graph.run(cal)[0] - res_graph.run(cal)[0]).mean(0).abs().max()) for k, r in (("plain", plain), ("bc", bc), ("both", both))}
    assert bias_err["bc"] < 1e-5 and bias_err["both"] < 1e-5 and bias_err["plain"] > 50 * bias_err["bc"]
    assert {"stem", "conv", "head"} == {n for n, e in bc.stats["layers"].items() if e["bias_shift_rms"] > 0}
    assert both.stats["refined"] == {"weight_rounding": "gptq", "bias_correction": True, "layers": 3}
    # the bias-free conv got an int32 bias; the ops and their count are unchanged
    conv = next(n for t, n in qn.items() if t.startswith("conv"))
    assert conv.args[3] is not None and both.graph.tensor_of(conv.args[3]).dtype == torch.int32
    assert plain.graph.tensor_of(next(n for n in plain.graph.call_nodes(OPS.qconv2d) if n.args[1].target.startswith("conv")).args[3]) is None
    assert op_count(both.graph, OPS.qconv2d) == 2 and op_count(both.graph, OPS.qlinear) == 1 and op_count(both.graph, aten.conv2d) == 0


def test_refinement_leaves_other_layers_alone(mlp_graph):
    # plain options: the codes are round-to-nearest and the bias is the float bias in int32 units
    r = run(mlp_graph, **INT8, **PLAIN)
    assert r.stats["refined"]["layers"] == 0
    fc1 = next(iter(r.graph.call_nodes(OPS.qlinear)))
    q_rtn, _ = symmetric_per_channel(mlp_graph.get_tensor("fc1.weight"), 8)
    assert torch.equal(r.graph.tensor_of(fc1.args[1]), q_rtn)
    assert all(k not in e for e in r.stats["layers"].values() for k in ("weight_rounding", "bias_shift_rms"))
    # dynamic activations: nothing static to refine, identical graphs with and without the options
    d0, d1 = run(mlp_graph, **{**INT8, "activations": "int8-dynamic"}, **PLAIN), run(mlp_graph, **{**INT8, "activations": "int8-dynamic"})
    assert d1.stats["refined"]["layers"] == 0
    x = torch.randn(64, 32)
    assert torch.equal(d0.graph.run(x)[0], d1.graph.run(x)[0])
    # mixed widths: only the static int8 layers are refined, and they absorb the 4-bit layers' bias too
    m0 = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="zd", activations="int8", **PLAIN)
    m1 = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="zd", activations="int8")
    refined = {n for n, e in m1.stats["layers"].items() if "bias_shift_rms" in e}
    assert refined == {n for n, e in m1.stats["layers"].items() if e["op"] == "qlinear"} and 0 < len(refined) < 5
    x = torch.randn(1024, 32)
    ref = mlp_graph.run(x)[0]
    assert sqnr_db(ref, m1.graph.run(x)[0]) > sqnr_db(ref, m0.graph.run(x)[0]) + 0.3


def test_refinement_needs_stackable_calibration_batches():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(F.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    g = Graph.capture(Pool().eval(), (smooth_images(2, 0),), dynamic_dims={0: "batch", 2: "h", 3: "w"})
    g.calibration = [(smooth_images(16, 1),), (smooth_images(16, 2, size=12),)]  # two image sizes
    r = run(g, **INT8)
    assert r.stats["refined"]["layers"] == 0
    assert all(e["refined"].startswith("no: calibration batches differ in shape") for e in r.stats["layers"].values())


def test_mse_ranges_measure_a_residual_output_after_the_sum(res_graph):
    mm, mse = run(res_graph, **INT8, **PLAIN), run(res_graph, **INT8, **PLAIN, act_calibration="mse")
    assert mse.stats["act_calibration"] == "mse"

    def out_grid(r, prefix):
        n = next(n for n in r.graph.call_nodes(OPS.qconv2d) if n.args[1].target.startswith(prefix))
        s, z = n.args[-3], n.args[-2]
        return -z * s, (255 - z) * s

    lo_mm, hi_mm = out_grid(mm, "conv")
    lo_mse, hi_mse = out_grid(mse, "conv")
    assert lo_mm < lo_mse < 0 < hi_mse <= hi_mm + 1e-6  # the negative side, mostly zeroed by the relu, is clipped
    # measured where it matters: relu(conv + residual) on the calibration set
    from graphpress.ir.quant import act_quant_mse
    from graphpress.passes.layers import record

    conv = list(res_graph.call_nodes(aten.conv2d))[1]
    add = next(iter(conv.users))
    stem_relu = next(a for a in add.args if a is not conv)
    vals = record(res_graph, [conv, stem_relu])
    x, r_ = torch.cat(vals[conv.name]).reshape(-1), torch.cat(vals[stem_relu.name]).reshape(-1)
    after = lambda v: torch.relu(v + r_)
    assert act_quant_mse(x, lo_mse, hi_mse, after) < 0.8 * act_quant_mse(x, lo_mm, hi_mm, after)
    x_test = smooth_images(512, 3)
    ref = res_graph.run(x_test)[0]
    assert sqnr_db(ref, mse.graph.run(x_test)[0]) > 30


# ---------------------------------------------------------------------------- refusals
class NoLayers(nn.Module):
    def forward(self, x):
        return torch.tanh(x) * 2.0 + 1.0


def test_no_eligible_layer_does_not_fire():
    g = Graph.capture(NoLayers().eval(), (torch.randn(2, 8),))
    r = make_pass("quantize-layerwise", {})(g)
    assert r.changed is False and r.stats["quantized"] == 0


def test_conv_is_not_eligible_weight_only_and_says_why():
    g = Graph.capture(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), (torch.randn(2, 3, 6, 6),))
    r = make_pass("quantize-layerwise", {"activations": "none"})(g)
    assert r.changed is False and "no weight-only integer kernel" in next(iter(r.stats["kept_float"].values()))


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"target_bit": 5}, "unknown option 'target_bit': did you mean 'target_bits'"),
        ({"importance": "lmi"}, "option 'importance': 'lmi' is not one of 'lim', 'zd', 'fisher', 'measured'"),
        ({"bits": [8, 5, 1]}, "option 'bits'"),
        ({"target_bits": 6, "size_budget": 100}, "not both"),
        ({"group_size": 48}, "option 'group_size'"),
        ({"layer_bits": {"fc1": 9}}, "option 'layer_bits': layer 'fc1'"),
        ({"weight_rounding": "gptk"}, "option 'weight_rounding': 'gptk' is not one of 'nearest', 'gptq'"),
        ({"bias_correction": "yes"}, "option 'bias_correction': expected true/false"),
        ({"act_calibration": "entropy"}, "option 'act_calibration': 'entropy' is not one of 'minmax', 'percentile', 'mse'"),
    ],
)
def test_bad_config_names_the_option(cfg, match):
    with pytest.raises(PassError, match=match):
        make_pass("quantize-layerwise", cfg)


def test_bad_layer_names_and_infeasible_budget(mlp_graph):
    with pytest.raises(PassError, match="option 'skip': names unknown layer 'fcc2': did you mean 'fc2'"):
        run(mlp_graph, skip=["fcc2"])
    with pytest.raises(PassError, match="option 'target_bits' .* cannot be met: the lowest allocation takes 4 bits"):
        run(mlp_graph, bits=[8, 4], target_bits=3.0, activations="none", on_budget="fail")
    # adapt (the default) takes the lowest width everywhere and says the target was out of reach
    lowest = run(mlp_graph, bits=[8, 4], target_bits=3.0, activations="none")
    assert set(lowest.stats["bits"].values()) == {4} and "is out of reach (the lowest allocation takes 4 bits)" in lowest.stats["budget_unreachable"]
    fixed = run(mlp_graph, bits=[8, 4], target_bits=8.0, layer_bits={"fc2": 4}, activations="none")
    assert fixed.stats["bits"]["fc2"] == 4 and fixed.stats["bits"]["fc1"] == 8


def test_stored_bytes_matches_modes():
    g = Graph.capture(MLP().eval(), (torch.randn(2, 32),))
    fc2 = next(l for l in find_layers(g)[0] if l.name == "fc2")
    assert stored_bytes(fc2, 8, QuantizeLayerwiseConfig(activations="int8")) == 4096 + 4 * 64
    assert stored_bytes(fc2, 4, QuantizeLayerwiseConfig(activations="none")) == 64 * 2 * 16 + 4 * 64 * 2 + 64
    assert stored_bytes(fc2, 32, QuantizeLayerwiseConfig()) == 4 * 4096


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow  # training the digits CNN takes 1-60 s on the shared machine
def test_digits_cnn_int8_in_onnx_runtime(tmp_path):
    from graphpress.backends.onnxruntime.lower import OnnxRuntimeBackend
    from graphpress.backends.onnxruntime.session import OrtRunner
    from graphpress.zoo import accuracy, digits_data, train_digits_cnn

    model, acc = train_digits_cnn(epochs=6)
    x_tr, _y_tr, x_te, y_te = digits_data()
    g = Graph.capture(model, (x_te[:8],))
    g.calibration = [(x_tr[:256],)]
    # static activation ranges come from real images: judge on those (random inputs saturate them)
    report = Pipeline(["fold-batchnorm", ("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8"})], random_inputs=0).run(g)
    q = report.graph
    assert report.steps[1].stats["average_bits"] == 8.0 and report.steps[1].stats["quantized"] == 4
    lowered = OnnxRuntimeBackend().lower(q, tmp_path)
    assert lowered.check["passed"]
    runner = OrtRunner(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    ort_acc = accuracy(lambda x: torch.from_numpy(runner(x)[0]), x_te, y_te)
    assert acc > 0.95 and ort_acc >= acc - 0.01
    assert math.isfinite(report.steps[1].worst_step_sqnr_db) and report.steps[1].worst_step_sqnr_db > 30


def test_asymmetric_same_padding_conv_is_kept_float_with_the_reason(op_count):
    g = Graph.capture(nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), nn.Conv2d(4, 4, 3, padding="same")).eval(), (torch.randn(2, 3, 6, 6),))
    r = make_pass("quantize-layerwise", {"bits": [8], "target_bits": 8, "activations": "int8"})(g.clone())
    assert r.stats["bits"] == {"1": 8} and "padding='same' is asymmetric" in r.stats["kept_float"]["0"]
    assert op_count(r.graph, aten.conv2d) == 1 and op_count(r.graph, OPS.qconv2d) == 1
    x = torch.rand(3, 3, 6, 6)
    assert sqnr_db(g.run(x)[0], r.graph.run(x)[0]) > 30


@pytest.mark.slow  # two passes over ResNet-20 with 512 calibration crops: ~20-60 s on the shared machine
def test_resnet20_int8_agreement_on_photo_crops(op_count):
    from graphpress.zoo import load_resnet20
    from graphpress.zoo.paths import RESNET20_RELPATH, resnet20_checkpoint_path
    from graphpress.zoo.photos import photo_crops

    if resnet20_checkpoint_path() is None:
        pytest.skip(f"../shared/models/{RESNET20_RELPATH.as_posix()} not found")
    pytest.importorskip("sklearn")
    calib, x = photo_crops(512, 1), photo_crops(2048, 2)
    g = Graph.capture(load_resnet20(), (calib[:2],))
    g.calibration = [(calib[i : i + 128],) for i in range(0, 512, 128)]
    g = Pipeline(["fold-batchnorm"]).run(g).graph
    ref = g.run(x)[0].argmax(-1)
    agree = {}
    for name, extra in (("plain", {**PLAIN, "shortcuts": "float"}), ("refined", {"shortcuts": "float"}), ("default", {})):
        q = Pipeline([("quantize-layerwise", {**INT8, **extra})], random_inputs=0).run(g).graph
        agree[name] = float((q.run(x)[0].argmax(-1) == ref).float().mean())
        assert op_count(q, OPS.qconv2d) == 19 and op_count(q, OPS.qlinear) == 1 and op_count(q, aten.conv2d) == 0
        # default: the 8 block outputs that feed a next block, and the ends of the 2 option-A shortcuts
        assert op_count(q, OPS.quantize_act) == (10 if name == "default" else 0)
    # measured: 0.963 round-to-nearest without bias correction; 0.974-0.976 with GPTQ + bias correction;
    # 0.965 with the shortcuts quantized too (the price of ORT's QLinearAdd fusion)
    assert 0.95 < agree["plain"] < 0.97 and agree["refined"] >= 0.97 and agree["refined"] > agree["plain"] + 0.008
    assert agree["default"] >= 0.96


def test_one_width_per_layer_measures_no_importance(mlp_graph):
    before = dict(imp.COUNTERS)
    r = run(mlp_graph, bits=[8], target_bits=8, importance="lim", activations="none")
    assert imp.COUNTERS == before  # neither computed nor looked up
    assert r.stats["importance_method"].startswith("not measured")
    assert all(r.stats["layers"][n]["importance"] is None and r.stats["bits"][n] == 8 for n in PARAMS)
    # a choice between widths is still measured
    r = run(mlp_graph, bits=[8, 4], target_bits=6.0, importance="zd", activations="none")
    assert all(isinstance(r.stats["layers"][n]["importance"], float) for n in PARAMS)


def test_group_rounding_gptq_beats_nearest_on_correlated_inputs():
    torch.manual_seed(3)
    g = Graph.capture(MLP().eval(), (torch.randn(4, 32),))
    basis = torch.randn(6, 32)
    g.calibration = [(torch.randn(128, 6) @ basis + 0.05 * torch.randn(128, 32),)]
    common = dict(bits=[4], target_bits=4, activations="none", group_size=32)
    near = run(g, **common).stats["layers"]
    for act_order in (False, True):
        got = run(g, group_rounding="gptq", act_order=act_order, **common).stats["layers"]
        # fc1 sees the correlated inputs themselves: GPTQ's feedback must pay there
        assert got["fc1"]["sqnr_db"] > near["fc1"]["sqnr_db"] + 3
        assert got["fc1"]["weight_rounding"] == ("gptq (act order)" if act_order else "gptq")
    assert "weight_rounding" not in near["fc1"]
    # fewer calibration rows than inputs: the Hessian is singular, and the stats say so
    g.calibration = [(torch.randn(16, 32),)]
    few = run(g, group_rounding="gptq", **common).stats["layers"]["fc1"]["weight_rounding"]
    assert few.startswith("gptq; only 16 calibration rows for 32 inputs: may overfit")


def test_group_rounding_is_checked():
    with pytest.raises(PassError, match="group_rounding"):
        make_pass("quantize-layerwise", {"group_rounding": "gptq4"})
    with pytest.raises(PassError, match="act_order"):
        make_pass("quantize-layerwise", {"act_order": "yes"})


# ---------------------------------------------------------------------------- LoRC
class Outliers(nn.Module):
    """One 64 -> 64 linear whose input channel 5 has weights 50x the others: the groups holding it
    get a coarse step, so the rounding error sits in those 32 columns (a low-rank block)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        with torch.no_grad():
            self.fc.weight[:, 5] *= 50

    def forward(self, x):
        return self.fc(x)


def test_lorc_adds_the_errors_leading_singular_directions_back_where_it_pays():
    torch.manual_seed(0)
    g = Graph.capture(Outliers().eval(), (torch.randn(4, 64),))
    g.calibration = [(torch.randn(64, 64),)]
    x = torch.randn(256, 64)
    ref = g.run(x)[0]
    plain = run(g, bits=[4], target_bits=4, activations="none")
    lorc = run(g, bits=[4], target_bits=4, activations="none", lorc_rank=16)
    info = lorc.stats["layers"]["fc"]["lorc"]
    assert info["kept"] and info["rank"] == 16 and info["weight_sqnr_db"][1] > info["weight_sqnr_db"][0] + 3
    # y = W_hat x + B (A x): two float linears of rank 16 beside the 4-bit op, summed
    linears = [n for n in lorc.graph.gm.graph.nodes if n.op == "call_function" and n.target is aten.linear.default]
    assert len(linears) == 2 and [tuple(lorc.graph.tensor_of(n.args[1]).shape) for n in linears] == [(16, 64), (64, 16)]
    assert lorc.stats["bytes_after"] == plain.stats["bytes_after"] + info["extra_bytes"] == plain.stats["bytes_after"] + 4 * 16 * 128
    assert sqnr_db(ref, lorc.graph.run(x)[0]) > sqnr_db(ref, plain.graph.run(x)[0]) + 3
    # a gain below lorc_min_gain_db: nothing added
    kept_out = run(g, bits=[4], target_bits=4, activations="none", lorc_rank=1, lorc_min_gain_db=30.0)
    assert kept_out.stats["layers"]["fc"]["lorc"]["kept"] is False
    assert not any(n.target is aten.linear.default for n in kept_out.graph.gm.graph.nodes if n.op == "call_function")
    assert kept_out.stats["bytes_after"] == plain.stats["bytes_after"]
    with pytest.raises(PassError, match="option 'lorc_rank': must be an integer >= 0"):
        QuantizeLayerwiseConfig(lorc_rank=-1)
