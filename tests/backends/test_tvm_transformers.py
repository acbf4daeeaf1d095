"""tvm backend on transformers decoders, and the importer fix-ups (graphpress/backends/tvm/fixups.py).

Llama and GPT-2 from config build and match the graph with their dynamic dims kept symbolic;
each importer gap breaks the build of a small module, and its fix-up repairs it with torch's
exact values and dtypes; modules without the gaps pass through untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm", reason='apache-tvm not installed (pip install -e ".[tvm]")')

from tvm.relax.frontend.torch import from_exported_program

from graphpress.backends import get_backend
from graphpress.backends.tvm.fixups import (
    BOOL_UINT8,
    SCAN_INT64,
    SHAPE_BOUNDS,
    SLICE_AXIS,
    SLICE_INBOUND,
    apply_fixups,
)
from graphpress.ir.graph import Graph

BATCH, BATCH_SEQ = {0: "batch"}, {0: "batch", 1: "seq"}


def _build(mod):
    return tvm.relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())["main"]


def _outputs(main, *inputs: torch.Tensor) -> list[np.ndarray]:
    out = main(*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    return [out[i].numpy() for i in range(len(out))]


def _assert_same_as_torch(model: nn.Module, main, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        ref = model(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    got = _outputs(main, *inputs)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.dtype == r.numpy().dtype  # torch's dtype, e.g. int64 counts from a bool cumsum
        np.testing.assert_array_equal(g, r.numpy())


def _lower_and_compare(name: str, factory, dims, shapes, tmp_path):
    model = factory()
    g = Graph.capture(model.eval(), (torch.randint(0, 100, (2, 16)),), name=name, dynamic_dims=dims)
    assert g.dynamic_dims == dims
    lowered = get_backend("tvm").lower(g, tmp_path / name)
    assert lowered.check["passed"] and lowered.check["worst"]["max_abs"] <= 1e-4
    runner = get_backend("tvm").runner(tmp_path / name / "model.so")
    gen = torch.Generator().manual_seed(0)
    for batch, seq in shapes:  # the dynamic dims stay symbolic in the library
        ids = torch.randint(0, 1000, (batch, seq), generator=gen)
        out = runner(ids)[0]
        assert out.shape == (batch, seq, 1000)
        np.testing.assert_allclose(out, g.run(ids)[0].numpy(), rtol=1e-4, atol=1e-5)
    return lowered


def test_llama_from_config_builds_and_matches_the_graph(tmp_path):
    pytest.importorskip("transformers")
    from graphpress.zoo.hf_tiny import tiny_llama

    lowered = _lower_and_compare("llama", tiny_llama, BATCH, [(1, 16), (3, 16)], tmp_path)
    assert lowered.info["fixups"] == [f"{SCAN_INT64} x1", f"{SLICE_AXIS} x2"]


def test_gpt2_with_dynamic_batch_and_sequence_builds_and_matches(tmp_path):
    pytest.importorskip("transformers")
    from graphpress.zoo.hf_tiny import tiny_gpt2

    # Dynamic batch and sequence, as the Hugging Face frontend captures: gap 3 appears too.
    lowered = _lower_and_compare("gpt2", tiny_gpt2, BATCH_SEQ, [(1, 5), (3, 24)], tmp_path)
    assert lowered.info["fixups"] == [f"{SCAN_INT64} x1", f"{SLICE_AXIS} x2", f"{SLICE_INBOUND} x3"]


class DiffLastDim(nn.Module):  # gap 1: diff decomposes into slice(dim=-1)
    def forward(self, x):
        return torch.diff(x, dim=-1)


class BoolCumsum(nn.Module):  # gap 2: torch counts in int64
    def forward(self, x):
        return (x > 0).cumsum(-1)


class PrependDiffCumsum(nn.Module):  # gap 3: x[:, :1] has shape min(1, seq) without seq's bound
    def forward(self, x):
        return torch.diff(x, dim=1, prepend=x[:, :1]).cumsum(1)


class PositionTable(nn.Module):  # gap 4: BERT's positions, reshaped to min(seq, 128)
    def __init__(self):
        super().__init__()
        self.register_buffer("positions", torch.arange(128)[None])
        self.embed = nn.Embedding(128, 4)

    def forward(self, x):
        return x + self.embed(self.positions[:, : x.shape[1]])


class BoolOps(nn.Module):  # gap 5: no LLVM bool path; add is OR, multiply AND
    def forward(self, x, y):
        a, b = x > 0, y > 0
        return a == b, a != b, a < b, a >= b, torch.maximum(a, b), torch.minimum(a, b), a + b, a * b


def _ints(n):
    return lambda batch, seq, gen: tuple(torch.randint(-3, 4, (batch, seq), generator=gen) for _ in range(n))


def _floats(batch, seq, gen):
    return (torch.randn(batch, seq, 4, generator=gen),)


GAPS = [
    (DiffLastDim, _ints(1), BATCH, r"axis < src_tensor_dim \(-1 vs\. 2\)", [f"{SLICE_AXIS} x2"]),
    (BoolCumsum, _ints(1), BATCH, r"MatchesCode\(DLDataTypeCode::kDLFloat\)", [f"{SCAN_INT64} x1"]),
    (PrependDiffCumsum, _ints(1), BATCH_SEQ, "non-symbolic shape is not supported", [f"{SLICE_INBOUND} x3"]),
    (PositionTable, _floats, BATCH_SEQ, "CodeGenVM cannot emit this Relax operator", [f"{SHAPE_BOUNDS} x2", f"{SLICE_INBOUND} x1"]),
    (BoolOps, _ints(2), BATCH_SEQ, r"fcmp o\w+ i1|MatchesCode\(DLDataTypeCode::kDLFloat\)", [f"{BOOL_UINT8} x8"]),
]


@pytest.mark.parametrize(("module", "inputs", "dims", "failure", "fixups"), GAPS, ids=[gap[0].__name__ for gap in GAPS])
def test_each_importer_gap_breaks_the_build_and_its_fixup_repairs_it_exactly(module, inputs, dims, failure, fixups):
    torch.manual_seed(0)
    model = module().eval()
    gen = torch.Generator().manual_seed(0)
    mod = from_exported_program(Graph.capture(model, inputs(2, 8, gen), name=module.__name__, dynamic_dims=dims).export_program())
    with pytest.raises(Exception, match=failure):
        _build(mod)
    fixed, applied = apply_fixups(mod)
    assert applied == fixups
    main = _build(fixed)
    for batch, seq in ((1, 8), (3, 8)) if dims == BATCH else ((1, 5), (3, 11)):
        _assert_same_as_torch(model, main, inputs(batch, seq, gen))


class NoGaps(nn.Module):
    def forward(self, x):
        a = x > 0
        return (x[:, 1:].cumsum(1),  # non-negative axis; end 2**63-1 not provably in bounds; int64 cumsum
                a.cumsum(1, dtype=torch.int32),  # the call gives a dtype: the importer keeps it
                x.float().cumsum(-1),  # float scan (a negative scan axis builds)
                x[:, :-1],  # negative end: not provably in bounds
                a & (x < 3))  # bool bitwise op: has an LLVM path


def test_modules_without_the_gaps_pass_through_untouched():
    model = NoGaps().eval()
    g = Graph.capture(model, (torch.randint(-3, 4, (2, 8)),), name="no_gaps", dynamic_dims=BATCH_SEQ)
    mod = from_exported_program(g.export_program())
    fixed, applied = apply_fixups(mod)
    assert applied == [] and fixed is mod
    main = _build(fixed)
    for batch, seq in ((1, 5), (3, 11)):
        _assert_same_as_torch(model, main, (torch.randint(-3, 4, (batch, seq)),))


def test_bert_with_dynamic_sequence_runs_without_upper_bound_buffers(tmp_path):
    pytest.importorskip("transformers")
    from graphpress.zoo.hf_tiny import tiny_bert

    # The export bounds the batch at 65536; lowering drops that bound so TVM's memory planner does
    # not reserve 65536 x seq buffers (before: std::bad_alloc on the first call).
    lowered = _lower_and_compare("bert", tiny_bert, BATCH_SEQ, [(1, 16), (3, 7)], tmp_path)
    assert lowered.check["passed"]
