"""tvm backend (untuned LLVM build): compiled libraries match the graph, run through the artifact
runtime without torch, keep the dynamic batch, and refuse graphpress ops in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tvm", reason='apache-tvm not installed (pip install -e ".[tvm]")')

from graphpress.backends import get_backend
from graphpress.errors import BackendError
from graphpress.ir.graph import Graph


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = h + F.max_pool2d(h, 3, 1, 1)  # a residual join
        return self.fc(h.mean((2, 3)))


def test_mlp_and_cnn_build_and_match_the_graph(tmp_path):
    torch.manual_seed(0)
    for name, model, x in (("mlp", nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)), torch.randn(2, 32)),
                           ("cnn", SmallCNN(), torch.randn(2, 3, 8, 8))):
        g = Graph.capture(model.eval(), (x,), name=name)
        lowered = get_backend("tvm").lower(g, tmp_path / name)
        assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
        assert lowered.files == ["model.so", "model.json", "model.relax.json"] and lowered.info["target"]["kind"] == "llvm"
        meta = json.loads((tmp_path / name / "model.json").read_text())
        assert meta["inputs"] == list(g.input_names) and meta["outputs"] == list(g.output_names)
        runner = get_backend("tvm").runner(tmp_path / name / "model.so")
        for batch in (1, 5):  # the batch stays symbolic
            xb = torch.randn(batch, *x.shape[1:])
            out = runner(xb.numpy())[0]
            assert out.shape[0] == batch
            np.testing.assert_allclose(out, g.run(xb)[0].numpy(), rtol=1e-4, atol=1e-5)


def test_graphpress_ops_are_expanded_and_a_computed_weight_is_refused_in_one_line(tmp_path):
    import graphpress.passes.quant  # noqa: F401 -- registers quantize-layerwise
    from graphpress.passes.base import make_pass

    g = Graph.capture(nn.Sequential(nn.Linear(32, 32)).eval(), (torch.randn(2, 32),), name="q")
    g.calibration = [(torch.randn(64, 32),)]
    q = make_pass("quantize-layerwise", {"bits": [4], "target_bits": 4, "activations": "none"})(g).graph
    lowered = get_backend("tvm").lower(q, tmp_path / "q")  # 4-bit weight dequantized to a float constant
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
    assert list(lowered.info["expanded_ops"]) == ["graphpress.wlinear_nbits"] and "32x32 float32" in lowered.info["expanded_ops"]["graphpress.wlinear_nbits"]

    class ComputedWeight(nn.Module):  # the compact circulant weight is computed in the graph, not stored
        def __init__(self):
            super().__init__()
            self.c = nn.Parameter(torch.randn(2, 2, 4))

        def forward(self, x):
            return torch.ops.graphpress.circulant_linear(x, self.c * 2, None)

    c = Graph.capture(ComputedWeight().eval(), (torch.randn(2, 8),), name="c")
    with pytest.raises(BackendError, match=r"^tvm: 'c': graphpress\.circulant_linear node '\w+': its compact weight c is not a constant") as err:
        get_backend("tvm").lower(c, tmp_path / "c")
    assert "\n" not in str(err.value)


def test_bad_target_and_missing_metadata(tmp_path):
    with pytest.raises(BackendError, match="target must be a dict"):
        get_backend("tvm", target="llvm")
    g = Graph.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(2, 4),), name="m")
    get_backend("tvm").lower(g, tmp_path / "m", check=False)
    (tmp_path / "m" / "model.json").unlink()
    with pytest.raises(BackendError, match="model.json: cannot read the TVM artifact's metadata"):
        get_backend("tvm").runner(tmp_path / "m" / "model.so")


def test_transformers_bert_from_config_builds_and_matches(tmp_path):
    pytest.importorskip("transformers")
    from graphpress.zoo.hf_tiny import tiny_bert

    ids = torch.randint(0, 100, (2, 16))
    g = Graph.capture(tiny_bert().eval(), (ids,), name="bert")
    lowered = get_backend("tvm").lower(g, tmp_path / "bert")
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4


def test_cuda_build_only_without_a_gpu(tmp_path):
    import shutil

    import tvm

    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: TVM cannot compile its generated CUDA code here")
    torch.manual_seed(0)
    for name, model, x in (("mlp", nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10)), torch.randn(2, 32)),
                           ("cnn", SmallCNN(), torch.randn(2, 3, 8, 8))):
        g = Graph.capture(model.eval(), (x,), name=name)
        lowered = get_backend("tvm", target={"kind": "cuda", "arch": "sm_80"}).lower(g, tmp_path / name)
        # dlight scheduled every kernel (an unscheduled GPU kernel fails the build), nvcc compiled them
        assert lowered.info["cuda"]["kernels"] >= 2 and lowered.info["cuda"]["source_chars"] > 1000
        assert (tmp_path / name / "model.so").stat().st_size > 0
        if tvm.runtime.enabled("cuda") and tvm.cuda(0).exist:
            assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
        else:
            assert lowered.check["skipped"] and "no CUDA device" in lowered.check["reason"]
            with pytest.raises(BackendError, match="built for CUDA, but this machine has no CUDA device"):
                get_backend("tvm").runner(tmp_path / name / "model.so")
    with pytest.raises(BackendError, match="target kind 'rocm' is not supported"):
        get_backend("tvm", target={"kind": "rocm"})
    with pytest.raises(BackendError, match="tuning is supported for llvm targets only"):
        get_backend("tvm", target={"kind": "cuda"}, tune_trials=8)
