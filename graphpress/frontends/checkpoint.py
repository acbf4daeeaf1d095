"""Frontend: a PyTorch checkpoint (weights only) + an architecture factory -> :class:`Graph`.

The file is read with ``torch.load(weights_only=True)``: graphpress never unpickles code. A
checkpoint that needs code to load (a pickled ``nn.Module``, custom classes) is refused with a
one-line error telling the user to re-save a ``state_dict``. Accepted layouts: a flat state
dict, or a dict holding one under ``state_dict`` / ``model_state_dict`` / ``model``, with or
without ``module.`` / ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.state_dict import capture_weights_file
from graphpress.ir.graph import Graph

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a torch checkpoint safely; one-line errors for every failure."""
    path = Path(path)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    if path.is_dir():
        raise FrontendError(f"{path}: is a folder, expected a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _weights_unpickler_detail(str(err))
        if "Unsupported global" in detail or "Unsupported class" in detail:
            raise FrontendError(
                f"{path}: refused: the checkpoint contains pickled code or objects ({detail[:160]}); graphpress loads "
                "weights only: re-save it with torch.save(model.state_dict(), ...) or as safetensors"
            ) from None
        raise FrontendError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail[:160]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}") from None
    return extract_state_dict(obj, path)


def _weights_unpickler_detail(message: str) -> str:
    """The informative line of torch's weights-only unpickler error (its first lines are boilerplate)."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line and line.split("WeightsUnpickler error:")[1].strip():
            return line.split("WeightsUnpickler error:")[1].strip().split(". Please use")[0]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[2] if len(lines) > 2 else (lines[0] if lines else "unpickling failed")


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        raise FrontendError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:6]))})")
    raise FrontendError(f"{path}: expected a state dict, got {type(obj).__name__}")


def load_checkpoint(
    path: str | Path,
    arch: str,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
) -> Graph:
    """Build ``arch`` (``'package.module:factory'``), load the checkpoint's weights, capture it."""
    return capture_weights_file(
        path,
        arch,
        read_state_dict,
        frontend="checkpoint",
        example_inputs=example_inputs,
        input_shape=input_shape,
        dynamic_batch=dynamic_batch,
    )
