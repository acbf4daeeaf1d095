"""Frontend: a llama2.c model file (7-int32 header + float32 tensors) -> :class:`Graph`.

The graph maps token ids (batch, seq) to logits (batch, seq, vocab); examples are token
sequences sampled from the model itself, since no tokenizer or dataset ships with it.

The file format's parser and writer and the model it fills are in
:mod:`graphpress.frontends.llama2c.model`; :mod:`graphpress.zoo.llama2c` adds the reference-model
conveniences (the shared stories260K checkpoint by default, a tiny random model, cross-entropy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from graphpress.frontends.llama2c.model import (
    Llama2c,
    ModelArgs,
    is_llama2c_file,
    load_llama2c,
    read_llama2c_header,
    sample,
    save_llama2c,
)
from graphpress.frontends.torch_module import TOKEN_DIMS, from_module
from graphpress.ir.graph import Graph


def is_llama2c(path: str | Path) -> bool:
    """Whether ``path`` is a llama2.c model file (reads 28 bytes: :func:`is_llama2c_file`)."""
    return is_llama2c_file(path)


def load_llama2c_graph(path: str | Path, *, example_inputs: Sequence[torch.Tensor] | None = None, dynamic_batch: bool = True) -> Graph:
    """Load the file with :func:`load_llama2c` and capture it."""
    model = load_llama2c(path)
    return from_module(
        model,
        example_inputs,
        name=Path(path).stem,
        dynamic_dims=TOKEN_DIMS if dynamic_batch else {},
        input_names=["tokens"],
        output_names=["logits"],
        source={"frontend": "llama2c", "path": str(path)},
    )


__all__ = [
    "Llama2c",
    "ModelArgs",
    "is_llama2c",
    "is_llama2c_file",
    "load_llama2c",
    "load_llama2c_graph",
    "read_llama2c_header",
    "sample",
    "save_llama2c",
]
