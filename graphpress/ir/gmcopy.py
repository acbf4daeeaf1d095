"""Copy a ``torch.fx.GraphModule``'s structure while sharing its tensors, without recompiling.

``copy.deepcopy(gm, memo)`` with every tensor in ``memo`` gives the same sharing, but it deep-copies
every node's metadata (stack traces, module stacks: ~24k objects on a 3000-node graph) and then
regenerates and recompiles the Python code of ``forward``. On a 100M-parameter Llama that was
0.1 s per copy, and the pipeline copies once per pass. The copy here is

* the graph: new nodes (names kept), each with a *shallow* copy of its ``meta``, and a copy of
  graphpress's annotations (the one metadata dict passes change in place); fake values, module
  stacks and stack traces are shared, since passes replace them rather than change them;
* the module tree: a new object for every module with new ``_parameters`` / ``_buffers`` /
  ``_modules`` dicts (so registering or deleting a tensor on one copy leaves the other alone)
  holding the same tensors;
* the compiled code: the new module gets its own class (as FX gives every GraphModule) whose
  ``forward`` is the original's function: the code is the same until someone changes the graph,
  and whoever does calls ``recompile()``, which replaces it on the copy's class only.

When the module's class holds anything else FX did not put there, the copy falls back to
``copy.deepcopy`` (same result, slower).
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx

# What GraphModule.recompile() puts on the per-instance class; anything more: deepcopy.
_CLASS_KEYS = {"__module__", "__doc__", "forward", "_wrapped_call", "__call__"}


def structure_copy(gm: fx.GraphModule, annotation_key: str, memo: dict[int, Any]) -> fx.GraphModule:
    """A copy of ``gm`` that shares its tensors (module docstring).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The module to copy.
    annotation_key : str
        The ``node.meta`` key whose dict is copied (deeply) rather than shared.
    memo : dict
        ``{id(obj): obj}`` for objects to share in the fallback ``deepcopy`` (the tensors and
        fake values).
    """
    cls = type(gm)
    if not _copyable(gm):
        with warnings.catch_warnings():
            # deep-copying the module's pytree specs trips a torch-internal FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            return copy.deepcopy(gm, memo)
    new = cls.__new__(cls)  # GraphModule.__new__ makes a fresh per-instance subclass
    new_cls = type(new)
    new_cls.forward = vars(cls)["forward"]
    new_cls.__call__ = vars(cls)["__call__"]
    new_cls._wrapped_call = type(vars(cls)["_wrapped_call"])(new_cls, None)
    modules: dict[int, torch.nn.Module] = {id(gm): new}
    state = _module_state(gm, modules)
    state["_graph"] = _graph_copy(gm.graph, annotation_key)
    state["meta"] = dict(getattr(gm, "meta", {}))
    new.__dict__.update(state)
    new._graph.owning_module = new
    return new


def _copyable(gm: fx.GraphModule) -> bool:
    cls = type(gm)
    return (
        _per_instance(cls)
        and set(vars(cls)) <= _CLASS_KEYS
        and {"forward", "__call__", "_wrapped_call"} <= set(vars(cls))
        and not any(_per_instance(type(m)) for _, m in gm.named_modules() if m is not gm)
    )


def _per_instance(cls: type) -> bool:
    """The class FX makes for each GraphModule (it keeps the base's ``__name__``)."""
    return cls.__qualname__.split(".")[-1] == "GraphModuleImpl"


def _module_state(module: torch.nn.Module, modules: dict[int, torch.nn.Module]) -> dict[str, Any]:
    """``module.__dict__`` with its containers copied and its submodules copied in turn."""
    state = dict(module.__dict__)
    for key, value in state.items():
        if key == "_modules":
            state[key] = OrderedDict((name, _module_copy(sub, modules)) for name, sub in value.items())
        elif isinstance(value, (dict, set, list)) and key != "_graph":
            state[key] = copy.copy(value)
    return state


def _module_copy(module: torch.nn.Module | None, modules: dict[int, torch.nn.Module]):
    if module is None:
        return None
    if id(module) in modules:  # a module reachable by two paths stays one module
        return modules[id(module)]
    new = module.__class__.__new__(module.__class__)
    modules[id(module)] = new
    new.__dict__.update(_module_state(module, modules))
    return new


def _graph_copy(graph: fx.Graph, annotation_key: str) -> fx.Graph:
    """New nodes with shallow-copied metadata (see the module docstring); what
    ``Graph.__deepcopy__`` does, less the deep copy of every node's metadata."""
    new = fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=getattr(graph, "_tracer_extras", None))
    val_map: dict[fx.Node, fx.Node] = {}
    out, old_output = new.graph_copy(graph, val_map, return_output_node=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        new._codegen = copy.deepcopy(graph._codegen)
    output = new.output(out, type_expr=getattr(old_output, "type", None))
    output.meta = copy.copy(old_output.meta)
    for node in new.nodes:
        if annotation_key in node.meta:
            node.meta[annotation_key] = _containers_copied(node.meta[annotation_key])
    return new


def _containers_copied(value: Any) -> Any:
    """Dicts, lists and sets copied all the way down; their leaves (tensors too) shared."""
    if isinstance(value, dict):
        return {k: _containers_copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_containers_copied(v) for v in value]
    if isinstance(value, set):
        return set(value)
    return value
