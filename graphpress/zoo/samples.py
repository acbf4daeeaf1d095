"""Real inputs (and one trained checkpoint) for the shipped models, written to files.

Every data-driven option of ``compress run`` (``--calibration``, ``--finetune-data``) and every
weight-only checkpoint in the README needs a file a new user does not have. This module makes
each one from real data that is on every machine:

=============  ===========================================================  ==========================
kind           what                                                          for
=============  ===========================================================  ==========================
``digits``     scikit-learn's digits (training split), standardized,        ``graphpress.zoo.digits:digits_cnn``
               ``float32 (n, 1, 8, 8)``
``photos``     32 x 32 crops of scikit-learn's two sample photos,           ResNet-20 (CIFAR-10)
               CIFAR-normalized, ``float32 (n, 3, 32, 32)``
``stories``    token sequences sampled from the pretrained stories260K      stories260K (llama2.c)
               (temperature 1, BOS first), ``int64 (n, seq_len)``
``digits-cnn`` a digits CNN trained on scikit-learn's digits (a             ``--arch graphpress.zoo.digits:digits_cnn``
               ``state_dict``: weights only, as ``torch.save`` writes it)
=============  ===========================================================  ==========================

Files are written atomically (a temporary sibling renamed into place) and an existing file is
never replaced unless asked.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from graphpress.errors import GraphpressError

#: Extensions :func:`write_samples` can write (the same ones ``--calibration`` reads).
SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


@dataclass(frozen=True)
class SampleKind:
    """One kind of sample file: its default count, what it is and what it is for."""

    name: str
    default_n: int
    what: str
    used_with: str
    weights: bool = False


KINDS: dict[str, SampleKind] = {
    k.name: k
    for k in (
        SampleKind("digits", 256, "scikit-learn digits images", "--arch graphpress.zoo.digits:digits_cnn"),
        SampleKind("photos", 256, "natural-photo crops (scikit-learn sample photos), CIFAR-normalized", "ResNet-20 (--arch graphpress.zoo.resnet20:resnet20)"),
        SampleKind("stories", 64, "token sequences sampled from stories260K", "stories260K.bin"),
        SampleKind("digits-cnn", 0, "digits CNN weights trained on scikit-learn digits (a state_dict)", "--arch graphpress.zoo.digits:digits_cnn", weights=True),
    )
}


def check_request(kind: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Validate a request before any work: the kind, the file extension, the destination.

    Raises
    ------
    GraphpressError
        One line naming the bad kind / path and the fix.
    """
    if kind not in KINDS:
        raise GraphpressError(f"samples: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = Path(path)
    spec = KINDS[kind]
    allowed = (".pt", ".pth", ".safetensors") if spec.weights else SUFFIXES
    if out.suffix.lower() not in allowed:
        raise GraphpressError(f"{out}: unsupported extension {out.suffix or '(none)'} for {kind}; use one of {', '.join(allowed)}")
    if out.is_dir():
        raise GraphpressError(f"{out}: is a folder; give a file name such as {out / (kind + '.pt')}")
    if out.exists() and not overwrite:
        raise GraphpressError(f"{out}: exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise GraphpressError(f"{out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraphpressError(f"{out}: cannot write in {parent} (permission denied); choose another path")
    return out


def make_samples(kind: str, n: int | None = None, *, seed: int = 0, seq_len: int = 64,
                 on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Make the samples of ``kind`` in memory.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`.
    n : int, optional
        Number of samples (images or sequences); default per kind. Ignored for weights.
    seed : int
        Seed of the crops, the token sampling or the training.
    seq_len : int
        Tokens per sequence for ``stories`` (BOS included).
    on_progress : callable, optional
        ``on_progress(done, total)`` for the slow kinds (token sampling).

    Returns
    -------
    Tensor or dict of Tensor
        A batch (rows = samples), or a ``state_dict`` for ``digits-cnn``.
    """
    if kind not in KINDS:
        raise GraphpressError(f"samples: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    n = KINDS[kind].default_n if n is None else n
    if n < 1 and not KINDS[kind].weights:
        raise GraphpressError(f"samples -n {n}: must be at least 1")
    if kind == "digits":
        from graphpress.zoo.digits import digits_data

        x_train = digits_data(seed)[0]
        if n > x_train.shape[0]:
            raise GraphpressError(f"samples digits -n {n}: the training split holds {x_train.shape[0]} images")
        return x_train[:n].contiguous()
    if kind == "photos":
        from graphpress.zoo.photos import photo_crops

        return photo_crops(n, seed)
    if kind == "stories":
        return _stories(n, seed, seq_len, on_progress)
    from graphpress.zoo.digits import train_digits_cnn

    model, _acc = train_digits_cnn(seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stories(n: int, seed: int, seq_len: int, on_progress: Callable[[int, int], None] | None) -> torch.Tensor:
    from graphpress.zoo.llama2c import load_llama2c, sample
    from graphpress.zoo.paths import STORIES260K_RELPATH, expected_path, stories260k_path

    if seq_len < 2:
        raise GraphpressError(f"samples stories --seq-len {seq_len}: must be at least 2")
    path = stories260k_path()
    if path is None:
        raise GraphpressError(
            f"samples stories: {expected_path(STORIES260K_RELPATH)} not found; put ../shared beside the checkout or set GRAPHPRESS_SHARED"
        )
    model = load_llama2c(path)
    if seq_len > model.args.seq_len:
        raise GraphpressError(f"samples stories --seq-len {seq_len}: stories260K's context is {model.args.seq_len} tokens")
    return sample(model, n, seq_len, temperature=1.0, seed=seed, bos=1, on_step=on_progress)  # llama2.c's BOS is 1


def write_samples(kind: str, path: str | os.PathLike, *, n: int | None = None, seed: int = 0, seq_len: int = 64,
                  overwrite: bool = False, on_progress: Callable[[int, int], None] | None = None) -> tuple[Path, Any]:
    """Make the samples of ``kind`` and write them to ``path`` atomically.

    ``.pt`` / ``.pth`` are written with ``torch.save`` (read back with ``weights_only=True``),
    ``.npy`` with numpy, ``.safetensors`` with safetensors (a batch is stored as ``x``).

    Returns
    -------
    (Path, Tensor or dict)
        The file written and what it holds.

    Raises
    ------
    GraphpressError
        Bad kind, extension, count or destination (checked before any work).
    """
    out = check_request(kind, path, overwrite=overwrite)
    data = make_samples(kind, n, seed=seed, seq_len=seq_len, on_progress=on_progress)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent)
    os.close(fd)
    try:
        suffix = out.suffix.lower()
        if suffix in (".pt", ".pth"):
            torch.save(data, tmp)
        elif suffix == ".npy":
            import numpy as np

            with open(tmp, "wb") as f:
                np.save(f, data.numpy(), allow_pickle=False)
        else:
            from safetensors.torch import save_file

            save_file(data if isinstance(data, dict) else {"x": data}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, data


def describe(kind: str, data: Any) -> str:
    """One line saying what a samples file holds and what to use it with."""
    spec = KINDS[kind]
    if isinstance(data, dict):
        count = sum(v.numel() for v in data.values())
        return f"{spec.what}: {len(data)} tensors, {count:,} values; use with {spec.used_with}"
    return f"{spec.what}: {str(data.dtype).replace('torch.', '')} {tuple(data.shape)}; use with {spec.used_with}"


__all__ = ["KINDS", "SampleKind", "check_request", "describe", "make_samples", "write_samples"]
