"""Frontend refusals that name the real cause (issue 15, point 7).

* a checkpoint carrying any pickled callable (os/posix.system, subprocess.*, builtins.*) is
  reported as pickled code, in the zip and the legacy torch.save formats and as a bare pickle;
* NaN / Inf weights are reported at load, naming the tensor, for every frontend;
* ``--input-shape`` that contradicts an ONNX model's declared input is an error;
* a folder that is neither an artifact nor a Hugging Face folder says exactly that.
"""

from __future__ import annotations

import builtins
import os
import pickle
import posix
import struct
import subprocess

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto

from graphpress.errors import FrontendError
from graphpress.frontends import load

ARCH = "tests.frontends.models:small_cnn"
CODE = "refused: the checkpoint contains pickled code or objects"


class Payload:
    """Unpickling this calls ``fn(*args)``: what a malicious checkpoint carries."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


MARKER = "graphpress-payload-ran"
PAYLOADS = {
    "os.system": (os.system, (f"echo {MARKER}",), "posix.system"),
    "posix.system": (posix.system, (f"echo {MARKER}",), "posix.system"),
    "subprocess.Popen": (subprocess.Popen, (["echo", MARKER],), "subprocess.Popen"),
    "subprocess.run": (subprocess.run, (["echo", MARKER],), "subprocess.run"),
    "subprocess.check_output": (subprocess.check_output, (["echo", MARKER],), "subprocess.check_output"),
    "builtins.eval": (builtins.eval, (f"print('{MARKER}')",), "builtins.eval"),
    "builtins.exec": (builtins.exec, (f"print('{MARKER}')",), "builtins.exec"),
    "builtins.print": (builtins.print, (MARKER,), "builtins.print"),
    "builtins.getattr": (builtins.getattr, (MARKER, "upper"), "builtins.getattr"),
    "builtins.__import__": (builtins.__import__, ("os",), "builtins.__import__"),
}


def _save(path, obj, fmt):
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as some tools write .pt files
        path.write_bytes(pickle.dumps(obj, protocol=2 if fmt == "pickle2" else 0))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle2", "pickle0"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_every_pickled_payload_is_reported_as_code(tmp_path, payload, fmt, capfd):
    fn, args, named = PAYLOADS[payload]
    path = tmp_path / "evil.pth"
    _save(path, {"conv.weight": torch.zeros(8, 3, 3, 3), "hook": Payload(fn, args)}, fmt)
    with pytest.raises(FrontendError) as err:
        load(path, arch=ARCH)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {CODE} ({named}")
    assert "corrupt" not in msg and "\n" not in msg
    assert MARKER not in "".join(capfd.readouterr())  # nothing ran
    from graphpress.frontends.checkpoint import pickled_globals

    assert pickled_globals(path)[0] == named


@pytest.mark.parametrize("suffix", [".pt", ".th", ".bin"])
def test_payload_in_other_checkpoint_suffixes(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    torch.save({"w": Payload(posix.system, ("true",))}, path)
    with pytest.raises(FrontendError, match=rf"{CODE} \(posix\.system\)"):
        load(path, arch=ARCH)


def test_hf_pytorch_model_bin_payload(tmp_path):
    pytest.importorskip("transformers")
    from graphpress.zoo.hf_tiny import save_tiny_hf

    folder = tmp_path / "gpt2"
    save_tiny_hf("gpt2", folder)
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload(subprocess.call, (["true"],))}, folder / "pytorch_model.bin")
    with pytest.raises(FrontendError, match=rf"pytorch_model.bin: {CODE} \(subprocess\.call\)"):
        load(folder)


def test_plain_checkpoints_still_load_and_damage_is_still_corrupt(tmp_path, shared_models):
    # an OrderedDict of tensors and plain numbers next to it are data, not code
    from graphpress.frontends.checkpoint import pickled_globals
    from tests.frontends.models import small_cnn

    good = tmp_path / "good.pt"
    torch.save({"state_dict": small_cnn().state_dict(), "best": 0.9, "epoch": 3}, good, _use_new_zipfile_serialization=False)
    assert pickled_globals(good) == []
    assert load(good, arch=ARCH).source["frontend"] == "checkpoint"
    assert pickled_globals(shared_models / "resnet20_cifar10" / "resnet20-12fca82f.th") == []
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(FrontendError, match="trunc.pt: not a readable PyTorch checkpoint"):
        load(bad, arch=ARCH)


# ----------------------------------------------------------------------------- NaN / Inf
def _state_with(value, key="conv.weight"):
    from tests.frontends.models import small_cnn

    sd = small_cnn().state_dict()
    sd[key] = sd[key].clone()
    sd[key].view(-1)[[1, 5]] = value
    return sd


@pytest.mark.parametrize("value, word", [(float("nan"), "2 NaN value"), (float("inf"), "2 Inf value")])
def test_non_finite_checkpoint_weight_is_named_at_load(tmp_path, value, word):
    path = tmp_path / "m.pt"
    torch.save(_state_with(value), path)
    with pytest.raises(FrontendError) as err:
        load(path, arch=ARCH)
    msg = str(err.value)
    assert msg.startswith(f"{path}: weight 'conv.weight' (8, 3, 3, 3) holds {word}")
    assert "re-export" in msg


def test_non_finite_safetensors_and_buffers(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(_state_with(float("nan"), "bn.running_var"), str(path))
    with pytest.raises(FrontendError, match=r"m.safetensors: weight 'bn.running_var' \(8,\) holds 2 NaN"):
        load(path, arch=ARCH)


def test_non_finite_module_and_harmless_inf_mask():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            # an additive causal mask: -inf that softmax turns into exact zeros
            self.register_buffer("mask", torch.full((4, 4), float("-inf")).triu(1))

        def forward(self, x):
            return torch.softmax(self.fc(x) + self.mask, -1)

    m = Masked()
    x = (torch.randn(2, 4, 4),)
    assert load(m, example_inputs=x).name == "Masked"  # Inf that leaves the outputs finite is fine
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    with pytest.raises(FrontendError, match=r"Masked: weight 'fc.weight' \(4, 4\) holds 1 NaN value\(s\) of 16"):
        load(m, example_inputs=x)


def test_non_finite_onnx_initializer(tmp_path):
    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.inf
    graph = oh.make_graph(
        [oh.make_node("MatMul", ["x", "dense.weight"], ["y"])],
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[onnx.numpy_helper.from_array(w, "dense.weight")],
    )
    path = tmp_path / "inf.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8), str(path))
    with pytest.raises(FrontendError, match=rf"{path}: weight 'dense.weight' \(3, 4\) holds 1 Inf value\(s\) and the model's outputs are not finite"):
        load(path)


def test_non_finite_llama2c_weight(tmp_path):
    from graphpress.zoo.llama2c import llama2c_tiny, save_llama2c

    path = tmp_path / "tiny.bin"
    save_llama2c(llama2c_tiny(), path)
    data = bytearray(path.read_bytes())
    data[28:32] = struct.pack("<f", float("nan"))  # first float after the 7-int header: the embedding
    path.write_bytes(bytes(data))
    with pytest.raises(FrontendError, match=r"tiny.bin: weight '[\w.]*embed[\w.]*' .* holds 1 NaN"):
        load(path)


def test_non_finite_hf_folder(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    from graphpress.zoo.hf_tiny import save_tiny_hf

    folder = tmp_path / "gpt2"
    save_tiny_hf("gpt2", folder)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("c_fc.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(FrontendError, match=rf"gpt2: weight '[\w.]*{key.split('.', 1)[1]}' .* holds 1 NaN"):
        load(folder)


# ------------------------------------------------------------------ ONNX --input-shape
def _onnx_file(tmp_path, dims, name="m.onnx"):
    graph = oh.make_graph(
        [oh.make_node("Relu", ["image"], ["y"])],
        "g",
        [oh.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    path = tmp_path / name
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_onnx_input_shape_contradicting_the_file_is_an_error(tmp_path):
    path = _onnx_file(tmp_path, ["N", 3, 32, 32])
    with pytest.raises(FrontendError) as err:
        load(path, input_shape="1x3x28x28")
    assert str(err.value).startswith(
        f"{path}: --input-shape 1x3x28x28 contradicts input 'image' declared as Nx3x32x32 in the file"
    )
    with pytest.raises(FrontendError, match="--input-shape 1x3x32 contradicts input 'image' declared as Nx3x32x32"):
        load(path, input_shape="1x3x32")
    # agreeing shapes are used, the symbolic batch takes the given size
    graph = load(path, input_shape="4x3x32x32")
    assert tuple(graph.example_inputs[0].shape) == (4, 3, 32, 32)


def test_onnx_input_shape_fills_symbolic_non_batch_dims(tmp_path):
    path = _onnx_file(tmp_path, ["N", "seq", 8])
    graph = load(path, input_shape="2x5x8")
    assert tuple(graph.example_inputs[0].shape) == (2, 5, 8)
    with pytest.raises(FrontendError, match="declared as Nxseqx8"):
        load(path, input_shape="2x5x9")


# ------------------------------------------------------------------------------ folders
def test_folder_that_is_neither_artifact_nor_hf(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(FrontendError) as err:
        load(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: folder is neither a graphpress artifact (no manifest.json) nor a Hugging Face model folder (no config.json)"
    )
