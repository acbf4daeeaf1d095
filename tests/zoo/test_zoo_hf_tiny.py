"""Tiny Hugging Face models: plain-tensor wrapper, export with dynamic batch, saved folders."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install graphpress[hf])")

from graphpress.zoo.hf_tiny import HFLogits, save_tiny_hf, tiny_bert, tiny_gpt2, tiny_llama, wrap_hf_model  # noqa: E402

torch.set_num_threads(2)

FACTORIES = {"tiny-bert": tiny_bert, "tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}
ARCH = {"tiny-bert": "BertForMaskedLM", "tiny-gpt2": "GPT2LMHeadModel", "tiny-llama": "LlamaForCausalLM"}


@pytest.mark.parametrize("name", FACTORIES)
def test_forward_returns_logits_tensor(name):
    model = FACTORIES[name]()
    assert isinstance(model, HFLogits) and not model.training
    assert type(model.model).__name__ == ARCH[name]
    (ids,) = model.example_inputs(2)
    assert ids.shape == (2, 16) and ids.dtype == torch.long and int(ids.max()) < 1000
    with torch.no_grad():
        out = model(ids)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 16, 1000)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", FACTORIES)
def test_factory_is_seeded(name):
    a, b, c = FACTORIES[name](), FACTORIES[name](), FACTORIES[name](seed=1)
    (ids,) = a.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
        assert not torch.allclose(a(ids), c(ids))


@pytest.mark.parametrize("name", FACTORIES)
def test_export_dynamic_batch_matches_eager(name):
    model = FACTORIES[name]()
    ep = torch.export.export(model, model.example_inputs(2), dynamic_shapes=({0: Dim("batch")},))
    (ids3,) = model.example_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids3), model(ids3), rtol=1e-5, atol=1e-5)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    # Eager attention: plain softmax, no fused SDPA node.
    assert "aten.softmax.int" in targets
    assert not any("scaled_dot_product" in t for t in targets)


@pytest.mark.parametrize("name", FACTORIES)
def test_sdpa_matches_eager(name):
    eager, sdpa = FACTORIES[name](), FACTORIES[name](attn_implementation="sdpa")
    (ids,) = eager.example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids), eager(ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_causal_models_ignore_future_tokens(name):
    model = FACTORIES[name]()
    (ids,) = model.example_inputs(2)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 1000
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_bert_attention_mask_hides_padding():
    model = tiny_bert()
    (ids,) = model.example_inputs(1)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    other = ids.clone()
    other[:, 12:] = 5  # change only masked-out positions
    with torch.no_grad():
        a, b = model(ids, mask), model(other, mask)
        full = model(ids)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, :12], full[:, :12])  # the mask does change visible positions


@pytest.mark.parametrize("name", FACTORIES)
def test_save_tiny_hf_round_trip(name, tmp_path):
    folder = save_tiny_hf(name, tmp_path / name)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.architectures == [ARCH[name]]
    hf = getattr(transformers, ARCH[name]).from_pretrained(folder)
    wrapped = wrap_hf_model(hf, attn_implementation="eager")
    reference = FACTORIES[name]()
    (ids,) = reference.example_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids), reference(ids), rtol=1e-6, atol=1e-6)


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny HF model"):
        save_tiny_hf("tiny-t5", tmp_path)


def test_wrap_bare_encoder_returns_hidden_state():
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    wrapped = wrap_hf_model(transformers.BertModel(config))
    (ids,) = wrapped.example_inputs(2)
    assert int(ids.max()) < 100
    with torch.no_grad():
        assert wrapped(ids).shape == (2, 16, 32)
