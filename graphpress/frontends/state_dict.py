"""Load a flat ``{name: tensor}`` state dict into an architecture, explaining any mismatch in one line.

Shared by the checkpoint and safetensors frontends: :func:`capture_weights_file` is the whole
"weights file + architecture factory -> Graph" path, parameterized by the file reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.torch_module import build_from_factory, from_module
from graphpress.ir.graph import Graph

# Prefixes added by wrappers (DataParallel/DDP, torch.compile) that the bare model does not have.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    changed = True
    while changed and out:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, path: str, arch: str) -> torch.nn.Module:
    """``load_state_dict(strict=True)`` with one-line errors listing missing/unexpected/mis-shaped keys.

    Keys missing from the file are accepted when the model ties them to a loaded tensor (e.g. an
    LM head sharing the embedding), since checkpoints store shared tensors once.
    """
    state = strip_prefixes(state)
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    loaded_ptrs = {own[k].data_ptr() for k in own if k in state}
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs and not k.endswith("num_batches_tracked")]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:2])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:2])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:2])})")
        raise FrontendError(f"{path}: weights do not match architecture {arch}: {', '.join(parts)}")
    module.load_state_dict(state, strict=False)
    return module.eval()


def capture_weights_file(
    path: str | Path,
    arch: str,
    read: Callable[[Path], Mapping[str, torch.Tensor]],
    *,
    frontend: str,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
) -> Graph:
    """Build ``arch`` (``'package.module:factory'``), load the weights ``read(path)`` returns
    (strictly), and capture the module."""
    if not arch:
        raise FrontendError(f"{path}: a {frontend} file holds only weights: pass --arch package.module:factory")
    module = load_into(build_from_factory(arch), read(Path(path)), path=str(path), arch=arch)
    return from_module(
        module,
        example_inputs,
        input_shape=input_shape,
        name=Path(path).stem,
        dynamic_batch=dynamic_batch,
        source={"frontend": frontend, "path": str(path), "arch": arch},
    )
