"""Assemble one ONNX model from per-unit ONNX models, streaming the weights to external data.

A decoder LLM compressed block by block yields one small ONNX graph per unit (embedding, decoder
block 0..n-1, final norm + head). :class:`OnnxStitcher` appends them one after another to a
single graph whose initializers live in external ``.data`` files: each unit's weight bytes are
written (and hashed) the moment the unit is added and only the external-data reference
(location, offset, length) is kept, so the memory held is one unit's weights plus the graph
structure, whatever the model's size. ``model.onnx`` itself stays small (structure only), so the
protobuf 2 GB limit never applies to it.

The output folder is written as a temporary sibling ``.DEST.tmp-<pid>-<random>`` and renamed into
place by :meth:`OnnxStitcher.close`; any error (a bad unit, a full disk) removes the temporary
folder and leaves ``DEST`` as it was. Only onnx and numpy are needed (no torch).
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Literal, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from graphpress.errors import ArtifactError, BackendError

#: File name of the stitched graph inside the destination folder.
MODEL_FILE = "model.onnx"
#: External data file name when ``data_files="one"``.
DATA_FILE = "model.onnx.data"
#: Offsets of external tensors are multiples of this (a page: ORT can mmap aligned tensors).
DEFAULT_ALIGN = 4096
#: Tensors smaller than this stay inside ``model.onnx`` (scalars, shapes): a page each would waste space.
DEFAULT_INLINE_BELOW = 1024
#: Copy size for initializers that are already external.
_CHUNK = 16 << 20
#: ONNX stores offset and length as decimal strings that ORT parses as int64.
_INT64_MAX = 2**63 - 1
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Types stored two elements per byte.
_PACKED_4BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}


def _domain(name: str) -> str:
    return "" if name in _DEFAULT_DOMAINS else name


def _domain_label(name: str) -> str:
    return name or "ai.onnx"


class _DataFile:
    """An external data file written append-only, hashed as it is written."""

    def __init__(self, folder: Path, name: str, align: int) -> None:
        self.name = name
        self.path = folder / name
        self.align = align
        self._f = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def _write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._sha.update(data)
        self.size += len(data)

    def _pad(self) -> int:
        pad = -self.size % self.align
        if pad:
            self._write(b"\0" * pad)
        return self.size

    def append(self, data: bytes | memoryview) -> tuple[int, int]:
        """Write ``data`` at the next aligned offset; return ``(offset, length)``."""
        offset = self._pad()
        self._write(data)
        return offset, len(data)

    def append_stream(self, chunks: Iterator[bytes]) -> tuple[int, int]:
        """Write an iterator of chunks at the next aligned offset; return ``(offset, length)``."""
        offset = self._pad()
        for chunk in chunks:
            self._write(chunk)
        return offset, self.size - offset

    def flush(self) -> None:
        # At the end of each unit: a full disk shows up in the unit that filled it.
        self._f.flush()

    def finish(self) -> None:
        """Flush, fsync and close; the digest is final from here on."""
        if self.digest is None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self.digest = self._sha.hexdigest()

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()


class OnnxStitcher:
    """Write one ONNX model from per-unit ONNX models, one unit in memory at a time.

    Parameters
    ----------
    dest : path
        Folder to create, holding ``model.onnx`` and its external data file(s). It must not exist,
        or be an empty folder; a non-empty folder is replaced only with ``overwrite=True`` and only
        if it holds nothing but ``model.onnx`` and ``*.data`` files (what a stitcher writes), so a
        user's folder is never deleted.
    data_files : {"one", "per-unit"}
        ``"one"``: every weight in ``model.onnx.data``; ``"per-unit"``: one file per unit that has
        weights, ``NNNN_<prefix>.data`` (``NNNN`` the unit's index).
    align : int
        Power of two, >= 64: every external tensor starts at a multiple of it (4096, a page,
        lets ONNX Runtime memory-map the tensors).
    inline_below : int
        Tensors with fewer bytes stay inside ``model.onnx``; string tensors always do.
    overwrite : bool
        Replace an existing non-empty ``dest`` that a stitcher wrote (see ``dest``).
    graph_name : str
        Name of the stitched graph.

    Notes
    -----
    Use it as a context manager so that an exception between units removes the temporary folder::

        with OnnxStitcher("out/onnx") as st:
            st.add_unit(embed, prefix="embed/", inputs={"input_ids": "input_ids"})
            for i, block in enumerate(blocks):
                st.add_unit(block, prefix=f"layers.{i}/", inputs={"x": "embed/h" if i == 0 else f"layers.{i-1}/y"})
            st.add_unit(head, prefix="head/", inputs={"x": f"layers.{len(blocks)-1}/y"})
            files = st.close({"logits": "head/logits"})
    """

    def __init__(
        self,
        dest: str | os.PathLike,
        *,
        data_files: Literal["one", "per-unit"] = "one",
        align: int = DEFAULT_ALIGN,
        inline_below: int = DEFAULT_INLINE_BELOW,
        overwrite: bool = False,
        graph_name: str = "stitched",
    ) -> None:
        if data_files not in ("one", "per-unit"):
            raise BackendError(f"OnnxStitcher: data_files={data_files!r}; use 'one' or 'per-unit'")
        if not isinstance(align, int) or align < 64 or align & (align - 1):
            raise BackendError(f"OnnxStitcher: align={align!r}; use a power of two >= 64 (4096 lets ORT mmap the weights)")
        self.dest = Path(os.path.abspath(dest))
        self.data_files = data_files
        self.align = align
        self.inline_below = int(inline_below)
        self._mode = _check_destination(self.dest, overwrite)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-{os.getpid()}-", dir=self.dest.parent))
        # A stitcher dropped without close() (no `with`, an error in the caller) still removes its folder.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.tmp), True)
        self._state = "open"
        self._graph = onnx.GraphProto(name=graph_name)
        self._opsets: dict[str, int] = {}
        self._ir_version = 0
        self._functions: dict[tuple[str, str, str], onnx.FunctionProto] = {}
        self._types: dict[str, onnx.TypeProto] = {}  # value name -> type, for value_info and outputs
        self._names: set[str] = set()  # every value name defined in the stitched graph
        self._prefixes: set[str] = set()
        self._data: list[_DataFile] = []
        self._one: _LazyDataFile | None = None  # data_files="one": created with the first external tensor
        self._units = 0
        self.external_bytes = 0
        # (dtype, dims, digest) -> stitched name of an in-memory initializer already placed: a
        # unit's tensor with the same bytes refers to it instead of being written again (the
        # rotary tables every block of a KV decoder carries, 64 MB each at 128K positions)
        self._content: dict[tuple, str] = {}
        self.shared_tensors = 0

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "OnnxStitcher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            # Leaving the block without close() would silently drop the work: say so.
            self.abort()
            raise BackendError(f"OnnxStitcher({self.dest}): the with-block ended without close(outputs); nothing was written")

    def abort(self) -> None:
        """Remove the temporary folder; ``dest`` stays as it was. Idempotent."""
        for df in self._data:
            df.discard()
        self._cleanup()
        if self._state == "open":
            self._state = "aborted"

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise BackendError(f"OnnxStitcher({self.dest}): {what} after the stitcher was {self._state}")

    # ------------------------------------------------------------------ units
    def add_unit(
        self,
        model: onnx.ModelProto | str | os.PathLike,
        *,
        prefix: str,
        inputs: Mapping[str, str],
        base_dir: str | os.PathLike | None = None,
    ) -> dict[str, str]:
        """Append one unit; its weights go to external data now.

        Parameters
        ----------
        model : onnx.ModelProto or path
            The unit. A path is loaded with ``load_external_data=False`` (its external tensors are
            copied in chunks, never loaded whole). The caller's proto is not modified.
        prefix : str
            Prepended to every node, value and initializer name of the unit (end it with a
            separator, e.g. ``"layers.3/"``), so that identical per-block graphs do not collide.
            Must be unique among the units.
        inputs : mapping of str to str
            Each graph input of the unit -> a value of the stitched graph: an output (or any value)
            of an earlier unit, named with its prefix, or a new name, which becomes a graph input of
            the stitched model (a name several units map to, e.g. an attention mask, is one input).
        base_dir : path, optional
            Folder that the unit's already-external tensors are relative to; defaults to the
            model file's folder when ``model`` is a path.

        Returns
        -------
        dict of str to str
            The unit's graph outputs -> their names in the stitched graph (``prefix + name``).

        Raises
        ------
        BackendError
            One line: an unmapped or unknown input, a type mismatch with the value it is mapped to,
            a reused prefix or a name collision, an opset version that conflicts with an earlier
            unit's, an external tensor whose file is missing or short, a write that failed
            (``ENOSPC``...). The temporary folder is removed; the stitcher cannot be used further.
        """
        self._check_open("add_unit")
        try:
            return self._add_unit(model, prefix, dict(inputs), base_dir)
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise _write_error(self.dest, err) from err
            raise

    def _add_unit(self, model, prefix: str, inputs: dict[str, str], base_dir) -> dict[str, str]:
        label = f"unit {self._units} (prefix {prefix!r})"
        if not isinstance(model, onnx.ModelProto):
            path = Path(model)
            if not path.is_file():
                raise BackendError(f"{label}: {path} not found")
            model = onnx.load(str(path), load_external_data=False)
            base_dir = path.parent if base_dir is None else base_dir
        if not prefix:
            raise BackendError(f"{label}: prefix is empty; give each unit its own prefix, e.g. 'layers.3/'")
        if prefix in self._prefixes:
            raise BackendError(f"{label}: prefix {prefix!r} is already used by an earlier unit; give each unit its own prefix")
        g = model.graph
        if len(g.sparse_initializer):
            raise BackendError(f"{label}: sparse_initializer {g.sparse_initializer[0].values.name!r} is not supported; densify it before stitching")

        # Everything that can be refused is checked before a byte is written.
        opsets = self._merge_opsets(label, model.opset_import)
        functions = self._merge_functions(label, model.functions)
        init_names = {t.name for t in g.initializer}
        unit_inputs = [vi for vi in g.input if vi.name not in init_names]
        in_names = {vi.name for vi in unit_inputs}
        missing = [vi.name for vi in unit_inputs if vi.name not in inputs]
        if missing:
            raise BackendError(f"{label}: graph input {missing[0]!r} is not mapped; add it to inputs= (unit input name -> stitched value name)")
        unknown = [n for n in inputs if n not in in_names]
        if unknown:
            hint = difflib.get_close_matches(unknown[0], sorted(in_names), n=1)
            raise BackendError(
                f"{label}: inputs= names {unknown[0]!r}, which is not a graph input of the unit"
                + (f"; did you mean {hint[0]!r}?" if hint else f" (inputs: {', '.join(sorted(in_names)) or 'none'})")
            )

        same = self._shared_initializers(g)

        def rename(name: str) -> str:
            if not name:  # an omitted optional input
                return name
            if name in same:
                return same[name]
            return inputs[name] if name in inputs else prefix + name

        new_inputs: list[onnx.ValueInfoProto] = []
        for vi in unit_inputs:
            target = inputs[vi.name]
            if target in self._types and vi.type.HasField("tensor_type") and self._types[target].HasField("tensor_type"):
                have, want = self._types[target].tensor_type.elem_type, vi.type.tensor_type.elem_type
                if have and want and have != want:
                    raise BackendError(
                        f"{label}: input {vi.name!r} is {_dtype(want)} but {target!r} is {_dtype(have)}; map it to a value of its type"
                    )
            if target not in self._names and target not in {x.name for x in new_inputs}:
                new_vi = onnx.ValueInfoProto()
                new_vi.CopyFrom(vi)
                new_vi.name = target
                new_inputs.append(new_vi)

        defined = _defined_names(g, init_names)
        clashes = sorted(n for n in defined if n not in in_names and prefix + n in self._names)
        if clashes:
            raise BackendError(
                f"{label}: name {prefix + clashes[0]!r} (prefix + {clashes[0]!r}) already exists in the stitched graph; "
                "end every unit's prefix with a separator, e.g. 'layers.3/'"
            )

        # Structure: copied node by node so the caller's initializers are never duplicated in memory.
        nodes = []
        for node in g.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            _rename_node(new, rename, prefix)
            nodes.append(new)

        data = self._data_file_for(prefix)
        base = Path(base_dir) if base_dir is not None else None
        inits = []
        placed: dict[tuple, str] = {}
        for t in g.initializer:
            if t.name in same:
                continue
            inits.append(self._place_tensor(label, t, rename(t.name), data, base))
            key = self._content_key(t)
            if key is not None:
                placed.setdefault(key, rename(t.name))
        # Large Constant nodes would keep their weights in model.onnx: they become initializers.
        kept_nodes = []
        for node in nodes:
            tensor = _constant_tensor(node)
            if tensor is not None and _nbytes(tensor) >= self.inline_below and tensor.data_type != onnx.TensorProto.STRING:
                inits.append(self._place_tensor(label, tensor, node.output[0], data, base))
            else:
                kept_nodes.append(node)
        for node in kept_nodes:
            self._externalize_subgraphs(label, node, data, base)
        if self.data_files == "per-unit":
            data.finish()
        else:
            data.flush()

        # Commit: nothing below can fail on user input.
        self._opsets.update(opsets)
        self._functions.update(functions)
        self._ir_version = max(self._ir_version, model.ir_version)
        self._prefixes.add(prefix)
        for key, name in placed.items():
            self._content.setdefault(key, name)
        self.shared_tensors += len(same)
        self._graph.input.extend(new_inputs)
        for vi in new_inputs:
            self._types[vi.name] = vi.type
            self._names.add(vi.name)
        self._graph.node.extend(kept_nodes)
        self._graph.initializer.extend(inits)
        for vi in list(g.value_info) + list(g.output):
            if vi.name not in in_names and vi.type.WhichOneof("value"):
                self._types[rename(vi.name)] = _copy(vi.type)
        self._names.update(prefix + n for n in defined if n not in in_names)
        self._units += 1
        return {o.name: rename(o.name) for o in g.output}

    def _content_key(self, t: onnx.TensorProto) -> tuple | None:
        """``(dtype, dims, digest)`` of an in-memory tensor that would go to external data (None
        for small, string or already-external tensors, which are not shared)."""
        if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING or _nbytes(t) < self.inline_below:
            return None
        return (t.data_type, tuple(t.dims), hashlib.blake2b(_raw_bytes(t), digest_size=16).digest())

    def _shared_initializers(self, g: onnx.GraphProto) -> dict[str, str]:
        """The unit's initializers whose bytes an earlier unit already placed -> that name."""
        if not self._content:
            return {}
        same = {}
        for t in g.initializer:
            key = self._content_key(t)
            if key is not None and key in self._content:
                same[t.name] = self._content[key]
        return same

    def _merge_opsets(self, label: str, imports) -> dict[str, int]:
        merged: dict[str, int] = {}
        for op in imports:
            dom = _domain(op.domain)
            prev = self._opsets.get(dom, merged.get(dom))
            if prev is not None and prev != op.version:
                raise BackendError(
                    f"{label}: imports opset {_domain_label(dom)} version {op.version} but earlier units use version {prev}; export every unit with the same opset"
                )
            merged[dom] = op.version
        return merged

    def _merge_functions(self, label: str, functions) -> dict[tuple[str, str, str], onnx.FunctionProto]:
        merged = {}
        for fn in functions:
            key = (fn.domain, fn.name, getattr(fn, "overload", ""))
            prev = self._functions.get(key, merged.get(key))
            if prev is not None and prev.SerializeToString() != fn.SerializeToString():
                raise BackendError(
                    f"{label}: local function {fn.domain}::{fn.name} differs from an earlier unit's function of the same name; rename one of them"
                )
            merged[key] = _copy(fn)
        return merged

    def _data_file_for(self, prefix: str) -> "_LazyDataFile":
        if self.data_files == "one":
            if self._one is None:
                self._one = _LazyDataFile(self, DATA_FILE)
            return self._one
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix).strip("._-") or "unit"
        return _LazyDataFile(self, f"{self._units:04d}_{safe}.data")

    def _place_tensor(self, label: str, t: onnx.TensorProto, name: str, data, base: Path | None) -> onnx.TensorProto:
        """A copy of ``t`` named ``name`` whose bytes are in ``data`` (or inline when small)."""
        external = t.data_location == onnx.TensorProto.EXTERNAL
        if external and _external_length(t) < self.inline_below:
            # A small tensor that was external anyway (saved with size_threshold=0): inline it like the rest.
            out = onnx.TensorProto(name=name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
            out.raw_data = b"".join(_external_chunks(label, t, base))
            return out
        if not external and (t.data_type == onnx.TensorProto.STRING or _nbytes(t) < self.inline_below):
            out = onnx.TensorProto()
            out.CopyFrom(t)
            out.name = name
            return out
        out = onnx.TensorProto(name=name, data_type=t.data_type, dims=t.dims, doc_string=t.doc_string)
        df = data.get()
        if external:
            offset, length = df.append_stream(_external_chunks(label, t, base))
        else:
            offset, length = df.append(_raw_bytes(t))
        if offset + length > _INT64_MAX:  # ORT parses offset/length as int64
            raise BackendError(f"{label}: tensor {t.name!r} would end at byte {offset + length} of {df.name}, beyond int64")
        self.external_bytes += length
        out.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", df.name), ("offset", str(offset)), ("length", str(length))):
            entry = out.external_data.add()
            entry.key, entry.value = key, value
        return out

    def _externalize_subgraphs(self, label: str, node: onnx.NodeProto, data, base) -> None:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                placed = [self._place_tensor(label, t, t.name, data, base) for t in sub.initializer]
                del sub.initializer[:]
                sub.initializer.extend(placed)
                for inner in sub.node:
                    self._externalize_subgraphs(label, inner, data, base)

    # ------------------------------------------------------------------ close
    def close(self, outputs: Mapping[str, str]) -> dict[str, dict[str, object]]:
        """Write ``model.onnx``, check it, and rename the folder into place.

        Parameters
        ----------
        outputs : mapping of str to str
            Graph output name of the stitched model -> a value of the stitched graph (e.g.
            ``{"logits": "head/logits"}``). A differing name gets an ``Identity`` node.

        Returns
        -------
        dict
            ``{file name: {"sha256": hex, "bytes": int}}`` for ``model.onnx`` and every data file,
            the shape of ``manifest["files"]``; the hashes were computed while writing.

        Raises
        ------
        BackendError
            One line: no outputs, an output naming an unknown value, ``onnx.checker`` refusing
            the model, a failed write. ``dest`` stays as it was and the temporary folder is removed.
        ArtifactError
            ``dest`` appeared or filled up meanwhile (not replaced).
        """
        self._check_open("close")
        try:
            files = self._close(dict(outputs))
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise _write_error(self.dest, err) from err
            raise
        self._state = "closed"
        self._cleanup.detach()
        return files

    def _close(self, outputs: dict[str, str]) -> dict[str, dict[str, object]]:
        if not outputs:
            raise BackendError(f"OnnxStitcher({self.dest}): close() needs at least one output (graph output name -> value name)")
        if self._units == 0:
            raise BackendError(f"OnnxStitcher({self.dest}): no unit was added")
        graph = self._graph
        for out_name, value in outputs.items():
            if value not in self._names:
                hint = difflib.get_close_matches(value, sorted(self._names), n=1)
                raise BackendError(
                    f"OnnxStitcher({self.dest}): output {out_name!r} maps to {value!r}, which no unit defines"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                )
            if out_name != value:
                if out_name in self._names:
                    raise BackendError(f"OnnxStitcher({self.dest}): output name {out_name!r} is already a value of another meaning; pick another name")
                graph.node.append(onnx.helper.make_node("Identity", [value], [out_name], name=f"output/{out_name}"))
            vi = graph.output.add()
            vi.name = out_name
            if value in self._types:
                vi.type.CopyFrom(self._types[value])
        output_names = set(outputs)
        input_names = {vi.name for vi in graph.input}
        init_names = {t.name for t in graph.initializer}
        del graph.value_info[:]
        for name, typ in self._types.items():
            if name not in output_names and name not in input_names and name not in init_names:
                graph.value_info.add(name=name).type.CopyFrom(typ)

        model = onnx.ModelProto(
            ir_version=self._ir_version,
            producer_name="graphpress",
            graph=graph,
            opset_import=[onnx.helper.make_opsetid(d, v) for d, v in sorted(self._opsets.items())],
            functions=list(self._functions.values()),
        )
        for df in self._data:
            df.finish()
        payload = model.SerializeToString()
        model_path = self.tmp / MODEL_FILE
        with open(model_path, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        files = {MODEL_FILE: {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}}
        del payload
        for df in self._data:
            files[df.name] = {"sha256": df.digest, "bytes": df.size}
        try:
            # The path form reads external data lazily and works beyond the 2 GB protobuf limit.
            onnx.checker.check_model(str(model_path))
        except onnx.checker.ValidationError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackendError(f"OnnxStitcher({self.dest}): onnx.checker refused the stitched model: {first}") from err
        _ordinary_permissions(self.tmp)
        _swap_in(self.tmp, self.dest, self._mode)
        return files


class _LazyDataFile:
    """Per-unit data file, created only when the unit has a tensor to write."""

    def __init__(self, owner: OnnxStitcher, name: str) -> None:
        self.owner, self.name, self.file = owner, name, None

    def get(self) -> _DataFile:
        if self.file is None:
            self.file = _DataFile(self.owner.tmp, self.name, self.owner.align)
            self.owner._data.append(self.file)
        return self.file

    def finish(self) -> None:
        if self.file is not None:
            self.file.finish()

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()


# ---------------------------------------------------------------------- helpers
def _copy(msg):
    """A detached copy: a kept reference to a submessage would keep the caller's whole unit (its weights) alive."""
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _dtype(elem_type: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"elem_type {elem_type}"


def _nbytes(t: onnx.TensorProto) -> int:
    if t.HasField("raw_data"):
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if t.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 1
    return n * itemsize


def _raw_bytes(t: onnx.TensorProto) -> bytes:
    """The little-endian bytes ONNX expects in an external file."""
    if t.HasField("raw_data"):
        return t.raw_data
    arr = numpy_helper.to_array(t)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def _external_length(t: onnx.TensorProto) -> int:
    """Bytes of an external tensor: its ``length``, else what its dims and type take."""
    info = {e.key: e.value for e in t.external_data}
    if "length" in info:
        return int(info["length"])
    return _nbytes(t)


def _external_chunks(label: str, t: onnx.TensorProto, base: Path | None) -> Iterator[bytes]:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location")
    if base is None:
        raise BackendError(f"{label}: tensor {t.name!r} is external ({location}); pass base_dir= (the folder of the unit's .onnx file)")
    path = base / (location or "")
    if not location or not path.is_file():
        raise BackendError(f"{label}: tensor {t.name!r}: external data file {path} not found")
    offset = int(info.get("offset", 0))
    size = path.stat().st_size
    length = _external_length(t)
    if offset + length > size:
        raise BackendError(f"{label}: tensor {t.name!r}: {path} has {size} bytes, the tensor needs bytes {offset}..{offset + length}")
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise BackendError(f"{label}: tensor {t.name!r}: {path} ended early")
            left -= len(chunk)
            yield chunk


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and len(node.output) == 1:
        for attr in node.attribute:
            if attr.name == "value" and attr.HasField("t"):
                return attr.t
    return None


def _defined_names(g: onnx.GraphProto, init_names: set[str]) -> set[str]:
    names = set(init_names) | {vi.name for vi in g.input}
    for node in g.node:
        names.update(o for o in node.output if o)
    return names


def _rename_node(node: onnx.NodeProto, rename, prefix: str) -> None:
    """Rename a node's values (and, recursively, its subgraphs') in place."""
    if node.name:
        node.name = prefix + node.name
    node.input[:] = [rename(n) for n in node.input]
    node.output[:] = [rename(n) for n in node.output]
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            # A subgraph's own names are prefixed like the unit's; its outer-scope reads are renamed with them.
            sub.input[:] = [_renamed_vi(vi, rename) for vi in sub.input]
            sub.output[:] = [_renamed_vi(vi, rename) for vi in sub.output]
            sub.value_info[:] = [_renamed_vi(vi, rename) for vi in sub.value_info]
            for t in sub.initializer:
                t.name = rename(t.name)
            for inner in sub.node:
                _rename_node(inner, rename, prefix)


def _renamed_vi(vi: onnx.ValueInfoProto, rename) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    out.name = rename(vi.name)
    return out


def _write_error(dest: Path, err: OSError) -> BackendError:
    if err.errno == errno.ENOSPC:
        return BackendError(f"{dest}: writing the ONNX external data failed: no space left on device; nothing was written, free disk space and re-run")
    return BackendError(f"{dest}: writing the stitched ONNX model failed: {type(err).__name__}: {err}")


# ---------------------------------------------------------------------- destination
def _is_stitch_output(folder: Path) -> str | None:
    """Why ``folder`` is not a stitcher's output, or None when it is (only model.onnx and *.data files)."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return f"holds {entry.name!r}, which is not a file"
        if entry.name != MODEL_FILE and not entry.name.endswith(".data"):
            return f"holds {entry.name!r}, which a stitcher does not write"
    return None


def _check_destination(dest: Path, overwrite: bool) -> str:
    if not (dest.is_symlink() or dest.exists()):
        return "new"
    if dest.is_symlink() or not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is {'a symlink' if dest.is_symlink() else 'not a folder'}; refusing to replace it")
    if not any(dest.iterdir()):
        return "empty"
    if not overwrite:
        raise ArtifactError(f"{dest} exists; pass overwrite=True to replace it")
    if why := _is_stitch_output(dest):
        raise ArtifactError(f"{dest} exists and {why}; refusing to replace it even with overwrite=True")
    return "replace"


def _ordinary_permissions(root: Path) -> None:
    # mkdtemp makes 0o700; a written model should be readable like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.iterdir():
        os.chmod(p, 0o666 & ~umask)


def _swap_in(tmp: Path, dest: Path, mode: str) -> None:
    if mode == "replace":
        aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{os.getpid()}-", dir=dest.parent))
        aside.rmdir()  # a unique name; rename needs the target absent
        os.rename(dest, aside)
        try:
            os.rename(tmp, dest)
        except BaseException:
            os.rename(aside, dest)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        try:
            if mode == "empty":
                dest.rmdir()  # fails if something appeared in it meanwhile
            os.rename(tmp, dest)
        except OSError as err:
            raise ArtifactError(f"{dest} changed while writing; not replaced ({err.strerror})") from err
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["OnnxStitcher", "MODEL_FILE", "DATA_FILE", "DEFAULT_ALIGN", "DEFAULT_INLINE_BELOW"]
