"""Channel dependency analysis: joins, channel maps (option-A), concat segments, depthwise, flatten
blocks, tied weights, and the groups that must stay whole with their reasons."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphpress.ir.graph import Graph
from graphpress.passes.prune.deps import FOREIGN, HEADS_REASON, analyze


def capture(model: nn.Module, *shape: int) -> Graph:
    torch.manual_seed(0)
    return Graph.capture(model.eval(), (torch.randn(*shape),))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.head(h.mean((2, 3)))


class OptionA(nn.Module):
    """ResNet's downsampling block: the shortcut is a strided slice plus zero channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        short = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        h = F.relu(self.c2(F.relu(self.c1(h))) + short)
        return self.head(h.mean((2, 3)))


def test_residual_add_joins_the_stream_and_the_block_output():
    a = analyze(capture(Residual(), 2, 3, 8, 8))
    stream = a.group("stem")
    assert stream.layers == ["stem", "c2"] and stream.size == 8 and stream.prunable
    assert sorted(u.target for u in stream.consumers) == ["c1.weight", "head.weight"]
    assert sorted(u.target for u in stream.producers) == ["c2.bias", "c2.weight", "stem.bias", "stem.weight"]
    inner = a.group("c1")
    assert inner.layers == ["c1"] and inner.prunable and [u.target for u in inner.consumers] == ["c2.weight"]
    assert a.group("head").pinned == ["reaches graph output 'output'"]
    assert len(a.groups) == 3 and not a.maps


def test_option_a_shortcut_is_a_channel_map_not_a_join():
    a = analyze(capture(OptionA(), 2, 3, 8, 8))
    src, dst = a.group("stem"), a.group("c2")
    assert src is not dst and src.prunable and dst.prunable
    assert len(a.maps) == 1 and dst.maps_in == a.maps and src.maps_out == a.maps
    m = a.maps[0]
    # positions 4..11 of c2's channels carry stem channels 0..7; the rest are padding zeros
    assert m.layout.gid[4:12].unique().tolist() == [src.roots[0].id]
    assert m.layout.ch[4:12].tolist() == list(range(8))
    assert bool((m.layout.gid[:4] <= -2).all()) and bool((m.layout.gid[12:] <= -2).all())
    assert len(a.pads) == 1 and not a.kept_zero_pads


def test_pad_followed_by_batch_norm_keeps_its_zeros():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(8)
            self.d = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.d(self.bn(F.pad(self.c(x), (0, 0, 0, 0, 2, 2))))

    m = M()
    m.bn.running_mean.uniform_(-1, 1)
    a = analyze(capture(m, 2, 3, 4, 4))
    # batch norm turns the padded zeros into values: they are kept (FOREIGN) and the pad stays
    assert a.kept_zero_pads == {0} and not a.pads
    lay = a.layouts[next(n for n in a.layouts if n.name == "batch_norm")][1]
    assert lay.gid[:2].tolist() == [FOREIGN, FOREIGN] and a.group("c").prunable


def test_concat_segments_and_flatten_blocks():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 6, 3, padding=1)
            self.fc = nn.Linear(10 * 2 * 2, 5)

        def forward(self, x):
            y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)
            return self.fc(F.adaptive_avg_pool2d(y, 2).flatten(1))

    a = analyze(capture(M(), 2, 3, 6, 6))
    ga, gb = a.group("a"), a.group("b")
    (col,) = [u for u in a.uses if u.target == "fc.weight" and u.dim == 1]
    assert len(col.layout) == 40 and ga.consumers == [col] and gb.consumers == [col]
    # columns 0..15 are channels 0..3 of 'a' (4 columns each), 16..39 channels of 'b'
    assert col.layout.gid[:16].unique().tolist() == [ga.roots[0].id]
    assert col.layout.ch[:16].tolist() == [c for c in range(4) for _ in range(4)]
    assert col.layout.ch[16:].tolist() == [c for c in range(6) for _ in range(4)]


def test_depthwise_conv_shares_its_input_group():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(3, 8, 1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.out(F.relu(self.dw(F.relu(self.pw(x)))))

    a = analyze(capture(M(), 2, 3, 6, 6))
    g = a.group("pw")
    assert g.prunable and {u.target for u in g.passthrough} == {"dw.weight", "dw.bias"}
    (dw_w,) = [u for u in g.passthrough if u.target == "dw.weight"]
    assert dw_w.layout.ch.tolist() == [c for c in range(8) for _ in range(2)]
    assert [u.target for u in g.consumers] == ["out.weight"] and len(a.depthwise) == 1


def test_grouped_conv_input_and_output_to_graph_input_and_output_are_pinned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.b = nn.Conv2d(4, 4, 1)
            self.c = nn.Conv2d(8, 3, 1)

        def forward(self, x):
            skip = x + self.b(x)  # joined with the graph input
            return self.c(F.relu(self.g(F.relu(self.a(x))))), skip

    a = analyze(capture(M(), 2, 4, 5, 5))
    assert any("grouped conv 'g' (groups=2)" in r for r in a.group("a").pinned)
    assert any("grouped conv 'g'" in r for r in a.group("g").pinned)
    assert a.group("b").pinned[0].startswith("joined in 'add' (aten.add) with graph input 'x'")
    assert a.group("c").pinned == ["reaches graph output 'output_0'"]


def test_attention_head_reshape_is_pinned_and_the_mlp_is_not():
    from graphpress.zoo import llama2c_tiny

    m = llama2c_tiny()
    a = analyze(Graph.capture(m, m.example_inputs()))
    wq = a.group("layers.0.attention.wq")
    assert any(HEADS_REASON in r for r in wq.pinned)
    mlp = a.group("layers.0.feed_forward.w1")
    assert mlp.layers == ["layers.0.feed_forward.w1", "layers.0.feed_forward.w3"] and mlp.prunable  # SwiGLU product joins
    assert a.group("tok_embeddings").prunable  # the residual stream, RMSNorm weights pass through
