"""Small generic helpers for graph rewrites: argument access, explainable skips, node insertion,
constant detection and dead-chain removal.

Passes use these so that the same questions ("is this argument a constant tensor?", "which
buffers does the graph mutate?", "erase what this rewrite left dead") get the same answers
everywhere, and so that a rule that does not fire records *why* in a :class:`Skips` counter.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from graphpress.ir.graph import Graph
from graphpress.ir.opsets import TRAINING_STAT_NORM

aten = torch.ops.aten


class Skips(dict):
    """``reason -> count`` of places where a rule matched partly but did not fire."""

    def add(self, reason: str, n: int = 1) -> None:
        self[reason] = self.get(reason, 0) + n


# ---------------------------------------------------------------------------- node queries
def packet(node: Any):
    """The ``OpOverloadPacket`` of a ``call_function`` node (``aten.conv2d``), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return getattr(node.target, "overloadpacket", None)


def is_op(node: Any, *packets: Any) -> bool:
    """Whether ``node`` calls one of ``packets`` (packets or overloads)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return node.target in packets or packet(node) in packets


def pair(v: Any, default: int) -> list[int]:
    """A conv's int-or-sequence argument (stride, padding, dilation) as two ints; None -> default."""
    if v is None:
        return [default, default]
    if isinstance(v, int):
        return [v, v]
    v = [int(x) for x in v]
    return v * 2 if len(v) == 1 else v


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of ``node``, else ``default``."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any, defaults: Sequence[Any] = ()) -> None:
    """Set argument ``index``/``name``; positional when it already is (or can be, padding the
    positions in between with ``defaults[i]``), else keyword."""
    if name in node.kwargs:
        node.update_kwarg(name, value)
        return
    args = list(node.args)
    if index < len(args):
        args[index] = value
    else:
        while len(args) < index:
            i = len(args)
            if i >= len(defaults):
                node.update_kwarg(name, value)
                return
            args.append(defaults[i])
        args.append(value)
    node.args = tuple(args)


def is_alive(node: fx.Node) -> bool:
    """False once the node was erased from its graph."""
    return not getattr(node, "_erased", False)


