"""A Hugging Face decoder captured with its KV cache: the graph's logits equal transformers' for
the prompt and for 32 decode steps fed back through the cache, in four families; per-input
dynamic dims; refusals in one line."""

import pytest
import torch
import transformers

from graphpress.errors import FrontendError
from graphpress.frontends import load
from graphpress.frontends.hf_kv import HFKVDecoder, capture_kv_decoder, kv_names, prefill_batches


def _model(family: str, **extra):
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=96)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**kw, **extra),
        "qwen2": lambda: transformers.Qwen2Config(**kw, **extra),
        "mistral": lambda: transformers.MistralConfig(**{"sliding_window": None, **kw, **extra}),
        "phi3": lambda: transformers.Phi3Config(pad_token_id=0, eos_token_id=1, bos_token_id=1, **kw, **extra),
    }[family]()
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def decode_against_transformers(run, model, prompt: torch.Tensor, steps: int) -> tuple[float, float]:
    """``(prefill max abs, worst decode max abs)``: ``run(*inputs)`` (a graph or an artifact
    through torch tensors) against transformers without a cache, greedy tokens fed back."""
    wrapper = HFKVDecoder(model)
    b = prompt.shape[0]
    with torch.no_grad():
        outs = [torch.as_tensor(o) for o in run(*wrapper.prefill_inputs(prompt))]
        prefill = float((outs[0] - model(prompt, use_cache=False).logits).abs().max())
        seqs, past = prompt.clone(), outs[1:]
        nxt = outs[0][:, -1].argmax(-1, keepdim=True)
        worst = 0.0
        for _ in range(steps):
            seqs = torch.cat([seqs, nxt], 1)
            n = seqs.shape[1]
            outs = [torch.as_tensor(o) for o in run(nxt, torch.ones(b, n, dtype=torch.long), torch.full((b, 1), n - 1), *past)]
            full = model(seqs, use_cache=False).logits[:, -1]
            worst = max(worst, float((outs[0][:, -1] - full).abs().max()))
            past, nxt = outs[1:], outs[0][:, -1].argmax(-1, keepdim=True)
    assert past[0].shape[2] == prompt.shape[1] + steps  # the cache grew by one per step
    return prefill, worst


@pytest.mark.parametrize("family, attention", [("llama", "gqa"), ("qwen2", "gqa"), ("mistral", "gqa"), ("phi3", "gqa"), ("llama", "eager")])
def test_prefill_and_32_decode_steps_equal_transformers(family, attention):
    model = _model(family)
    graph = capture_kv_decoder(model, name=family, attention=attention)
    assert model.config._attn_implementation == "eager"  # the caller's model is left as it was
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    prefill, decode = decode_against_transformers(graph.run, model, prompt, 32)
    assert prefill < 1e-5 and decode < 1e-5


def test_the_graph_has_genai_names_and_per_input_dims():
    graph = capture_kv_decoder(_model("llama"), name="tiny")
    past, present = kv_names(2)
    assert [s.name for s in graph.input_specs] == ["input_ids", "attention_mask", "position_ids", *past]
    assert graph.output_names == ["logits", *present]
    shapes = {s.name: s.shape for s in graph.input_specs}
    assert shapes["input_ids"] == ("batch", "seq") and shapes["attention_mask"] == ("batch", "total")
    assert shapes["past_key_values.1.value"] == ("batch", 2, "past", 16)
    out = {s.name: s.shape for s in graph.output_specs}
    assert out["logits"] == ("batch", "seq", 128) and out["present.0.key"] == ("batch", 2, "past + seq", 16)
    assert {k: graph.source["kv_cache"][k] for k in ("layers", "kv_heads", "head_dim", "model_type", "context_length")} == {
        "layers": 2, "kv_heads": 2, "head_dim": 16, "model_type": "llama", "context_length": 96}
    # the examples are a prefill of 16 tokens; the traced inputs a real cached prefix of 4 tokens and 12 new ones
    ids, mask, pos, k0 = graph.example_inputs[:4]
    assert ids.shape == (2, 16) and mask.shape == (2, 16) and pos[0].tolist() == list(range(16)) and k0.shape == (2, 2, 0, 16)
    ids, mask, pos, k0 = graph.trace_inputs[:4]
    assert ids.shape == (2, 12) and mask.shape == (2, 16) and pos[0].tolist() == list(range(4, 16)) and k0.shape == (2, 2, 4, 16)
    assert sum(n.target == torch.ops.graphpress.gqa_cached.default for n in graph.gm.graph.nodes) == 2  # one op per layer
    graph.verify()
    # a snapshot keeps the dims; a prefill (past 0) and a batch of 1 run
    snap = graph.snapshot()
    assert snap.input_dims == graph.input_dims
    out1 = snap.run(*HFKVDecoder(_model("llama")).prefill_inputs(torch.tensor([[3, 4, 5]])))
    assert out1[0].shape == (1, 3, 128) and out1[1].shape == (1, 2, 3, 16)


def test_token_calibration_becomes_prefill_inputs_and_full_inputs_are_kept():
    graph = capture_kv_decoder(_model("llama"), name="tiny")
    ids = torch.randint(0, 128, (3, 7))
    (b,) = prefill_batches(graph, [(ids,)])
    assert len(b) == len(graph.example_inputs) and torch.equal(b[0], ids)
    assert b[1].shape == (3, 7) and b[2][1].tolist() == list(range(7)) and b[3].shape == (3, 2, 0, 16)
    full = graph.example_inputs
    assert all(x is y for x, y in zip(prefill_batches(graph, [full])[0], full))  # already the graph's inputs
    with pytest.raises(FrontendError, match="token ids"):
        prefill_batches(graph, [(torch.randn(3, 7),)])


