"""Load an artifact folder and run it: ``graphpress.runtime.load(folder)(x) -> [np.ndarray, ...]``.

The backend runner is picked from ``manifest["backend"]`` through a small registry of loader
functions (:func:`register_loader`): ``"onnxruntime"``, ``"torch"`` (a ``torch.export``
program; needs torch) and ``"he"`` (encrypted inference; it needs torch and tenseal, imported
only for HE artifacts) and ``"tvm"`` (the compiled library in a Relax VM; needs apache-tvm, not torch).
Loading and running an ONNX or TVM artifact needs numpy and that runtime only: nothing here
imports torch (torch tensors are accepted when torch is already imported).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from graphpress.errors import ArtifactError, GraphpressError
from graphpress.runtime.artifact import Artifact, IOSpec, read_artifact

# A loader builds a runner (positional arrays in, list of numpy arrays out) for an artifact.
Loader = Callable[..., Any]
_LOADERS: dict[str, Loader] = {}


def register_loader(backend: str) -> Callable[[Loader], Loader]:
    """Register ``fn(artifact, *, providers, threads) -> runner`` for ``manifest["backend"] == backend``."""

    def deco(fn: Loader) -> Loader:
        _LOADERS[backend] = fn
        return fn

    return deco


@register_loader("onnxruntime")
def _load_onnxruntime(artifact: Artifact, *, providers: Sequence[Any] | None = None, threads: int | None = None) -> Any:
    # Imported here so that a TVM-only install can load TVM artifacts without onnxruntime.
    from graphpress.backends.onnxruntime.session import OrtRunner

    return OrtRunner(artifact.model_path, providers=providers, threads=threads)


@register_loader("torch")
def _load_torch(artifact: Artifact, *, providers: Sequence[Any] | None = None, threads: int | None = None) -> Any:
    from graphpress.backends.torch.lower import TorchRunner

    return TorchRunner(artifact.model_path, threads=threads)


@register_loader("tvm")
def _load_tvm(artifact: Artifact, *, providers: Sequence[Any] | None = None, threads: int | None = None) -> Any:
    # torch-free: the compiled library, its metadata and the Relax VM
    from graphpress.backends.tvm.runner import TVMRunner

    return TVMRunner(artifact.model_path, threads=threads)


@register_loader("he")
def _load_he(artifact: Artifact, *, providers: Sequence[Any] | None = None, threads: int | None = None) -> Any:
    # HE artifacts need torch (the client graph) and tenseal; imported only for them.
    from graphpress.backends.he import require_tenseal

    require_tenseal()
    from graphpress.backends.he.lower import load_runner

    return load_runner(artifact.folder)


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str] | None:
    """Shape and dtype name of a torch tensor without converting it (numpy has no bfloat16, so
    ``.numpy()`` would fail before the dtype could be judged); None for anything else."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return tuple(x.shape), str(x.dtype).removeprefix("torch.")
    return None