def topo_index(graph: Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


# ---------------------------------------------------------------------------- meta / fake values
def fake_mode(graph: Graph):
    """The fake mode of the nodes' ``meta['val']``: that of the first fake value (None when
    there is none).

    The first one, not a check that all agree (``detect_fake_mode`` walked every value of a
    3000-node graph for each constant a pass added: 0.44 s of a 1.2 s quantization): a node
    whose value came from another mode is propagated again by the next structure check."""
    for n in graph.nodes:
        val = n.meta.get("val")
        for v in val if isinstance(val, (list, tuple)) else (val,):
            mode = getattr(v, "fake_mode", None)
            if mode is not None:
                return mode
    return None


def fake_of(graph: Graph, tensor: torch.Tensor, mode: Any = None):
    """A fake tensor for ``meta['val']`` of a new node holding ``tensor`` (None when impossible).

    A tensor of more than one element gets a fake with its layout only: what the ops downstream
    need, without converting the real tensor (a one-element tensor is converted in full, since
    fake mode keeps its value for ``item()``)."""
    mode = mode or fake_mode(graph)
    if mode is None:
        return None
    try:
        if tensor.numel() > 1 and tensor.layout == torch.strided and not tensor.is_quantized:
            from graphpress.ir.verify import fake_tensor

            return fake_tensor(mode, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)
        return mode.from_tensor(tensor, static_shapes=True)
    except Exception:  # noqa: BLE001
        return None


def refresh_meta(graph: Graph) -> None:
    """Recompute ``meta['val']`` of every node by fake propagation on the example inputs.

    Only needed when a node lacks ``meta['val']`` (e.g. inserted without one); failures are left
    for :meth:`Graph.verify` to report.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in graph.example_inputs]
    try:
        FakeTensorProp(graph.gm, mode).propagate(*inputs)
    except Exception:  # noqa: BLE001
        pass


def node_val(graph: Graph, node: Any) -> Any:
    """``meta['val']`` of ``node`` (a fake tensor for tensor nodes), recomputed when missing."""
    if not isinstance(node, fx.Node):
        return None
    if "val" not in node.meta and node.op in ("call_function", "get_attr", "placeholder"):
        refresh_meta(graph)
    return node.meta.get("val")


def rank_of(graph: Graph, node: Any) -> int | None:
    val = node_val(graph, node)
    return val.dim() if isinstance(val, torch.Tensor) else None


# ---------------------------------------------------------------------------- constants
# In-place ops that change only tensor metadata (``requires_grad``), never data: pure for inference.
METADATA_ONLY_INPLACE = (aten.detach_,)


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _written_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs of a ``call_function`` node it may write to: schema ``Tensor(a!)`` arguments,
    running statistics of a norm in training mode, all inputs of an impure non-ATen call."""
    schema = getattr(node.target, "_schema", None)
    if packet(node) in METADATA_ONLY_INPLACE:
        return []
    if schema is None:
        return list(node.all_input_nodes) if node.is_impure() else []
    out: list[fx.Node] = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.extend(_nodes_in(node.args[i] if i < len(node.args) else node.kwargs.get(a.name)))
    if packet(node) in TRAINING_STAT_NORM and arg(node, 5, "training", False) is True:
        out.extend(_nodes_in(node.args[3:5]))
    return out


def mutated_targets(graph: Graph) -> set[str]:
    """``get_attr`` targets that some op in the graph may write to, directly or through a view.

    Walks back from every written argument through ``call_function`` inputs (an over-approximation
    of view chains) to the ``get_attr`` nodes; such tensors are state, not constants.
    """
    roots = [w for n in graph.nodes if n.op == "call_function" for w in _written_inputs(n)]
    targets: set[str] = set()
    seen: set[fx.Node] = set()
    while roots:
        n = roots.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            targets.add(str(n.target))
        elif n.op == "call_function":
            roots.extend(n.all_input_nodes)
    return targets


def constant_tensor(graph: Graph, node: Any, mutated: set[str] | None = None) -> torch.Tensor | None:
    """The tensor behind ``node`` when it is a ``get_attr`` constant not written by the graph."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    if mutated is not None and str(node.target) in mutated:
        return None
    return graph.tensor_of(node)


def is_parameter(graph: Graph, target: str) -> bool:
    owner_path, _, attr = target.rpartition(".")
    try:
        owner = graph.gm.get_submodule(owner_path) if owner_path else graph.gm
    except AttributeError:
        return False
    return attr in owner._parameters


# ---------------------------------------------------------------------------- insertion
def insert_get_attr(graph: Graph, target: str, *, before: fx.Node, module: str = "", mode: Any = None) -> fx.Node:
    """A ``get_attr`` node for existing tensor ``target`` inserted before ``before``, with a fake
    ``meta['val']`` and the ``module`` annotation."""
    with graph.gm.graph.inserting_before(before):
        node = graph.gm.graph.get_attr(target)
    val = fake_of(graph, graph.get_tensor(target), mode)
    if val is not None:
        node.meta["val"] = val
    graph.annotations(node)["module"] = module
    return node


def add_constant(
    graph: Graph, hint: str, value: torch.Tensor, *, before: fx.Node, parameter: bool = True, module: str = "", mode: Any = None
) -> fx.Node:
    """Register ``value`` as a new tensor (named from ``hint``) and return a ``get_attr`` for it."""
    target = graph.add_tensor(hint, value, parameter=parameter)
    return insert_get_attr(graph, target, before=before, module=module, mode=mode)


def insert_call(
    graph: Graph, target: Any, args: tuple, kwargs: dict | None = None, *, before: fx.Node, like: fx.Node | None = None
) -> fx.Node:
    """A ``call_function`` node inserted before ``before``; meta (source module, stack, val) is
    copied from ``like`` when given."""
    with graph.gm.graph.inserting_before(before):
        node = graph.gm.graph.call_function(target, args, kwargs or {})
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "val", "tensor_meta", "custom"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        node.meta["graphpress"] = dict(graph.annotations(like))
    else:
        graph.annotations(node).setdefault("module", "")
    return node


# ---------------------------------------------------------------------------- removal
def is_removable(node: fx.Node) -> bool:
    """A node that can go once it has no users: a pure ``call_function`` or a ``get_attr``.
    Placeholders, the output, ``call_module`` nodes (``_guards_fn``) and impure ops never are."""
    if node.op == "get_attr":
        return True
    if node.op == "call_function":
        if packet(node) in METADATA_ONLY_INPLACE:
            return True
        try:
            return not node.is_impure()
        except Exception:  # noqa: BLE001
            return False
    return False


def erase_dead(graph: Graph, nodes: Iterable[fx.Node]) -> int:
    """Erase ``nodes`` that have no users and are removable, then their inputs that became dead,
    transitively. Returns the number of nodes erased."""
    work = [n for n in nodes if is_alive(n)]
    erased = 0
    while work:
        node = work.pop()
        if not is_alive(node) or node.users or not is_removable(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.gm.graph.erase_node(node)
        erased += 1
        work.extend(inputs)
    return erased


__all__ = [
    "pair",
    "Skips",
    "packet",
    "is_op",
    "arg",
    "set_arg",
    "is_alive",
    "topo_index",
    "fake_mode",
    "fake_of",
    "refresh_meta",
    "node_val",
    "rank_of",
    "mutated_targets",
    "constant_tensor",
    "is_parameter",
    "insert_get_attr",
    "add_constant",
    "insert_call",
    "METADATA_ONLY_INPLACE",
    "is_removable",
    "erase_dead",
]
