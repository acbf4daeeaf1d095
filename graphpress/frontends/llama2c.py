"""Frontend: a llama2.c model file (7-int32 header + float32 tensors) -> :class:`Graph`.

The graph maps token ids (batch, seq) to logits (batch, seq, vocab); examples are token
sequences sampled from the model itself, since no tokenizer or dataset ships with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from graphpress.frontends.torch_module import TOKEN_DIMS, from_module
from graphpress.ir.graph import Graph


def is_llama2c(path: str | Path) -> bool:
    from graphpress.zoo.llama2c import is_llama2c_file

    return is_llama2c_file(path)


def load_llama2c_graph(path: str | Path, *, example_inputs: Sequence[torch.Tensor] | None = None, dynamic_batch: bool = True) -> Graph:
    """Load the file with :func:`graphpress.zoo.llama2c.load_llama2c` and capture it."""
    from graphpress.zoo.llama2c import load_llama2c

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