def _as_array(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def _np_dtype(name: str) -> np.dtype | None:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and friends have no numpy dtype; the runner will judge
        return None


class LoadedModel:
    """A runnable artifact.

    Attributes
    ----------
    artifact : Artifact
    manifest : dict
    inputs, outputs : list of IOSpec
        From the manifest; ``__call__`` takes inputs in this order and returns outputs in this order.
    runner : object
        The backend runner (e.g. :class:`~graphpress.backends.onnxruntime.session.OrtRunner`).
    """

    def __init__(self, artifact: Artifact, runner: Any):
        self.artifact = artifact
        self.manifest = artifact.manifest
        self.folder = artifact.folder
        self.inputs: list[IOSpec] = artifact.inputs
        self.outputs: list[IOSpec] = artifact.outputs
        self.runner = runner
        names = [s.name for s in self.inputs]
        runner_names = list(getattr(runner, "input_names", names))
        if sorted(runner_names) != sorted(names):
            raise ArtifactError(
                f"{self.folder}: {artifact.model_file} has inputs {runner_names}, manifest.json lists {names}"
            )
        # Feed the runner in its own order even if the manifest lists inputs differently.
        self._order = [names.index(n) for n in runner_names]
        self._dtypes = [_np_dtype(s.dtype) for s in self.inputs]

    def _expected(self, spec: IOSpec) -> str:
        return f"{spec.shape_str()} {spec.dtype}"

    def validate(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Convert inputs to numpy and check count, rank, fixed dims, shared symbolic dims, dtype.

        Raises
        ------
        ArtifactError
            One line naming the input and its expected shape and dtype.
        """
        if len(inputs) != len(self.inputs):
            want = ", ".join(f"{s.name} {self._expected(s)}" for s in self.inputs)
            raise ArtifactError(f"{self.folder.name}: got {len(inputs)} inputs, expected {len(self.inputs)}: {want}")
        arrays, bound = [], {}
        for spec, want_dtype, x in zip(self.inputs, self._dtypes, inputs):
            meta = _shape_dtype(x)
            if meta is None:
                a = _as_array(x)
                shape, dtype = tuple(a.shape), str(a.dtype)
            else:
                shape, dtype = meta
            got = f"got {shape} {dtype}"
            if len(shape) != len(spec.shape):
                raise ArtifactError(f"input {spec.name!r}: expected rank {len(spec.shape)} {self._expected(spec)}, {got}")
            for axis, (want, have) in enumerate(zip(spec.shape, shape)):
                if isinstance(want, int):
                    if want != have:
                        raise ArtifactError(f"input {spec.name!r}: expected {self._expected(spec)}, {got} (dim {axis})")
                else:
                    # Symbolic dims with one name (the shared "batch") must agree across inputs.
                    first = bound.setdefault(want, (spec.name, have))
                    if first[1] != have:
                        raise ArtifactError(f"input {spec.name!r}: dim {axis} ({want}) is {have} but input {first[0]!r} has {first[1]}")
            # Compared by name: bfloat16 (torch, or numpy via ml_dtypes) has no plain numpy dtype.
            if want_dtype is not None and dtype != str(want_dtype):
                raise ArtifactError(f"input {spec.name!r}: expected dtype {spec.dtype} {spec.shape_str()}, {got}; cast it first")
            arrays.append(_as_array(x) if meta is not None else a)
        return arrays

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        """Run the model on positional inputs (numpy arrays or torch tensors) in manifest order.

        Returns
        -------
        list of np.ndarray
            In the order of :attr:`outputs`.
        """
        arrays = self.validate(inputs)
        return list(self.runner(*(arrays[i] for i in self._order)))

    @property
    def kv_cache(self) -> bool:
        """Whether this is a decoder artifact with a KV cache (``past_key_values.*`` inputs):
        :meth:`generate` then runs one token per step."""
        return any(s.name.startswith("past_key_values.") for s in self.inputs)

    @property
    def context_length(self) -> int | None:
        """The most tokens a KV-cache decoder artifact was built for (its source's
        ``max_position_embeddings``), None when unknown."""
        facts = (self.manifest.get("source") or {}).get("kv_cache") or {}
        value = facts.get("context_length")
        return int(value) if isinstance(value, int) and value > 0 else None

    def generate(self, prompt_ids: Any, max_new_tokens: int = 32, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_token_id: int | None = None,
                 on_token: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
        """Continue ``prompt_ids`` with a decoder artifact: greedy (``temperature=0``, the
        default) or sampled with temperature, top-k and top-p, seeded by ``seed``; see
        :func:`graphpress.runtime.generate.generate`.

        Raises
        ------
        ArtifactError
            One line: not a decoder artifact, bad prompt ids, or a bad sampling option.
        """
        from graphpress.runtime.generate import Sampling, generate

        sampling = Sampling(temperature, top_k, top_p, seed)
        return generate(self, prompt_ids, max_new_tokens, sampling, eos_token_id=eos_token_id, on_token=on_token)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}{s.shape_str()}:{s.dtype}" for s in self.inputs)
        return f"LoadedModel({str(self.folder)!r}, backend={self.artifact.backend!r}, inputs=[{ins}])"


def load(
    folder: str | os.PathLike,
    *,
    verify_hashes: bool = True,
    providers: Sequence[Any] | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Load an artifact folder written by :func:`graphpress.runtime.write_artifact`.

    Parameters
    ----------
    folder : path
    verify_hashes : bool
        Check every file's sha256 against the manifest (a full read of the model files).
    providers : sequence, optional
        onnxruntime execution providers; default CUDA when available, else CPU.
    threads : int, optional
        Intra-op threads of the backend runner; default: the runtime's own default.

    Returns
    -------
    LoadedModel

    Raises
    ------
    ArtifactError
        One line: folder or manifest missing, invalid JSON, unknown ``format_version``, a file's
        sha256 mismatch (naming it), unknown backend, or the backend could not load the model.

    Examples
    --------
    >>> model = load("out/resnet20")                          # doctest: +SKIP
    >>> (logits,) = model(np.zeros((4, 3, 32, 32), np.float32))  # doctest: +SKIP
    """
    artifact = read_artifact(folder, verify_hashes=verify_hashes)
    backend = artifact.backend
    loader = _LOADERS.get(backend)
    if loader is None:
        raise ArtifactError(f"{artifact.folder}: unknown backend {backend!r}; this graphpress loads: {', '.join(sorted(_LOADERS))}")
    try:
        runner = loader(artifact, providers=providers, threads=threads)
    except ArtifactError:
        raise
    except GraphpressError as err:
        raise ArtifactError(f"{artifact.folder}: {err}") from err
    except ImportError as err:
        raise ArtifactError(f"{artifact.folder}: backend {backend!r} needs a missing package: {err}") from err
    return LoadedModel(artifact, runner)


__all__ = ["LoadedModel", "load", "register_loader"]
