"""The compress CLI end to end: real checkpoints, artifacts, and one-line errors for bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from graphpress.cli.main import app
from graphpress.runtime import load as load_artifact

runner = CliRunner()
ARCH = "tests.frontends.models:small_cnn"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def cli_subprocess(*args, cwd=None):
    """Run the real console entry point, as a user would."""
    return subprocess.run(
        [sys.executable, "-c", "from graphpress.cli.main import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_resnet20_fold_batchnorm_artifact(shared_models, tmp_path):
    from graphpress.zoo.resnet20 import load_resnet20

    ckpt = shared_models / "resnet20_cifar10" / "resnet20-12fca82f.th"
    recipe = tmp_path / "fold.yaml"
    recipe.write_text("name: fold\npasses: [fold-batchnorm]\n")
    out = tmp_path / "art"
    res = invoke("run", ckpt, "--arch", "graphpress.zoo.resnet20:resnet20", "--recipe", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    assert "torch eager (original)" in res.output and "onnxruntime (compressed)" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"][0]["name"] == "fold-batchnorm" and manifest["passes"][0]["stats"]["folded"] == 19
    assert set(manifest["metrics"]["latency_ms"]) == {"torch eager (original)", "onnxruntime (original)", "onnxruntime (compressed)"}
    # 64 inputs: the artifact matches the original pretrained model
    model = load_resnet20(ckpt)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = load_artifact(out)(x.numpy())[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    assert "batch_norm" not in " ".join(n.op_type for n in __import__("onnx").load(str(out / "model.onnx")).graph.node).lower()


def test_stories260k_logits_artifact(shared_models, tmp_path):
    from graphpress.zoo.llama2c import load_llama2c, sample

    path = shared_models / "stories260k" / "stories260K.bin"
    out = tmp_path / "llama"
    res = invoke("run", path, "-o", out, "--no-baseline")
    assert res.exit_code == 0, res.output
    model = load_llama2c(path)
    tokens = sample(model, 4, 24, seed=3)
    got = load_artifact(out)(tokens.numpy())[0]
    with torch.no_grad():
        want = model(tokens).numpy()
    assert got.shape == (4, 24, 512)
    assert np.abs(got - want).max() < 1e-4
    # compress bench fills the 'seq' dim from the example shape, or from --dim
    res = invoke("bench", out, "--repeat", "3")
    assert res.exit_code == 0, res.output
    seq = json.loads((out / "manifest.json").read_text())["example_shapes"]["tokens"][1]
    assert f"tokens (1, {seq})" in res.output and "median ms" in res.output
    res = invoke("bench", out, "--repeat", "3", "--batch", "2", "--dim", "seq=7")
    assert res.exit_code == 0, res.output
    assert "tokens (2, 7)" in res.output


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_hf_folder_artifact(tmp_path, name):
    pytest.importorskip("transformers")
    from graphpress.frontends.huggingface import build_hf_model
    from graphpress.zoo.hf_tiny import save_tiny_hf, wrap_hf_model

    folder = tmp_path / name
    save_tiny_hf(name, folder)
    out = tmp_path / "art"
    res = invoke("run", folder, "-o", out, "--no-bench")
    assert res.exit_code == 0, res.output
    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = wrap_hf_model(build_hf_model(folder))(ids).numpy()
    got = load_artifact(out)(ids.numpy())[0]
    assert np.abs(got - want).max() < 1e-4


def test_onnx_round_trip(shared_models, tmp_path):
    from graphpress.zoo.resnet20 import load_resnet20

    model = load_resnet20(shared_models / "resnet20_cifar10" / "resnet20-12fca82f.th")
    onnx_path = tmp_path / "resnet20.onnx"
    batch = torch.export.Dim("batch")
    torch.onnx.export(model, (torch.randn(2, 3, 32, 32),), str(onnx_path), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    out = tmp_path / "art"
    res = invoke("run", onnx_path, "-o", out, "--no-bench")
    assert res.exit_code == 0, res.output
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = load_artifact(out)(x.numpy())[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_passes_and_inspect_and_bench(tmp_path):
    res = invoke("passes")
    assert res.exit_code == 0
    for name in ("fold-batchnorm", "fuse-linear-activation", "eliminate-dead-code", "fold-constants"):
        assert name in res.output
    res = invoke("inspect", ARCH)
    assert res.exit_code == 0 and "aten.conv2d" in res.output and "FLOPs" in res.output
    res = invoke("inspect", ARCH, "--json")
    data = json.loads(res.output)
    conv = next(layer for layer in data["layers"] if layer["op"] == "aten.conv2d")
    assert conv["flops"] == 2 * (2 * 8 * 16 * 16) * 27
    out = tmp_path / "art"
    assert invoke("run", ARCH, "-o", out, "--no-bench").exit_code == 0
    res = invoke("inspect", out)
    assert res.exit_code == 0 and "model.onnx" in res.output
    res = invoke("bench", out, "--batch", "3", "--repeat", "5")
    assert res.exit_code == 0 and "median ms" in res.output


def test_demo(tmp_path):
    res = invoke("demo", "-o", tmp_path / "demo")
    assert res.exit_code == 0, res.output
    assert "torch fp32, before" in res.output and "artifact, after" in res.output
    accs = [float(line.split("│")[-2].strip().rstrip("%")) for line in res.output.splitlines() if "before" in line and "%" in line or "after" in line and "%" in line]
    assert len(accs) == 2 and accs[0] > 95 and abs(accs[0] - accs[1]) < 0.5


# ------------------------------------------------------------------ bad input: one line, exit != 0
@pytest.fixture
def good_ckpt(tmp_path):
    from tests.frontends.models import small_cnn

    path = tmp_path / "good.pt"
    torch.save(small_cnn().state_dict(), path)
    return path


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_cases(tmp_path, good_ckpt):
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good_ckpt.read_bytes()[:300])
    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, evil)
    wrong = tmp_path / "wrong.pt"
    torch.save({"linear.weight": torch.zeros(2, 2)}, wrong)
    bad_pass = tmp_path / "bad_pass.yaml"
    bad_pass.write_text("passes: [fold-batchnrom]\n")
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("passes:\n  - fuse-linear-activation: {activatons: [relu]}\n")
    exists = tmp_path / "exists"
    exists.mkdir()
    (exists / "mine.txt").write_text("user data")
    out = tmp_path / "out"
    return {
        "missing file": (["run", tmp_path / "nope.pt", "--arch", ARCH, "-o", out], "nope.pt: file not found"),
        "truncated checkpoint": (["run", trunc, "--arch", ARCH, "-o", out], "not a readable PyTorch checkpoint"),
        "pickled code": (["run", evil, "--arch", ARCH, "-o", out], "refused: the checkpoint contains pickled code"),
        "keys mismatch": (["run", wrong, "--arch", ARCH, "-o", out], "weights do not match architecture"),
        "unknown pass": (["run", good_ckpt, "--arch", ARCH, "-r", bad_pass, "-o", out], "did you mean 'fold-batchnorm'"),
        "misspelled key": (["run", good_ckpt, "--arch", ARCH, "-r", bad_key, "-o", out], "unknown option 'activatons'"),
        "output exists": (["run", good_ckpt, "--arch", ARCH, "-o", exists], "exists; pass --overwrite"),
        "not ours even with overwrite": (["run", good_ckpt, "--arch", ARCH, "-o", exists, "--overwrite"], "refusing to replace it"),
        "unknown backend": (["run", good_ckpt, "--arch", ARCH, "-b", "tensorrt", "-o", out], "unknown backend 'tensorrt'"),
    }


CASES = [
    "missing file",
    "truncated checkpoint",
    "pickled code",
    "keys mismatch",
    "unknown pass",
    "misspelled key",
    "output exists",
    "not ours even with overwrite",
    "unknown backend",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line(tmp_path, good_ckpt, case):
    args, expected = _bad_cases(tmp_path, good_ckpt)[case]
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error:") and expected in lines[0]
    assert "Traceback" not in res.output and "pwned" not in res.output
    assert (tmp_path / "exists" / "mine.txt").read_text() == "user data"
    assert not (tmp_path / "out").exists()


def test_bad_input_real_process_has_no_traceback(tmp_path, good_ckpt):
    """The console entry point itself: stderr is one line, exit code 2."""
    proc = cli_subprocess("run", tmp_path / "missing.th", "--arch", ARCH, "-o", tmp_path / "o", cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing.th: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_overwrite_replaces_own_artifact(tmp_path):
    out = tmp_path / "art"
    assert invoke("run", ARCH, "-o", out, "--no-bench").exit_code == 0
    first = json.loads((out / "manifest.json").read_text())["created"]
    assert runner.invoke(app, ["run", ARCH, "-o", str(out), "--no-bench"]).exit_code == 2
    assert invoke("run", ARCH, "-o", out, "--no-bench", "--overwrite").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["created"] >= first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".art.tmp")]


def test_circulant_search_recipe_artifact_reproduces(tmp_path):
    """compress run with circulant-search: the artifact reloads and reproduces the compressed graph."""
    from graphpress.frontends import load
    from graphpress.passes import Pipeline

    recipe = tmp_path / "circ.yaml"
    recipe.write_text(
        "name: circ\npasses:\n  - fold-batchnorm\n"
        "  - circulant-search: {budget: 'uniform:4', cost_model: he-analytic, min_sqnr_db: -100}\n"
    )
    out = tmp_path / "art"
    res = invoke("run", "tests.frontends.models:wide_cnn", "-r", recipe, "-o", out, "--no-bench")
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    search = manifest["passes"][1]
    assert search["name"] == "circulant-search" and search["changed"]
    assert search["stats"]["cost"] <= search["stats"]["budget"]["value"] + 1e-9
    assert manifest["metrics"]["params_after"] < manifest["metrics"]["params_before"]
    expected = Pipeline.from_recipe(recipe).run(load("tests.frontends.models:wide_cnn")).graph
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = load_artifact(out)(x.numpy())[0]
    np.testing.assert_allclose(got, expected.run(x)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_finetune_option_recovers(tmp_path):
    """--finetune-data trains only the compact vectors and is recorded in the manifest."""
    recipe = tmp_path / "circ.yaml"
    recipe.write_text("name: circ\npasses:\n  - fold-batchnorm\n  - block-circulant: {block_size: 8, min_sqnr_db: -100}\n")
    data = tmp_path / "x.pt"
    torch.save(torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(0)), data)
    out = tmp_path / "art"
    res = invoke("run", "tests.frontends.models:wide_cnn", "-r", recipe, "-o", out, "--no-bench", "--finetune-data", data, "--finetune-epochs", "3")
    assert res.exit_code == 0, res.output
    ft = json.loads((out / "manifest.json").read_text())["finetune"]
    assert ft["trained"] and all("circ" in t or "bias" in t or "fold" in t for t in ft["trained"])
    assert ft["best_val_loss"] <= ft["initial_val_loss"]


def test_finetune_after_prune_channels(tmp_path):
    """docs/passes/prune-channels.md's route: prune channels, then --finetune-data (auto: all weights)."""
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("name: prune\npasses:\n  - fold-batchnorm\n  - prune-channels: {sparsity: 0.5}\n")
    data = tmp_path / "x.pt"
    torch.save(torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(0)), data)
    out = tmp_path / "art"
    args = ["run", "tests.frontends.models:wide_cnn", "-r", recipe, "--no-bench", "--finetune-data", data, "--finetune-epochs", "3"]
    res = invoke(*args, "-o", out)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    ft = manifest["finetune"]
    assert ft["trainable"] == "all" and ft["params_trained"] == manifest["metrics"]["params_after"]
    assert ft["best_val_loss"] <= ft["initial_val_loss"]
    assert f"fine-tuned {ft['params_trained']:,} weights" in res.output
    # asking for annotated tensors only names the option that fixes it
    res = runner.invoke(app, [str(a) for a in (*args, "--finetune-trainable", "annotated", "-o", tmp_path / "art2")])
    assert res.exit_code == 2 and "--finetune-trainable all" in res.output
