"""ir/opsets.py is the one vocabulary of op families; passes and backends define none of their own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from graphpress.ir import opsets

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[2] / "graphpress"
FAMILIES = {name: getattr(opsets, name) for name in opsets.__all__}


def test_every_family_is_a_frozenset_of_aten_ops():
    assert len(FAMILIES) >= 30
    for name, family in FAMILIES.items():
        assert isinstance(family, frozenset), name
        assert family, name
        for op in family:
            if name.endswith("_OVERLOADS"):
                assert isinstance(op, torch._ops.OpOverload), (name, op)
            else:
                assert isinstance(op, torch._ops.OpOverloadPacket), (name, op)
            assert str(op).startswith("aten."), (name, op)


@pytest.mark.parametrize("a, b", [
    ("CONV_ANY", "CONV_TRANSPOSED"), ("CONV_ANY", "LINEAR_LIKE"), ("LINEAR_LIKE", "BATCHED_MATMUL"),
    ("BATCH_NORM", "LAST_DIM_NORM"), ("RESHAPE", "COPY"), ("RESHAPE", "ACTIVATION"),
    ("ZERO_SAFE_UNARY", "NONZERO_UNARY"), ("JOIN", "RESHAPE"), ("POOLING", "POOLING_TUPLE"), ("SIZED_RESHAPE", "SPLIT"), ("ATTENTION", "BATCHED_MATMUL"),
    ("SOFTMAX", "ACTIVATION"), ("SHAPE_QUERY", "RESHAPE"),
])
def test_families_that_must_be_disjoint_are(a, b):
    # the prune dependency dispatch tests these one after the other: an op in two would take the first branch only
    assert not FAMILIES[a] & FAMILIES[b], (a, b, FAMILIES[a] & FAMILIES[b])


def test_nested_families_contain_their_parts():
    assert opsets.CONV < opsets.CONV_ANY
    assert opsets.LINEAR < opsets.LINEAR_LIKE < opsets.MATMUL_LIKE
    assert opsets.SIZED_RESHAPE < opsets.RESHAPE < opsets.MOVEMENT < opsets.NON_KERNEL
    assert opsets.RESHAPE | opsets.COPY == opsets.RESHAPE_OR_COPY
    assert opsets.RELU < opsets.ACTIVATION and opsets.RELU < opsets.NON_POLYNOMIAL
    assert opsets.MAX_POOL_2D < opsets.NON_POLYNOMIAL
    assert opsets.ADDITIVE_JOIN < opsets.JOIN


def test_copies_that_used_to_disagree_now_agree():
    # prune/deps.py omitted the training-mode export of batch norm; circulant and fold-batchnorm had it
    assert aten._native_batch_norm_legit in opsets.BATCH_NORM
    assert len(opsets.BATCH_NORM) == 4
    # sparsify-activations walked through contiguous/clone, fuse-blocks through flatten: both now see both
    assert {aten.contiguous, aten.clone, aten.flatten, aten.unflatten} <= opsets.RESHAPE_OR_COPY
    # the HE backend (by name) and polynomial-activations listed different in-place / 3-d spellings
    spellings = {aten.sigmoid_, aten.tanh_, aten.hardtanh_, aten.max_pool3d, aten.max_pool2d_with_indices}
    assert spellings <= opsets.NON_POLYNOMIAL


def test_quant_shortcut_overloads_exclude_bit_reinterpreting_views():
    assert aten.view.default in opsets.QUANT_SHORTCUT_OVERLOADS
    assert aten.view.dtype not in opsets.QUANT_SHORTCUT_OVERLOADS


def test_polynomial_activations_skips_exactly_what_it_cannot_replace():
    from graphpress.passes.polyact import activations

    assert frozenset(activations._NOT_POLYNOMIAL) == frozenset({
        aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_, aten.hardtanh, aten.hardtanh_, aten.elu, aten.leaky_relu,
        aten.softmax, aten._softmax, aten.log_softmax, aten.max_pool1d, aten.max_pool3d, aten.adaptive_max_pool2d,
    })


# ---------------------------------------------------------------------------- no private op families
def _is_aten_attr(node: ast.AST) -> bool:
    """``torch.ops.aten.x[.overload]`` or ``aten.x[.overload]`` (the module alias every file uses)."""
    if not isinstance(node, ast.Attribute):
        return False
    text = ast.unparse(node)
    return text.startswith("torch.ops.aten.") or text.startswith("aten.")


def private_op_families(source: str) -> list[tuple[int, int]]:
    """``(line, count)`` of each module-level set / tuple / list / frozenset literal holding two or
    more ATen ops. Module level means outside any function or class body."""
    tree = ast.parse(source)
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            return
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            count = sum(_is_aten_attr(e) for e in node.elts)
            if count >= 2:
                found.append((node.lineno, count))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in tree.body:
        visit(stmt)
    return found


def test_scanner_catches_the_old_spellings():
    old = (
        "aten = torch.ops.aten\n"
        "_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view)\n"
        "BATCH_NORMS = {aten.batch_norm, aten.native_batch_norm}\n"
        "X = frozenset([torch.ops.aten.relu.default, torch.ops.aten.relu_.default])\n"
        "ONE = (aten.linear, 3)\n"
        "def f(p):\n    return p in (aten.add, aten.sub)\n"
    )
    assert private_op_families(old) == [(2, 3), (3, 2), (4, 2)]


def test_no_pass_or_backend_module_defines_its_own_op_family():
    modules = sorted([*(ROOT / "passes").rglob("*.py"), *(ROOT / "backends").rglob("*.py")])
    assert len(modules) > 30
    offenders = [
        f"{path.relative_to(ROOT.parent)}:{line}: {count} aten ops in a module-level literal; "
        "use (or add) a family in graphpress/ir/opsets.py"
        for path in modules
        for line, count in private_op_families(path.read_text())
    ]
    assert offenders == []


def test_prune_dependency_graph_slices_a_training_mode_batch_norm():
    """``_native_batch_norm_legit`` used to be missing from prune/deps.py's copy of the batch norms:
    the conv feeding it had its channels pinned as an unknown op. Now its four per-channel tensors
    are sliced with the conv's output channels."""
    import operator

    from torch import nn

    from graphpress.ir.graph import Graph
    from graphpress.passes.prune.deps import analyze

    class ConvBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn, self.h = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.h(torch.relu(self.bn(self.c(x))).mean((2, 3)))

    torch.manual_seed(0)
    g = Graph.capture(ConvBn().eval(), (torch.randn(2, 3, 8, 8),))
    bn = next(g.call_nodes(aten.batch_norm))
    with g.gm.graph.inserting_before(bn):
        legit = g.gm.graph.call_function(aten._native_batch_norm_legit.default, (*bn.args[:5], False, 0.1, 1e-5))
        out = g.gm.graph.call_function(operator.getitem, (legit, 0))
    legit.meta["val"] = (bn.meta["val"], None, None)
    out.meta.update(bn.meta)
    bn.replace_all_uses_with(out)
    g.gm.graph.erase_node(bn)
    g.gm.recompile()

    conv = next(grp for grp in analyze(g).groups if grp.name == "c")
    assert conv.size == 8 and conv.pinned == []
    assert sorted(u.part for u in conv.passthrough) == ["bias", "running_mean", "running_var", "weight"]
