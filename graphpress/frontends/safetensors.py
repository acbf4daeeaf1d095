"""Frontend: a ``.safetensors`` weights file + an architecture factory -> :class:`Graph`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.state_dict import capture_weights_file
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
    return capture_weights_file(
        path,
        arch,
        read_safetensors,
        frontend="safetensors",
        example_inputs=example_inputs,
        input_shape=input_shape,
        dynamic_batch=dynamic_batch,
    )
