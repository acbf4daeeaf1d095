"""`compress generate`: a prompt continued by a decoder artifact, as token ids or as text through
the source folder's tokenizer, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from graphpress.cli.main import app
from graphpress.runtime import load
from tests.cli.test_cli_checks import one_error_line
from tests.stream.tiny import write_llama

runner = CliRunner()


def _tokenizer(folder, size: int) -> None:
    """One word per id: ``w0`` ... (what a model built from a config can have)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from graphpress.stream import StreamOptions, compress_stream

    root = tmp_path_factory.mktemp("cligen")
    write_llama(root / "m")  # vocab 128
    _tokenizer(root / "m", 128)
    compress_stream(root / "m", {"name": "exact", "passes": ["eliminate-dead-code"]}, root / "art",
                    options=StreamOptions(calibration_sequences=2, calibration_seq_len=8, heldout_sequences=2, heldout_seq_len=8))
    return root


def test_prompt_ids_are_continued_greedily(artifact):
    res = runner.invoke(app, ["generate", str(artifact / "art"), "--prompt-ids", "5, 7, 9", "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    want = load(artifact / "art").generate(np.array([[5, 7, 9]]), 4)[0]
    # the tokenizer is there, so the tokens come back as its words
    assert " ".join(f"w{t}" for t in want) in " ".join(res.output.split())
    assert "4 tokens in" in res.output


def test_a_text_prompt_goes_through_the_source_tokenizer_and_sampling_is_seeded(artifact):
    args = ["generate", str(artifact / "art"), "--prompt", "w5 w7", "--max-new-tokens", "3", "--temperature", "0.9", "--top-k", "10", "--seed", "3"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0, a.output
    assert a.output.split("tokens in")[0] == b.output.split("tokens in")[0]
    assert a.output.split()[:2] == ["w5", "w7"]


def test_bad_requests_are_one_line(artifact, tmp_path):
    art = artifact / "art"
    assert "exactly one of --prompt" in one_error_line(["generate", art])
    assert "exactly one of --prompt" in one_error_line(["generate", art, "--prompt", "w1", "--prompt-ids", "1"])
    assert "not a list of integers" in one_error_line(["generate", art, "--prompt-ids", "1 x"])
    assert "prompt token ids must be in [0, 128)" in one_error_line(["generate", art, "--prompt-ids", "1 500"])
    assert "top_p must be in (0, 1]" in one_error_line(["generate", art, "--prompt-ids", "1", "--temperature", "1", "--top-p", "2"])
    # a tokenizer with more tokens than the model's logits is not this model's
    _tokenizer(artifact / "m", 300)
    try:
        assert "not this model's tokenizer" in one_error_line(["generate", art, "--prompt", "w1"])
    finally:
        _tokenizer(artifact / "m", 128)
    # no tokenizer in the source folder: text cannot be encoded
    (artifact / "m" / "tokenizer.json").rename(tmp_path / "t.json")
    try:
        assert "no tokenizer.json" in one_error_line(["generate", art, "--prompt", "w1"])
    finally:
        (tmp_path / "t.json").rename(artifact / "m" / "tokenizer.json")


def test_a_model_that_is_not_a_decoder_is_refused(tmp_path):
    import torch

    from graphpress.api import compress

    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    compress(net, out=tmp_path / "mlp", recipe={"name": "none", "passes": ["eliminate-dead-code"]}, example_inputs=(torch.randn(2, 4),), bench=False)
    line = one_error_line(["generate", tmp_path / "mlp", "--prompt-ids", "1 2"])
    assert "not a decoder artifact" in line
    assert json.loads((tmp_path / "mlp" / "manifest.json").read_text())["backend"] == "onnxruntime"


def test_run_with_kv_cache_then_generate_gives_the_same_tokens_as_the_streamed_artifact(artifact):
    out = artifact / "kv"
    (artifact / "exact.yaml").write_text("name: exact\npasses:\n  - eliminate-dead-code\n")
    res = runner.invoke(app, ["run", str(artifact / "m"), "-r", str(artifact / "exact.yaml"), "--kv-cache", "--stream", "off", "--no-bench", "-o", str(out)])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]
    res = runner.invoke(app, ["generate", str(out), "--prompt", "w5 w7 w9", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    want = load(artifact / "art").generate(np.array([[5, 7, 9]]), 5)[0]  # no cache: the whole sequence each step
    assert " ".join(f"w{t}" for t in want) in " ".join(res.output.split())
    assert "KV cache: one token per step" in res.output
    # the source's max_position_embeddings (64) bounds prompt + new tokens: one line
    assert "exceed the model's context of 64 tokens" in one_error_line(["generate", str(out), "--prompt-ids", "1 2 3", "--max-new-tokens", "62"])


def test_a_streamed_kv_artifact_generates_the_tokens_of_the_whole_graph_one(artifact):
    out = artifact / "kv-stream"
    (artifact / "exact.yaml").write_text("name: exact\npasses:\n  - eliminate-dead-code\n")
    res = runner.invoke(app, ["run", str(artifact / "m"), "-r", str(artifact / "exact.yaml"), "--kv-cache", "--stream", "on", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "decode step after" in res.output  # the end-to-end check decoded a token from the artifact's own caches
    assert {"genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    res = runner.invoke(app, ["bench", str(out)])  # the manifest gives every symbolic dim a size
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", str(out), "--prompt", "w5 w7 w9", "--max-new-tokens", "5"])
    assert res.exit_code == 0, res.output
    want = load(artifact / "art").generate(np.array([[5, 7, 9]]), 5)[0]
    assert " ".join(f"w{t}" for t in want) in " ".join(res.output.split())
    assert "KV cache: one token per step" in res.output


def test_kv_cache_is_refused_outside_hugging_face_folders(artifact, tmp_path):
    assert "--kv-cache needs a Hugging Face causal-LM folder" in one_error_line(
        ["run", "tests.frontends.models:small_cnn", "--kv-cache", "-o", str(tmp_path / "y")])
