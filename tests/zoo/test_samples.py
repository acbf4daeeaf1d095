"""``compress samples``: real inputs for the shipped models, written atomically, checked before work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from graphpress.cli.main import app
from graphpress.errors import GraphpressError
from graphpress.train import load_inputs
from graphpress.zoo.digits import digits_cnn, digits_data
from graphpress.zoo.paths import stories260k_path
from graphpress.zoo.samples import check_request, make_samples, write_samples

runner = CliRunner()


def test_digits_are_the_training_images(tmp_path):
    path, data = write_samples("digits", tmp_path / "d.npy", n=100)
    assert data.shape == (100, 1, 8, 8) and data.dtype == torch.float32
    back = load_inputs(path)
    assert torch.equal(back, digits_data(0)[0][:100])
    assert abs(float(back.mean())) < 0.2 and 0.8 < float(back.std()) < 1.2  # standardized like the model's training data


def test_photos_are_natural_crops(tmp_path):
    path, data = write_samples("photos", tmp_path / "p.safetensors", n=32, seed=3)
    assert data.shape == (32, 3, 32, 32)
    assert torch.equal(load_inputs(path), data)
    # Natural images: neighbouring pixels are strongly correlated (noise would give ~0).
    a, b = data[..., :, :-1].flatten(), data[..., :, 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
    assert not torch.equal(make_samples("photos", 32, seed=4), data)  # the seed matters


def test_stories_tokens_come_from_the_model(tmp_path):
    if stories260k_path() is None:
        pytest.skip("../shared/models/stories260k/stories260K.bin not found: real pretrained models live in ../shared beside the checkout")
    from graphpress.zoo.llama2c import load_llama2c, next_token_cross_entropy

    path, tokens = write_samples("stories", tmp_path / "s.pt", n=16, seq_len=24)
    assert tokens.shape == (16, 24) and tokens.dtype == torch.int64 and bool((tokens[:, 0] == 1).all())
    assert torch.equal(load_inputs(path), tokens)
    model = load_llama2c(stories260k_path())
    assert int(tokens.max()) < model.args.vocab_size
    # Sampled from the model itself, the sequences are far likelier under it than uniform tokens.
    uniform = torch.randint(0, model.args.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(0))
    assert next_token_cross_entropy(model, tokens) < 0.6 * next_token_cross_entropy(model, uniform)


def test_digits_cnn_checkpoint_is_trained_weights(tmp_path):
    path, state = write_samples("digits-cnn", tmp_path / "w.pt")
    loaded = torch.load(path, weights_only=True)
    model = digits_cnn()
    model.load_state_dict(loaded)
    _, _, x_te, y_te = digits_data()
    with torch.no_grad():
        acc = (model.eval()(x_te).argmax(-1) == y_te).float().mean().item()
    assert acc > 0.95


def test_refusals_before_any_work(tmp_path):
    (tmp_path / "exists.pt").write_bytes(b"mine")
    with pytest.raises(GraphpressError, match="unknown kind 'cifar'; choose one of digits, photos"):
        check_request("cifar", tmp_path / "x.pt")
    with pytest.raises(GraphpressError, match=r"exists; pass --overwrite"):
        write_samples("digits", tmp_path / "exists.pt")
    assert (tmp_path / "exists.pt").read_bytes() == b"mine"  # nothing of the user's is replaced
    with pytest.raises(GraphpressError, match=r"unsupported extension \.npy for digits-cnn"):
        check_request("digits-cnn", tmp_path / "w.npy")
    with pytest.raises(GraphpressError, match="does not exist; create it first"):
        check_request("digits", tmp_path / "nope" / "x.pt")
    with pytest.raises(GraphpressError, match="at least 1"):
        make_samples("photos", 0)


def test_cli_writes_and_reports(tmp_path):
    out = tmp_path / "calib.npy"
    res = runner.invoke(app, ["samples", "digits", "-o", str(out), "-n", "64"])
    assert res.exit_code == 0, res.output
    assert "float32 (64, 1, 8, 8)" in res.output and "--calibration" not in res.output.split("use with")[0]
    assert np.load(out).shape == (64, 1, 8, 8)
    again = runner.invoke(app, ["samples", "digits", "-o", str(out)])
    assert again.exit_code == 2 and "exists; pass --overwrite" in again.output
    assert [p.name for p in tmp_path.iterdir()] == ["calib.npy"]  # no temporary file left behind
