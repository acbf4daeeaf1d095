"""fuse-blocks: conv-bn-relu chains, residual blocks and MLP blocks annotated as fused regions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import PassError
from graphpress.ir.graph import Graph
from graphpress.ir.regions import EXPORT_KEY, kernel_count, region_of, regions
from graphpress.passes import Pipeline
from graphpress.passes.base import make_pass
from graphpress.zoo.resnet20 import resnet20


@pytest.fixture(scope="module")
def folded_resnet20() -> Graph:
    """ResNet-20 (random init) after fold-batchnorm; tests take clones."""
    torch.manual_seed(0)
    model = resnet20()
    graph = Graph.capture(model, model.example_inputs(2), name="resnet20")
    return make_pass("fold-batchnorm")(graph).graph


def _members(graph: Graph) -> list[tuple[str, list[str]]]:
    """(kind, member op names) per region, in region-id order."""
    from graphpress.ir.graph import op_name

    return [(region_of(nodes[0])["kind"], [op_name(n) for n in nodes]) for _rid, nodes in sorted(regions(graph).items())]


def test_resnet20_blocks_become_regions_and_outputs_are_identical(folded_resnet20):
    graph = folded_resnet20.clone()
    x = torch.randn(3, 3, 32, 32)
    before = graph.run(x)[0]
    result = make_pass("fuse-blocks")(graph)
    stats = result.stats
    assert stats["regions"] == 10 and stats["by_kind"] == {"residual_block": 9, "mlp_block": 0, "conv_bn_relu": 1}
    # 19 conv + 19 relu + 9 add + 2 pad + mean + linear = 51 kernels; 10 regions + mean + linear = 12
    assert (stats["kernels_before"], stats["kernels_after"]) == (51, 12) == (51, kernel_count(result.graph))
    assert stats["ops_in_regions"] == 49 and stats["skipped"] == {}
    members = _members(result.graph)
    assert members[0] == ("conv_bn_relu", ["aten.conv2d", "aten.relu"])
    assert members[1] == ("residual_block", ["aten.conv2d", "aten.relu", "aten.conv2d", "aten.add", "aten.relu"])
    # layer2.0: option-A shortcut (every second pixel, zero-padded channels) inside the block
    assert members[4] == ("residual_block", ["aten.conv2d", "aten.relu", "aten.conv2d", "aten.slice", "aten.slice",
                                             "aten.pad", "aten.add", "aten.relu"])
    assert torch.equal(result.graph.run(x)[0], before)  # annotations only: bit-identical


def test_regions_survive_reexport_and_decomposition(folded_resnet20):
    graph = make_pass("fuse-blocks")(folded_resnet20.clone()).graph
    program = graph.export_program().run_decompositions()
    seen: dict[int, set[str]] = {}
    for node in program.graph.nodes:
        r = (node.meta.get("custom") or {}).get(EXPORT_KEY)
        if r is not None:
            seen.setdefault(r["id"], set()).add(str(node.target))
    assert len(seen) == 10
    assert seen[4] == {"aten.convolution.default", "aten.relu.default", "aten.slice.Tensor", "aten.constant_pad_nd.default",
                       "aten.add.Tensor"}


class Chains(nn.Module):
    """conv-bn-relu that must fuse, one whose conv output is also read elsewhere, one without relu."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))  # (bn not folded: inference batch_norm inside the chain)
        y = self.b(h)
        h2 = F.relu(y) + y  # conv output has two users: must NOT fuse
        return self.c(h2)  # no activation: not a candidate


def test_conv_chains_fuse_only_when_the_conv_output_stays_inside(capture):
    graph = capture(Chains(), 2, 4, 8, 8)
    result = make_pass("fuse-blocks")(graph)
    assert _members(result.graph) == [("conv_bn_relu", ["aten.conv2d", "aten.batch_norm", "aten.relu"])]
    assert result.stats["skipped"] == {
        "conv_bn_relu: conv output has other users": 1,
        # relu(y) + y looks like a residual join of conv b, but its "shortcut" is not b's input
        "residual_block: add inputs do not meet the block shape (shortcut not derived from the main path's input)": 1,
    }
    assert (result.stats["kernels_before"], result.stats["kernels_after"]) == (7, 5)  # conv bn relu conv relu add conv


class Block(nn.Module):
    def __init__(self, shortcut: str):
        super().__init__()
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.proj = nn.Conv2d(8, 8, 1)
        self.other = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.other(x)  # the block input is computed, with two readers
        h = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        if self.shortcut == "identity":
            s = x
        elif self.shortcut == "projection":
            s = self.proj(x)
        elif self.shortcut == "unrelated":
            s = self.proj(x * 2)  # derived from x only through a mul: not a block shortcut
        elif self.shortcut == "leak":
            return F.relu(out + x) + h.mean()  # the inner relu is read outside the block
        elif self.shortcut == "broadcast":
            s = x[:, :1]  # a slice of x, but (N, 1, H, W): the add broadcasts
        return F.relu(out + s)


