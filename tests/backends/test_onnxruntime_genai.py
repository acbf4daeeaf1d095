"""genai_config.json: written for KV-cache decoder graphs only, with the model's facts."""

import torch
import transformers

from graphpress.backends.onnxruntime.genai import genai_config, write_genai_files
from graphpress.frontends.hf_kv import capture_kv_decoder
from graphpress.frontends.huggingface import HFLogits
from graphpress.ir.graph import Graph


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=80, eos_token_id=3, bos_token_id=1)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_kv_graph_gets_its_sizes_names_and_tokens(tmp_path):
    graph = capture_kv_decoder(_llama(), name="tiny", source={"path": str(tmp_path / "src")})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    config = genai_config(graph, "model.onnx")
    model = config["model"]
    assert model["type"] == "llama" and model["vocab_size"] == 96 and model["context_length"] == 80
    assert model["eos_token_id"] == 3 and model["bos_token_id"] == 1 and model["pad_token_id"] == 3  # no pad: the eos
    dec = model["decoder"]
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"], dec["num_hidden_layers"]) == (16, 64, 4, 2, 2)
    assert dec["inputs"]["past_key_names"] % 1 == "past_key_values.1.key" and dec["outputs"]["present_value_names"] % 0 == "present.0.value"
    assert set(dec["inputs"]) >= {"input_ids", "attention_mask", "position_ids"}
    # GroupQueryAttention writes into a full-length cache in place: GenAI may share the buffers
    assert config["search"]["past_present_share_buffer"] is True
    eager = capture_kv_decoder(_llama(), name="tiny", attention="eager")
    assert genai_config(eager, "model.onnx")["search"]["past_present_share_buffer"] is False  # plain ops only append
    # heads of 8: GroupQueryAttention refuses them, the capture keeps eager attention, no sharing
    small = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=80)
    small._attn_implementation = "eager"
    graph8 = capture_kv_decoder(transformers.LlamaForCausalLM(small).eval(), name="h8")
    assert graph8.source["kv_cache"]["attention"] == "eager" and genai_config(graph8, "model.onnx")["search"]["past_present_share_buffer"] is False
    out = tmp_path / "art"
    out.mkdir()
    assert write_genai_files(graph, out, "model.onnx") == ["genai_config.json", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == "{}"


def test_a_graph_without_a_cache_gets_none(tmp_path):
    # the rule must not match: a logits-only decoder is not what GenAI feeds
    graph = Graph.capture(HFLogits(_llama()), (torch.randint(0, 96, (2, 8)),), dynamic_dims={0: "batch", 1: "seq"})
    assert genai_config(graph, "model.onnx") is None
    assert write_genai_files(graph, tmp_path, "model.onnx") == [] and not list(tmp_path.iterdir())
