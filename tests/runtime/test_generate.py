"""Generation from a decoder artifact: the same tokens as transformers' greedy decoding, seeded
sampling that stays inside top-k / top-p, and one-line refusals."""

import json

import numpy as np
import pytest
import torch

from graphpress.errors import ArtifactError
from graphpress.runtime import load
from graphpress.runtime.generate import Sampling, next_tokens
from tests.genai_helpers import genai_greedy


# ---------------------------------------------------------------------------- choosing a token
def _logits():
    return np.log(np.array([[0.5, 0.3, 0.1, 0.06, 0.04], [0.02, 0.02, 0.9, 0.03, 0.03]]))


def test_greedy_is_argmax_and_top_k_1_is_greedy_at_any_temperature():
    rng = np.random.default_rng(0)
    assert next_tokens(_logits(), Sampling(), rng).tolist() == [0, 2]
    assert next_tokens(_logits(), Sampling(temperature=5.0, top_k=1), rng).tolist() == [0, 2]


def test_sampling_stays_in_top_k_and_in_the_nucleus_and_is_seeded():
    rows = np.repeat(_logits()[:1], 4000, axis=0)
    top2 = next_tokens(rows, Sampling(temperature=1.0, top_k=2, seed=1), np.random.default_rng(1))
    assert set(top2.tolist()) == {0, 1}
    # p = .5, .3, .1 ...: a nucleus of 0.7 keeps 0 and 1 (the mass before token 1 is 0.5 < 0.7)
    nucleus = next_tokens(rows, Sampling(temperature=1.0, top_p=0.7), np.random.default_rng(2))
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(float((nucleus == 0).mean()) - 0.5 / 0.8) < 0.03  # renormalised over the kept tokens
    free = next_tokens(rows, Sampling(temperature=1.0), np.random.default_rng(3))
    assert abs(float((free == 2).mean()) - 0.1) < 0.02  # plain sampling follows the softmax
    again = next_tokens(rows, Sampling(temperature=1.0), np.random.default_rng(3))
    assert np.array_equal(free, again)


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1.0}, "temperature must be a number >= 0"),
    ({"top_k": 0}, "top_k must be an integer >= 1"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling_options_are_one_line(kw, match):
    with pytest.raises(ArtifactError, match=match):
        Sampling(**kw)


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    from graphpress.stream import StreamOptions, compress_stream
    from tests.stream.tiny import write_llama

    root = tmp_path_factory.mktemp("gen")
    model = write_llama(root / "m", layers=2, vocab=256)
    compress_stream(root / "m", {"name": "exact", "passes": ["eliminate-dead-code"]}, root / "art",
                    options=StreamOptions(calibration_sequences=2, calibration_seq_len=8, heldout_sequences=2, heldout_seq_len=8))
    return model, load(root / "art")


def test_greedy_generation_gives_transformers_tokens(decoder):
    model, art = decoder
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    seen = []
    got = art.generate(prompt.numpy(), 8, on_token=lambda step, tok: seen.append(tok.copy()))
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                              pad_token_id=0)  # the mask given: a prompt token 0 is not padding
    assert got.shape == (2, 13) and got.dtype == np.int64
    assert np.array_equal(got, want.numpy())
    assert len(seen) == 8 and np.array_equal(np.stack(seen, 1), got[:, 5:])  # streamed step by step
    one = art.generate(prompt[0].numpy(), 3)  # a 1-D prompt gives a 1-D sequence
    assert one.shape == (8,) and np.array_equal(one, got[0, :8])


