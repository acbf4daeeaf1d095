"""prune-channels: weights shrink by the expected counts, removing channels that were already zero
leaves the outputs unchanged (conv chain, residual, option-A shortcut, concat, depthwise, flatten,
channel slice), the option-A map matches a hand-written reference on real weights, pinned groups
stay whole, and the pruned graph re-exports with torch.export and runs in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpress.passes.prune.structured  # noqa: F401 -- registers prune-channels
from graphpress.errors import PassError, VerificationError
from graphpress.ir.graph import Graph
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.passes.prune.structured import kept_count


def capture(model: nn.Module, *shape: int, seed: int = 0) -> Graph:
    gen = torch.Generator().manual_seed(seed)
    return Graph.capture(model.eval(), (torch.randn(*shape, generator=gen),))


def prune(graph: Graph, **cfg):
    return make_pass("prune-channels", cfg)(graph.clone())


@torch.no_grad()
def zero(layer: nn.Module, channels, bn: nn.BatchNorm2d | None = None) -> None:
    """Make output ``channels`` of ``layer`` exactly zero (rows, bias, batch-norm scale and shift)."""
    layer.weight[list(channels)] = 0
    if layer.bias is not None:
        layer.bias[list(channels)] = 0
    if bn is not None:
        bn.weight[list(channels)] = 0
        bn.bias[list(channels)] = 0


@torch.no_grad()
def randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def assert_same_outputs(before: Graph, after: Graph, batch: int = 5) -> None:
    x = before.random_inputs(7, batch=batch)
    for a, b in zip(before.run(*x), after.run(*x)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    return [i for i in range(original.shape[0]) if any(torch.equal(original[i], r) for r in pruned)]


# ---------------------------------------------------------------------------- models
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x)))
        return self.c3(x)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        return self.head(h.mean((2, 3)))


class OptionA(nn.Module):
    """ResNet's downsampling block with the option-A shortcut (strided slice + zero channels)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        short = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        h = F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))) + short)
        return self.head(h.mean((2, 3)))


# ---------------------------------------------------------------------------- exactness by zeroing
def test_conv_chain_removes_zero_channels_exactly():
    m = randomize_bn(Chain())
    zero(m.c1, [1, 3, 4, 6], m.bn1)
    zero(m.c2, [0, 2, 5, 7], m.bn2)
    g = capture(m, 2, 3, 8, 8)
    r = prune(g, sparsity=0.5)
    p = r.graph
    assert p.get_tensor("c1.weight").shape == (4, 3, 3, 3) and p.get_tensor("bn1.running_var").shape == (4,)
    assert p.get_tensor("c2.weight").shape == (4, 4, 3, 3) and p.get_tensor("c3.weight").shape == (4, 4, 1, 1)
    assert kept_rows(g.get_tensor("c1.weight"), p.get_tensor("c1.weight")) == [0, 2, 5, 7]
    assert r.stats["pinned"] == {"c3": "reaches graph output 'output'"}
    assert r.stats["params_after"] < r.stats["params_before"] and r.stats["macs_after"] < r.stats["macs_before"]
    # MACs per image: (3*9*8 + 8*9*8 + 8*4) * 64 before, (3*9*4 + 4*9*4 + 4*4) * 64 after
    assert (r.stats["macs_before"], r.stats["macs_after"]) == ((216 + 576 + 32) * 64, (108 + 144 + 16) * 64)
    assert_same_outputs(g, p)


def test_residual_identity_shortcut_prunes_the_joined_stream_together():
    m = randomize_bn(Residual())
    zero(m.stem, [0, 1, 2, 3], m.bn0)
    zero(m.c2, [0, 1, 2, 3], m.bn2)  # the stream's channels are zero in every producer
    zero(m.c1, [4, 5, 6, 7], m.bn1)
    g = capture(m, 2, 3, 8, 8)
    r = prune(g)
    p = r.graph
    stream = next(row for row in r.stats["groups"] if row["name"] == "stem")
    assert stream == {"name": "stem", "channels_before": 8, "channels_after": 4, "members": ["stem", "c2"]}
    assert p.get_tensor("c1.weight").shape == (4, 4, 3, 3) and p.get_tensor("c2.weight").shape == (4, 4, 3, 3)
    assert p.get_tensor("head.weight").shape == (4, 4)
    assert_same_outputs(g, p)


