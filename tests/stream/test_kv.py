"""Streamed decoder artifacts with a KV cache: every block a generation step over its own cache,
stitched into the interface of the whole-graph KV capture (and of ONNX Runtime GenAI), checked
end to end on a prefill and on a decode step, and refused in one line where a cache cannot be
streamed."""

import json

import numpy as np
import onnx
import pytest
import torch

from graphpress.errors import FrontendError
from graphpress.runtime import load
from graphpress.stream import StreamOptions, compress_stream
from tests.genai_helpers import genai_greedy
from tests.stream.tiny import write_llama

INT4 = {"name": "int4", "passes": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32}}]}
EXACT = {"name": "exact", "passes": ["eliminate-dead-code"]}
KV = StreamOptions(calibration_sequences=4, calibration_seq_len=12, heldout_sequences=2, heldout_seq_len=12, kv_cache=True)


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvstream")
    model = write_llama(root / "m", layers=2, vocab=256, max_shard_size="60KB")
    result = compress_stream(root / "m", EXACT, root / "out", options=KV)
    return model, root, result


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(torch.as_tensor(ids), max_new_tokens=n, do_sample=False, min_new_tokens=n)[0].numpy()


def test_an_exact_streamed_kv_artifact_generates_the_models_tokens(exact):
    model, root, result = exact
    art = load(root / "out")
    assert art.kv_cache
    names = [s.name for s in art.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3:] == [
        f"past_key_values.{i}.{p}" for i in range(2) for p in ("key", "value")]
    assert [s.name for s in art.outputs] == ["logits"] + [f"present.{i}.{p}" for i in range(2) for p in ("key", "value")]
    prompt = np.array([[5, 7, 9, 11]])
    assert art.generate(prompt, 12)[0].tolist() == _greedy(model, prompt, 12).tolist()
    ort = result.manifest["stream"]["end_to_end"]["onnxruntime"]
    assert ort["ok"] and ort["decode_step"]["past"] == 11 and ort["decode_step"]["max_abs"] < 1e-4
    facts = result.manifest["source"]["kv_cache"]
    assert (facts["layers"], facts["kv_heads"], facts["head_dim"], facts["attention"], facts["rotary"]) == (2, 2, 16, "gqa", "in attention")
    # the sizes 'compress bench' fills the symbolic dims with: a held-out prefill over empty caches
    shapes = result.manifest["example_shapes"]
    assert shapes["attention_mask"] == [2, 12] and shapes["past_key_values.1.value"] == [2, 2, 0, 16]
    assert "KV cache: 2 layers x (key, value) of 2 heads x 16, attention gqa; a decode step after 11 cached tokens" in (
        root / "out" / "report.md").read_text()
    config = json.loads((root / "out" / "genai_config.json").read_text())["model"]
    assert config["decoder"]["num_hidden_layers"] == 2 and config["vocab_size"] == 256 and config["context_length"] == 64


def test_every_block_is_one_grouped_query_attention_sharing_one_rotary_table(exact):
    _, root, _ = exact
    graph = onnx.load(str(root / "out" / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    # the blocks' identical cos / sin tables are stored once and read by both nodes
    assert gqa[0].input[7] == gqa[1].input[7] and gqa[0].input[8] == gqa[1].input[8]
    assert sum(1 for t in graph.initializer if t.name == gqa[0].input[7]) == 1


def test_int4_streams_with_its_cache_and_decodes_as_checked(tmp_path):
    model = write_llama(tmp_path / "m", layers=3, vocab=256)
    # llm-int4's weights: int4 groups of 32 with int8 activation compute, q/k/v and gate/up fused
    recipe = {"name": "int4", "passes": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "int8-block", "group_size": 32}},
                                         "fuse-parallel-linears"]}
    result = compress_stream(tmp_path / "m", recipe, tmp_path / "out", options=KV)
    e2e = result.manifest["stream"]["end_to_end"]
    ort = e2e["onnxruntime"]
    # int8 activations: ONNX Runtime may break rounding ties otherwise than torch, so the SQNR floor is the rule
    assert ort["ok"] and ort["rule"].startswith("activations rounded") and ort["decode_step"]["sqnr_db"] > 30
    assert 0 < e2e["kl"] < 0.05  # lossy, not broken
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 3 * 4 + 1 and ops.count("GroupQueryAttention") == 3  # qkv, o, gate+up, down per block; the head
    art = load(tmp_path / "out")
    prompt = np.array([[1, 2, 3]])
    tokens = art.generate(prompt, 8)[0]
    # the artifact's own cache path equals re-running it on the whole sequence (no cache)
    full = art(*_prefill(tokens[None, :-1], 3))[0]
    assert full[0, 2:].argmax(-1).tolist() == tokens[3:].tolist()
    assert tokens.tolist() != [] and len(tokens) == 11


