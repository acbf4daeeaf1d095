"""The llama2.c reference models: stories260K from the shared folder, a tiny random model, and
the next-token cross-entropy used to check them.

The file format's parser and the model are the llama2.c frontend's
(:mod:`graphpress.frontends.llama2c.model`, re-exported here); this module adds the conveniences
of a model zoo on top: :func:`load_llama2c` defaults to the shared ``stories260K.bin``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from graphpress.errors import FrontendError
from graphpress.frontends.llama2c import model as _model
from graphpress.frontends.llama2c.model import (
    Llama2c,
    ModelArgs,
    RMSNorm,
    apply_rope,
    is_llama2c_file,
    read_llama2c_header,
    rope_tables,
    sample,
    save_llama2c,
)
from graphpress.zoo.paths import STORIES260K_RELPATH, expected_path, stories260k_path

__all__ = [
    "Llama2c",
    "ModelArgs",
    "RMSNorm",
    "apply_rope",
    "is_llama2c_file",
    "llama2c_tiny",
    "load_llama2c",
    "next_token_cross_entropy",
    "read_llama2c_header",
    "rope_tables",
    "sample",
    "save_llama2c",
]


def load_llama2c(path: str | Path | None = None) -> Llama2c:
    """:func:`graphpress.frontends.llama2c.model.load_llama2c` with ``path`` defaulting to the
    shared ``stories260K.bin``; a :class:`FrontendError` names where it was looked for when absent.
    """
    if path is None:
        path = stories260k_path()
        if path is None:
            raise FrontendError(
                f"{expected_path(STORIES260K_RELPATH)}: stories260K model not found; "
                "pass a path or set GRAPHPRESS_SHARED"
            )
    return _model.load_llama2c(path)


def llama2c_tiny(
    dim: int = 32,
    hidden_dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab_size: int = 64,
    seq_len: int = 64,
    shared_classifier: bool = True,
    seed: int = 0,
) -> Llama2c:
    """Small randomly initialised :class:`Llama2c` (no file needed), in eval mode.

    Parameters
    ----------
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len : int
        Model hyper-parameters; the defaults exercise GQA (4 query heads, 2 kv heads).
    shared_classifier : bool
        Tie the classifier to the token embedding.
    seed : int
        Seed for the initialisation, so the factory is deterministic.

    Returns
    -------
    Llama2c
    """
    args = ModelArgs(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab_size=vocab_size,
        seq_len=seq_len,
        shared_classifier=shared_classifier,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama2c(args)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    continue
                # llama2.c training init: N(0, 0.02); keeps random logits moderate.
                p.normal_(0.0, 0.02)
    return model.eval()


@torch.no_grad()
def next_token_cross_entropy(model: nn.Module, tokens: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``.

    Parameters
    ----------
    model : nn.Module
        Maps ``LongTensor[B, T]`` to logits ``[B, T, vocab]``.
    tokens : torch.LongTensor
        ``(B, T)`` sequences, ``T >= 2``.

    Returns
    -------
    float
    """
    logits = model(tokens[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
