"""Frontends: checkpoints, safetensors, factories and the dispatcher, with their one-line errors."""

import pickle

import pytest
import torch
import torch.nn as nn

from graphpress.errors import FrontendError
from graphpress.frontends import load, parse_shape
from graphpress.frontends.state_dict import strip_prefixes

ARCH = "tests.frontends.models:small_cnn"


def small_cnn():
    from tests.frontends.models import small_cnn as f

    return f()


@pytest.fixture
def trained_state():
    torch.manual_seed(0)
    m = small_cnn()
    for p in m.parameters():
        p.data.normal_()
    return m, m.state_dict()


def _check_same(graph, module):
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(graph.run(x)[0], module.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["flat", "nested", "module-prefix", "nested-module-prefix"])
def test_checkpoint_layouts(tmp_path, trained_state, layout):
    m, sd = trained_state
    if "prefix" in layout:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "best_prec1": 90.0, "epoch": 3} if "nested" in layout else sd
    path = tmp_path / "m.th"
    torch.save(obj, path)
    g = load(path, arch=ARCH)
    assert g.source["frontend"] == "checkpoint"
    _check_same(g, m)


def test_safetensors(tmp_path, trained_state):
    from safetensors.torch import save_file

    m, sd = trained_state
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _check_same(load(path, arch=ARCH), m)


def test_factory_spec_and_input_shape():
    g = load("tests.frontends.models:small_cnn", input_shape="1x3x16x16")
    assert g.input_specs[0].shape == ("batch", 3, 16, 16)
    assert parse_shape("2,3,4") == (2, 3, 4)
    with pytest.raises(FrontendError, match="expected integers"):
        parse_shape("2xAx4")


def test_nn_module_with_example_inputs_method():
    class WithExamples(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

        def example_inputs(self, batch=2):
            return (torch.ones(batch, 3),)

    g = load(WithExamples())
    assert g.example_inputs[0].shape == (2, 3)


def test_strip_prefixes():
    assert strip_prefixes({"module._orig_mod.a": 1, "module._orig_mod.b": 2}) == {"a": 1, "b": 2}
    # not every key prefixed: left alone
    assert strip_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "file not found"),
        (lambda p: p.write_bytes(b"not a zip at all"), "not a readable PyTorch checkpoint"),
        (lambda p: torch.save({"w": Evil()}, p), "refused: the checkpoint contains pickled code"),
        (lambda p: p.write_bytes(pickle.dumps(Evil())), "refused|not a readable"),
    ],
)
def test_bad_checkpoints_one_line(tmp_path, make, match, capsys):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(FrontendError, match=match) as err:
        load(path, arch=ARCH)
    assert "\n" not in str(err.value) and "bad.pt" in str(err.value)
    assert "pwned" not in capsys.readouterr().out  # nothing was executed


def test_truncated_checkpoint(tmp_path, trained_state):
    _, sd = trained_state
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FrontendError, match="trunc.pt: not a readable PyTorch checkpoint"):
        load(bad, arch=ARCH)


def test_truncated_safetensors(tmp_path, trained_state):
    from safetensors.torch import save_file

    _, sd = trained_state
    good = tmp_path / "good.safetensors"
    save_file(dict(sd), str(good))
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(FrontendError, match="trunc.safetensors: not a valid safetensors file"):
        load(bad, arch=ARCH)


def test_keys_that_do_not_match(tmp_path, trained_state):
    _, sd = trained_state
    sd = dict(sd)
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc.bias"]
    sd["conv.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    with pytest.raises(FrontendError) as err:
        load(path, arch=ARCH)
    msg = str(err.value)
    assert "weights do not match architecture" in msg
    assert "1 missing key(s) (e.g. fc.bias)" in msg and "1 unexpected key(s) (e.g. extra.weight)" in msg
    assert "conv.weight: file (5, 3, 3, 3) vs model (8, 3, 3, 3)" in msg


@pytest.mark.parametrize(
    "arch, match",
    [
        ("no_such_pkg.mod:f", "cannot import module 'no_such_pkg.mod'"),
        ("tests.frontends.models:nope", "has no attribute 'nope'"),
        ("tests.frontends.models", "expected 'package.module:factory'"),
        ("tests.frontends.models:not_a_module", "not an nn.Module"),
    ],
)
def test_bad_arch(tmp_path, trained_state, arch, match):
    path = tmp_path / "m.pt"
    torch.save(trained_state[1], path)
    with pytest.raises(FrontendError, match=match):
        load(path, arch=arch)


def test_dispatcher_errors(tmp_path):
    (tmp_path / "x.xyz").write_text("hi")
    with pytest.raises(FrontendError, match="unknown model format '.xyz'"):
        load(tmp_path / "x.xyz")
    with pytest.raises(FrontendError, match="no config.json"):
        load(tmp_path)
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text("{}")
    with pytest.raises(FrontendError, match="is a graphpress artifact"):
        load(art)
    ckpt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    with pytest.raises(FrontendError, match="pass --arch"):
        load(ckpt)