def test_option_a_shortcut_prunes_source_and_target_independently_and_exactly():
    m = randomize_bn(OptionA())
    pruned_src = [0, 2, 4, 6]  # kept stem channels 1, 3, 5, 7 land on c2 positions 5, 7, 9, 11
    zero(m.stem, pruned_src, m.bn0)
    zero(m.c2, [0, 1, 2, 3, 4, 6, 8, 10], m.bn2)  # positions fed by pruned stem channels or padding
    zero(m.c1, list(range(8, 16)), m.bn1)
    g = capture(m, 2, 3, 8, 8)
    r = prune(g)
    p = r.graph
    assert r.stats["channel_maps_rebuilt"] == 1 and r.stats["pruned_groups"] == 3
    assert p.get_tensor("stem.weight").shape == (4, 3, 3, 3) and p.get_tensor("c2.weight").shape == (8, 8, 3, 3)
    assert p.get_tensor("c1.weight").shape == (8, 4, 3, 3) and p.get_tensor("head.weight").shape == (4, 8)
    assert_same_outputs(g, p)
    ops = [n.target for n in p.nodes if n.op == "call_function"]
    assert torch.ops.aten.pad.default not in ops  # the shortcut is rebuilt as a map


@torch.no_grad()
def test_option_a_map_matches_a_hand_written_reference_on_real_weights():
    """Nothing zeroed: a target channel whose source channel was pruned gets zero from the
    shortcut; a removed target channel is gone, whatever its source."""
    m = randomize_bn(OptionA())
    g = capture(m, 2, 3, 8, 8)
    r = prune(g, sparsity=0.5)
    p = r.graph
    keep_src = kept_rows(g.get_tensor("stem.weight"), p.get_tensor("stem.weight"))
    keep_c1 = kept_rows(g.get_tensor("c1.weight")[:, keep_src], p.get_tensor("c1.weight"))
    keep_dst = kept_rows(g.get_tensor("c2.weight")[:, keep_c1], p.get_tensor("c2.weight"))
    assert len(keep_src) == 4 and len(keep_c1) == 8 and len(keep_dst) == 8
    # the kept sets are chosen independently; make sure this case exercises the zero fill
    assert any(4 <= t < 12 and (t - 4) not in keep_src for t in keep_dst)

    def mask(n, keep):
        v = torch.zeros(1, n, 1, 1)
        v[:, keep] = 1
        return v

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    h = F.relu(m.bn0(m.stem(x))) * mask(8, keep_src)
    y = F.relu(m.bn1(m.c1(h))) * mask(16, keep_c1)
    out = F.relu(m.bn2(m.c2(y)) + F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))) * mask(16, keep_dst)
    ref = m.head(out.mean((2, 3)))
    torch.testing.assert_close(p.run(x)[0], ref, rtol=1e-4, atol=1e-5)


def test_concat_consumer_loses_each_segments_pruned_columns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 3, padding=1)
            self.c = nn.Conv2d(10, 8, 1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            return self.fc(F.relu(self.c(y)).mean((2, 3)))

    m = M()
    zero(m.a, [1, 2])
    zero(m.b, [0, 3, 5])
    zero(m.c, [0, 1, 2, 3])
    g = capture(m, 2, 3, 6, 6)
    r = prune(g)
    p = r.graph
    assert p.get_tensor("a.weight").shape[0] == 2 and p.get_tensor("b.weight").shape[0] == 3
    assert p.get_tensor("c.weight").shape == (4, 5, 1, 1)
    assert_same_outputs(g, p)


def test_depthwise_conv_prunes_with_its_input_and_updates_groups():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.out(F.relu(self.dw(F.relu(self.pw(x)))))

    m = M()
    zero(m.pw, [0, 1, 2, 3])
    with torch.no_grad():
        m.dw.bias[:8] = 0  # outputs 0..7 of the depthwise conv read pw channels 0..3
    g = capture(m, 2, 3, 6, 6)
    r = prune(g)
    p = r.graph
    dw = next(n for n in p.call_nodes(torch.ops.aten.conv2d) if n.args[1].target == "dw.weight")
    assert p.get_tensor("dw.weight").shape == (8, 1, 3, 3) and dw.args[6] == 4
    assert p.get_tensor("out.weight").shape == (2, 8, 1, 1)
    assert_same_outputs(g, p)


@pytest.mark.parametrize("flatten", ["flatten", "view"])
def test_flatten_before_linear_removes_a_block_of_columns_per_channel(flatten):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 4 * 4, 5)

        def forward(self, x):
            y = F.relu(self.c(x))
            y = y.flatten(1) if flatten == "flatten" else y.view(y.shape[0], -1)
            return self.fc(y)

    m = M()
    zero(m.c, [2, 3, 5, 7])
    g = capture(m, 2, 3, 4, 4)
    r = prune(g)
    assert r.graph.get_tensor("fc.weight").shape == (5, 64)
    torch.testing.assert_close(r.graph.get_tensor("fc.weight"), g.get_tensor("fc.weight").view(5, 8, 16)[:, [0, 1, 4, 6]].reshape(5, 64))
    assert_same_outputs(g, r.graph)


