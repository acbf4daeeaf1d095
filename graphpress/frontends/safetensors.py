"""Frontend: a ``.safetensors`` weights file + an architecture factory -> :class:`Graph`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.state_dict import load_into
from graphpress.frontends.torch_module import build_from_factory, from_module
from graphpress.ir.graph import Graph


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; one-line errors for missing, truncated or invalid files."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"{path}: not a valid safetensors file (truncated or corrupt?): {first[:200]}") from None


def load_safetensors(
    path: str | Path,
    arch: str,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
) -> Graph:
    """Build ``arch``, load the safetensors weights strictly, capture it."""
    if not arch:
        raise FrontendError(f"{path}: a safetensors file holds only weights: pass --arch package.module:factory")
    state = read_safetensors(path)
    module = load_into(build_from_factory(arch), state, path=str(path), arch=arch)
    return from_module(
        module,
        example_inputs,
        input_shape=input_shape,
        name=Path(path).stem,
        dynamic_batch=dynamic_batch,
        source={"frontend": "safetensors", "path": str(path), "arch": arch},
    )
