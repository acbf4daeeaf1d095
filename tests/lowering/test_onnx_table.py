"""graphpress.lowering.onnx: one table covers every graphpress:: op, and ir/ holds no target code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import graphpress.ir  # noqa: F401 -- registers every graphpress:: op
from graphpress.lowering.onnx import ONNX_TRANSLATIONS, circulant, translation_table

IR = Path(__file__).resolve().parents[2] / "graphpress" / "ir"


def _graphpress_ops() -> set[str]:
    return {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("graphpress::")}


def test_every_graphpress_op_has_an_onnx_translation():
    ops = _graphpress_ops()
    assert len(ops) >= 12, ops  # linear_act, 2 circulant, 4 quant, 2 load, 2 sparse, sparse_unpack
    table = translation_table()
    assert {op.name() for op in table} == ops
    assert {op.name() for op in ONNX_TRANSLATIONS} == ops
    assert all(callable(fn) for fn in table.values())


def test_tables_are_independent_values():
    """Building a table with another circulant lowering changes neither the default table nor a
    later default build (the lowering used to be a module-global switch)."""
    op = torch.ops.graphpress.circulant_linear.default
    default_fn = ONNX_TRANSLATIONS[op]
    dense = translation_table(circulant_linear="dense")
    assert dense[op] is not default_fn and ONNX_TRANSLATIONS[op] is default_fn
    assert "'dense'" in dense[op].__doc__ and "'auto'" in translation_table()[op].__doc__
    table = translation_table()
    table.clear()  # a caller's copy: the shared default stays whole
    assert len(ONNX_TRANSLATIONS) == len(_graphpress_ops())
    assert not hasattr(circulant, "ONNX_LINEAR_LOWERING") and not hasattr(circulant, "onnx_linear_lowering")


def test_unknown_circulant_lowering_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^circulant ONNX lowering must be one of \('auto', 'dense', 'dft', 'dft-matmul'\), got 'fft'$"):
        translation_table(circulant_linear="fft")


@pytest.mark.parametrize("module", sorted(p.name for p in IR.glob("*.py")))
def test_ir_imports_no_target_library(module):
    """The IR holds only the IR: no ONNX translation, TVM or HE code (issue 16 step 5)."""
    text = (IR / module).read_text()
    hits = re.findall(r"^\s*(?:import|from)\s+(onnxscript|onnx_ir|onnx|onnxruntime|tvm|tenseal)\b", text, flags=re.M)
    assert not hits, f"graphpress/ir/{module} imports {sorted(set(hits))}: target code belongs in graphpress/lowering/ or a backend"
