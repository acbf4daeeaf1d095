"""Shape functions of graphpress's custom ops, callable without the dispatcher.

``@shape_function(op)`` registers a function as ``op``'s fake kernel (``op.register_fake``:
what ``torch.export`` and fake tensors use) and also records it in :data:`SHAPE_FUNCTIONS`, keyed
by the op's overload (``torch.ops.graphpress.<name>.default``, the target FX nodes hold).

Why: the structure check (:mod:`graphpress.ir.verify`) propagates fake tensors after every pass,
and a custom op reached through the dispatcher cost ~0.3 ms per node there against ~0.08 ms for
calling the same function (the 57 rewritten layers of an int8 pass on a 100M-parameter Llama).
Calling it directly runs the same checks and gives the same fake output.
"""

from __future__ import annotations

from typing import Any, Callable

#: ``{op overload: shape function}`` for every op registered through :func:`shape_function`.
SHAPE_FUNCTIONS: dict[Any, Callable[..., Any]] = {}


def shape_function(op) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn`` becomes ``op``'s fake kernel and is recorded in :data:`SHAPE_FUNCTIONS`.

    Parameters
    ----------
    op : torch._library.custom_ops.CustomOpDef
        An op made with ``torch.library.custom_op``.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        op.register_fake(fn)
        overload = getattr(op, "_opoverload", None)  # absent in another torch: the dispatcher is used
        if overload is not None:
            SHAPE_FUNCTIONS[overload] = fn
        return fn

    return register