def test_channel_slice_is_a_map_into_the_other_operand():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(3, 4, 1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(x) + self.a(x)[:, 2:6]))

    m = M()
    zero(m.a, [2, 3, 5, 6])  # a's channels 2..5 feed b's 0..3
    zero(m.b, [1, 3])  # b keeps 0 (fed by pruned a2: zero fill) and 2 (fed by kept a4)
    g = capture(m, 2, 3, 4, 4)
    r = prune(g)
    assert r.stats["channel_maps_rebuilt"] == 1
    assert r.graph.get_tensor("a.weight").shape[0] == 4 and r.graph.get_tensor("c.weight").shape == (2, 2, 1, 1)
    assert_same_outputs(g, r.graph)


# ---------------------------------------------------------------------------- refusals and options
def test_groups_tied_to_inputs_outputs_or_grouped_convs_stay_whole():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.c(F.relu(self.g(F.relu(self.a(x))))) + 0 * x[:, :3], x + self.b(x)

    g = capture(m := M(), 2, 4, 5, 5)
    r = prune(g)
    assert not r.changed and r.stats["pruned_groups"] == 0
    pinned = r.stats["pinned"]
    assert set(pinned) == {"a", "g", "b", "c"}
    assert "grouped conv 'g' (groups=2)" in pinned["a"]
    assert "with graph input 'x'" in pinned["b"]
    assert all(r.graph.get_tensor(f"{n}.weight").shape == getattr(m, n).weight.shape for n in "agbc")


def test_options_skip_ratios_round_to_and_bad_values():
    m = randomize_bn(Chain())
    g = capture(m, 2, 3, 8, 8)
    r = prune(g, skip=["c2"], layer_ratios={"c1": 0.75})
    assert r.graph.get_tensor("c1.weight").shape[0] == 2 and r.graph.get_tensor("c2.weight").shape[0] == 8
    assert r.stats["skipped"] == {"c2": "skipped by config"}
    r = prune(g, sparsity=0.7, round_to=4)
    assert r.graph.get_tensor("c1.weight").shape[0] == 4  # 8 - 5 = 3 kept, rounded up to 4
    assert kept_count(10, 0.5) == 5 and kept_count(10, 0.9, min_channels=2) == 2 and kept_count(6, 0.5, 4) == 4
    with pytest.raises(PassError, match="option 'skip': names unknown layer 'c9'"):
        prune(g, skip=["c9"])
    with pytest.raises(PassError, match="option 'score': 'l3' is not one of 'l1', 'l2', 'wanda'"):
        make_pass("prune-channels", {"score": "l3"})
    with pytest.raises(PassError, match=r"option 'sparsity': must be in \[0, 1\)"):
        make_pass("prune-channels", {"sparsity": 1.0})


def test_wanda_uses_activations_and_drops_dead_channels_l1_would_keep():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 1)
            self.c2 = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c2(F.relu(self.c1(x)))

    m = M()
    with torch.no_grad():
        m.c1.weight[:4] *= 10  # large rows ...
        m.c1.bias[:4] = -1e3  # ... that never pass the relu: dead channels
    g = capture(m, 2, 3, 4, 4)
    g.calibration = [(torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(2)),)]
    l1 = prune(g, score="l1")
    wanda = prune(g, score="wanda")
    assert kept_rows(g.get_tensor("c1.weight"), l1.graph.get_tensor("c1.weight")) == [0, 1, 2, 3]
    assert kept_rows(g.get_tensor("c1.weight"), wanda.graph.get_tensor("c1.weight")) == [4, 5, 6, 7]
    assert_same_outputs(g, wanda.graph)  # the dead channels contributed nothing


# ---------------------------------------------------------------------------- pipeline, export, ONNX
def test_pipeline_torch_export_and_onnx_of_the_pruned_option_a_block(tmp_path):
    from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx

    g = capture(randomize_bn(OptionA()), 2, 3, 8, 8)
    report = Pipeline([("prune-channels", {"sparsity": 0.5, "min_sqnr_db": -100.0})]).run(g)  # half of a random block: no floor
    p = report.graph
    assert report.steps[0].changed and report.params_after < 0.45 * report.params_before
    ep = p.export_program()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(ep.module()(x), p.run(x)[0])
    lower_to_onnx(p, tmp_path)
    assert check_onnx(p, tmp_path / "model.onnx")["passed"]


