"""Lazy sharded reading of Hugging Face decoder folders (issue 17, streaming frontend).

Tiny Llama / Qwen2 / Mistral / Phi-3 models (hidden 64, 2 layers, vocab 128) are saved by
``transformers`` in bf16 with a small ``max_shard_size`` so every folder is sharded; the reader
must give back their state dicts bit-exactly in bf16, one block per prefix, and refuse every
damaged folder in one line before reading any tensor. A larger folder (8 layers, hidden 512)
written tensor by tensor checks that reading one block costs about one block of RSS.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphpress.errors import FrontendError
from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout, iter_blocks

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=64, pad_token_id=None, bos_token_id=1, eos_token_id=2)
FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def _llm_folder_module():
    spec = importlib.util.spec_from_file_location("llm_folder", ROOT / "benchmarks" / "llm_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_tiny(family: str, folder: Path, **overrides) -> dict[str, torch.Tensor]:
    import transformers

    config = transformers.AutoConfig.for_model(family, **{**SHAPE, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    # randomise the norms too, so a swapped norm would be caught by the value check
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p.float()).to(p.dtype))
    model.save_pretrained(folder, max_shard_size="20KB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (folder, the saved model's state dict)."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: (root / f, _save_tiny(f, root / f)) for f in FAMILIES}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# -- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_the_state_dict_bit_exact_in_bf16(tiny, family):
    folder, state = tiny[family]
    assert (folder / "model.safetensors.index.json").is_file()
    ck = ShardedCheckpoint(folder)
    assert len(ck.shards()) > 3, "the folder should be sharded"
    assert set(ck.names()) == set(state)
    assert ck.total_bytes() == sum(t.numel() * t.element_size() for t in state.values())
    assert ck.config["model_type"] == family
    for name, want in state.items():
        assert ck.dtype(name) == torch.bfloat16
        assert ck.shape(name) == tuple(want.shape)
        assert ck.nbytes(name) == want.numel() * 2
        for mmap in (False, True):
            got = ck.get(name, mmap=mmap)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name  # bit-exact


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_lists_blocks_and_tensors_returns_exactly_one_block(tiny, family):
    folder, state = tiny[family]
    ck = ShardedCheckpoint(folder)
    lay = decoder_layout(ck)
    assert lay.family == family and lay.num_layers == 2
    assert lay.blocks == ("model.layers.0.", "model.layers.1.")
    assert (lay.num_heads, lay.num_kv_heads, lay.head_dim) == (4, 2, 16)
    assert lay.embedding == "model.embed_tokens.weight" and lay.final_norm == "model.norm.weight"
    assert lay.lm_head == "lm_head.weight" and not lay.tied
    fused = {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"}
    if family == "phi3":
        assert fused <= set(lay.block_tensors)
        assert lay.expected_shape("model.layers.0.self_attn.qkv_proj.weight") == (64 + 2 * 32, 64)
        assert lay.expected_shape("model.layers.0.mlp.gate_up_proj.weight") == (256, 64)
    else:
        assert not fused & set(lay.block_tensors)
        assert lay.expected_shape("model.layers.1.self_attn.k_proj.weight") == (32, 64)  # GQA: 2 KV heads x 16
    biases = {n for n in lay.block_tensors if n.endswith(".bias")}
    assert biases == ({"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"} if family == "qwen2" else set())

    block = ck.tensors("model.layers.1.")
    assert list(block) == [n for n in ck.names() if n.startswith("model.layers.1.")]
    assert set(block) == set(lay.block_names(1)) == {n for n in state if n.startswith("model.layers.1.")}
    for name, t in block.items():
        assert torch.equal(t.view(torch.int16), state[name].view(torch.int16))
    rel = lay.block(0)
    assert set(rel) == set(lay.block_tensors)

    per_block = sum(state[n].numel() for n in lay.block_names(0))
    assert lay.block_bytes(0) == lay.block_bytes(1) == per_block * 2
    assert lay.block_bytes(0, torch.float32) == per_block * 4
    assert lay.largest_block_bytes() == per_block * 4
    assert lay.largest_block_bytes(None) == per_block * 2
    units = lay.units()
    assert [u for u, _ in units] == ["embed", "block.0", "block.1", "norm", "head"]
    assert sum(lay.unit_bytes(u) for u, _ in units) == ck.total_bytes()
    assert [i for i, _ in iter_blocks(lay)] == [0, 1]


def test_tied_head_reuses_the_embedding(tmp_path):
    state = _save_tiny("llama", tmp_path / "tied", tie_word_embeddings=True)
    ck = ShardedCheckpoint(tmp_path / "tied")
    assert "lm_head.weight" not in ck.names()
    lay = decoder_layout(ck)
    assert lay.tied and lay.lm_head == lay.embedding == "model.embed_tokens.weight"
    assert torch.equal(ck.get(lay.lm_head).view(torch.int16), state["lm_head.weight"].view(torch.int16))
    assert sum(lay.unit_bytes(u) for u in ("embed", "block.0", "block.1", "norm")) == ck.total_bytes()


def test_single_file_folder(tmp_path, tiny):
    _, state = tiny["mistral"]
    from safetensors.torch import save_file

    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copy(tiny["mistral"][0] / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ck = ShardedCheckpoint(folder)
    assert ck.index_path is None and ck.shards() == [folder / "model.safetensors"]
    assert decoder_layout(ck).num_layers == 2
    assert torch.equal(ck.get("model.norm.weight").view(torch.int16), state["model.norm.weight"].view(torch.int16))


def test_get_returns_owned_memory_mmap_views_share_one_mapping(tiny):
    folder, state = tiny["llama"]
    name = "model.layers.0.mlp.up_proj.weight"
    ck = ShardedCheckpoint(folder)
    owned = ck.get(name)
    owned.add_(1)
    assert torch.equal(ck.get(name).view(torch.int16), state[name].view(torch.int16)), "get() must hand out its own copy"
    # the mmap view is safetensors' private mapping: a write never reaches the file, but later
    # mmap views of the same handle see it (why the default copies, and why the docs say read-only)
    view = ck.get(name, mmap=True)
    view.add_(1)
    assert torch.equal(ck.get(name, mmap=True), view)
    assert torch.equal(ck.get(name).view(torch.int16), state[name].view(torch.int16))
    ck.release()
    assert torch.equal(ck.get(name, mmap=True).view(torch.int16), state[name].view(torch.int16))


# -- bad input --------------------------------------------------------------------------------


def test_missing_config(tmp_path, tiny):
    folder = _copy(tiny["llama"][0], tmp_path / "f")
    (folder / "config.json").unlink()
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert _one_line(err) == f"{folder / 'config.json'}: not found: a Hugging Face model folder needs its config.json (save_pretrained writes it)"


def test_no_weights(tmp_path, tiny):
    folder = tmp_path / "f"
    folder.mkdir()
    shutil.copy(tiny["llama"][0] / "config.json", folder / "config.json")
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert _one_line(err).startswith(f"{folder}: no safetensors weights (expected model.safetensors or model.safetensors.index.json")


def test_deleted_shard(tmp_path, tiny):
    folder = _copy(tiny["qwen2"][0], tmp_path / "f")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    (folder / victim).unlink()
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    msg = _one_line(err)
    assert msg.startswith(f"{folder / 'model.safetensors.index.json'}: points at missing shard file {victim} (for ")
    assert msg.endswith("re-download the shard or fix the index")


@pytest.mark.parametrize("shard, message", [
    ("model-99999-of-00012.safetensors", "points at missing shard file model-99999-of-00012.safetensors (for 1 tensor(s), e.g. "
                                         "'model.norm.weight'): re-download the shard or fix the index"),
    ("../elsewhere.safetensors", "shard '../elsewhere.safetensors' (for 'model.norm.weight') lies outside the folder: "
                                 "an index names files inside it; fix the index"),
])
def test_index_naming_a_shard_that_is_not_in_the_folder(tmp_path, tiny, shard, message):
    folder = _copy(tiny["mistral"][0], tmp_path / "f")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    path.write_text(json.dumps(index))
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert _one_line(err) == f"{path}: {message}"


def test_tensor_listed_in_index_absent_from_its_shard(tmp_path, tiny):
    folder = _copy(tiny["llama"][0], tmp_path / "f")
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    wm = index["weight_map"]
    other = next(s for s in wm.values() if s != wm["model.norm.weight"])
    wm["model.norm.weight"] = other
    path.write_text(json.dumps(index))
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert _one_line(err) == (f"{folder / other}: tensor 'model.norm.weight' is listed in model.safetensors.index.json but "
                              "absent from this shard: re-download the shard or fix the index")


def test_truncated_header_and_truncated_data(tmp_path, tiny):
    folder = _copy(tiny["llama"][0], tmp_path / "f")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:40])  # inside the JSON header
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    msg = _one_line(err)
    assert msg.startswith(f"{shard}: header claims ") and msg.endswith("the shard is truncated or corrupt: re-download it or re-save the checkpoint")

    shard.write_bytes(raw[:-10])  # header intact, last tensor cut short
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert f"ends at byte {len(raw)} but the file holds {len(raw) - 10}" in _one_line(err)

    shard.write_bytes(raw[:8] + b"{not json" + raw[17:])
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert _one_line(err).startswith(f"{shard}: header is not valid JSON (JSONDecodeError")

    shard.write_bytes(b"\x01\x02")
    with pytest.raises(FrontendError) as err:
        ShardedCheckpoint(folder)
    assert "2 byte(s), shorter than a safetensors header" in _one_line(err)


def test_config_that_does_not_match_the_shapes(tmp_path, tiny):
    folder = _copy(tiny["llama"][0], tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    ck = ShardedCheckpoint(folder)  # the headers are fine; the layout check finds the mismatch
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(FrontendError) as err:
        decoder_layout(ck)
    assert _one_line(err) == (
        f"{shard}: tensor 'model.layers.0.self_attn.k_proj.weight' has shape (32, 64), config.json implies (64, 64) "
        "(llama: hidden_size=64, intermediate_size=128, heads=4, num_key_value_heads=4, head_dim=16, vocab_size=128); "
        "3 more mismatch(es): fix config.json or re-export the checkpoint"
    )


def test_config_with_fewer_layers_and_missing_head(tmp_path, tiny):
    folder = _copy(tiny["phi3"][0], tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FrontendError) as err:
        decoder_layout(ShardedCheckpoint(folder))
    msg = _one_line(err)
    assert "tensor 'model.layers.1." in msg and "is beyond num_hidden_layers=1 (" in msg and "use the whole-graph path (load_hf_folder)" in msg

    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FrontendError) as err:
        decoder_layout(ShardedCheckpoint(folder))
    assert _one_line(err).startswith(f"{folder}: tensor 'model.layers.2.input_layernorm.weight' expected by config.json (phi3, 3 layer(s)) is not in the checkpoint (5 more missing)")


def test_gpt2_refused_with_the_whole_graph_path_named(tmp_path):
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    ck = ShardedCheckpoint(folder)  # reading works for any safetensors folder
    assert "transformer.wte.weight" in ck.names()
    with pytest.raises(FrontendError) as err:
        decoder_layout(ck)
    assert _one_line(err) == (f"{folder / 'config.json'}: model_type 'gpt2' is not supported by streaming mode "
                              "(supported: llama, qwen2, mistral, phi3); the whole-graph path (load_hf_folder, --stream off) still takes it")


# -- the folder writer and memory -------------------------------------------------------------


def test_llm_folder_writer_round_trips_through_transformers(tmp_path):
    import transformers

    mod = _llm_folder_module()
    config = mod.llama_config(**mod.SIZES["tiny"], max_position_embeddings=64)
    stats = mod.write_folder(tmp_path / "w", config, shard_bytes=50_000, seed=3, tokenizer=True)
    assert stats["params"] == 90432 and stats["shards"] == 4 and stats["bytes"] == 2 * 90432
    ck = ShardedCheckpoint(tmp_path / "w")
    lay = decoder_layout(ck)
    assert lay.num_kv_heads == 2 and not lay.tied
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "w"), dtype=torch.bfloat16)
    state = model.state_dict()
    assert set(state) == set(ck.names())
    for name in ck.names():
        assert torch.equal(ck.get(name).view(torch.int16), state[name].view(torch.int16)), name
    assert torch.equal(ck.get("model.norm.weight").float(), torch.ones(64))
    w = ck.get("model.layers.0.mlp.up_proj.weight").float()
    assert 0.015 < float(w.std()) < 0.025
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "w"))
    assert tok("w5 w127")["input_ids"] == [5, 127] and tok.eos_token_id == 2
    # same seed and name: same values whatever the sharding
    mod.write_folder(tmp_path / "w2", config, shard_bytes=10**9, seed=3)
    ck2 = ShardedCheckpoint(tmp_path / "w2")
    assert len(ck2.shards()) == 1
    assert torch.equal(ck2.get("lm_head.weight").view(torch.int16), ck.get("lm_head.weight").view(torch.int16))


_RSS_PROBE = r"""
import json, sys, torch
from graphpress.frontends.shards import ShardedCheckpoint, decoder_layout

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

