"""ResNet-20: architecture, option-A shortcut, export, and the shared pretrained checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from graphpress.errors import FrontendError
from graphpress.zoo.paths import RESNET20_RELPATH, expected_path, resnet20_checkpoint_path
from graphpress.zoo.resnet20 import BasicBlock, ResNet20, load_resnet20, read_resnet20_checkpoint, resnet20

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def pretrained() -> ResNet20:
    if resnet20_checkpoint_path() is None:
        pytest.skip(f"../shared/models/{RESNET20_RELPATH.as_posix()} not found: {expected_path(RESNET20_RELPATH)}")
    return load_resnet20()


def test_factory_shapes_and_parameter_count():
    model = resnet20()
    assert not model.training
    (x,) = model.example_inputs(4)
    assert x.shape == (4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    # He et al. report 0.27M parameters for ResNet-20; option A adds none.
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert resnet20(num_classes=7)(x).shape == (4, 7)


def test_example_inputs_are_deterministic():
    a, b = resnet20().example_inputs(3)[0], resnet20().example_inputs(3)[0]
    assert torch.equal(a, b)
    assert torch.equal(resnet20().example_inputs(2)[0], a[:2])


def test_option_a_shortcut_is_subsample_plus_zero_channels():
    torch.manual_seed(0)
    block = BasicBlock(16, 32, stride=2).eval()
    # Silence the residual branch: bn2 outputs exactly zero, so the block is relu(shortcut).
    with torch.no_grad():
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = torch.randn(2, 16, 8, 8)
    out = block(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], F.relu(x[:, :, ::2, ::2]))
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0
    assert not any("shortcut" in name for name, _ in block.named_parameters())


def test_export_dynamic_batch_random_init():
    model = resnet20()
    ep = torch.export.export(model, model.example_inputs(2), dynamic_shapes=({0: Dim("batch")},))
    (x3,) = model.example_inputs(3)
    torch.testing.assert_close(ep.module()(x3), model(x3), rtol=1e-5, atol=1e-5)


def test_missing_checkpoint_is_a_frontend_error(tmp_path):
    with pytest.raises(FrontendError, match="no such ResNet-20 checkpoint"):
        load_resnet20(tmp_path / "nope.th")


def test_wrong_checkpoint_is_a_frontend_error(tmp_path):
    path = tmp_path / "other.th"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}, "best_prec1": 1.0}, path)
    with pytest.raises(FrontendError, match="not a ResNet-20 checkpoint") as err:
        load_resnet20(path)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- pretrained


def test_checkpoint_keys_match_exactly(pretrained):
    state, _ = read_resnet20_checkpoint()
    model_keys = {k for k in resnet20().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(state) == model_keys


def test_checkpoint_reports_trained_accuracy(pretrained):
    # The README states top-1 91.78 % on the CIFAR-10 test set.
    assert pretrained.best_prec1 == pytest.approx(91.78, abs=0.05)


def test_pretrained_weights_are_trained(pretrained):
    # Fresh BN layers have running_mean 0 / running_var 1; trained ones do not.
    bn = pretrained.layer3[2].bn2
    assert bn.running_mean.abs().max() > 0.05
    assert (bn.running_var - 1).abs().max() > 0.05
    fresh = resnet20()
    assert not torch.allclose(pretrained.conv1.weight, fresh.conv1.weight)


def test_pretrained_outputs_deterministic_and_finite(pretrained):
    (x,) = pretrained.example_inputs(8)
    with torch.no_grad():
        a, b = pretrained(x), pretrained(x)
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    # A second load gives bit-identical outputs.
    with torch.no_grad():
        assert torch.equal(load_resnet20()(x), a)


def test_pretrained_export_dynamic_batch_matches_eager(pretrained):
    ep = torch.export.export(pretrained, pretrained.example_inputs(2), dynamic_shapes=({0: Dim("batch")},))
    (x3,) = pretrained.example_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x3), pretrained(x3), rtol=1e-5, atol=1e-5)
