"""Frontends turn a model source into an :class:`~graphpress.ir.graph.Graph`.

:func:`load` picks one from what it is given:

==================================  ===========================================
source                              frontend
==================================  ===========================================
``nn.Module``                       :func:`from_module` (example inputs needed)
``package.module:factory``          the factory's module (e.g. ``graphpress.zoo:resnet20``)
folder with ``config.json``         Hugging Face (:func:`load_hf_folder`)
``*.onnx``                          graphpress's ONNX importer (:func:`load_onnx`)
``*.safetensors``                   weights + ``arch`` (:func:`load_safetensors`)
``*.bin`` with a llama2.c header    llama2.c (:func:`load_llama2c_graph`)
``*.pt *.pth *.th *.ckpt *.bin``    ``torch.load(weights_only=True)`` + ``arch``
==================================  ===========================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.checkpoint import load_checkpoint
from graphpress.frontends.huggingface import is_hf_folder, load_hf_folder
from graphpress.frontends.llama2c import is_llama2c, load_llama2c_graph
from graphpress.frontends.onnx import load_onnx
from graphpress.frontends.safetensors import load_safetensors
from graphpress.frontends.torch_module import build_from_factory, from_module, parse_shape
from graphpress.ir.graph import Graph

CHECKPOINT_SUFFIXES = {".pt", ".pth", ".th", ".ckpt", ".bin", ".tar"}


def _is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (legacy: a pickle starting with the PROTO opcode 0x80)."""
    with path.open("rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def looks_like_factory(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists() and "/" not in spec.partition(":")[0]


def load(
    source: Any,
    *,
    arch: str | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | str | None = None,
    dynamic_batch: bool = True,
    kv_cache: bool = False,
) -> Graph:
    """Capture ``source`` (a module, a factory spec, or a path) as a :class:`Graph`.

    Parameters
    ----------
    source : nn.Module, str or Path
        See the module docstring for what is accepted.
    arch : str, optional
        ``'package.module:factory'`` for weight-only files (checkpoints, safetensors).
    example_inputs : sequence of Tensor, optional
        Inputs to trace with; defaults come from the model (``example_inputs(batch)``),
        ``input_shape``, or the format (ONNX input specs, token ids for language models).
    input_shape : sequence of int or str, optional
        Shape of a single float input, e.g. ``"1x3x32x32"``.
    kv_cache : bool
        Capture a Hugging Face causal LM as one generation step with a KV cache
        (:mod:`graphpress.frontends.hf_kv`) instead of ``input_ids -> logits``.
    """
    if isinstance(input_shape, str):
        input_shape = parse_shape(input_shape)
    if kv_cache:
        return _load_kv(source, example_inputs, input_shape)
    if isinstance(source, torch.nn.Module):
        return from_module(source, example_inputs, input_shape=input_shape, dynamic_batch=dynamic_batch)
    text = str(source)
    if looks_like_factory(text):
        module = build_from_factory(text)
        return from_module(
            module,
            example_inputs,
            input_shape=input_shape,
            name=text.partition(":")[2],
            dynamic_batch=dynamic_batch,
            source={"frontend": "factory", "arch": text},
        )
    path = Path(text)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            raise FrontendError(f"{path}: is a graphpress artifact, not a model source; run it with graphpress.runtime.load or 'compress bench'")
        if is_hf_folder(path):
            return load_hf_folder(path, example_inputs=example_inputs, dynamic_batch=dynamic_batch)
        raise FrontendError(
            f"{path}: folder is neither a graphpress artifact (no manifest.json) nor a Hugging Face model folder (no config.json)"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(path, example_inputs=example_inputs, input_shape=input_shape, dynamic_batch=dynamic_batch)
    if suffix == ".safetensors":
        return load_safetensors(path, arch or "", example_inputs=example_inputs, input_shape=input_shape, dynamic_batch=dynamic_batch)
    if suffix == ".bin" and not arch and (is_llama2c(path) or not _is_torch_file(path)):
        # not a torch zip/pickle: a llama2.c file, and its reader explains a bad size or header
        return load_llama2c_graph(path, example_inputs=example_inputs, dynamic_batch=dynamic_batch)
    if suffix in CHECKPOINT_SUFFIXES or arch:
        return load_checkpoint(path, arch or "", example_inputs=example_inputs, input_shape=input_shape, dynamic_batch=dynamic_batch)
    raise FrontendError(
        f"{path}: unknown model format '{suffix or path.name}': expected .onnx, .safetensors, .pt/.pth/.th/.ckpt/.bin, "
        "a llama2.c .bin, or a Hugging Face folder"
    )


def _load_kv(source: Any, example_inputs: Any, input_shape: Any) -> Graph:
    """``load(..., kv_cache=True)``: a Hugging Face causal-LM folder, or a llama2.c file through
    its transformers Llama twin (:mod:`graphpress.frontends.llama2c.to_hf`)."""
    path = Path(str(source))
    is_l2c = not isinstance(source, torch.nn.Module) and path.is_file() and is_llama2c(path)
    if isinstance(source, torch.nn.Module) or not (is_hf_folder(path) or is_l2c):
        what = type(source).__name__ if isinstance(source, torch.nn.Module) else str(source)
        raise FrontendError(f"{what}: --kv-cache needs a Hugging Face causal-LM folder (config.json + weights) or a llama2.c .bin")
    if example_inputs is not None or input_shape is not None:
        raise FrontendError(f"{path}: --kv-cache makes its own example inputs (prefill prompts, and a cached prefix to trace with); drop --input-shape / example inputs")
    from graphpress.frontends.hf_kv import capture_kv_decoder, load_hf_kv_folder

    if is_l2c:
        from graphpress.frontends.llama2c import load_llama2c
        from graphpress.frontends.llama2c.to_hf import to_transformers

        return capture_kv_decoder(to_transformers(load_llama2c(path)), name=path.stem, source={"frontend": "llama2c", "path": str(path)})
    return load_hf_kv_folder(path)


__all__ = [
    "load",
    "from_module",
    "load_checkpoint",
    "load_safetensors",
    "load_hf_folder",
    "load_onnx",
    "load_llama2c_graph",
    "parse_shape",
]
