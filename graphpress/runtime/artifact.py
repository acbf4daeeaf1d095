"""The artifact folder: model files + ``manifest.json`` + ``report.md``, written atomically.

Layout and manifest schema are documented in ``docs/artifact.md``. Rules:

* Everything is written to a temporary sibling ``.OUT.tmp-<pid>-<random>`` and renamed into
  place, so a crash or error never leaves a half-written ``OUT`` (and the temporary folder is
  removed). A run that was killed leaves its sibling behind; the next write into the same
  parent folder removes siblings whose process is gone (:func:`clean_stale_siblings`).
* ``manifest["files"]`` holds the sha256 and size of every file except ``manifest.json``
  itself, and ``manifest["manifest_sha256"]`` the hash of the manifest itself (its canonical
  JSON without that field); :func:`read_artifact` checks both.
* Folders get ordinary permissions (``0o777`` less the umask, files ``0o666`` less the umask),
  not the owner-only mode of a fresh temporary folder.
* An existing ``OUT`` is replaced only with ``overwrite=True`` and only when it is ours: a folder
  whose ``manifest.json`` says ``"format": "graphpress-artifact"`` and which holds no file the
  manifest does not list. A file, a user folder, or an artifact with extra files is refused even
  with ``overwrite``; an empty folder is fine. The old folder is moved aside first and deleted
  only once the new one is in place.

This module imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import graphpress
from graphpress.errors import ArtifactError

FORMAT = "graphpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.md"
SELF_HASH = "manifest_sha256"
_CHUNK = 1 << 20
# A temporary sibling's process may be gone without a trace (SIGKILL, a reboot): siblings named
# without a pid (older graphpress) are judged by age alone; write_artifact finishes in minutes.
STALE_SIBLING_AGE_S = 3600.0
# Lowering folders in the temp dir live as long as a run's lower/verify/bench stages.
STALE_SCRATCH_AGE_S = 6 * 3600.0
SCRATCH_PREFIXES = ("graphpress-lower-", "graphpress-baseline-")
SCRATCH_OWNER = ".graphpress-owner"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]+$")


# --------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class IOSpec:
    """Name, shape and dtype of a model input or output as stored in the manifest.

    The torch-free twin of :class:`graphpress.ir.graph.TensorSpec` (same dict form): ``shape``
    holds ints, or strings such as ``"batch"`` for symbolic dims.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IOSpec":
        return cls(str(d["name"]), tuple(d["shape"]), str(d["dtype"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def shape_str(self) -> str:
        return "(" + ", ".join(str(d) for d in self.shape) + ")"


# ------------------------------------------------------------------------------------ artifact
@dataclass
class Artifact:
    """A read artifact: its folder and its parsed manifest.

    Attributes
    ----------
    folder : Path
    manifest : dict
        The parsed ``manifest.json``.
    """

    folder: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    @property
    def model_file(self) -> str:
        return self.manifest["model_file"]

    @property
    def model_path(self) -> Path:
        return self.folder / self.model_file

    @property
    def inputs(self) -> list[IOSpec]:
        return [IOSpec.from_dict(d) for d in self.manifest.get("inputs", [])]

    @property
    def outputs(self) -> list[IOSpec]:
        return [IOSpec.from_dict(d) for d in self.manifest.get("outputs", [])]

    @property
    def report_md(self) -> str:
        path = self.folder / REPORT
        return path.read_text(encoding="utf-8") if path.is_file() else ""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _check_name(name: str) -> str:
    """A file name inside the artifact: relative, POSIX, no ``..`` (the manifest may come from
    an untrusted folder, so a name must never point outside it)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or any(part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"invalid artifact file name {name!r}: use a relative path without '..'")
    return str(p)


def _jsonable(obj: Any) -> Any:
    """Non-finite floats become "inf"/"-inf"/"nan" (JSON has no such numbers; SQNR is often inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, str) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths are common in reports; anything else is a caller bug and fails.
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return _jsonable(obj.item())
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """The manifest as indented JSON text; raises :class:`ArtifactError` when not serializable."""
    try:
        return json.dumps(_jsonable(manifest), indent=2, allow_nan=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"manifest is not JSON-serializable: {err}") from err


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without ``manifest_sha256``.

    Canonical, so re-indenting the file does not count as an edit while any changed value does.
    """
    body = {k: v for k, v in _jsonable(manifest).items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sealed_manifest_text(manifest: Mapping[str, Any]) -> str:
    """``manifest`` as ``manifest.json`` text with its ``manifest_sha256`` filled in.

    The digest is taken over the manifest as it will be read back (after the JSON round trip that
    turns numpy scalars, paths and tuples into plain JSON), so reading it verifies.
    """
    parsed = json.loads(dump_manifest({k: v for k, v in manifest.items() if k != SELF_HASH}))
    parsed[SELF_HASH] = manifest_digest(parsed)
    return dump_manifest(parsed)


def make_manifest(
    graph: Any,
    lowered: Any,
    *,
    recipe: Mapping[str, Any] | None = None,
    passes: Sequence[Mapping[str, Any]] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest for ``graph`` lowered as ``lowered`` (duck-typed: no torch import here).

    Parameters
    ----------
    graph : graphpress.ir.graph.Graph
        Supplies ``input_specs``, ``output_specs``, ``name``, ``source``, ``dynamic_batch``.
    lowered : graphpress.backends.base.LoweredModel
        Supplies ``backend``, ``model_file`` and, under ``"lowering"``, ``info`` and ``check``.
    recipe : mapping, optional
        The recipe as run.
    passes : sequence of mapping, optional
        Per-pass report dicts, in order.
    metrics : mapping, optional
        Model-level metrics (size, latency, accuracy...).

    Returns
    -------
    dict
        Ready for :func:`write_artifact` (which adds ``format``, ``created``, ``files``...).
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graphpress_version": graphpress.__version__,
        "created": _utc_now(),
        "backend": lowered.backend,
        "model_file": lowered.model_file,
        # the model file's interface: the graph's, unless the lowering changed it (caches stored as codes)
        "inputs": list((getattr(lowered, "io", None) or {}).get("inputs") or [s.to_dict() for s in graph.input_specs]),
        "outputs": list((getattr(lowered, "io", None) or {}).get("outputs") or [s.to_dict() for s in graph.output_specs]),
        "source": {"name": graph.name, "dynamic_batch": bool(graph.dynamic_batch), **dict(graph.source)},
        "recipe": dict(recipe or {}),
        "passes": [dict(p) for p in (passes or [])],
        "metrics": dict(metrics or {}),
        "lowering": {"info": dict(lowered.info), "check": dict(lowered.check)},
    }


def _is_our_artifact(folder: Path) -> str | None:
    """None when ``folder`` is an artifact we may replace, else the reason it is not."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "it is not a graphpress artifact (no manifest.json)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its manifest.json is not valid JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"its manifest.json is not a {FORMAT} manifest"
    listed = set((manifest.get("files") or {}).keys()) | {MANIFEST}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if rel not in listed:
            return f"it holds {rel!r}, which the manifest does not list"
    return None


def _fsync_dir(path: Path) -> None:
    # Make the rename durable on POSIX; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Prehashed:
    """A file :func:`write_artifact` *moves* into the artifact (``os.replace``: same file system)
    with the hash and size its writer computed while writing it, instead of copying and hashing
    it again: a streamed LLM's weights are gigabytes (about 1 s per GB to hash, more to copy)."""

    path: Path
    sha256: str
    bytes: int


def _place_file(src: "bytes | str | os.PathLike | Prehashed", dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, Prehashed):
        if not Path(src.path).is_file() or Path(src.path).stat().st_size != src.bytes:
            raise ArtifactError(f"{src.path}: not a file of {src.bytes} bytes (a pre-hashed artifact file changed before it was moved in)")
        os.replace(src.path, dst)
        return
    if isinstance(src, (bytes, bytearray, memoryview)):
        with open(dst, "wb") as f:
            f.write(src)
            f.flush()
            os.fsync(f.fileno())
        return
    src = Path(src)
    if not src.is_file():
        raise ArtifactError(f"{src}: not a file (artifact content must be bytes or a file path)")
    # A copy, not a hard link: a linked file shares its inode with the caller's, so re-lowering
    # into the same scratch folder would rewrite the artifact's model behind its hash.
    shutil.copyfile(src, dst)


def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _ordinary_permissions(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain ``mkdir`` / ``open`` would: mkdtemp
    makes ``0o700`` folders, which would hide the artifact from every other user."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except OSError:
        return 0.0


def _stale(path: Path, pid: int | None, max_age_s: float) -> bool:
    """A leftover of a run that is over: its process is gone, or (no pid known, or a pid reused
    for too long) it is older than ``max_age_s``."""
    if pid is not None and pid != os.getpid() and not _pid_alive(pid):
        return True
    return _age_s(path) > (max_age_s if pid is None else max(max_age_s, 24 * 3600.0))


def clean_stale_siblings(parent: str | os.PathLike, *, max_age_s: float = STALE_SIBLING_AGE_S) -> list[Path]:
    """Remove the temporary siblings killed runs of :func:`write_artifact` left in ``parent``.

    ``.OUT.tmp-<pid>-*`` folders (a write in progress) are deleted when their process is gone.
    ``.OUT.old-<pid>-*`` (an old artifact moved aside while being replaced) is renamed back to
    ``OUT`` when ``OUT`` is missing -- the replacement never landed -- and deleted otherwise.
    Names without a pid count as stale after ``max_age_s``.

    Returns
    -------
    list of Path
        What was removed (a restored folder is not listed).
    """
    parent = Path(parent)
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _SIBLING.match(path.name)
        if not m or path.is_symlink() or not path.is_dir():
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if not _stale(path, pid, max_age_s):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and not (target.exists() or target.is_symlink()) and (path / MANIFEST).is_file():
            try:
                os.rename(path, target)
                continue
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def clean_stale_scratch(
    tmpdir: str | os.PathLike | None = None, *, max_age_s: float = STALE_SCRATCH_AGE_S
) -> list[Path]:
    """Remove lowering folders (``graphpress-lower-*``, ``graphpress-baseline-*``) that killed runs
    left in the temp dir.

    A folder claimed with :func:`claim_scratch` records its process; it is removed once that
    process is gone. An unclaimed one is removed when older than ``max_age_s``.

    Returns
    -------
    list of Path
        The folders removed.
    """
    root = Path(tmpdir or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        entries = [p for p in root.iterdir() if p.name.startswith(SCRATCH_PREFIXES)]
    except OSError:
        return removed
    for path in entries:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            pid: int | None = int((path / SCRATCH_OWNER).read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid == os.getpid() or not _stale(path, pid, max_age_s):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def claim_scratch(folder: str | os.PathLike) -> Path:
    """Mark a lowering folder as this process's (a hidden owner file holding the pid) and clean
    the stale ones beside it, so a killed run's folder is removed by the next run.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    (folder / SCRATCH_OWNER).write_text(f"{os.getpid()}\n", encoding="ascii")
    clean_stale_scratch(folder.parent)
    return folder


def check_destination(out_dir: str | os.PathLike, overwrite: bool) -> str:
    """Whether an artifact may be written at ``out_dir``: ``"new"``, ``"empty"`` or ``"replace"``.

    Call it before long work so a refusal comes first. Raises a one-line :class:`ArtifactError`
    when ``out_dir`` exists without ``overwrite``, or is not ours to replace. It also removes
    what killed runs left behind: stale temporary siblings in ``out_dir``'s parent
    (:func:`clean_stale_siblings`) and stale lowering folders in the temp dir
    (:func:`clean_stale_scratch`).
    """
    out = Path(os.path.abspath(out_dir))
    # Every run checks its destination first: the place to clear what killed runs left behind.
    clean_stale_siblings(out.parent)
    clean_stale_scratch()
    if not (out.is_symlink() or out.exists()):
        return "new"
    if out.is_symlink() or not out.is_dir():
        kind = "a symlink" if out.is_symlink() else "not a folder"
        raise ArtifactError(f"{out} exists and is {kind}; refusing to replace it")
    if not any(out.iterdir()):
        return "empty"
    if not overwrite:
        raise ArtifactError(f"{out} exists; pass --overwrite to replace it")
    if why := _is_our_artifact(out):
        raise ArtifactError(f"{out} exists and {why}; refusing to replace it even with --overwrite")
    return "replace"


def write_artifact(
    out_dir: str | os.PathLike,
    files: Mapping[str, bytes | str | os.PathLike],
    manifest: Mapping[str, Any],
    report_md: str,
    overwrite: bool = False,
) -> Path:
    """Write an artifact folder atomically.

    Parameters
    ----------
    out_dir : path
        The artifact folder ``OUT`` to create (its parent is created when missing).
    files : mapping of str to bytes, path or Prehashed
        Model files by name relative to ``OUT`` (e.g. ``{"model.onnx": Path(...)}``); paths are
        copied, :class:`Prehashed` files moved (their recorded hash is trusted). ``manifest.json`` and ``report.md`` are reserved.
    manifest : mapping
        Manifest content; ``format``, ``format_version``, ``graphpress_version`` and ``created``
        are filled in when absent and ``files`` is always recomputed (sha256 + bytes per file).
        The caller's mapping is not modified.
    report_md : str
        Human-readable report stored as ``report.md``.
    overwrite : bool
        Replace an existing artifact at ``OUT`` (never a file, a non-artifact folder, or an
        artifact holding files its manifest does not list).

    Returns
    -------
    Path
        ``OUT``.

    Raises
    ------
    ArtifactError
        One line: ``OUT`` exists (without ``overwrite``) or is not ours to replace, a file name
        is invalid, the manifest is not JSON-serializable, or the write failed. On any error
        ``OUT`` is as it was before the call and no temporary folder is left behind.
    """
    out = Path(os.path.abspath(out_dir))
    mode = check_destination(out, overwrite)
    names = {_check_name(n): src for n, src in files.items()}
    for reserved in (MANIFEST, REPORT):
        if reserved in names:
            raise ArtifactError(f"{reserved!r} is written by write_artifact; do not pass it in files")

    # Refuse now what read_artifact would refuse later: an artifact nobody can load.
    missing = [k for k in ("backend", "model_file", "inputs", "outputs") if k not in manifest]
    if missing:
        raise ArtifactError(f"manifest lacks {', '.join(map(repr, missing))}; see docs/artifact.md")
    if manifest["model_file"] not in names:
        raise ArtifactError(f"model_file {manifest['model_file']!r} is not among the files written ({', '.join(names) or 'none'})")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        for name, src in names.items():
            _place_file(src, tmp / name)
        (tmp / REPORT).write_text(report_md, encoding="utf-8")
        man = dict(manifest)
        man.setdefault("format", FORMAT)
        man.setdefault("format_version", FORMAT_VERSION)
        man.setdefault("graphpress_version", graphpress.__version__)
        man.setdefault("created", _utc_now())
        known = {name: {"sha256": src.sha256, "bytes": src.bytes} for name, src in names.items() if isinstance(src, Prehashed)}
        man["files"] = {
            rel: known.get(rel) or {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and (rel := p.relative_to(tmp).as_posix()) != MANIFEST
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(sealed_manifest_text(man))
            f.flush()
            os.fsync(f.fileno())
        _ordinary_permissions(tmp)
        _swap_in(tmp, out, mode)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (ArtifactError, KeyboardInterrupt, SystemExit)):
            raise
        raise ArtifactError(f"{out}: writing the artifact failed: {type(err).__name__}: {err}") from err
    _fsync_dir(out.parent)
    return out


def _swap_in(tmp: Path, out: Path, mode: str) -> None:
    """Rename ``tmp`` to ``out``.

    ``mode`` is what the checks found: ``"new"`` (no OUT), ``"empty"`` (an empty folder) or
    ``"replace"`` (our artifact, moved aside first and restored if the rename fails).
    """
    if mode == "replace":
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        aside.rmdir()  # reserve a unique name; rename needs the target absent (or empty)
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        if mode == "empty":
            out.rmdir()  # fails if something appeared in it meanwhile: then it is not ours to replace
        os.rename(tmp, out)
    except OSError as err:  # OUT appeared or filled up while writing: rename refuses a non-empty target
        raise ArtifactError(f"{out} changed while writing; not replaced ({err.strerror})") from err


# -------------------------------------------------------------------------------------- reading
def read_artifact(folder: str | os.PathLike, *, verify_hashes: bool = True) -> Artifact:
    """Read and validate ``folder/manifest.json``.

    Parameters
    ----------
    folder : path
    verify_hashes : bool
        Recompute the sha256 of every listed file and compare with the manifest.

    Returns
    -------
    Artifact

    Raises
    ------
    ArtifactError
        One line for: folder missing, manifest missing or invalid JSON, another format or an
        unknown ``format_version``, a manifest edited after writing (``manifest_sha256``), a
        missing field, a listed file missing, a sha256 mismatch (naming the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no manifest.json; not a graphpress artifact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ArtifactError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unknown format_version {version!r}; this graphpress ({graphpress.__version__}) reads version {FORMAT_VERSION}")
    sealed = manifest.get(SELF_HASH)
    if not isinstance(sealed, str):
        raise ArtifactError(f"{path}: no {SELF_HASH}; the manifest was edited or not written by graphpress: re-run 'compress' to rebuild the artifact")
    if manifest_digest(manifest) != sealed:
        raise ArtifactError(f"{path}: edited after the artifact was written ({SELF_HASH} mismatch); re-run 'compress' to rebuild the artifact")
    for key in ("backend", "model_file", "inputs", "outputs", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: missing field {key!r}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must map file names to {{sha256, bytes}}")
    if manifest["model_file"] not in files:
        raise ArtifactError(f"{path}: model_file {manifest['model_file']!r} is not listed in 'files'")
    for name, entry in files.items():
        _check_name(name)
        fpath = folder / name
        if not fpath.is_file():
            raise ArtifactError(f"{fpath}: listed in manifest.json but missing")
        if not verify_hashes:
            continue
        try:
            expected = entry["sha256"]
        except (TypeError, KeyError) as err:
            raise ArtifactError(f"{path}: no sha256 for {name!r}") from err
        if fpath.stat().st_size != entry.get("bytes", fpath.stat().st_size) or sha256_file(fpath) != expected:
            raise ArtifactError(f"{fpath}: sha256 mismatch; the file changed after the artifact was written")
    return Artifact(folder=folder, manifest=manifest)


__all__ = [
    "Artifact",
    "IOSpec",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Prehashed",
    "REPORT",
    "claim_scratch",
    "clean_stale_scratch",
    "clean_stale_siblings",
    "dump_manifest",
    "manifest_digest",
    "sealed_manifest_text",
    "make_manifest",
    "read_artifact",
    "sha256_file",
    "write_artifact",
]
