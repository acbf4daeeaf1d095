"""llama2.c loader and Llama model: format round trip, errors, sampling, export, stories260K."""

from __future__ import annotations

import copy
import math
import struct

import pytest
import torch
from torch.export import Dim

from graphpress.errors import FrontendError
from graphpress.zoo.llama2c import (
    Llama2c,
    ModelArgs,
    is_llama2c_file,
    llama2c_tiny,
    load_llama2c,
    next_token_cross_entropy,
    read_llama2c_header,
    rope_tables,
    sample,
    save_llama2c,
)
from graphpress.zoo.paths import STORIES260K_RELPATH, expected_path, stories260k_path

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def stories() -> Llama2c:
    if stories260k_path() is None:
        pytest.skip(f"../shared/models/{STORIES260K_RELPATH.as_posix()} not found: {expected_path(STORIES260K_RELPATH)}")
    return load_llama2c()


@pytest.fixture()
def tiny_file(tmp_path):
    return save_llama2c(llama2c_tiny(), tmp_path / "tiny.bin")


# ----------------------------------------------------------------------------- tiny model


def test_tiny_shapes_and_gqa():
    model = llama2c_tiny()
    assert not model.training
    (tokens,) = model.example_inputs(3)
    assert tokens.shape == (3, 32) and tokens.dtype == torch.long
    assert int(tokens[:, 0].unique()) == 1  # BOS
    assert model(tokens).shape == (3, 32, 64)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (32, 32) and attn.wk.weight.shape == (16, 32)
    assert model.output.weight is model.tok_embeddings.weight


def test_tiny_factory_is_deterministic():
    a, b = llama2c_tiny(), llama2c_tiny()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(llama2c_tiny(seed=1).tok_embeddings.weight, a.tok_embeddings.weight)


def test_causal_mask_future_tokens_do_not_change_past_logits():
    model = llama2c_tiny()
    (tokens,) = model.example_inputs(2)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % model.args.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_rope_rotates_interleaved_pairs():
    from graphpress.zoo.llama2c import apply_rope

    cos, sin = rope_tables(head_size=4, seq_len=3)
    x = torch.zeros(1, 3, 1, 4)
    x[..., 0] = 1.0  # unit vector in the first (even, odd) pair
    out = apply_rope(x, cos, sin)
    # Position p rotates pair 0 by angle p (theta^0 = 1): (cos p, sin p); pair 1 stays 0.
    for p in range(3):
        torch.testing.assert_close(out[0, p, 0], torch.tensor([math.cos(p), math.sin(p), 0.0, 0.0]))


def test_example_inputs_cached_and_deterministic():
    model = llama2c_tiny()
    (a,) = model.example_inputs(2)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(3.0)  # a "pass" edits weights: inputs must not move
    assert torch.equal(model.example_inputs(2)[0], a)
    assert torch.equal(llama2c_tiny().example_inputs(2)[0], a)


def test_sample_is_seeded():
    model = llama2c_tiny()
    a = sample(model, 2, 10, seed=3)
    assert a.shape == (2, 10)
    assert torch.equal(a, sample(model, 2, 10, seed=3))
    assert not torch.equal(a, sample(model, 2, 10, seed=4))
    greedy = sample(model, 1, 6, temperature=0.0)
    with torch.no_grad():
        assert torch.equal(model(greedy[:, :-1]).argmax(-1)[0, -1], greedy[0, -1])


def test_tiny_export_dynamic_batch_matches_eager():
    model = llama2c_tiny()
    ep = torch.export.export(model, model.example_inputs(2), dynamic_shapes=({0: Dim("batch")},))
    (x3,) = model.example_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x3), model(x3), rtol=1e-5, atol=1e-5)


