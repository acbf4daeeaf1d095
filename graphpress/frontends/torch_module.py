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
    where = (source or {}).get("path") or name or type(module).__name__
    with_inf = check_finite_weights(module, where=where)
    try:
        inputs = resolve_example_inputs(module, example_inputs, input_shape, who=name or type(module).__name__)
    except Exception:
        if with_inf:  # e.g. sampling example tokens from a model whose weights hold Inf
            _refuse_inf(where, with_inf)
        raise
    if with_inf:
        check_finite_outputs(module, inputs, with_inf, where=where)
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


def _non_finite(t: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating tensor."""
    if not (t.is_floating_point() or t.is_complex()) or t.is_meta:
        return 0, 0
    t = t.detach()
    if bool(torch.isfinite(t).all()):  # the common case: one pass, no counting
        return 0, 0
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def check_finite_weights(module: torch.nn.Module, *, where: str) -> list[tuple[str, tuple[int, ...], int]]:
    """Refuse weights holding NaN before capture, naming the tensor; list those holding Inf.

    NaN is never a meaningful weight. An infinite value can be one (an additive ``-inf``
    attention mask stored as a buffer or initializer), so tensors with Inf are returned as
    ``(name, shape, count)`` for :func:`check_finite_outputs`, which refuses them only when the
    model's outputs are not finite.

    Raises
    ------
    FrontendError
        ``"<where>: weight 'conv1.weight' (16, 3, 3, 3) holds 3 NaN value(s) ..."``.
    """
    seen: set[int] = set()
    with_inf: list[tuple[str, tuple[int, ...], int]] = []
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        nans, infs = _non_finite(t)
        if nans:
            raise FrontendError(
                f"{where}: weight {name!r} {tuple(t.shape)} holds {nans} NaN value(s) of {t.numel()}"
                f"{f' and {infs} Inf' if infs else ''}; the file is damaged or the training diverged: "
                "re-export the weights from a healthy checkpoint"
            )
        if infs:
            with_inf.append((name, tuple(t.shape), infs))
    return with_inf


def _refuse_inf(where: str, with_inf: list[tuple[str, tuple[int, ...], int]]) -> None:
    name, shape, infs = with_inf[0]
    more = f" (and {len(with_inf) - 1} more weight(s) with Inf)" if len(with_inf) > 1 else ""
    raise FrontendError(
        f"{where}: weight {name!r} {shape} holds {infs} Inf value(s){more} and the model's outputs are not finite; "
        "the file is damaged or the training diverged: re-export the weights from a healthy checkpoint"
    )


def check_finite_outputs(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], with_inf: list[tuple[str, tuple[int, ...], int]], *, where: str
) -> None:
    """Run ``module`` once: when its outputs are not finite, the Inf weights are the cause; say so."""
    try:
        with torch.no_grad():
            out = module(*inputs)
    except Exception:  # noqa: BLE001 -- capture reports a model that cannot run; Inf alone is no proof
        return
    leaves = list(out.values()) if isinstance(out, dict) else (list(out) if isinstance(out, (tuple, list)) else [out])
    if all(bool(torch.isfinite(o).all()) for o in leaves if isinstance(o, torch.Tensor) and o.is_floating_point()):
        return
    _refuse_inf(where, with_inf)


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
