"""Streaming compression end to end on tiny decoder LLMs: the artifact matches the model, the
int4 artifact is verified per block and end to end, and bad input fails in one line leaving
nothing behind."""

import json
import os

import onnx
import pytest
import torch
import transformers

from graphpress.errors import FrontendError, GraphpressError, VerificationError
from graphpress.runtime import load, read_artifact
from graphpress.stream import StreamOptions, compress_stream
from tests.stream.tiny import write_llama

INT4 = {"name": "int4", "passes": [{"quantize-layerwise": {"bits": [4], "target_bits": 4, "activations": "none", "group_size": 32}}]}
EXACT = {"name": "exact", "passes": ["eliminate-dead-code"]}
SMALL = StreamOptions(calibration_sequences=4, calibration_seq_len=12, heldout_sequences=2, heldout_seq_len=12)


def _llama(folder, *, layers=2, family="llama", **extra):
    return write_llama(folder, layers=layers, vocab=256, family=family, max_shard_size="60KB", **extra)  # sharded: an index and several files


def test_an_exact_recipe_streams_to_an_artifact_that_gives_the_models_logits(tmp_path):
    model = _llama(tmp_path / "m", family="mistral", sliding_window=5)  # a window shorter than the sequence
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    result = compress_stream(tmp_path / "m", EXACT, tmp_path / "out", options=SMALL)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(5))
    (logits,) = load(tmp_path / "out")(ids.numpy())
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    assert float((torch.from_numpy(logits) - want).abs().max()) < 1e-4
    e2e = result.manifest["stream"]["end_to_end"]
    assert e2e["onnxruntime"]["ok"] and e2e["top1_agreement"] == 1.0 and e2e["kl"] < 1e-8


def test_int4_streams_block_by_block_with_checks_and_a_hashed_artifact(tmp_path):
    _llama(tmp_path / "m", layers=3)
    seen = []
    opts = StreamOptions(calibration_sequences=4, calibration_seq_len=12, heldout_seq_len=12, head_slice_bytes=256 * 64 * 2)
    result = compress_stream(tmp_path / "m", INT4, tmp_path / "out", options=opts, on_unit=lambda i, n, r: seen.append((i, n, r.unit)))
    assert [u for _, _, u in seen] == ["embed", "block.0", "block.1", "block.2", "head.0", "head.1"]
    assert all(n == 6 for _, n, _ in seen)
    art = read_artifact(tmp_path / "out")  # checks every file's sha256
    assert set(art.manifest["files"]) == {"model.onnx", "model.onnx.data", "report.md"}
    stream = art.manifest["stream"]
    blocks = [u for u in stream["units"] if u["unit"].startswith("block.")]
    assert all(15 < u["sqnr_db"] < 40 for u in blocks)  # int4 group-32 on a random block: lossy, not broken
    assert all(p["name"] == "quantize-layerwise" and p["changed"] for u in blocks for p in u["passes"])
    e2e = stream["end_to_end"]
    assert e2e["onnxruntime"]["ok"] and e2e["onnxruntime"]["max_abs"] < 1e-4
    assert 0 < e2e["kl"] < 0.05
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 3 * 7 + 2  # q, k, v, o, gate, up, down per block, and the two head slices
    assert "Concat" in ops
    assert os.path.getsize(tmp_path / "out" / "model.onnx") < 200_000
    assert "| block.2 |" in (tmp_path / "out" / "report.md").read_text()


def test_a_block_below_the_sqnr_floor_fails_naming_it_and_leaves_nothing(tmp_path):
    _llama(tmp_path / "m")
    opts = StreamOptions(calibration_sequences=2, calibration_seq_len=8, heldout_seq_len=8, min_block_sqnr_db=60.0)
    with pytest.raises(VerificationError, match=r"block 0: output SQNR .* below min_block_sqnr_db=60"):
        compress_stream(tmp_path / "m", INT4, tmp_path / "out", options=opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no artifact, no scratch folder


def test_bad_input_is_one_line_before_any_weight_is_read(tmp_path):
    _llama(tmp_path / "m")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = "model-missing.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(FrontendError, match="model-missing.safetensors"):
        compress_stream(tmp_path / "m", INT4, tmp_path / "out", options=SMALL)
    with pytest.raises(GraphpressError, match="unknown pass|no pass|not-a-pass"):
        compress_stream(tmp_path / "m", {"passes": ["not-a-pass"]}, tmp_path / "out2", options=SMALL)
    gpt2 = tmp_path / "g"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    with pytest.raises(FrontendError, match="gpt2"):
        compress_stream(gpt2, INT4, tmp_path / "out3", options=SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g", "m"]


def test_calibration_token_ids_are_checked(tmp_path):
    _llama(tmp_path / "m")
    with pytest.raises(FrontendError, match=r"token ids must lie in \[0, 256\)"):
        compress_stream(tmp_path / "m", INT4, tmp_path / "out", options=SMALL, calibration=torch.full((2, 8), 999))