ck = ShardedCheckpoint(sys.argv[1])
lay = decoder_layout(ck)
base = rss()
block = ck.tensors("model.layers.3.")
one = rss() - base
del block
peak = 0
for i, tensors in enumerate(lay.blocks):
    held = lay.block(i)
    peak = max(peak, rss() - base)
    del held
print(json.dumps({"one_block": one, "walk_peak": peak, "after_walk": rss() - base,
                  "block_bytes": lay.block_bytes(3), "total_bytes": ck.total_bytes()}))
"""


def test_reading_one_block_costs_one_block_of_rss(tmp_path):
    mod = _llm_folder_module()
    config = mod.llama_config(hidden_size=512, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=8,
                              num_key_value_heads=8, vocab_size=128, max_position_embeddings=64)
    stats = mod.write_folder(tmp_path / "big", config, shard_bytes=12_000_000, seed=0)
    assert stats["shards"] >= 5
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path / "big")], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    block, total = m["block_bytes"], m["total_bytes"]
    assert block == 2 * (4 * 512 * 512 + 3 * 512 * 2048 + 2 * 512)  # 8.4 MB of bf16
    assert total > 7 * block
    # one block costs one block (allocator slack aside), never the model
    assert 0.9 * block <= m["one_block"] <= 1.5 * block + 2 * 2**20, m
    assert m["walk_peak"] <= 1.5 * block + 2 * 2**20, m
    # nothing accumulates over the walk (glibc may keep up to a block of freed heap for reuse)
    assert m["after_walk"] <= 1.5 * block + 2 * 2**20, m


@pytest.mark.parametrize("family,default", [("llama", 4), ("mistral", 8)])
def test_keys_a_config_leaves_out_take_transformers_defaults(tmp_path, tiny, family, default):
    # llama's num_key_value_heads defaults to the head count, mistral's to 8: the check must use
    # the family's own default, not one rule for all
    folder = _copy(tiny[family][0], tmp_path / "f")
    config = json.loads((folder / "config.json").read_text())
    del config["num_key_value_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FrontendError) as err:
        decoder_layout(ShardedCheckpoint(folder))
    msg = _one_line(err)
    assert "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (32, 64)" in msg
    assert f"config.json implies ({default * 16}, 64)" in msg and f"num_key_value_heads={default}," in msg


def test_get_rows_reads_just_those_rows_bit_exactly(tiny):
    folder, state = tiny["llama"]
    ck = ShardedCheckpoint(folder)
    name = "lm_head.weight"
    full = state[name]
    for start, stop in ((0, 1), (3, 17), (full.shape[0] - 5, full.shape[0]), (4, 4)):
        rows = ck.get_rows(name, start, stop)
        assert rows.dtype == full.dtype and rows.shape == (stop - start, full.shape[1])
        assert torch.equal(rows.view(torch.int16), full[start:stop].view(torch.int16))
    with pytest.raises(FrontendError) as err:
        ck.get_rows(name, 5, full.shape[0] + 1)
    assert _one_line(err).endswith(f"has {full.shape[0]} rows; rows 5:{full.shape[0] + 1} asked")