@pytest.mark.slow
def test_resnet20_half_the_channels_of_every_group(shared_models, tmp_path):
    from graphpress.backends.onnxruntime.lower import check_onnx, lower_to_onnx
    from graphpress.zoo import load_resnet20

    m = load_resnet20(shared_models / "resnet20_cifar10" / "resnet20-12fca82f.th")
    g = Graph.capture(m, m.example_inputs())
    r = prune(g, sparsity=0.5)
    s = r.stats
    assert s["pruned_groups"] == 12 and list(s["pinned"]) == ["linear"]
    assert 0.24 < s["params_after"] / s["params_before"] < 0.27
    assert 0.24 < s["macs_after"] / s["macs_before"] < 0.27
    assert s["channel_maps_rebuilt"] == 2
    r.graph.verify()
    lower_to_onnx(r.graph, tmp_path)
    assert check_onnx(r.graph, tmp_path / "model.onnx")["passed"]


@torch.no_grad()
def test_llama_mlp_hidden_channels_prune_through_the_swiglu_product():
    from graphpress.zoo import llama2c_tiny

    m = llama2c_tiny()
    for layer in m.layers:
        layer.feed_forward.w1.weight[::2] = 0  # silu(0) * w3 x = 0: these hidden channels are dead
    g = Graph.capture(m, m.example_inputs())
    r = prune(g, skip=["tok_embeddings"])  # the residual stream (RMSNorm over channels) stays
    p = r.graph
    for i in range(len(m.layers)):
        ff = f"layers.{i}.feed_forward"
        assert p.get_tensor(f"{ff}.w1.weight").shape == (32, 32) and p.get_tensor(f"{ff}.w3.weight").shape == (32, 32)
        assert p.get_tensor(f"{ff}.w2.weight").shape == (32, 32)
        assert "attention head reshape: not supported yet" in r.stats["pinned"][f"layers.{i}.attention.wq"]
    assert r.stats["skipped"] == {"tok_embeddings": "skipped by config"}
    p.verify()
    assert_same_outputs(g, p, batch=2)


# ---------------------------------------------------------------------------- on_budget
def test_adapt_backs_off_the_most_sensitive_groups_until_the_budget_holds():
    g = capture(randomize_bn(OptionA()), 2, 3, 8, 8)
    first = prune(g, sparsity=0.5)
    report = Pipeline([("prune-channels", {"sparsity": 0.5, "min_sqnr_db": 10.0})]).run(g)
    step = report.steps[0]
    s = step.stats
    assert s["asked_sparsity"] == 0.5 and 0.0 <= s["achieved_sparsity"] < 0.5 and step.worst_step_sqnr_db >= 10.0
    assert s["backed_off_layers"] and all(v["got"] < v["asked"] == 0.5 for v in s["backed_off_layers"].values())
    assert report.params_after > first.graph.parameter_count()  # kept more channels than asked
    ob = s["on_budget"]
    assert ob["met"] and ob["tries"][0]["sqnr_db"] < 10.0


def test_fail_is_one_line_with_the_sparsity_and_the_option():
    g = capture(randomize_bn(OptionA()), 2, 3, 8, 8)
    with pytest.raises(VerificationError) as err:
        Pipeline([("prune-channels", {"sparsity": 0.5, "min_sqnr_db": 10.0, "on_budget": "fail"})]).run(g)
    msg = str(err.value)
    assert "\n" not in msg and "below the pass budget min_sqnr_db=10.0 at sparsity 0.500 (sparsity 0.5)" in msg
    assert "lower sparsity, set on_budget: adapt, or change min_sqnr_db" in msg


def test_a_met_target_runs_once_and_is_unchanged_by_on_budget():
    # the removed channels are zero: nothing changes numerically, the budget holds on the first try
    model = Chain().eval()
    zero(model.c1, [0, 2, 5, 7], model.bn1)
    g = capture(model, 2, 3, 8, 8)
    adapt = Pipeline([("prune-channels", {"sparsity": 0.5, "layer_ratios": {"c1": 0.5}, "skip": ["c2"], "min_sqnr_db": 40.0})]).run(g)
    s = adapt.steps[0].stats
    assert "on_budget" not in s and s["backed_off_layers"] == {} and s["achieved_sparsity"] == 0.5
    assert adapt.steps[0].worst_step_sqnr_db > 40.0


def test_the_default_budget_is_a_real_floor():
    from graphpress.passes.base import get_pass_class

    cfg = get_pass_class("prune-channels").Config()
    assert cfg.min_sqnr_db == 0.0 and cfg.on_budget == "adapt"
