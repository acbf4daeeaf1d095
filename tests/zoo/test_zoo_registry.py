"""The zoo's registry, factory convention and shared-path helpers."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import graphpress.zoo as zoo
from graphpress.zoo import paths

torch.set_num_threads(2)

HF_NAMES = {"tiny-bert", "tiny-gpt2", "tiny-llama"}


def test_models_registry_names():
    assert set(zoo.MODELS) == {"resnet20", "digits-cnn", "llama2c-tiny", *HF_NAMES}


@pytest.mark.parametrize("name", sorted(zoo.MODELS))
def test_factory_convention(name):
    if name in HF_NAMES:
        pytest.importorskip("transformers", reason="transformers not installed (pip install graphpress[hf])")
    model = zoo.MODELS[name]()
    assert isinstance(model, torch.nn.Module) and not model.training
    inputs = model.example_inputs(2)
    assert isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs)
    assert all(t.shape[0] == 2 for t in inputs)
    again = zoo.MODELS[name]().example_inputs(2)
    assert all(torch.equal(a, b) for a, b in zip(inputs, again))
    with torch.no_grad():
        out = model(*inputs)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "ref", ["graphpress.zoo.resnet20:resnet20", "graphpress.zoo.digits:digits_cnn", "graphpress.zoo.llama2c:llama2c_tiny"]
)
def test_factory_reference_strings_resolve(ref):
    module, func = ref.split(":")
    model = getattr(importlib.import_module(module), func)()
    assert hasattr(model, "example_inputs")


def test_shared_dir_default_is_repo_sibling(monkeypatch):
    monkeypatch.delenv(paths.SHARED_ENV, raising=False)
    repo_root = Path(paths.__file__).resolve().parents[2]
    assert paths.shared_dir() == repo_root.parent / "shared"
    assert paths.shared_models_dir() == repo_root.parent / "shared" / "models"


def test_env_override_and_none_when_absent(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.SHARED_ENV, str(tmp_path))
    assert zoo.resnet20_checkpoint_path() is None
    assert zoo.stories260k_path() is None
    # Placeholder files (not real weights) where the helpers look.
    for rel in (paths.RESNET20_RELPATH, paths.STORIES260K_RELPATH):
        (tmp_path / "models" / rel).parent.mkdir(parents=True)
        (tmp_path / "models" / rel).write_bytes(b"x")
    assert zoo.resnet20_checkpoint_path() == tmp_path / "models" / paths.RESNET20_RELPATH
    assert zoo.stories260k_path() == tmp_path / "models" / paths.STORIES260K_RELPATH


def test_pretrained_loaders_fail_clearly_when_shared_is_absent(monkeypatch, tmp_path):
    from graphpress.errors import FrontendError

    monkeypatch.setenv(paths.SHARED_ENV, str(tmp_path))
    for _name, loader in zoo.PRETRAINED.items():
        with pytest.raises(FrontendError, match="GRAPHPRESS_SHARED"):
            loader()