def test_tiny_export_dynamic_batch_and_sequence():
    model = llama2c_tiny()
    seq = Dim("seq", min=2, max=model.args.seq_len)
    ep = torch.export.export(model, model.example_inputs(2), dynamic_shapes=({0: Dim("batch"), 1: seq},))
    for T in (5, model.args.seq_len):
        tokens = torch.randint(0, model.args.vocab_size, (3, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_seq_len_is_rejected():
    model = llama2c_tiny()
    with pytest.raises(RuntimeError, match="exceeds seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- file format


@pytest.mark.parametrize("shared", [True, False])
def test_save_load_round_trip(tmp_path, shared):
    model = llama2c_tiny(shared_classifier=shared, seed=2)
    path = save_llama2c(model, tmp_path / "m.bin")
    (vocab,) = struct.unpack_from("<i", path.read_bytes(), 20)
    assert vocab == (64 if shared else -64)  # llama2.c marks an untied classifier with a negative vocab
    loaded = load_llama2c(path)
    assert loaded.args == model.args
    assert (loaded.output.weight is loaded.tok_embeddings.weight) == shared
    (tokens,) = model.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_is_llama2c_file(tmp_path, tiny_file):
    assert is_llama2c_file(tiny_file)
    assert not is_llama2c_file(tmp_path / "missing.bin")
    (tmp_path / "short.bin").write_bytes(b"\x01\x02")
    assert not is_llama2c_file(tmp_path / "short.bin")
    (tmp_path / "noise.bin").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    assert not is_llama2c_file(tmp_path / "noise.bin")
    assert not is_llama2c_file(tmp_path)  # a folder


def _one_line_error(path, match: str) -> str:
    with pytest.raises(FrontendError, match=match) as err:
        load_llama2c(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_missing_file_error(tmp_path):
    _one_line_error(tmp_path / "absent.bin", "no such llama2.c model file")


def test_truncated_file_error(tmp_path, tiny_file):
    data = tiny_file.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[:-100])
    msg = _one_line_error(cut, "truncated")
    assert str(len(data)) in msg and str(len(data) - 100) in msg
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    _one_line_error(tmp_path / "long.bin", "trailing data")
    (tmp_path / "hdr.bin").write_bytes(data[:20])
    _one_line_error(tmp_path / "hdr.bin", "too short for a llama2.c header")


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ((32, 64, 2, 0, 2, 64, 64), "n_heads=0"),
        ((30, 64, 2, 4, 2, 64, 64), "not divisible by n_heads"),
        ((32, 64, 2, 4, 3, 64, 64), "not divisible by n_kv_heads"),
        ((32, 64, 2, 4, 2, 64, -5), "seq_len=-5"),
    ],
)
def test_bad_header_error(tmp_path, tiny_file, values, why):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *values) + tiny_file.read_bytes()[28:])
    _one_line_error(path, why)
    assert not is_llama2c_file(path)


def test_newer_export_version_is_named(tmp_path):
    path = tmp_path / "v1.bin"
    path.write_bytes(struct.pack("<2i", 0x616B3432, 1) + bytes(256))
    _one_line_error(path, "version 1")


# ----------------------------------------------------------------------------- stories260K


def test_stories_header(stories):
    assert stories.args == ModelArgs(
        dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512
    )
    assert is_llama2c_file(stories260k_path())
    assert read_llama2c_header(stories260k_path()).file_size() == stories260k_path().stat().st_size
    # The stored RoPE tables are llama2.c's (theta 10000), within float32 rounding.
    cos, sin = rope_tables(8, 512)
    torch.testing.assert_close(stories.freqs_cos, cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(stories.freqs_sin, sin, atol=1e-5, rtol=0)


def test_stories_save_is_byte_identical(stories, tmp_path):
    out = save_llama2c(stories, tmp_path / "again.bin")
    assert out.read_bytes() == stories260k_path().read_bytes()


@pytest.fixture(scope="module")
def stories_samples(stories) -> torch.Tensor:
    return sample(stories, 8, 128, temperature=1.0, seed=0)


def test_stories_is_trained(stories, stories_samples):
    # Chance is ln(512) = 6.24 nats; the shared README measured 2.80.
    ce = next_token_cross_entropy(stories, stories_samples)
    assert ce < 3.5, ce
    assert stories_samples.unique().numel() > 100  # not a degenerate repeat-one-token model


def test_stories_weight_layout_is_out_in(stories):
    """Reading the matrices as (in, out) instead gives a visibly worse model."""
    transposed = copy.deepcopy(stories)
    with torch.no_grad():
        for layer in transposed.layers:
            for lin in (*[getattr(layer.attention, n) for n in ("wq", "wk", "wv", "wo")],
                        *[getattr(layer.feed_forward, n) for n in ("w1", "w2", "w3")]):
                out_f, in_f = lin.weight.shape
                lin.weight.copy_(lin.weight.detach().clone().reshape(in_f, out_f).T)
    own = next_token_cross_entropy(stories, sample(stories, 8, 64, seed=0))
    other = next_token_cross_entropy(transposed, sample(transposed, 8, 64, seed=0))
    assert own < 3.0 < 4.5 < other, (own, other)  # measured 2.65 vs 5.23


def test_stories_example_inputs(stories):
    (tokens,) = stories.example_inputs(2)
    assert tokens.shape == (2, 32)
    assert torch.equal(tokens, sample(stories, 2, 32, seed=0))


def test_stories_export_dynamic_batch_matches_eager(stories):
    ep = torch.export.export(stories, stories.example_inputs(2), dynamic_shapes=({0: Dim("batch")},))
    (x3,) = stories.example_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x3), stories(x3), rtol=1e-5, atol=1e-5)