def test_a_sliding_window_model_is_refused_in_one_line():
    # the rule must not match a cache that drops old entries
    with pytest.raises(FrontendError, match=r"sliding-window attention \(8 tokens\).*full attention only"):
        HFKVDecoder(_model("mistral", sliding_window=8))


def test_kv_cache_needs_a_hugging_face_folder(tmp_path):
    with pytest.raises(FrontendError, match="--kv-cache needs a Hugging Face causal-LM folder"):
        load(torch.nn.Linear(2, 2), kv_cache=True)
    model = _model("llama")
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FrontendError, match="makes its own example inputs"):
        load(tmp_path / "m", kv_cache=True, input_shape="1x4")
    graph = load(tmp_path / "m", kv_cache=True)
    assert graph.input_names[3] == "past_key_values.0.key" and graph.source["frontend"] == "huggingface"


def test_the_rotary_goes_into_the_attention_op_only_for_position_only_rope_types():
    from transformers.models.llama import modeling_llama

    rotate = modeling_llama.apply_rotary_pos_emb
    model = _model("llama")
    inside = capture_kv_decoder(model, name="tiny")
    outside = capture_kv_decoder(model, name="tiny", attention="eager")
    assert inside.source["kv_cache"]["rotary"] == "in attention" and outside.source["kv_cache"]["rotary"] == "model"
    assert modeling_llama.apply_rotary_pos_emb is rotate  # the model's module is left as it was
    gqa = [n for n in inside.gm.graph.nodes if n.target == torch.ops.graphpress.gqa_cached.default]
    assert len(gqa) == 2 and all(n.args[7] is not None for n in gqa)  # the tables
    calls = sum(n.op == "call_function" for n in inside.gm.graph.nodes)
    assert calls < sum(n.op == "call_function" for n in outside.gm.graph.nodes)
    # a position-only rope with scaling goes in too, and stays exact
    linear = _model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    graph = capture_kv_decoder(linear, name="linear")
    assert graph.source["kv_cache"]["rotary"] == "in attention"
    prompt = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    prefill, decode = decode_against_transformers(graph.run, linear, prompt, 8)
    assert prefill < 1e-5 and decode < 1e-5
    # partial rotary keeps the model's own: the rule must not match
    partial = _model("phi3", partial_rotary_factor=0.5)
    graph = capture_kv_decoder(partial, name="partial")
    assert graph.source["kv_cache"]["rotary"] == "model (partial or interleaved rotary)"
    prefill, decode = decode_against_transformers(graph.run, partial, prompt, 8)
    assert prefill < 1e-5 and decode < 1e-5


def test_a_length_dependent_rope_is_refused_in_one_line():
    with pytest.raises(FrontendError, match=r"rope type 'dynamic' changes its angles with the sequence length.*position-only rope types"):
        capture_kv_decoder(_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0}), name="dyn")


def test_stories260k_with_a_cache_follows_the_llama2c_model(shared_models):
    # real pretrained weights: llama2.c's interleaved rotary pairs become transformers' halves
    from graphpress.frontends.llama2c import load_llama2c
    from graphpress.frontends.llama2c.to_hf import to_transformers

    path = shared_models / "stories260k" / "stories260K.bin"
    graph = load(path, kv_cache=True)
    facts = graph.source["kv_cache"]
    # heads of 8: ONNX Runtime's GroupQueryAttention takes multiples of 16, so the model's attention stays
    assert graph.source["frontend"] == "llama2c" and facts["attention"] == "eager" and facts["rotary"] == "model"
    assert facts["attention_note"] == "eager (head_dim 8: GroupQueryAttention needs a multiple of 16)"
    original = load_llama2c(path)
    prompt = torch.tensor([[1, 403, 407, 261, 378]])
    wrapper = HFKVDecoder(to_transformers(original))
    with torch.no_grad():
        outs = graph.run(*wrapper.prefill_inputs(prompt))
        torch.testing.assert_close(outs[0], original(prompt), rtol=1e-4, atol=2e-4)
        seqs, past = prompt, outs[1:]
        for _ in range(16):  # greedy, through the cache, against the full llama2.c forward
            nxt = outs[0][:, -1].argmax(-1, keepdim=True)
            seqs = torch.cat([seqs, nxt], 1)
            n = seqs.shape[1]
            outs = graph.run(nxt, torch.ones(1, n, dtype=torch.long), torch.tensor([[n - 1]]), *past)
            past = outs[1:]
            torch.testing.assert_close(outs[0][:, -1], original(seqs)[:, -1], rtol=1e-4, atol=2e-4)


def test_stories260k_artifact_generates_the_llama2c_models_greedy_tokens(shared_models, tmp_path):
    from graphpress.api import compress
    from graphpress.frontends.llama2c import load_llama2c
    from graphpress.runtime import load as load_artifact

    path = shared_models / "stories260k" / "stories260K.bin"
    res = compress(path, out=tmp_path / "s", recipe={"name": "exact", "passes": ["eliminate-dead-code"]}, kv_cache=True, bench=False)
    art = load_artifact(res.folder)
    assert art.kv_cache and art.context_length == 512
    got = art.generate([1, 403, 407, 261], 12)
    model, seq = load_llama2c(path), torch.tensor([[1, 403, 407, 261]])
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tolist() == seq[0].tolist()
