"""Frontend: a Hugging Face model folder (``config.json`` + weights) -> :class:`Graph`.

The model is built with ``transformers`` from its config (``from_config``; nothing is
downloaded) and its weights are read by graphpress's own safe readers: safetensors files
(single or sharded with ``model.safetensors.index.json``) or ``pytorch_model.bin`` through
``torch.load(weights_only=True)``. The captured graph takes ``input_ids`` (batch, seq) and
returns the model's logits (or last hidden state for headless models), through
:class:`HFLogits` (also what :mod:`graphpress.zoo.hf_tiny`'s tiny models are wrapped in).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from graphpress.errors import FrontendError
from graphpress.frontends.checkpoint import read_state_dict
from graphpress.frontends.safetensors import read_safetensors
from graphpress.frontends.state_dict import load_into
from graphpress.frontends.torch_module import TOKEN_DIMS, from_module
from graphpress.ir.graph import Graph

#: Sequence length of :meth:`HFLogits.example_inputs`.
EXAMPLE_SEQ_LEN = 16
# Token range of example inputs when a config names no vocabulary size (the zoo's tiny vocab).
_FALLBACK_VOCAB = 1000


class HFLogits(nn.Module):
    """Wrap a ``transformers`` model so ``forward`` returns a plain tensor.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        Any model whose output has ``logits`` (LM heads, classifiers) or
        ``last_hidden_state`` (bare encoders/decoders).

    Notes
    -----
    ``forward(input_ids, attention_mask=None)`` calls the model with
    ``return_dict=True`` and, when the model accepts it, ``use_cache=False`` (a KV cache
    object in the output would not export and is useless for a full-sequence forward).
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.model = hf_model
        params = inspect.signature(hf_model.forward).parameters
        # BERT has no KV cache and takes no use_cache argument; decoders do.
        self._pass_use_cache = "use_cache" in params
        self._accepts_mask = "attention_mask" in params
        config = getattr(hf_model, "config", None)
        self.vocab_size = int(getattr(config, "vocab_size", _FALLBACK_VOCAB) or _FALLBACK_VOCAB)
        self._example_seq_len = min(EXAMPLE_SEQ_LEN, _max_positions(config) or EXAMPLE_SEQ_LEN)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "return_dict": True}
        if attention_mask is not None:
            if not self._accepts_mask:
                raise TypeError(f"{type(self.model).__name__} takes no attention_mask")
            kwargs["attention_mask"] = attention_mask
        if self._pass_use_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        if getattr(out, "logits", None) is not None:
            return out.logits
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
        return out[0]

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        """Seeded random token ids ``LongTensor[batch, 16]`` in ``[0, vocab_size)``.

        Parameters
        ----------
        batch : int
            Number of sequences.

        Returns
        -------
        tuple of torch.Tensor
            ``(input_ids,)``.
        """
        gen = torch.Generator().manual_seed(0)
        return (torch.randint(0, self.vocab_size, (batch, self._example_seq_len), generator=gen),)


def _max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def wrap_hf_model(hf_model: nn.Module, attn_implementation: str | None = None) -> HFLogits:
    """Wrap a loaded ``transformers`` model as :class:`HFLogits`, in eval mode.

    Parameters
    ----------
    hf_model : transformers.PreTrainedModel
        The model (e.g. from ``AutoModelForCausalLM.from_pretrained``).
    attn_implementation : str, optional
        If given (``"eager"`` or ``"sdpa"``), switch the model's attention kernel
        first; ``None`` keeps what the model was loaded with. Both export.

    Returns
    -------
    HFLogits
    """
    if attn_implementation is not None and hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation(attn_implementation)
    return HFLogits(hf_model.eval()).eval()


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as err:
            raise FrontendError(f"{index}: invalid shard index: {err}") from None
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard))
        return state
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return read_state_dict(folder / "pytorch_model.bin")
    raise FrontendError(f"{folder}: no weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)")


def read_hf_config(folder: str | Path) -> Any:
    """The folder's ``transformers`` config with eager attention (it exports cleanly with dynamic
    shapes; sdpa paths add mask code that may not); one-line errors."""
    try:
        import transformers
    except ImportError:
        raise FrontendError(f"{folder}: Hugging Face folders need transformers: pip install 'graphpress[hf]'") from None
    folder = Path(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"{folder / 'config.json'}: cannot read config: {first[:200]}") from None
    config._attn_implementation = "eager"
    return config


def build_hf_model(folder: str | Path) -> torch.nn.Module:
    """Instantiate the folder's architecture from its config and load its weights (strict)."""
    import transformers

    folder = Path(folder)
    config = read_hf_config(folder)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("cpu"):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    state = read_hf_weights(folder)
    load_into(model, state, path=str(folder), arch=type(model).__name__)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def open_hf_folder(folder: str | Path) -> tuple[Path, torch.nn.Module]:
    """``(folder, model)``: the folder checked (one-line errors) and its model built with
    :func:`build_hf_model`; what both the logits capture and the KV-cache capture start from."""
    folder = Path(folder)
    if not folder.exists():
        raise FrontendError(f"{folder}: folder not found")
    if not is_hf_folder(folder):
        raise FrontendError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder, build_hf_model(folder)


def load_hf_folder(
    folder: str | Path,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    seq_len: int = 16,
    dynamic_batch: bool = True,
) -> Graph:
    """Capture a HF model folder; example input: seeded ``input_ids`` of shape (2, seq_len)."""
    folder, hf = open_hf_folder(folder)
    wrapper = wrap_hf_model(hf)
    if example_inputs is None:
        vocab = int(getattr(hf.config, "vocab_size", 100))
        seq = min(seq_len, int(getattr(hf.config, "max_position_embeddings", seq_len) or seq_len))
        gen = torch.Generator().manual_seed(0)
        example_inputs = (torch.randint(0, vocab, (2, seq), generator=gen),)
    return from_module(
        wrapper,
        example_inputs,
        name=folder.name,
        dynamic_dims=TOKEN_DIMS if dynamic_batch else {},
        input_names=["input_ids"],
        output_names=["logits"],
        source={"frontend": "huggingface", "path": str(folder), "architecture": type(hf).__name__},
    )