@pytest.mark.parametrize("shortcut, fused, skipped", [
    ("identity", ["aten.conv2d", "aten.relu", "aten.conv2d", "aten.add", "aten.relu"], {}),
    ("projection", ["aten.conv2d", "aten.relu", "aten.conv2d", "aten.conv2d", "aten.add", "aten.relu"], {}),
    ("unrelated", None, {"residual_block: add inputs do not meet the block shape (shortcut not derived from the main path's input)": 1}),
    ("leak", None, {"residual_block: an inner node's output is read outside the block": 1}),
    ("broadcast", None, {"residual_block: residual add broadcasts (main path and shortcut shapes differ)": 1}),
])
def test_residual_block_shapes(capture, shortcut, fused, skipped):
    graph = make_pass("fold-batchnorm")(capture(Block(shortcut), 2, 8, 6, 6)).graph
    x = torch.randn(2, 8, 6, 6)
    before = graph.run(x)[0]
    result = make_pass("fuse-blocks", {"kinds": ["residual_block"]})(graph)
    if fused is None:
        assert regions(result.graph) == {} and not result.changed
    else:
        assert _members(result.graph) == [("residual_block", fused)]
        assert result.stats["kernels_after"] == result.stats["kernels_before"] - len(fused) + 1
    assert result.stats["skipped"] == skipped
    assert torch.equal(result.graph.run(x)[0], before)


class MLPs(nn.Module):
    def __init__(self, d=16, h=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.w1, self.w3, self.w2 = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)
        self.g1, self.g2 = nn.Linear(d, h), nn.Linear(h, d)
        self.u1, self.u2, self.u3 = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        x = x + self.fc2(F.gelu(self.fc1(x)))  # plain MLP block
        x = x + self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU
        a = F.gelu(self.g1(x))
        x = x + self.g2(a) + a.mean(-1, keepdim=True)  # hidden activation read outside: must NOT fuse
        return x + self.u3(F.silu(self.u1(x)) * self.u2(x * 0.5))  # gate and up read different inputs


def test_mlp_blocks_plain_and_gated(capture):
    graph = capture(MLPs(), 2, 5, 16)
    x = torch.randn(3, 5, 16)
    before = graph.run(x)[0]
    result = make_pass("fuse-blocks")(graph)
    assert _members(result.graph) == [
        ("mlp_block", ["aten.linear", "aten.gelu", "aten.linear"]),
        ("mlp_block", ["aten.linear", "aten.silu", "aten.linear", "aten.mul", "aten.linear"]),
    ]
    assert result.stats["skipped"] == {"mlp_block: an inner node's output is read outside the block": 1,
                                       "mlp_block: gate and up projections read different inputs": 1}
    assert result.stats["kernels_before"] - result.stats["kernels_after"] == (3 - 1) + (5 - 1)
    assert torch.equal(result.graph.run(x)[0], before)


def test_mlp_block_after_linear_activation_fusion(capture):
    graph = capture(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), 4, 16)
    graph = make_pass("fuse-linear-activation")(graph).graph
    result = make_pass("fuse-blocks")(graph)
    assert _members(result.graph) == [("mlp_block", ["graphpress.linear_act", "aten.linear"])]
    assert (result.stats["kernels_before"], result.stats["kernels_after"]) == (2, 1)


def test_kinds_and_max_ops_choose_what_fuses(folded_resnet20):
    graph = folded_resnet20
    chains = make_pass("fuse-blocks", {"kinds": ["conv_bn_relu"]})(graph.clone()).stats
    # stem + conv1 of each of the 9 blocks; conv2 feeds the residual add, not a relu
    assert chains["by_kind"] == {"conv_bn_relu": 10} and chains["kernels_after"] == 41
    small = make_pass("fuse-blocks", {"max_ops": 5})(graph.clone()).stats
    # option-A blocks have 6 compute ops (conv, relu, conv, pad, add, relu): left to conv-relu chains
    assert small["by_kind"] == {"residual_block": 7, "mlp_block": 0, "conv_bn_relu": 3}
    assert small["skipped"] == {"residual_block: more than max_ops (5) compute ops": 2}


def test_rerun_replaces_regions(folded_resnet20):
    graph = make_pass("fuse-blocks")(folded_resnet20.clone()).graph
    again = make_pass("fuse-blocks", {"kinds": ["conv_bn_relu"]})(graph)
    assert again.stats["kernels_before"] == 12 and again.stats["kernels_after"] == 41
    assert again.stats["replaced_region_nodes"] == 49 + 4  # 49 compute ops + 4 slices
    assert {region_of(nodes[0])["kind"] for nodes in regions(again.graph).values()} == {"conv_bn_relu"}


def test_bad_options_are_one_line_errors():
    with pytest.raises(PassError, match=r"^pass 'fuse-blocks': option 'kinds': unknown kind\(s\) 'residual'; choose from"):
        make_pass("fuse-blocks", {"kinds": ["residual"]})
    with pytest.raises(PassError, match="'max_ops' must be at least 2"):
        make_pass("fuse-blocks", {"max_ops": 1})
    with pytest.raises(PassError, match="unknown option 'max_op': did you mean 'max_ops'"):
        make_pass("fuse-blocks", {"max_op": 4})


def test_pipeline_verifies_it_as_exact(capture):
    graph = capture(Block("projection"), 2, 8, 6, 6)
    report = Pipeline(["fold-batchnorm", "fuse-blocks"]).run(graph)
    step = report.steps[-1]
    assert step.stats["regions"] == 1 and (step.stats["kernels_before"], step.stats["kernels_after"]) == (7, 2)
    assert step.step and max(d.max_abs for d in step.step) == 0.0
