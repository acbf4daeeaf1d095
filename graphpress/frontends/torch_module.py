"""Frontend: an in-memory ``nn.Module`` plus example inputs -> :class:`Graph`."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.ir.graph import Graph

# Language models take (batch, seq) token ids: both dims stay dynamic.
TOKEN_DIMS = {0: "batch", 1: "seq"}


def from_module(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    name: str | None = None,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: dict[int, str] | None = None,
    source: dict[str, Any] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Graph:
    """Capture ``module`` (eval mode) with ``torch.export``.

    Parameters
    ----------
    module : nn.Module
        The model. If it has an ``example_inputs(batch)`` method, that supplies inputs when
        ``example_inputs`` and ``input_shape`` are not given.
    example_inputs : sequence of Tensor, optional
        Inputs to trace with.
    input_shape : sequence of int, optional
        Shape of a single float input (random normal, seeded) when no examples are given.
    dynamic_batch : bool
        Export dim 0 as dynamic (falls back to static if the model does not allow it).
    dynamic_dims : dict of int to str, optional
        Dynamic dims by position and name, e.g. ``{0: "batch", 1: "seq"}``; overrides ``dynamic_batch``.
    input_names, output_names : sequence of str, optional
        Names for reports and backends (default: the placeholder names / ``output``).
    """
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(f"expected a torch.nn.Module, got {type(module).__name__}")
    inputs = resolve_example_inputs(module, example_inputs, input_shape, who=name or type(module).__name__)
    return Graph.capture(
        module,
        inputs,
        name=name or type(module).__name__,
        dynamic_batch=dynamic_batch,
        dynamic_dims=dynamic_dims,
        input_names=input_names,
        output_names=output_names,
        source=source or {"frontend": "torch_module", "class": f"{type(module).__module__}.{type(module).__qualname__}"},
    )


def resolve_example_inputs(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    input_shape: Sequence[int] | None,
    *,
    who: str,
) -> tuple[torch.Tensor, ...]:
    """Explicit examples, else a random tensor of ``input_shape``, else ``module.example_inputs(2)``."""
    if example_inputs is not None:
        return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if input_shape is not None:
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(tuple(int(d) for d in input_shape), generator=gen),)
    maker = getattr(module, "example_inputs", None)
    if callable(maker):
        out = maker(2)
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)
    raise FrontendError(
        f"{who}: no example inputs: pass --input-shape (e.g. 1x3x32x32) or give the model an example_inputs(batch) method"
    )


def parse_shape(text: str) -> tuple[int, ...]:
    """``'1x3x32x32'`` or ``'1,3,32,32'`` -> ``(1, 3, 32, 32)``; one-line error otherwise."""
    parts = text.replace(",", "x").lower().split("x")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise FrontendError(f"--input-shape {text!r}: expected integers like 1x3x32x32") from None
    if not shape or any(d <= 0 for d in shape):
        raise FrontendError(f"--input-shape {text!r}: expected positive integers like 1x3x32x32")
    return shape


def resolve_factory(spec: str) -> Callable[..., torch.nn.Module]:
    """Import ``'package.module:factory'`` and return the callable; one-line errors otherwise."""
    if ":" not in spec:
        raise FrontendError(f"architecture {spec!r}: expected 'package.module:factory', e.g. graphpress.zoo.resnet20:resnet20")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise FrontendError(f"architecture {spec!r}: cannot import module '{mod_name}': {err}") from None
    obj: Any = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise FrontendError(f"architecture {spec!r}: module '{mod_name}' has no attribute '{attr}'")
    if not callable(obj):
        raise FrontendError(f"architecture {spec!r}: '{attr}' is not callable")
    return obj


def build_from_factory(spec: str, **kwargs: Any) -> torch.nn.Module:
    """Call the factory named by ``spec``; it must return an ``nn.Module``."""
    factory = resolve_factory(spec)
    try:
        module = factory(**kwargs)
    except Exception as err:  # noqa: BLE001 -- user code
        raise FrontendError(f"architecture {spec!r}: factory raised {type(err).__name__}: {err}") from None
    if not isinstance(module, torch.nn.Module):
        raise FrontendError(f"architecture {spec!r}: factory returned {type(module).__name__}, not an nn.Module")
    return module.eval()
