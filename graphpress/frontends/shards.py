"""Lazy, shard-by-shard reading of a Hugging Face decoder-LLM folder (issue 17's streaming mode).

:class:`ShardedCheckpoint` opens a folder holding ``config.json`` and ``model.safetensors`` (or
``model.safetensors.index.json`` and its shards) by reading only the shards' headers: the
8-byte length and the JSON table of names, dtypes, shapes and byte ranges. Everything a run
could trip over later -- a missing file, an index naming a file or tensor that is not there, a
truncated or corrupt header, a byte range past the end of its file -- is one
:class:`~graphpress.errors.FrontendError` line before any tensor is read. Tensors are then read
one at a time, in the dtype the checkpoint stores (a bf16 checkpoint stays bf16).

:func:`decoder_layout` checks the folder against its config for the Llama, Qwen2, Mistral and
Phi-3 families and lists the units a block-by-block run visits: the embedding, the blocks
``model.layers.{i}.``, the final norm and the head (or the tied embedding).

Memory: :meth:`ShardedCheckpoint.get` reads a tensor into memory it owns (``pread`` into a fresh
buffer): the process's RSS holds exactly the tensors alive, and freeing them returns the memory.
``get(name, mmap=True)`` instead returns a zero-copy view of safetensors' private file mapping;
see the method for why that is not the default (measured in ``docs/frontends/big-checkpoints.md``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from graphpress.errors import FrontendError

#: safetensors dtype tags -> torch dtypes (the ones this torch build has).
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _tag, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _DTYPES[_tag] = getattr(torch, _attr)

# A real header is a few hundred KB at most (an 8B model's largest shard lists ~100 tensors);
# a length far beyond that is a corrupt file, not a header to allocate.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

#: model_type values :func:`decoder_layout` supports.
STREAMING_FAMILIES = ("llama", "qwen2", "mistral", "phi3")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard, dtype, shape and absolute byte range in the file."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (8-byte little-endian length + JSON) and check every byte range."""
    if not path.is_file():
        raise FrontendError(f"{path}: shard file not found: re-download it or re-save the checkpoint")
    size = path.stat().st_size
    fix = "the shard is truncated or corrupt: re-download it or re-save the checkpoint"
    if size < 8:
        raise FrontendError(f"{path}: {size} byte(s), shorter than a safetensors header; {fix}")
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise FrontendError(f"{path}: header claims {length} bytes but the file holds {size}; {fix}")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrontendError(f"{path}: header is not valid JSON ({err.__class__.__name__}: {str(err)[:120]}); {fix}") from None
    if not isinstance(header, dict):
        raise FrontendError(f"{path}: header is not a JSON object; {fix}")
    base = 8 + length
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (begin, finish) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            begin, finish = int(begin), int(finish)
        except (KeyError, TypeError, ValueError):
            raise FrontendError(f"{path}: tensor '{name}': malformed header entry {str(entry)[:120]}; {fix}") from None
        if tag not in _DTYPES:
            raise FrontendError(f"{path}: tensor '{name}': dtype {tag} is not supported (supported: {', '.join(_DTYPES)})")
        dtype = _DTYPES[tag]
        want = math.prod(shape) * dtype.itemsize
        if finish - begin != want or begin < 0:
            raise FrontendError(f"{path}: tensor '{name}': byte range {begin}..{finish} does not hold {tag}{list(shape)} ({want} bytes); {fix}")
        if base + finish > size:
            raise FrontendError(f"{path}: tensor '{name}' ends at byte {base + finish} but the file holds {size}; {fix}")
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, base + finish)
    return out


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FrontendError(f"{path}: cannot read {what}: {str(err).splitlines()[0][:160]}") from None


