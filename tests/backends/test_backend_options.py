"""Backend options are frozen dataclasses built from dicts with the pass configs' one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from graphpress.backends import available_backends, backend_options, backend_options_class, get_backend
from graphpress.config import config_to_dict
from graphpress.errors import BackendError


@pytest.mark.parametrize("name", ["onnxruntime", "torch", "tvm", "he"])
def test_every_backend_has_frozen_versioned_options(name):
    cls = backend_options_class(name)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    opts = cls()
    assert opts.version == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.version = 2  # type: ignore[misc]
    # dict round trip: what the manifest stores builds the same options again
    assert backend_options(name, config_to_dict(opts)) == opts


def test_registry_covers_every_backend():
    assert sorted(available_backends()) == ["he", "onnxruntime", "torch", "tvm"]
    for name in available_backends():
        backend_options_class(name)


def test_values_are_typed_and_coerced():
    opts = backend_options("he", {"encoding": "coeff-dense", "act_bits": 6, "percentile": 99, "check_seeds": [0, 3]})
    assert (opts.encoding, opts.act_bits, opts.percentile, opts.check_seeds) == ("coeff-dense", 6, 99.0, (0, 3))
    assert isinstance(opts.percentile, float)
    assert backend_options("tvm", {"tuning_db": Path("/some/artifact")}).tuning_db == "/some/artifact"


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("he", {"encodng": "coeff-dense"}, "backend 'he': unknown option 'encodng': did you mean 'encoding'?"),
        ("tvm", {"tune_trails": 8}, "backend 'tvm': unknown option 'tune_trails': did you mean 'tune_trials'?"),
        ("onnxruntime", {"zzz": 1}, "backend 'onnxruntime': unknown option 'zzz': valid options: version, opset, optimize, check_seeds"),
        ("he", {"act_bits": "eight"}, "backend 'he': option 'act_bits': expected an integer, got 'eight'"),
        ("onnxruntime", {"optimize": "yes"}, "backend 'onnxruntime': option 'optimize': expected true/false, got 'yes'"),
        ("torch", {"version": 2}, "backend 'torch': config version 2 is newer than this graphpress supports (1); upgrade graphpress"),
        ("onnxrt", {}, "unknown backend 'onnxrt'; did you mean 'onnxruntime'? known backends: he, onnxruntime, torch, tvm"),
    ],
)
def test_bad_options_are_one_line(name, options, message):
    with pytest.raises(BackendError) as err:
        backend_options(name, options)
    assert str(err.value) == message


def test_get_backend_validates_then_constructs():
    be = get_backend("onnxruntime", opset=20, optimize=True)
    assert be.options == backend_options("onnxruntime", {"opset": 20, "optimize": True})
    assert (be.opset, be.optimize) == (20, True)
    with pytest.raises(BackendError, match="unknown option 'opsett': did you mean 'opset'"):
        get_backend("onnxruntime", opsett=20)
    # a well-typed value the backend refuses is still the backend's own one-line error
    with pytest.raises(BackendError, match="opset 12 is not supported"):
        get_backend("onnxruntime", opset=12)


def test_directly_constructed_backends_carry_their_options():
    from graphpress.backends.torch import TorchBackend

    assert TorchBackend(check_seeds=[5]).options == backend_options("torch", {"check_seeds": [5]})


def test_options_modules_import_without_torch():
    """Options are validated before any work: their modules need neither torch nor a compiler."""
    code = (
        "import sys\n"
        "import graphpress.backends.he.options, graphpress.backends.tvm.options\n"
        "assert 'torch' not in sys.modules and 'tenseal' not in sys.modules and 'tvm' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
