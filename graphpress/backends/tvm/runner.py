"""Run a compiled TVM artifact (``model.so`` + ``model.json``) with the Relax VM; imports no torch.

``model.so`` is the exported Relax executable (weights embedded as constants); ``model.json`` names
the inputs and outputs and records the target the library was built for. A tuned library (see
:mod:`graphpress.backends.tvm.tune`) also holds ``main_static``, the tuned schedules for the
shapes listed in ``model.json["static_shapes"]``: inputs of exactly those shapes run there, any
other shapes run through ``main``. The library only runs
on a CPU that supports the recorded ``mcpu``'s instruction set.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from graphpress.errors import BackendError

META_FILE = "model.json"


def require_tvm() -> Any:
    """``import tvm``, or one line saying how to install it."""
    try:
        import tvm
    except ImportError as err:
        raise BackendError('tvm: apache-tvm is not installed; pip install -e ".[tvm]" (apache-tvm==0.27.0.post1, apache-tvm-ffi==0.1.14.post1)') from err
    return tvm


def _as_numpy(x: Any) -> np.ndarray:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


_LOADED: dict[str, tuple[int, int]] = {}


def _loadable(path: Path) -> Path:
    """``path``, or a fresh copy of it when this process already loaded a different file there.

    ``dlopen`` hands back the library already mapped under the same name, so after tuning rewrote
    ``model.so`` a new runner in the same process would silently run the old library.
    """
    key = str(path.resolve())
    st = path.stat()
    stamp = (st.st_ino, st.st_mtime_ns)
    if _LOADED.setdefault(key, stamp) == stamp:
        return path
    fd, copy = tempfile.mkstemp(prefix=path.stem + "-", suffix=path.suffix)
    os.close(fd)
    shutil.copy2(path, copy)
    return Path(copy)


class TVMRunner:
    """A loaded TVM artifact: positional arrays (numpy or torch) in, numpy arrays out.

    Parameters
    ----------
    model_path : path
        The ``model.so`` library; ``model.json`` must sit next to it.
    threads : int, optional
        Sets ``TVM_NUM_THREADS`` before the library is loaded (the TVM thread pool reads it once
        per process: the first runner's value wins).
    """

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None):
        tvm = require_tvm()
        from tvm import relax

        self.model_path = Path(model_path)
        meta_path = self.model_path.with_name(META_FILE)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise BackendError(f"{meta_path}: cannot read the TVM artifact's metadata ({err}); re-export the artifact") from err
        self.input_names: list[str] = list(meta["inputs"])
        self.output_names: list[str] = list(meta["outputs"])
        self.target = meta.get("target")
        if threads is not None:
            os.environ.setdefault("TVM_NUM_THREADS", str(int(threads)))
        device = tvm.cpu()
        if (self.target or {}).get("kind") == "cuda":
            # A CPU-only TVM wheel cannot even load a CUDA library: say so before trying.
            if not tvm.runtime.enabled("cuda") or not tvm.cuda(0).exist:
                raise BackendError(f"{self.model_path}: built for CUDA, but this machine has no CUDA device TVM can use "
                                   "(CPU-only TVM wheel or no GPU); run it on a GPU machine or re-export for llvm")
            device = tvm.cuda(0)
        try:
            lib = tvm.runtime.load_module(str(_loadable(self.model_path)))
        except Exception as err:
            raise BackendError(f"{self.model_path}: cannot load the TVM library: {str(err).strip().splitlines()[0]}") from err
        self._tvm = tvm
        self.vm = relax.VirtualMachine(lib, device)
        self._main = self.vm["main"]
        # A tuned library also holds main_static: the tuned schedules for exactly these shapes.
        static = meta.get("static_shapes")
        self.static_shapes = [tuple(int(d) for d in s) for s in static] if static else None
        self._static = self.vm["main_static"] if self.static_shapes else None

    def run_function(self, name: str, *inputs: Any) -> list[np.ndarray]:
        """Run one function of the library by name (``"main"``, or ``"main_static"`` in a tuned one)."""
        fn = {"main": self._main, "main_static": self._static}.get(name)
        if fn is None:
            raise BackendError(f"{self.model_path.name}: no function {name!r} (tuned libraries have main and main_static)")
        out = fn(*[self._tvm.runtime.tensor(_as_numpy(x)) for x in inputs])
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [o.numpy() for o in outs]

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        if len(inputs) != len(self.input_names):
            raise BackendError(f"{self.model_path.name}: got {len(inputs)} inputs, expected {len(self.input_names)} ({', '.join(self.input_names)})")
        arrays = [_as_numpy(x) for x in inputs]
        args = [self._tvm.runtime.tensor(a) for a in arrays]
        fn = self._static if self._static is not None and [a.shape for a in arrays] == self.static_shapes else self._main
        out = fn(*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [o.numpy() for o in outs]

    def __repr__(self) -> str:
        return f"TVMRunner({self.model_path.name!r}, inputs={self.input_names}, target={self.target})"


__all__ = ["META_FILE", "TVMRunner", "require_tvm"]
