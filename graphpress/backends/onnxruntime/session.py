"""Run an ONNX model with ONNX Runtime: numpy arrays (or torch tensors) in, numpy arrays out.

Needs only numpy and onnxruntime: torch tensors are recognised through ``sys.modules`` so that
this module never imports torch itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from graphpress.errors import BackendError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def default_providers() -> list[str]:
    """``[CUDA, CPU]`` when the installed onnxruntime has the CUDA EP, else ``[CPU]``.

    Other EPs the wheel may list (e.g. ``AzureExecutionProvider``) are left out: they do not run
    models locally. CPU stays last as the fallback for ops the CUDA EP lacks.
    """
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def to_numpy(x: Any) -> np.ndarray:
    """A C-contiguous numpy view/copy of ``x`` (numpy array, torch tensor, or array-like)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    # ORT reads the buffer directly and needs C order; ascontiguousarray is free when it already is.
    return np.ascontiguousarray(x)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    # ORT messages start with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ..."; keep the tail.
    line = text.splitlines()[0] if text else type(err).__name__
    return line.rsplit(" : ", 1)[-1][:300]


class OrtRunner:
    """An ``onnxruntime.InferenceSession`` with a positional-call interface.

    Parameters
    ----------
    model_path : str or Path
        The ``.onnx`` file (external-data files must sit next to it).
    providers : sequence, optional
        Execution providers in priority order (names or ``(name, options)`` pairs);
        default :func:`default_providers` (CUDA when available, else CPU).
    threads : int, optional
        Intra-op thread count; default: ORT's own default (one per physical core).

    Attributes
    ----------
    input_names, output_names : list of str
        In the model's order; ``__call__`` takes inputs in this order.
    providers : list of str
        The providers the session actually uses (ORT drops a listed EP it cannot start).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        threads: int | None = None,
    ):
        self.model_path = Path(model_path)
        providers = list(providers) if providers is not None else default_providers()
        available = ort.get_available_providers()
        for p in providers:
            name = p[0] if isinstance(p, tuple) else p
            if name not in available:
                raise BackendError(f"onnxruntime: execution provider {name!r} is not available; available: {', '.join(available)}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        # ORT logs warnings (e.g. unused initializers, EP fallbacks) straight to stderr; keep errors only.
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        except Exception as err:  # noqa: BLE001 -- ORT raises its own pybind exception types
            raise BackendError(f"{self.model_path.name}: onnxruntime could not load the model: {_first_line(err)}") from err
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.threads = threads

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """Run the model on positional inputs (numpy arrays or torch tensors, in input order)."""
        if len(inputs) != len(self.input_names):
            raise BackendError(f"{self.model_path.name}: got {len(inputs)} inputs, expected {len(self.input_names)} ({', '.join(self.input_names)})")
        feed = {name: to_numpy(x) for name, x in zip(self.input_names, inputs)}
        try:
            return self.session.run(self.output_names, feed)
        except Exception as err:  # noqa: BLE001
            raise BackendError(f"{self.model_path.name}: onnxruntime run failed: {_first_line(err)}") from err

    def shared_cache_decoder(self, past: Sequence[str], present: Sequence[str], shape: Sequence[int], dtype: str = "float32",
                             logits: str = "logits", ids: str | None = None) -> "SharedCacheDecoder":
        """A :class:`SharedCacheDecoder` over this session (see there)."""
        return SharedCacheDecoder(self, past, present, shape, dtype, logits, ids)

    def __repr__(self) -> str:
        return f"OrtRunner({self.model_path.name!r}, inputs={self.input_names}, providers={self.providers})"


class SharedCacheDecoder:
    """Generation steps of a KV-cache decoder whose attention writes into full-length cache
    buffers in place (``com.microsoft.GroupQueryAttention``), through ORT's IOBinding.

    Each layer's key and value cache is allocated once, ``shape = (batch, kv_heads, max_len,
    head_dim)``, and bound both as the step's past and as its present: the kernel sees the same
    buffer and appends the step's keys and values in place (what ONNX Runtime GenAI does with
    ``past_present_share_buffer``), instead of the runtime feeding the presents back as new
    arrays every step. A step takes the new token ids, the mask over everything so far and the
    positions; it returns the logits.

    With ``ids`` (the token input's name), a one-token step writes its logits into one buffer kept
    for the whole generation instead of an array ORT allocates and the runtime copies each step;
    the returned array is that buffer, valid until the next call.
    """

    def __init__(self, runner: OrtRunner, past: Sequence[str], present: Sequence[str], shape: Sequence[int], dtype: str,
                 logits: str, ids: str | None = None):
        self.runner, self.session = runner, runner.session
        self.past, self.present, self.logits, self.ids = list(past), list(present), logits, ids
        self._step_out: np.ndarray | None = None  # (batch, 1, vocab), bound while steps are one token
        self.caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(tuple(shape), dtype=dtype)) for _ in self.past]
        # one binding for the whole generation: the caches are bound once, a step rebinds only
        # its token ids, mask, positions and the logits
        self.binding = self.session.io_binding()
        for name, cache in zip(self.past, self.caches):
            self.binding.bind_ortvalue_input(name, cache)
        for name, cache in zip(self.present, self.caches):
            self.binding.bind_ortvalue_output(name, cache)

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, np.ascontiguousarray(value))
        one = self.ids is not None and feeds[self.ids].shape[1] == 1
        if one and self._step_out is not None:
            pass  # the step buffer is still bound
        else:
            self.binding.bind_output(self.logits)  # unallocated: the prompt's shape
            self._step_out = None
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as err:  # noqa: BLE001
            raise BackendError(f"{self.runner.model_path.name}: onnxruntime run failed: {_first_line(err)}") from err
        if one and self._step_out is not None:
            return self._step_out
        out = self.binding.get_outputs()[-1].numpy()
        if one:  # the first one-token step: its shape is every later step's; bind a buffer of it
            self._step_out = np.empty_like(out)
            self.binding.bind_output(self.logits, "cpu", 0, self._step_out.dtype, list(self._step_out.shape), self._step_out.ctypes.data)
        return out


__all__ = ["OrtRunner", "default_providers", "to_numpy", "CUDA", "CPU"]
