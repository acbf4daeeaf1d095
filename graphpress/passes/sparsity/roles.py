"""Where a linear layer sits in a transformer, found from the graph (not from module names).

CHESS sparsifies attention selectively: the query/key/value projections read the normalised
hidden state, and zeroing its entries perturbs every attention score, while the output
projection reads the attention result like any MLP input. The roles:

* ``attention-input`` -- the layer's output reaches an *attention product* (a ``matmul`` /
  ``bmm`` / ``scaled_dot_product_attention`` whose operands are both computed values) through
  shape and elementwise ops only (reshape, transpose, RoPE's mul/add/cat/neg/slice...);
* ``attention-output`` -- its input comes from an attention product through such ops;
* ``mlp`` -- anything else.

The walk is bounded (``_DEPTH`` nodes) and stops at other linears, so a layer two blocks away is
never mistaken for part of this one's attention.
"""

from __future__ import annotations

import torch
from torch import fx

from graphpress.ir.opsets import ACTIVATION_PRODUCTS, ROLE_BOUNDARY
from graphpress.ir.rewrite import is_op

aten = torch.ops.aten
ROLES = ("attention-input", "attention-output", "mlp")
_DEPTH = 24


def _computed(v) -> bool:
    return isinstance(v, fx.Node) and v.op not in ("get_attr", "placeholder")


def _is_attention_product(node: fx.Node) -> bool:
    if not is_op(node, *ACTIVATION_PRODUCTS):
        return False
    operands = list(node.args[1]) if is_op(node, aten.einsum) else list(node.args[:3])
    return sum(_computed(a) and _depends_on_input(a) for a in operands) >= 2


def _depends_on_input(node: fx.Node) -> bool:
    """Whether ``node`` is computed from a graph input (not only from constants)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        stack.extend(a for a in n.all_input_nodes)
        if len(seen) > 4096:
            return True
    return False


def _reaches(start: fx.Node, forward: bool) -> bool:
    frontier, seen = [start], {start}
    for _ in range(_DEPTH):
        nxt = []
        for n in frontier:
            for m in (n.users if forward else n.all_input_nodes):
                if m in seen or m.op in ("output", "placeholder", "get_attr"):
                    continue
                seen.add(m)
                if _is_attention_product(m):
                    return True
                if is_op(m, *ROLE_BOUNDARY):
                    continue
                nxt.append(m)
        if not nxt:
            return False
        frontier = nxt
    return False


def role(node: fx.Node) -> str:
    """``"attention-input"``, ``"attention-output"`` or ``"mlp"`` for an ``aten.linear`` node."""
    if _reaches(node, forward=True):
        return "attention-input"
    x = node.args[0]
    if isinstance(x, fx.Node) and (_is_attention_product(x) or _reaches(x, forward=False)):
        return "attention-output"
    return "mlp"


__all__ = ["ROLES", "role"]