class ShardedCheckpoint:
    """A Hugging Face folder's safetensors weights, opened by their headers only.

    Parameters
    ----------
    folder : str or Path
        A folder with ``config.json`` and either ``model.safetensors`` or
        ``model.safetensors.index.json`` plus the shards it names (the single file wins when
        both exist, as in ``transformers``).

    Raises
    ------
    FrontendError
        One line naming the file or tensor and the fix: folder or ``config.json`` missing or
        unreadable; no safetensors weights; an unreadable index; an index naming a missing
        shard or a tensor its shard lacks; a truncated or corrupt shard header.

    Notes
    -----
    Opening reads ``config.json``, the index and each shard's header (a few KB each); no
    tensor data. Tensors are read by :meth:`get` / :meth:`tensors`, one at a time.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FrontendError(f"{self.folder}: folder not found")
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise FrontendError(f"{config_path}: not found: a Hugging Face model folder needs its config.json (save_pretrained writes it)")
        config = _read_json(config_path, "config.json")
        if not isinstance(config, dict):
            raise FrontendError(f"{config_path}: not a JSON object")
        #: The parsed ``config.json``.
        self.config: dict[str, Any] = config
        self._infos: dict[str, TensorInfo] = {}
        self._handles: dict[Path, Any] = {}
        single, index = self.folder / SINGLE_FILE, self.folder / INDEX_FILE
        if single.is_file():
            self._infos = _read_header(single)
            self.index_path: Path | None = None
        elif index.is_file():
            self.index_path = index
            self._open_index(index)
        else:
            raise FrontendError(
                f"{self.folder}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE} with its shards); "
                "a pytorch_model.bin folder: re-save it with save_pretrained(safe_serialization=True) or use the whole-graph path (load_hf_folder)"
            )

    def _open_index(self, index: Path) -> None:
        data = _read_json(index, "the shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FrontendError(f"{index}: no 'weight_map' object: the index is damaged; re-download it or re-save the checkpoint")
        by_shard: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(str(shard), []).append(name)
        # Every file is checked for existence before any header is parsed: a missing shard is
        # the likelier fault and its message should not wait behind a slow disk.
        root = self.folder.resolve()
        for shard, names in by_shard.items():
            if root not in (self.folder / shard).resolve().parents:
                raise FrontendError(f"{index}: shard '{shard}' (for '{names[0]}') lies outside the folder: an index names files inside it; fix the index")
            if not (self.folder / shard).is_file():
                raise FrontendError(
                    f"{index}: points at missing shard file {shard} (for {len(names)} tensor(s), e.g. '{names[0]}'): "
                    "re-download the shard or fix the index"
                )
        for shard, names in by_shard.items():
            header = _read_header(self.folder / shard)
            for name in names:
                if name not in header:
                    raise FrontendError(
                        f"{self.folder / shard}: tensor '{name}' is listed in {INDEX_FILE} but absent from this shard: "
                        "re-download the shard or fix the index"
                    )
                self._infos[name] = header[name]

    # -- header queries -------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, in the order of the index (or of the single file's header)."""
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Shard, dtype, shape and byte range of ``name`` (a :class:`TensorInfo`)."""
        try:
            return self._infos[name]
        except KeyError:
            raise FrontendError(f"{self.folder}: no tensor '{name}' in the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` as stored."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """torch dtype of ``name`` as stored (``torch.bfloat16`` for a bf16 checkpoint)."""
        return self.info(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of ``name`` as stored."""
        return self.info(name).nbytes

    def numel(self, name: str) -> int:
        """Element count of ``name``."""
        return math.prod(self.info(name).shape)

    def total_bytes(self) -> int:
        """Bytes of all tensors as stored (the weights' size on disk, headers excluded)."""
        return sum(i.nbytes for i in self._infos.values())

    def shards(self) -> list[Path]:
        """The shard files, in first-use order."""
        return list(dict.fromkeys(i.shard for i in self._infos.values()))

    # -- tensor reads ---------------------------------------------------------------------

    def get(self, name: str, *, mmap: bool = False) -> torch.Tensor:
        """One tensor, in the checkpoint's dtype, read on demand.

        Parameters
        ----------
        name : str
            Tensor name, e.g. ``"model.layers.3.mlp.up_proj.weight"``.
        mmap : bool
            ``False`` (default): read the bytes into a fresh tensor this caller owns (one
            ``pread``; freeing it returns the memory; writing to it touches nothing else).
            ``True``: a zero-copy view into safetensors' mapping of the shard (``safe_open``'s
            ``get_tensor``). That mapping is private (copy-on-write) and covers the whole
            shard for as long as the shard's handle is open: pages read stay in the process's
            RSS until :meth:`release`, and an in-place write to the view is seen by every
            later ``get(..., mmap=True)`` of that tensor (never by the file). Treat such views
            as read-only.

        Returns
        -------
        torch.Tensor
            Shape and dtype as stored, on the CPU.
        """
        info = self.info(name)
        if mmap:
            return self._handle(info.shard).get_tensor(name)
        return self._read(info, info.start, info.nbytes).view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first dimension) of one tensor, reading only their bytes
        (a slice of an 8B model's 1 GB head without the rest of it)."""
        info = self.info(name)
        rows = info.shape[0] if info.shape else 0
        if not 0 <= start <= stop <= rows:
            raise FrontendError(f"{info.shard}: tensor '{name}' has {rows} rows; rows {start}:{stop} asked")
        row_bytes = info.nbytes // rows if rows else 0
        out = self._read(info, info.start + start * row_bytes, (stop - start) * row_bytes)
        return out.view(info.dtype).reshape((stop - start, *info.shape[1:]))

    @staticmethod
    def _read(info: "TensorInfo", offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` from ``offset`` of the tensor's shard into a fresh uint8 tensor (``pread``)."""
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(out.numpy())
            fd = os.open(info.shard, os.O_RDONLY)
            try:
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise FrontendError(f"{info.shard}: tensor '{info.name}': file ended early (shrunk since it was opened?): re-download the shard")
                    done += got
            finally:
                os.close(fd)
        return out

    def tensors(self, prefix: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, e.g. ``"model.layers.3."``.

        End block prefixes with ``.``: ``"model.layers.1"`` would also take layers 10-19.
        Tensors are read as :meth:`get` reads them; the dict keeps the checkpoint's order.
        """
        return {n: self.get(n, mmap=mmap) for n in self._infos if n.startswith(prefix)}

    def _handle(self, shard: Path) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
        return handle

    def release(self) -> None:
        """Close the shard handles ``get(..., mmap=True)`` opened, unmapping their pages.

        Views handed out earlier keep their own mapping alive until they are freed.
        """
        self._handles.clear()

    def __repr__(self) -> str:
        return f"ShardedCheckpoint({str(self.folder)!r}, {len(self)} tensors in {len(self.shards())} shard(s), {self.total_bytes() / 1e9:.2f} GB)"


# -- decoder layout ---------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Buffers older checkpoints saved next to the weights; the models recompute them.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class DecoderLayout:
    """The units of a block-by-block run over a decoder LLM checkpoint, checked against its config.

    Attributes
    ----------
    checkpoint : ShardedCheckpoint
        Where the tensors are read from.
    family : str
        The config's ``model_type`` (one of :data:`STREAMING_FAMILIES`).
    num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim, vocab_size : int
        The shape hyperparameters the checks used (config values, ``transformers``' defaults
        for keys the config leaves out).
    embedding : str
        The token-embedding tensor (``model.embed_tokens.weight``).
    blocks : tuple of str
        Block prefixes ``model.layers.{i}.`` in run order.
    block_tensors : tuple of str
        Tensor names inside a block, relative to its prefix (every block has the same set).
    final_norm : str
        ``model.norm.weight``.
    lm_head : str
        ``lm_head.weight``, or :attr:`embedding` when the head is tied to it.
    tied : bool
        Whether the head reuses the embedding (``tie_word_embeddings``).
    """

    checkpoint: ShardedCheckpoint
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    embedding: str
    blocks: tuple[str, ...]
    block_tensors: tuple[str, ...]
    final_norm: str
    lm_head: str
    tied: bool
    _expected: dict[str, tuple[int, ...]] = field(repr=False, compare=False, default_factory=dict)

    def block_names(self, i: int) -> list[str]:
        """Full tensor names of block ``i``."""
        return [self.blocks[i] + rel for rel in self.block_tensors]

    def block(self, i: int, *, mmap: bool = False) -> dict[str, torch.Tensor]:
        """Block ``i``'s tensors (checkpoint dtype), keyed relative to the block (``"mlp.up_proj.weight"``)."""
        return {rel: self.checkpoint.get(self.blocks[i] + rel, mmap=mmap) for rel in self.block_tensors}

    def _bytes(self, names: list[str], dtype: torch.dtype | None) -> int:
        ck = self.checkpoint
        if dtype is None:
            return sum(ck.nbytes(n) for n in names)
        return sum(ck.numel(n) for n in names) * dtype.itemsize

    def block_bytes(self, i: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of block ``i``: as stored, or as ``dtype`` (e.g. ``torch.float32``) when given."""
        return self._bytes(self.block_names(i), dtype)

    def largest_block_bytes(self, dtype: torch.dtype | None = torch.float32) -> int:
        """Bytes of the largest block as ``dtype`` (fp32 by default: issue 17's memory unit); ``None``: as stored."""
        return max(self.block_bytes(i, dtype) for i in range(self.num_layers))

    def units(self) -> list[tuple[str, list[str]]]:
        """``(unit, tensor names)`` in run order: ``embed``, ``block.0`` .. ``block.{n-1}``, ``norm``, ``head``.

        A tied head lists the embedding tensor again (it is read twice, held once at a time).
        """
        out = [("embed", [self.embedding])]
        out += [(f"block.{i}", self.block_names(i)) for i in range(self.num_layers)]
        out += [("norm", [self.final_norm]), ("head", [self.lm_head])]
        return out

    def unit_bytes(self, unit: str, dtype: torch.dtype | None = None) -> int:
        """Bytes of one unit named as in :meth:`units`."""
        for name, tensors in self.units():
            if name == unit:
                return self._bytes(tensors, dtype)
        raise FrontendError(f"{self.checkpoint.folder}: no unit '{unit}' (units: embed, block.0..block.{self.num_layers - 1}, norm, head)")

    def expected_shape(self, name: str) -> tuple[int, ...]:
        """The shape the config implies for ``name`` (a full tensor name)."""
        return self._expected[name]


def _hyper(config: dict[str, Any], family: str) -> dict[str, Any]:
    """Config values with ``transformers``' per-family defaults filled in for missing keys."""
    merged = dict(config)
    needed = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
              "num_key_value_heads", "tie_word_embeddings"] + (["attention_bias", "mlp_bias"] if family == "llama" else [])
    if all(merged.get(k) is not None for k in needed):
        return merged  # a complete config (save_pretrained writes every key): no transformers import
    try:
        from transformers import AutoConfig

        resolved = AutoConfig.for_model(family, **{k: v for k, v in config.items() if k != "model_type"})
        for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "mlp_bias",
                    "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            if merged.get(key) is None and getattr(resolved, key, None) is not None:
                merged[key] = getattr(resolved, key)
    except Exception:  # noqa: BLE001 -- transformers absent or rejecting an odd key: the plain fallbacks below apply
        pass
    return merged


def decoder_layout(checkpoint: ShardedCheckpoint) -> DecoderLayout:
    """Check ``checkpoint`` against its config and list the units of a block-by-block run.

    Parameters
    ----------
    checkpoint : ShardedCheckpoint
        An opened folder whose ``config.json`` names ``model_type`` llama, qwen2, mistral or phi3.

    Returns
    -------
    DecoderLayout

    Raises
    ------
    FrontendError
        One line: an unsupported ``model_type`` (the whole-graph path, ``load_hf_folder``,
        still takes it); a config key missing; an expected tensor missing; a tensor whose
        shape differs from what the config implies (named with both shapes); a tensor no
        supported block uses.
    """
    folder, config_path = checkpoint.folder, checkpoint.folder / "config.json"
    family = str(checkpoint.config.get("model_type", ""))
    if family not in STREAMING_FAMILIES:
        raise FrontendError(
            f"{config_path}: model_type '{family or '(none)'}' is not supported by streaming mode "
            f"(supported: {', '.join(STREAMING_FAMILIES)}); the whole-graph path (load_hf_folder, --stream off) still takes it"
        )
    cfg = _hyper(checkpoint.config, family)
    ints: dict[str, int] = {}
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise FrontendError(f"{config_path}: '{key}' is {value!r}: a {family} config needs a positive integer there")
        ints[key] = value
    hidden, inter, heads = ints["hidden_size"], ints["intermediate_size"], ints["num_attention_heads"]
    layers, vocab = ints["num_hidden_layers"], ints["vocab_size"]
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    q, kvd = heads * head_dim, kv * head_dim

    block: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    if family == "phi3":
        block["self_attn.qkv_proj.weight"] = (q + 2 * kvd, hidden)
        block["self_attn.o_proj.weight"] = (hidden, q)
        block["mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        block["mlp.down_proj.weight"] = (hidden, inter)
    else:
        attn = {"q_proj": (q, hidden), "k_proj": (kvd, hidden), "v_proj": (kvd, hidden), "o_proj": (hidden, q)}
        for proj, shape in attn.items():
            block[f"self_attn.{proj}.weight"] = shape
        if family == "qwen2":
            for proj in ("q_proj", "k_proj", "v_proj"):
                block[f"self_attn.{proj}.bias"] = (attn[proj][0],)
        if family == "llama" and cfg.get("attention_bias"):
            for proj, shape in attn.items():
                block[f"self_attn.{proj}.bias"] = (shape[0],)
        mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for proj, shape in mlp.items():
            block[f"mlp.{proj}.weight"] = shape
            if family == "llama" and cfg.get("mlp_bias"):
                block[f"mlp.{proj}.bias"] = (shape[0],)

    embedding, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    tied = bool(cfg.get("tie_word_embeddings", False))
    expected: dict[str, tuple[int, ...]] = {embedding: (vocab, hidden), norm: (hidden,)}
    for i in range(layers):
        for rel, shape in block.items():
            expected[f"model.layers.{i}.{rel}"] = shape
    if not tied:
        expected[head] = (vocab, hidden)

    why = f"{family}: hidden_size={hidden}, intermediate_size={inter}, heads={heads}, num_key_value_heads={kv}, head_dim={head_dim}, vocab_size={vocab}"
    missing = [n for n in expected if n not in checkpoint]
    if missing:
        hint = "tie_word_embeddings is false" if missing[0] == head else f"{layers} layer(s)"
        raise FrontendError(
            f"{folder}: tensor '{missing[0]}' expected by config.json ({family}, {hint}) is not in the checkpoint"
            + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
            + ": the checkpoint and its config.json do not belong together; re-download or re-save the folder"
        )
    wrong = [n for n, shape in expected.items() if checkpoint.shape(n) != shape]
    if wrong:
        n = wrong[0]
        raise FrontendError(
            f"{checkpoint.info(n).shard}: tensor '{n}' has shape {tuple(checkpoint.shape(n))}, config.json implies {expected[n]} ({why})"
            + (f"; {len(wrong) - 1} more mismatch(es)" if len(wrong) > 1 else "")
            + ": fix config.json or re-export the checkpoint"
        )
    allowed = set(expected) | ({head} if tied else set())
    extra = [n for n in checkpoint.names() if n not in allowed and not _IGNORED.search(n)]
    if extra:
        m = _LAYER_RE.match(extra[0])
        where = f"beyond num_hidden_layers={layers}" if m and int(m.group(1)) >= layers else f"not part of a {family} model"
        raise FrontendError(
            f"{checkpoint.info(extra[0]).shard}: tensor '{extra[0]}' is {where}"
            + (f" ({len(extra) - 1} more such tensor(s))" if len(extra) > 1 else "")
            + "; streaming would ignore it: use the whole-graph path (load_hf_folder) or fix config.json"
        )
    return DecoderLayout(
        checkpoint=checkpoint,
        family=family,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        embedding=embedding,
        blocks=tuple(f"model.layers.{i}." for i in range(layers)),
        block_tensors=tuple(block),
        final_norm=norm,
        lm_head=embedding if tied else head,
        tied=tied,
        _expected=expected,
    )


def iter_blocks(layout: DecoderLayout, *, mmap: bool = False) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(i, block i's tensors)`` one block at a time (the previous block is the caller's to drop)."""
    for i in range(layout.num_layers):
        yield i, layout.block(i, mmap=mmap)


__all__ = ["ShardedCheckpoint", "TensorInfo", "DecoderLayout", "decoder_layout", "iter_blocks", "STREAMING_FAMILIES"]
