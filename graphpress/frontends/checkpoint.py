"""Frontend: a PyTorch checkpoint (weights only) + an architecture factory -> :class:`Graph`.

The file is read with ``torch.load(weights_only=True)``: graphpress never unpickles code. A
checkpoint that needs code to load (a pickled ``nn.Module``, custom classes) is refused with a
one-line error telling the user to re-save a ``state_dict``. Accepted layouts: a flat state
dict, or a dict holding one under ``state_dict`` / ``model_state_dict`` / ``model``, with or
without ``module.`` / ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from graphpress.errors import FrontendError
from graphpress.frontends.state_dict import capture_weights_file
from graphpress.ir.graph import Graph

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a torch checkpoint safely; one-line errors for every failure."""
    path = Path(path)
    if not path.exists():
        raise FrontendError(f"{path}: file not found")
    if path.is_dir():
        raise FrontendError(f"{path}: is a folder, expected a checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        # torch words a blocked global differently per module and version (and some payloads
        # surface as other errors), so the file's own pickle opcodes decide what is reported.
        code = pickled_globals(path)
        if code:
            raise FrontendError(
                f"{path}: refused: the checkpoint contains pickled code or objects ({', '.join(code[:3])}); graphpress "
                "loads weights only: re-save it with torch.save(model.state_dict(), ...) or as safetensors"
            ) from None
        if isinstance(err, pickle.UnpicklingError):
            detail = _weights_unpickler_detail(str(err))
            if "Unsupported global" in detail or "Unsupported class" in detail or "GLOBAL" in detail:
                raise FrontendError(
                    f"{path}: refused: the checkpoint contains pickled code or objects ({detail[:160]}); graphpress loads "
                    "weights only: re-save it with torch.save(model.state_dict(), ...) or as safetensors"
                ) from None
            raise FrontendError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail[:160]}") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FrontendError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first[:200]}") from None
    return extract_state_dict(obj, path)


# Globals a weights-only checkpoint legitimately names: torch's tensor/storage rebuilders and
# dtypes, OrderedDict, and the numpy scalars/arrays some trainers store next to the weights.
# Anything else (os.system, subprocess.Popen, builtins.eval, a user class) is code or an object.
_SAFE_GLOBAL_MODULES = ("torch", "torch.")
_SAFE_GLOBALS = {
    "collections OrderedDict",
    "builtins set",
    "builtins frozenset",
    "builtins bytearray",
    "builtins complex",
    "builtins slice",
    "_codecs encode",
    "numpy.core.multiarray _reconstruct",
    "numpy._core.multiarray _reconstruct",
    "numpy.core.multiarray scalar",
    "numpy._core.multiarray scalar",
    "numpy ndarray",
    "numpy dtype",
}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickle_streams(path: Path) -> Iterator[bytes | io.BufferedIOBase]:
    """The pickles of a torch file: every ``*.pkl`` member of a zip checkpoint, or the legacy
    format's leading pickles (magic number, protocol, sys info, the object, storage keys)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith(".pkl"):
                    yield zf.read(name)
        return
    with path.open("rb") as fh:
        yield fh  # consecutive pickles are read from the same handle


def _globals_of(stream: bytes | io.BufferedIOBase, limit: int) -> list[str]:
    """``"module name"`` of every GLOBAL / STACK_GLOBAL / INST opcode in up to ``limit`` pickles."""
    fh = io.BytesIO(stream) if isinstance(stream, bytes) else stream
    found: list[str] = []
    for _ in range(limit):
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _pos in pickletools.genops(fh):
                if op.name in _STRING_OPS:
                    strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
                elif op.name in ("GLOBAL", "INST"):
                    found.append(str(arg))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]} {strings[-1]}")
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
        except Exception:  # noqa: BLE001 -- the end of the pickles, or damage: report what was read
            break
    return found


def _python3_name(ref: str) -> str:
    """Protocol <= 2 pickles spell globals the Python 2 way (``__builtin__ eval``,
    ``commands Popen``); map them back as the unpickler would, so messages name the real thing."""
    import _compat_pickle

    module, _, name = ref.partition(" ")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module} {name}"


def pickled_globals(path: str | Path) -> list[str]:
    """Globals in a torch file's pickles that are not weights (e.g. ``['posix.system']``), in order.

    An empty list means the pickles name only torch's rebuilders and plain containers (or could
    not be parsed at all). Never unpickles anything: the opcodes are only listed.
    """
    path = Path(path)
    bad: list[str] = []
    try:
        for stream in _pickle_streams(path):
            for ref in map(_python3_name, _globals_of(stream, limit=5)):
                module = ref.split(" ")[0]
                if ref in _SAFE_GLOBALS or module == "torch" or module.startswith(_SAFE_GLOBAL_MODULES[1]):
                    continue
                name = ref.replace(" ", ".")
                if name not in bad:
                    bad.append(name)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return bad
    return bad


def _weights_unpickler_detail(message: str) -> str:
    """The informative line of torch's weights-only unpickler error (its first lines are boilerplate)."""
    for line in message.splitlines():
        if "WeightsUnpickler error:" in line and line.split("WeightsUnpickler error:")[1].strip():
            return line.split("WeightsUnpickler error:")[1].strip().split(". Please use")[0]
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[2] if len(lines) > 2 else (lines[0] if lines else "unpickling failed")


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        raise FrontendError(f"{path}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:6]))})")
    raise FrontendError(f"{path}: expected a state dict, got {type(obj).__name__}")


def load_checkpoint(
    path: str | Path,
    arch: str,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_shape: Sequence[int] | None = None,
    dynamic_batch: bool = True,
) -> Graph:
    """Build ``arch`` (``'package.module:factory'``), load the checkpoint's weights, capture it."""
    return capture_weights_file(
        path,
        arch,
        read_state_dict,
        frontend="checkpoint",
        example_inputs=example_inputs,
        input_shape=input_shape,
        dynamic_batch=dynamic_batch,
    )
