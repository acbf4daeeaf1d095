"""The search space: choices per layer, candidates as recipes, which layers may be pruned."""

from __future__ import annotations

import pytest
import torch

from graphpress.auto.space import FLOAT, Candidate, Choice, layer_choices, search_layers, uniform
from graphpress.frontends import load
from graphpress.passes.pipeline import Pipeline
from graphpress.zoo.digits import digits_cnn
from graphpress.zoo.resnet20 import resnet20


def test_choice_labels_round_trip():
    for c in (FLOAT, Choice(8), Choice(8, 0.25), Choice(32, 0.5), Choice(4), Choice(8, 0.0, 0.5), Choice(block=4),
              Choice(8, weight_only=True)):
        assert Choice.parse(c.label) == c
    assert Choice(8, 0.25).label == "int8+prune25" and FLOAT.label == "float" and FLOAT.leaves
    with pytest.raises(ValueError, match="unknown choice"):
        Choice.parse("fp16")


def test_candidate_recipe_configures_each_family_per_layer():
    cand = Candidate.of({"a": Choice(8, 0.25), "b": Choice(8), "c": Choice(32, 0.5), "d": FLOAT, "e": Choice(4), "f": Choice(8, weight_only=True)})
    assert cand.to_dict() == {"a": "int8+prune25", "b": "int8", "c": "prune50", "e": "int4", "f": "w8"}  # float layers are not named
    (prune, p1), (q8, p2), (w8, p4), (q4, p3) = [next(iter(p.items())) for p in cand.recipe()]
    assert w8 == "quantize-layerwise" and p4["targets"] == ["f"] and p4["activations"] == "none" and p4["bits"] == [8]
    assert prune == "prune-channels" and p1["layer_ratios"] == {"a": 0.25, "c": 0.5} and p1["sparsity"] == 0.0
    assert q8 == "quantize-layerwise" and p2["targets"] == ["a", "b"] and p2["activations"] == "int8" and p2["bits"] == [8]
    assert q4 == "quantize-layerwise" and p3["targets"] == ["e"] and p3["activations"] == "none"
    # auto measures quality itself: the passes' own budgets are off and they fail instead of adapting
    assert all(cfg.get("min_sqnr_db", None) is None and cfg.get("on_budget") == "fail" for p in cand.recipe() for cfg in p.values())
    assert Candidate().recipe() == [] and Candidate.of({"x": FLOAT}) == Candidate()


def test_resnet20_prunes_only_block_internal_convs():
    g = Pipeline.from_recipe("default").run(load(resnet20().eval(), example_inputs=(torch.randn(2, 3, 32, 32),))).graph
    layers = {lay.name: lay for lay in search_layers(g)}
    assert len(layers) == 20  # 19 convs + the classifier
    prunable = sorted(n for n, lay in layers.items() if lay.prunable)
    # each basic block's first conv alone produces its channels; the second feeds the residual sum (pinned)
    assert prunable == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
    assert layers["layer1.0.conv1"].consumers == ("layer1.0.conv2",)
    assert layer_choices(layers["layer1.0.conv2"], "latency") == [FLOAT, Choice(8)]
    assert len(layer_choices(layers["layer1.0.conv1"], "latency")) == 6
    # the uniform prune recipe touches only the prunable layers
    assert set(uniform(layers.values(), Choice(32, 0.5), "latency").to_dict()) == set(prunable)


def test_size_choices_keep_convs_out_of_weight_only_widths():
    g = load(digits_cnn().eval(), example_inputs=(torch.randn(2, 1, 8, 8),))
    layers = {lay.name: lay for lay in search_layers(g)}
    assert Choice(4) not in layer_choices(layers["conv1"], "size")  # no weight-only conv kernel
    assert {Choice(4), Choice(8, weight_only=True), Choice(sparsity=0.5)} <= set(layer_choices(layers["fc1"], "size"))
    # HE: the block sizes each layer's shape admits (conv1 has one input channel: dense only)
    assert layer_choices(layers["conv1"], "he-latency") == [FLOAT]
    assert [c.block for c in layer_choices(layers["fc1"], "he-latency")] == [1, 2, 4, 8, 16]
    assert Candidate.of({"fc1": Choice(block=4)}).recipe()[0]["block-circulant"]["blocks"] == {"fc1": 4}
    with pytest.raises(ValueError, match="unknown objective"):
        layer_choices(layers["fc1"], "speed")