def test_sampled_generation_is_reproducible_and_stops_at_eos(decoder):
    _, art = decoder
    prompt = np.array([[1, 2, 3]])
    a = art.generate(prompt, 6, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    b = art.generate(prompt, 6, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert np.array_equal(a, b) and a.shape == (1, 9)
    first = int(art.generate(prompt, 1)[0, -1])
    stopped = art.generate(prompt, 6, eos_token_id=first)
    assert stopped.shape == (1, 4) and int(stopped[0, -1]) == first


def test_generation_refuses_what_it_cannot_run(decoder, tmp_path):
    _, art = decoder
    with pytest.raises(ArtifactError, match=r"prompt token ids must be in \[0, 256\)"):
        art.generate(np.array([[1, 999]]), 2)
    with pytest.raises(ArtifactError, match="prompt_ids must be a non-empty"):
        art.generate(np.zeros((1, 0), dtype=np.int64), 2)
    with pytest.raises(ArtifactError, match="top_k"):
        art.generate(np.array([[1]]), 2, temperature=1.0, top_k=0)
    from graphpress.runtime.generate import generate

    class NotADecoder:  # an image model's inputs and outputs
        folder = "out/resnet20"
        inputs = [type("S", (), {"name": "input", "dtype": "float32", "shape": ("batch", 3, 32, 32), "shape_str": lambda self: "[batch, 3, 32, 32]"})()]
        outputs = [type("S", (), {"name": "logits", "dtype": "float32", "shape": ("batch", 10), "shape_str": lambda self: "[batch, 10]"})()]

    with pytest.raises(ArtifactError, match="out/resnet20: not a decoder artifact: generation needs one input_ids"):
        generate(NotADecoder(), np.array([[1]]), 2)


# ---------------------------------------------------------------------------- with a KV cache
@pytest.fixture(scope="module")
def kv_decoder(tmp_path_factory):
    from graphpress.api import compress
    from tests.stream.tiny import write_llama

    root = tmp_path_factory.mktemp("genkv")
    model = write_llama(root / "m", layers=2, vocab=256)
    exact = compress(root / "m", out=root / "exact", recipe={"name": "exact", "passes": ["eliminate-dead-code"]}, kv_cache=True,
                     bench=False)
    int4 = compress(root / "m", out=root / "int4", kv_cache=True, bench=False, recipe="llm-int4")
    return model, load(exact.folder), load(int4.folder), int4.graph


def test_a_kv_artifact_generates_transformers_tokens_one_token_per_step(kv_decoder, monkeypatch):
    model, art, _, _ = kv_decoder
    assert [s.name for s in art.inputs][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    from graphpress.backends.onnxruntime.session import SharedCacheDecoder

    fed = []
    real = SharedCacheDecoder.__call__
    monkeypatch.setattr(SharedCacheDecoder, "__call__", lambda self, feeds: fed.append(feeds["input_ids"].shape) or real(self, feeds))
    got = art.generate(prompt.numpy(), 8)
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                              pad_token_id=0)
    assert np.array_equal(got, want.numpy())
    # the prompt once, then one token per step through the cache (never the whole sequence again)
    assert fed == [(2, 5)] + [(2, 1)] * 7


def test_an_int4_kv_artifact_decodes_as_its_graph_does_in_onnx_runtime(kv_decoder):
    from graphpress.frontends.hf_kv import HFKVDecoder
    from graphpress.ir.compare import sqnr_db

    model, _, art, graph = kv_decoder
    assert [p["name"] for p in art.manifest["passes"]] == ["quantize-layerwise", "fuse-parallel-linears", "quantize-embeddings",
                                                                 "eliminate-dead-code"]
    assert art.manifest["passes"][1]["stats"]["linears_fused"] == 2 * 5  # q/k/v and gate/up of both layers
    wrapper = HFKVDecoder(model)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    ours, theirs = graph.run(*wrapper.prefill_inputs(prompt)), art(*wrapper.prefill_inputs(prompt))
    fp_gap = float((ours[0] - model(prompt, use_cache=False).logits).abs().max())
    for step in range(32):  # ONNX Runtime's caches fed back, the graph fed the same
        # int8 activation rounding (MatMulNBits accuracy level 4) may tie-break apart: SQNR, not allclose
        assert sqnr_db(ours[0], torch.as_tensor(theirs[0])) > 35 and sqnr_db(ours[1], torch.as_tensor(theirs[1])) > 35
        nxt = torch.as_tensor(theirs[0][:, -1].argmax(-1))[:, None]
        n = 6 + step + 1
        feeds = (nxt, torch.ones(1, n, dtype=torch.long), torch.tensor([[n - 1]]))
        ours = graph.run(*feeds, *(torch.as_tensor(t) for t in theirs[1:]))
        theirs = art(*feeds, *theirs[1:])
    assert theirs[1].shape == (1, 2, 6 + 32, 16)
    assert fp_gap > 1e-3  # int4: the rule "it is quantized" holds (not the float model)


def test_onnx_runtime_genai_runs_a_kv_artifact_and_gives_its_tokens(kv_decoder):
    _, _, art, _ = kv_decoder
    config = json.loads((art.folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2 and config["search"]["past_present_share_buffer"] is True
    prompt = np.array([[5, 7, 9, 11]])
    ours = art.generate(prompt, 10)
    assert genai_greedy(art.folder, prompt, 10) == ours[0].tolist()


def test_shared_cache_buffers_give_the_tokens_of_fed_back_caches(kv_decoder, monkeypatch):
    # ONNX Runtime's IOBinding path (each cache allocated once at full length, bound as past and
    # present) against feeding the presents back: the same tokens, greedy and sampled
    _, exact, int4, _ = kv_decoder
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5)).numpy()
    made = []
    real = type(exact.runner).shared_cache_decoder
    monkeypatch.setattr(type(exact.runner), "shared_cache_decoder", lambda self, *a, **k: made.append(a[2]) or real(self, *a, **k))
    shared = [art.generate(prompt, 10) for art in (exact, int4)] + [exact.generate(prompt, 10, temperature=0.9, top_k=20, seed=3)]
    assert made == [(2, 2, 17, 16)] * 3  # (batch, kv heads, prompt + new, head_dim), once per generate
    monkeypatch.delattr(type(exact.runner), "shared_cache_decoder")
    fed_back = [art.generate(prompt, 10) for art in (exact, int4)] + [exact.generate(prompt, 10, temperature=0.9, top_k=20, seed=3)]
    for a, b in zip(shared, fed_back):
        assert np.array_equal(a, b)


def test_a_kv_artifact_with_caches_in_k_bits_stores_codes_and_decodes_as_its_graph(tmp_path):
    from graphpress.api import compress
    from tests.stream.tiny import write_llama

    write_llama(tmp_path / "m", layers=2, vocab=256)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0")).save(str(tmp_path / "m" / "tokenizer.json"))
    res = compress(tmp_path / "m", out=tmp_path / "kv4", kv_cache=True, bench=False, recipe="llm-int4-kv4")
    art = load(res.folder)
    specs = {s.name: s for s in art.inputs}
    bits = art.manifest["lowering"]["info"]["kv_cache_bits"]
    assert set(bits) == {f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")} and set(bits.values()) <= {2, 4, 8}
    for name, b in bits.items():
        assert specs[name].dtype == "uint8" and specs[name].shape[3] == 16 * b // 8
        assert specs[name + "_scales"].dtype == "float16" and specs[name + "_scales"].shape[3] == 2
    assert not (art.folder / "genai_config.json").exists()  # GenAI reads float caches only
    assert (art.folder / "tokenizer.json").exists()  # the tokenizer travels with the artifact all the same
    stats = next(p for p in art.manifest["passes"] if p["name"] == "quantize-kv-cache")["stats"]
    assert stats["ratio_vs_fp16"] < 0.5
    # the artifact's greedy tokens are those of its graph, decoded through the graph's own float caches
    prompt = np.array([[5, 7, 9, 11, 13]])
    got = art.generate(prompt, 12)
    graph, ids = res.graph, torch.as_tensor(prompt)
    with torch.no_grad():
        outs = graph.run(ids, torch.ones_like(ids), torch.arange(5)[None], *[torch.zeros(1, 2, 0, 16)] * 4)
        seq = ids
        for _ in range(12):
            nxt = outs[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            n = seq.shape[1]
            outs = graph.run(nxt, torch.ones(1, n, dtype=torch.long), torch.tensor([[n - 1]]), *outs[1:])
    assert np.array_equal(got, seq.numpy())


@pytest.mark.parametrize("passes", [["eliminate-dead-code"], [{"quantize-kv-cache": {"bits": 4, "max_kl": None}}, "eliminate-dead-code"]],
                         ids=["float-cache", "4-bit-cache"])
def test_a_kv_artifact_on_the_torch_backend_keeps_the_graphs_names_and_tokens(tmp_path, passes):
    from graphpress.api import compress
    from tests.stream.tiny import write_llama

    write_llama(tmp_path / "m", layers=2, vocab=256)
    recipe = {"name": "kv", "passes": passes}
    on_torch = load(compress(tmp_path / "m", out=tmp_path / "t", kv_cache=True, bench=False, recipe=recipe, backend="torch").folder)
    on_ort = load(compress(tmp_path / "m", out=tmp_path / "o", kv_cache=True, bench=False, recipe=recipe).folder)
    # export names a forward's *args past_0, past_1 ...: the runner reports the graph's names
    assert on_torch.runner.input_names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert all(s.dtype == "float32" for s in on_torch.inputs[3:])  # torch keeps float caches (rounded, when quantized)
    prompt = np.array([[5, 7, 9, 11]])
    assert np.array_equal(on_torch.generate(prompt, 10), on_ort.generate(prompt, 10))
