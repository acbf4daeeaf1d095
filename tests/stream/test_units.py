"""stream/units: the unit modules reproduce the Hugging Face model exactly, and the helpers that
slice the head and pick each block's attention window."""

import pytest
import torch
import transformers

from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout
from graphpress.stream.units import (
    BlockUnit,
    HeadUnit,
    block_window,
    build_meta_model,
    causal_mask,
    head_slices,
    materialize,
    rotary_for,
)

FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 4}),  # shorter than the sequence: the window matters
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
}


def _folder(tmp_path, family):
    cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    cfg = cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    model.set_attn_implementation("eager")  # what the units use: the same kernels, so the same bits
    return model.float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_units_chained_give_the_models_logits(tmp_path, family):
    model = _folder(tmp_path, family)
    layout = decoder_layout(ShardedCheckpoint(tmp_path))
    meta = build_meta_model(tmp_path)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        h = torch.nn.functional.embedding(ids, layout.checkpoint.get(layout.embedding).float())
        for i in range(layout.num_layers):
            layer = materialize(meta.model.layers[i], layout.block(i))
            h = BlockUnit(layer, rotary_for(meta), block_window(meta.config, i))(h)
        norm = materialize(meta.model.norm, {"weight": layout.checkpoint.get(layout.final_norm)})
        got = HeadUnit(norm, layout.checkpoint.get(layout.lm_head).float())(h)
    assert (got - want).abs().max() < 1e-5, float((got - want).abs().max())


def test_causal_mask_with_and_without_a_window():
    full = causal_mask(4, torch.float32, None, torch.device("cpu"))[0, 0]
    upper = torch.ones(4, 4).triu(1).bool()
    assert full.shape == (4, 4) and bool((full[upper] < -1e30).all()) and bool((full[~upper] == 0).all())
    win = causal_mask(4, torch.float32, 2, torch.device("cpu"))[0, 0]
    seen = (win == 0).int()
    assert seen.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_head_slices_cover_the_vocabulary_evenly_within_the_bound():
    parts = head_slices(vocab=128256, hidden=4096, max_bytes=832 * 2**20)
    assert parts[0].start == 0 and parts[-1].stop == 128256
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert all((p.stop - p.start) * 4096 * 4 <= 832 * 2**20 for p in parts)
    assert len(parts) == 3
    assert head_slices(vocab=100, hidden=8, max_bytes=1 << 30) == head_slices(100, 8, 1 << 40)  # one slice
    assert len(head_slices(100, 8, 1)) == 100  # at least a row each
    # one size where a few more slices divide the vocabulary: 3 would leave 10667 / 10667 / 10666
    llama2 = head_slices(vocab=32000, hidden=1024, max_bytes=50 * 2**20)
    assert [p.stop - p.start for p in llama2] == [8000] * 4
    # no divisor within twice the count (a prime vocabulary): even slices, the last one shorter
    prime = head_slices(vocab=32003, hidden=1024, max_bytes=50 * 2**20)
    assert len(prime) == 3 and {p.stop - p.start for p in prime[:-1]} == {10668}


def test_block_window_follows_the_config():
    cfg = transformers.Qwen2Config(num_hidden_layers=2, sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert [block_window(cfg, i) for i in range(2)] == [None, 8] or [block_window(cfg, i) for i in range(2)] == [8, None]
    assert block_window(transformers.LlamaConfig(), 0) is None
    assert block_window(transformers.MistralConfig(sliding_window=16), 0) == 16
    assert block_window(transformers.MistralConfig(sliding_window=None), 0) is None


def test_materialize_refuses_a_tensor_set_that_does_not_match(tmp_path):
    _folder(tmp_path, "llama")
    layout = decoder_layout(ShardedCheckpoint(tmp_path))
    meta = build_meta_model(tmp_path)
    weights = layout.block(0)
    weights.pop("mlp.up_proj.weight")
    from graphpress.errors import FrontendError

    with pytest.raises(FrontendError, match=r"missing \['mlp.up_proj.weight'\]"):
        materialize(meta.model.layers[0], weights)