def _prefill(ids, layers, kv_heads=2, head_dim=16):
    b, s = ids.shape
    empty = np.zeros((b, kv_heads, 0, head_dim), dtype=np.float32)
    return (ids.astype(np.int64), np.ones((b, s), dtype=np.int64), np.broadcast_to(np.arange(s), (b, s)).astype(np.int64),
            *([empty] * (2 * layers)))


def test_heads_too_small_for_the_fused_kernel_keep_eager_attention(tmp_path):
    model = write_llama(tmp_path / "m", layers=2, vocab=256, num_attention_heads=8, num_key_value_heads=4)  # head_dim 8
    result = compress_stream(tmp_path / "m", EXACT, tmp_path / "out", options=KV)
    facts = result.manifest["source"]["kv_cache"]
    assert facts["attention"] == "eager" and "multiple of 16" in facts["attention_note"]
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)
    prompt = np.array([[4, 8, 15, 16]])
    assert load(tmp_path / "out").generate(prompt, 10)[0].tolist() == _greedy(model, prompt, 10).tolist()
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False


def test_what_cannot_stream_a_cache_is_one_line_before_any_weight_is_read(tmp_path):
    write_llama(tmp_path / "w", family="mistral", sliding_window=5)
    with pytest.raises(FrontendError, match=r"sliding-window attention \(5 tokens\) drops old cache entries"):
        compress_stream(tmp_path / "w", EXACT, tmp_path / "out", options=KV)
    # the rule must not match without a cache: the same folder streams as logits only
    compress_stream(tmp_path / "w", EXACT, tmp_path / "ok", options=StreamOptions(calibration_sequences=2, calibration_seq_len=8,
                                                                                    heldout_seq_len=8))
    write_llama(tmp_path / "m")
    kv_search = {"name": "kv4", "passes": [{"quantize-kv-cache": {"bits": 4}}]}
    with pytest.raises(FrontendError, match="quantize-kv-cache measures the decode KL of the whole model"):
        compress_stream(tmp_path / "m", kv_search, tmp_path / "out", options=KV)
    assert not (tmp_path / "out").exists()


def test_onnx_runtime_genai_runs_a_streamed_kv_artifact(exact):
    _, root, _ = exact
    prompt = np.array([[5, 7, 9, 11]])
    ours = load(root / "out").generate(prompt, 10)
    assert genai_greedy(root / "out", prompt, 10) == ours[0].tolist()


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_other_families_stream_with_their_cache_and_generate_their_tokens(tmp_path, family):
    # Qwen2: biased q/k/v; Phi-3: one fused qkv_proj and gate_up_proj (the units read the family's own layers)
    from tests.stream.test_units import _folder

    model = _folder(tmp_path / "m", family)
    compress_stream(tmp_path / "m", EXACT, tmp_path / "out", options=KV)
    prompt = np.array([[3, 14, 15, 92]])
    assert load(tmp_path / "out").generate(prompt, 10)[0].tolist() == _greedy(model, prompt, 10).tolist()
