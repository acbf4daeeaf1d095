"""Streaming (sequential) compression of a decoder LLM, one unit in memory at a time.

The run visits the units of :func:`graphpress.frontends.shards.decoder_layout` in order:

1. **embedding** -- the table read in the checkpoint's dtype, stored in the artifact as float16
   when the checkpoint is bf16/fp16 (exact for values in float16's normal range), looked up in
   float32;
2. **block 0 .. n-1** -- each read from its shards, converted to float32, bound to a graph
   captured once per kind of block (:class:`~graphpress.stream.units.BlockUnit`; a snapshot of the
   template with the block's tensors set), compressed by the recipe's :class:`Pipeline` (verified
   after every pass as always) with the block's calibration inputs, checked against the
   uncompressed block (output SQNR on the calibration activations), lowered to ONNX and appended
   to the artifact, then freed;
3. **head** -- the final norm and the head's rows in slices no larger than the largest block
   (in float32), each compressed the same way; the slices' logits are concatenated.

Calibration is sequential: block ``i`` is calibrated on the activations the *compressed* blocks
before it produce (what the block will see at run time). A held-out set is carried twice, through
the uncompressed blocks and through the compressed ones, so the end-to-end KL and top-1 agreement
come out of the same single pass over the checkpoint. At the end the written artifact is loaded in
ONNX Runtime and run on the held-out set: its logits must match the streamed compressed ones.

Memory: one unit's float32 weights, its compressed copy and the ONNX export of it, plus the
activations of the calibration and held-out sets (``sequences x seq_len x hidden`` floats each);
the checkpoint stays on disk and the artifact's weights go to its data file as each unit is added
(:class:`~graphpress.backends.onnxruntime.stitch.OnnxStitcher`).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from graphpress.errors import FrontendError, GraphpressError, VerificationError
from graphpress.frontends.shards import STREAMING_FAMILIES, ShardedCheckpoint, decoder_layout
from graphpress.frontends.torch_module import TOKEN_DIMS
from graphpress.ir import dist
from graphpress.ir.compare import kl_divergence, sqnr_db, top1_agreement
from graphpress.ir.graph import Graph
from graphpress.ir.memory import reset_peak, rss_mb, trim
from graphpress.ir.ops_quant import quantizes_activations
from graphpress.passes.pipeline import Pipeline
from graphpress.passes.recipes import Recipe, load_recipe
from graphpress.stream.onnx_units import EMBED_FILE, OnnxTemplates, check_session, concat_model, embedding_model, export_unit
from graphpress.stream.units import (
    BlockUnit,
    HeadUnit,
    KVBlockUnit,
    block_window,
    build_meta_model,
    head_slices,
    materialize,
    rotary_for,
)

#: float16's largest finite value: a bf16 embedding table beyond it is stored in float32.
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class StreamOptions:
    """How a streamed run calibrates and checks.

    Attributes
    ----------
    calibration_sequences, calibration_seq_len : int
        Seeded random token sequences the blocks are calibrated and checked on, when no
        calibration token ids are given. The defaults (256 tokens) are a check set: every token
        is a forward of every block several times over (the uncompressed and compressed unit,
        the passes' verification), which is most of a weight-only run's time. Data-driven passes
        (SparseGPT, AWQ) want real text and more of it: pass token ids.
    heldout_sequences, heldout_seq_len : int
        Seeded random token sequences (another seed) for the end-to-end KL / top-1 and the
        ONNX Runtime check.
    batch : int
        Sequences per calibration batch handed to the passes.
    seed : int
        Seed of the token sequences.
    data_files : str
        ``"one"`` external data file, or ``"per-unit"`` (one per unit).
    min_block_sqnr_db : float or None
        Fail the run when a compressed block's output SQNR (against the uncompressed block on
        the same inputs) is below this; None: report only.
    head_slice_bytes : int or None
        Largest float32 bytes of one head slice; None: half the largest block's float32 bytes.
    kv_cache : bool
        Write a generation-step artifact with a KV cache (``past_key_values.{i}.key/.value`` in,
        ``present.{i}.key/.value`` out, ``attention_mask`` and ``position_ids``; the interface of
        :mod:`graphpress.frontends.hf_kv` and ONNX Runtime GenAI): every block is a
        :class:`~graphpress.stream.units.KVBlockUnit`, calibrated and checked on prefills.
    workers : int
        Local processes (ranks) the run is split over with ``torch.distributed`` (gloo): each
        calibrates on its share of the calibration sequences, statistics are summed over the
        ranks and per-layer solves split between them, so every rank holds the same compressed
        units; rank 0 writes the artifact. Under ``torchrun`` the launcher's ranks are used instead.
    collective_timeout_s : float
        How long a rank waits in a collective before failing (a dead rank must not hang the rest).
    """

    calibration_sequences: int = 4
    calibration_seq_len: int = 64
    heldout_sequences: int = 2
    heldout_seq_len: int = 32
    batch: int = 2
    seed: int = 0
    data_files: str = "one"
    min_block_sqnr_db: float | None = None
    head_slice_bytes: int | None = None
    workers: int = 1
    collective_timeout_s: float = 1800.0
    kv_cache: bool = False


@dataclass
class UnitRecord:
    """What one unit cost and how it measured."""

    unit: str
    time_s: float
    rss_mb: float | None
    params: int
    sqnr_db: float | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    peak_rss_mb: float | None = None  # the process's peak while this unit was worked on

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["sqnr_db"] is not None and not math.isfinite(d["sqnr_db"]):
            d["sqnr_db"] = "inf" if d["sqnr_db"] > 0 else "-inf"
        return d


@dataclass
class StreamResult:
    """A streamed run's artifact folder, manifest and per-unit records."""

    folder: Path
    manifest: dict[str, Any]
    units: list[UnitRecord]


UnitEvent = Callable[[int, int, UnitRecord], None]


def is_streamable(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` is a decoder-LLM checkpoint of a streaming family, else why not."""
    try:
        layout = decoder_layout(ShardedCheckpoint(folder))
    except FrontendError as err:
        return str(err)
    return None if layout.family in STREAMING_FAMILIES else f"family {layout.family!r} is not streamed"


def compress_stream(
    folder: str | os.PathLike,
    recipe: str | Path | Recipe | dict,
    out: str | os.PathLike,
    *,
    options: StreamOptions = StreamOptions(),
    calibration: torch.Tensor | None = None,
    overwrite: bool = False,
    on_unit: UnitEvent | None = None,
) -> StreamResult:
    """Compress the decoder LLM in ``folder`` unit by unit into an ONNX artifact at ``out``.

    Parameters
    ----------
    folder : path
        A Hugging Face folder (``config.json`` + safetensors, sharded or not) of the Llama,
        Qwen2, Mistral or Phi-3 family.
    recipe : str, Path, Recipe or dict
        The passes every block (and head slice) runs, as for the whole-graph path.
    out : path
        The artifact folder; refused when it exists unless ``overwrite``.
    options : StreamOptions
        Calibration and check settings.
    calibration : LongTensor (sequences, seq), optional
        Token ids to calibrate on instead of seeded random ones.
    overwrite : bool
        Replace an existing artifact at ``out``.
    on_unit : callable, optional
        ``on_unit(done, total, record)`` after each unit (the CLI's progress line).

    Returns
    -------
    StreamResult

    Raises
    ------
    FrontendError
        The folder is not a supported checkpoint (one line, before any weight is read).
    VerificationError
        A pass broke a block (the pipeline names pass and block), a block missed
        ``min_block_sqnr_db``, or ONNX Runtime's logits do not match the streamed ones.
    """
    from graphpress.runtime.artifact import check_destination

    out = Path(os.path.abspath(out))
    check_destination(out, overwrite)
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else load_recipe(recipe)
    Pipeline.from_recipe(recipe)  # unknown passes and options fail before any weight is read
    layout = decoder_layout(ShardedCheckpoint(folder))
    if options.kv_cache:
        _check_kv(folder, recipe)
    _tokens(calibration, options.calibration_sequences, options.calibration_seq_len, layout.vocab_size, options.seed, "calibration")
    if not isinstance(options.workers, int) or options.workers < 1:
        raise FrontendError(f"stream option workers={options.workers!r}: give a positive number of processes")
    if dist.world()[1] == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # started by torchrun: join its process group (env:// rendezvous) for this run
        from graphpress.stream.workers import under_launcher

        return under_launcher(folder, recipe, out, options=options, calibration=calibration, overwrite=overwrite, on_unit=on_unit)
    if options.workers > 1 and dist.world()[1] == 1:
        from graphpress.stream.workers import spawn

        return spawn(folder, recipe, out, options=options, calibration=calibration, overwrite=overwrite, on_unit=on_unit)
    return run_rank(folder, recipe, out, options=options, calibration=calibration, overwrite=overwrite, on_unit=on_unit)


def run_rank(
    folder: str | os.PathLike,
    recipe: Recipe,
    out: Path,
    *,
    options: StreamOptions,
    calibration: torch.Tensor | None,
    overwrite: bool,
    on_unit: UnitEvent | None,
) -> StreamResult | None:
    """The streamed run on this process: every rank of a process group runs it (rank 0 writes
    the artifact and returns the result, the others return None); one process runs it alone."""
    from graphpress.backends.onnxruntime.lower import lower_to_onnx
    from graphpress.backends.onnxruntime.stitch import OnnxStitcher
    from graphpress.runtime.artifact import Prehashed, write_artifact

    t_start = time.perf_counter()
    reset_peak()
    rank, size = dist.world()
    primary = rank == 0
    checkpoint = ShardedCheckpoint(folder)
    layout = decoder_layout(checkpoint)
    meta = build_meta_model(folder)
    config = meta.config
    vocab, hidden = layout.vocab_size, layout.hidden_size
    calib_ids = _tokens(calibration, options.calibration_sequences, options.calibration_seq_len, vocab, options.seed, "calibration")
    held_ids = _tokens(None, options.heldout_sequences, options.heldout_seq_len, vocab, options.seed + 1, "held-out")
    if size > len(calib_ids):
        raise FrontendError(f"{size} workers need at least {size} calibration sequences, got {len(calib_ids)}")
    # every rank checks the passes on the same sequences (the first batch), so that every
    # budget decision is the same on all; statistics come from each rank's own share
    check_ids = calib_ids[: options.batch]
    local_ids = calib_ids[rank::size]
    kv = _kv_geometry(config) if options.kv_cache else None
    feed = _feeder(kv)
    total = 1 + layout.num_layers + len(_slices(layout, options))
    records: list[UnitRecord] = []

    def done(record: UnitRecord) -> None:
        record.peak_rss_mb = rss_mb("VmHWM")
        reset_peak()  # the next unit's peak is its own
        records.append(record)
        if on_unit is not None and primary:
            on_unit(len(records), total, record)

    exports = OnnxTemplates()
    scratch = None
    if primary:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.stream-{os.getpid()}-", dir=out.parent))
    try:
        stitched = scratch / "onnx" if scratch is not None else None
        with (OnnxStitcher(stitched, data_files=options.data_files) if primary else contextlib.nullcontext()) as stitcher:
            # ---------------------------------------------------------------- embedding
            t0 = time.perf_counter()
            table = checkpoint.get(layout.embedding)
            storage = _embedding_dtype(table)
            with torch.no_grad():
                ref = torch.nn.functional.embedding(held_ids, table).float()  # the checkpoint's values exactly
                calib = torch.nn.functional.embedding(local_ids, table).to(storage).float()  # what the artifact computes
                # one process: the check sequences are the first calibration ones, and stay a view
                # of them from unit to unit (no forward of their own; see _compress_unit)
                check = calib[: len(check_ids)] if size == 1 else torch.nn.functional.embedding(check_ids, table).to(storage).float()
                test = torch.nn.functional.embedding(held_ids, table).to(storage).float()
            # a KV artifact's decode path: the held-out prefix's caches, then its last token as one step
            decode = (test[:, :-1], test[:, -1:]) if kv else None
            presents: dict[str, str] = {}
            rounds_activations = False  # ONNX Runtime breaks int8 rounding ties otherwise than torch (check_onnx)
            prev = None
            if primary:
                model = embedding_model(table, storage, scratch)
                prev = stitcher.add_unit(model, prefix="embed/", inputs={"input_ids": "input_ids"}, base_dir=scratch)["hidden"]
                (scratch / EMBED_FILE).unlink()
            del table
            done(UnitRecord("embed", time.perf_counter() - t0, rss_mb(), layout.vocab_size * hidden,
                            sqnr_db=sqnr_db(ref, test)))

            # ---------------------------------------------------------------- blocks
            templates: dict[int | None, Graph] = {}
            for i in range(layout.num_layers):
                t0 = time.perf_counter()
                # one tensor at a time: a block's checkpoint-dtype copy never sits beside its float32 one
                weights = {rel: checkpoint.get(layout.blocks[i] + rel).float() for rel in layout.block_tensors}
                window = block_window(config, i)
                graph = _bound_block(templates, window, meta, weights, i, check, kv)
                del weights
                graph.name = f"block.{i}"
                check_in = check
                record, compressed, calib, check = _compress_unit(graph, recipe, calib, check, options, f"block {i}", size == 1, feed)
                rounds_activations = rounds_activations or quantizes_activations(compressed.gm)
                with torch.no_grad():
                    ref = _run(graph, ref, feed)
                    test = _run(compressed, test, feed)
                    if decode is not None:
                        decode = _decode_block(compressed, decode, feed)
                if primary:
                    inputs = {"hidden": prev}
                    if kv:
                        inputs.update({"attention_mask": "attention_mask", "position_ids": "position_ids",
                                       "past_key": f"past_key_values.{i}.key", "past_value": f"past_key_values.{i}.value"})
                    outs = _add(stitcher, lower_to_onnx, compressed, scratch, f"layers.{i}/", inputs, exports,
                                (dict(zip(graph.input_names, feed(check_in))), check))
                    prev = outs["hidden_out"]
                    if kv:
                        presents[f"present.{i}.key"], presents[f"present.{i}.value"] = outs["present_key"], outs["present_value"]
                del check_in
                graph.release()
                compressed.release()
                del graph, compressed
                trim()
                record.time_s = time.perf_counter() - t0
                record.rss_mb = rss_mb()
                done(record)

            # ---------------------------------------------------------------- head slices
            t0 = time.perf_counter()
            norm = materialize(meta.model.norm, {"weight": checkpoint.get(layout.final_norm)})
            slices = _slices(layout, options)
            outputs, ref_logits, test_logits, decode_logits = [], [], [], []
            for k, part in enumerate(slices):
                t1 = time.perf_counter() if k else t0
                unit = HeadUnit(norm, checkpoint.get_rows(layout.lm_head, part.start, part.stop).float())  # only this slice is read
                graph = Graph.capture(unit, (check,), name=f"head.{k}", dynamic_dims=TOKEN_DIMS,
                                      input_names=["hidden"], output_names=["logits"], source={"unit": f"head.{k}"})
                del unit
                record, compressed, _, checked = _compress_unit(graph, recipe, calib, check, options, f"head slice {k} (rows {part.start}:{part.stop})",
                                                          size == 1)
                rounds_activations = rounds_activations or quantizes_activations(compressed.gm)
                with torch.no_grad():
                    ref_logits.append(_run(graph, ref))
                    test_logits.append(_run(compressed, test))
                    if decode is not None:
                        decode_logits.append(_run(compressed, decode[1]))
                if primary:
                    outputs.append(_add(stitcher, lower_to_onnx, compressed, scratch, f"head.{k}/", {"hidden": prev}, exports,
                                        ({"hidden": check}, checked))["logits"])
                del checked
                graph.release()
                compressed.release()
                del graph, compressed
                trim()
                record.unit = f"head.{k}"
                record.time_s = time.perf_counter() - t1
                record.rss_mb = rss_mb()
                done(record)
            del norm
            if primary:
                logits_name = outputs[0]
                if len(outputs) > 1:
                    logits_name = stitcher.add_unit(concat_model(len(outputs)), prefix="head/", inputs={f"x{k}": n for k, n in enumerate(outputs)})["logits"]
                files = stitcher.close({"logits": logits_name, **presents})

        if not primary:
            dist.barrier()  # rank 0 is checking and writing the artifact
            return None
        tail = rss_mb("VmHWM")  # the concatenation and the closing of the artifact
        peaks = {"compress_peak_rss_mb": max([r.peak_rss_mb or 0.0 for r in records] + [tail or 0.0])}
        reset_peak()
        ref_all, test_all = torch.cat(ref_logits, -1), torch.cat(test_logits, -1)
        del ref_logits, test_logits
        end_to_end = {
            "heldout_tokens": int(held_ids.numel()),
            "kl": kl_divergence(ref_all, test_all),
            "top1_agreement": top1_agreement(ref_all, test_all),
            "sqnr_db": _json(sqnr_db(ref_all, test_all)),
        }
        del ref_all
        # what only the units needed goes before ONNX Runtime loads the whole model: the kept
        # exports (one per unit structure), the block templates, the meta model
        exports.models.clear()
        templates.clear()
        del meta
        gc.collect()
        trim()
        ort_check = _ort_check(stitched / "model.onnx", held_ids, test_all, kv, torch.cat(decode_logits, -1) if kv else None,
                               rounds_activations)
        end_to_end["onnxruntime"] = ort_check
        peaks["check_peak_rss_mb"] = rss_mb("VmHWM")
        if not ort_check["ok"]:
            raise VerificationError(
                f"{folder}: ONNX Runtime's logits differ from the streamed ones ({_check_text(ort_check)}); the artifact is not written")
        del test_all
        end_to_end["onnx_exports"] = {"exported": exports.exports, "rebound": exports.rebound,
                                      "rebinding_checked_max_abs": [_json(v) for v in sorted(exports.checked.values())]}
        end_to_end.update(peaks)
        manifest = _manifest(folder, layout, recipe, options, records, end_to_end, calib_ids, time.perf_counter() - t_start, kv)
        moved: dict[str, Any] = {name: Prehashed(stitched / name, meta_["sha256"], meta_["bytes"]) for name, meta_ in files.items()}
        if kv:
            moved.update(_genai_files(manifest["source"]["kv_cache"], folder))
        folder_out = write_artifact(out, moved, manifest, _report(manifest), overwrite=overwrite)
        dist.barrier()
    finally:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
    return StreamResult(folder_out, manifest, records)


# ------------------------------------------------------------------------------------ helpers
def _tokens(given: torch.Tensor | None, n: int, seq: int, vocab: int, seed: int, what: str) -> torch.Tensor:
    if given is not None:
        if not isinstance(given, torch.Tensor) or given.dim() != 2 or given.dtype not in (torch.int32, torch.int64):
            raise FrontendError(f"streaming {what} data must be token ids of shape (sequences, seq), got {getattr(given, 'shape', type(given))}")
        if int(given.min()) < 0 or int(given.max()) >= vocab:
            raise FrontendError(f"streaming {what} token ids must lie in [0, {vocab}); found {int(given.min())}..{int(given.max())}")
        return given.long()
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=gen)


def _slices(layout, options: StreamOptions):
    # half a block: a slice is held about three times at once (float32 rows, the verification
    # forward's chunks and logits, the per-layer check), a block about twice
    limit = options.head_slice_bytes or layout.largest_block_bytes(torch.float32) // 2
    return head_slices(layout.vocab_size, layout.hidden_size, limit)


def _embedding_dtype(table: torch.Tensor) -> torch.dtype:
    """float16 for a bf16/fp16 table within float16's range, else float32."""
    if table.dtype in (torch.bfloat16, torch.float16):
        low, high = torch.aminmax(table)  # no |table| temporary: the table of an 8B Llama is 1 GB
        if max(-float(low), float(high)) <= _FP16_MAX:
            return torch.float16
    return torch.float32


def _bound_block(templates: dict, window: int | None, meta, weights: dict[str, torch.Tensor], index: int, calib: torch.Tensor,
                 kv: "_KV | None" = None) -> Graph:
    """Block ``index`` as a graph: the template of its kind (captured at its first block, then
    holding no weights of its own) snapshotted with this block's tensors set; with ``kv``, the
    block's generation step over its cache (:class:`KVBlockUnit`)."""
    example = _feeder(kv)(calib[: min(2, len(calib))])
    template = templates.get(window)
    if template is None:
        layer = materialize(meta.model.layers[index], dict(weights))
        if kv is None:
            graph = Graph.capture(BlockUnit(layer, rotary_for(meta), window), example, name=f"block.{index}", dynamic_dims=TOKEN_DIMS,
                                  input_names=["hidden"], output_names=["hidden_out"], source={"unit": "block"})
        else:
            unit = KVBlockUnit(layer, rotary_for(meta), meta.config)
            kv.facts.update(unit.facts)
            graph = Graph.capture(unit, example, name=f"block.{index}", trace_inputs=_kv_trace_inputs(calib, kv), dynamic_dims={0: "batch"},
                                  input_names=list(KV_UNIT_INPUTS), output_names=["hidden_out", "present_key", "present_value"],
                                  input_dims=[{0: "batch", 1: "seq"}, {0: "batch", 1: "total"}, {0: "batch", 1: "seq"},
                                              {0: "batch", 2: "past"}, {0: "batch", 2: "past"}],
                                  source={"unit": "block", "kv_unit": True})
        targets = [f"layer.{rel}" for rel in weights]
        missing = [t for t in targets if not _has(graph, t)]
        if missing:
            raise FrontendError(f"block {index}: the captured block has no tensor {missing[0]!r}; streaming cannot re-bind its weights")
        template = graph.snapshot()
        for target in targets:  # the template keeps the structure, not block 0's weights
            t = graph.get_tensor(target)
            template.set_tensor(target, torch.zeros((), dtype=t.dtype).expand(t.shape))
        # a snapshot's record of what it shared holds every tensor it was taken with: kept, it
        # kept block 0's float32 weights alive for the whole run (0.87 GB at 8B)
        template.written_in_place(forget=True)
        templates[window] = template
        meta.model.layers[index].to("meta")
        return graph
    graph = template.snapshot()
    for rel, value in weights.items():
        target = f"layer.{rel}"
        if tuple(value.shape) != tuple(template.get_tensor(target).shape):
            raise FrontendError(f"block {index}: tensor {rel!r} is {tuple(value.shape)}, the block expects {tuple(template.get_tensor(target).shape)}")
        graph.set_tensor(target, value)
    graph.example_inputs = example
    return graph


def _has(graph: Graph, target: str) -> bool:
    try:
        graph.get_tensor(target)
        return True
    except (AttributeError, KeyError, GraphpressError):
        return False


def _compress_unit(graph: Graph, recipe: Recipe, calib: torch.Tensor, check: torch.Tensor, options: StreamOptions, where: str,
                   check_leads_calib: bool, feed: Callable[[torch.Tensor], tuple] | None = None):
    """Run the recipe on one unit: verified on ``check`` (the same on every rank), calibrated on
    this rank's batches ``calib``. The unit's SQNR is the pipeline's own cumulative figure on
    ``check`` (every rank gets the same). Returns the record, the compressed unit and its
    outputs on ``calib`` and on ``check``; ``check_leads_calib`` (one process: ``check`` is the
    first rows of ``calib``) takes the latter from the former instead of another forward;
    ``feed`` turns hidden states into the unit's inputs (a KV block's prefill)."""
    feed = feed or _feeder(None)
    graph.example_inputs = feed(check)
    graph.calibration = [feed(calib[k:k + options.batch]) for k in range(0, len(calib), options.batch)]
    pipeline = Pipeline.from_recipe(recipe)
    # a unit's inputs are activations: seeded random ones say little about them, so every pass
    # is verified on the unit's own calibration activations (the example inputs) instead
    pipeline.random_inputs = 0
    try:
        report = pipeline.run(graph)
    except GraphpressError as err:
        raise type(err)(f"{where}: {err}") from err
    compressed = report.graph
    # the unit's first output: the residual stream (a KV block's presents are reported per pass)
    sqnr = report.steps[-1].cumulative[0].sqnr_db if report.steps and report.steps[-1].cumulative else math.inf
    if options.min_block_sqnr_db is not None and sqnr < options.min_block_sqnr_db:
        raise VerificationError(f"{where}: output SQNR {sqnr:.1f} dB on the check sequences is below min_block_sqnr_db={options.min_block_sqnr_db}")
    with torch.no_grad():
        outputs = _run(compressed, calib, feed)
        checked = outputs[: check.shape[0]] if check_leads_calib else _run(compressed, check, feed)
    record = UnitRecord(graph.name, 0.0, None, graph.parameter_count(), sqnr_db=sqnr, passes=report.to_dict()["passes"])
    return record, compressed, outputs, checked


def _run(graph: Graph, x: torch.Tensor, feed: Callable[[torch.Tensor], tuple] | None = None, batch: int = 8) -> torch.Tensor:
    """The unit's first output on hidden states ``x``, ``batch`` sequences at a time."""
    feed = feed or _feeder(None)
    return torch.cat([graph.run(*feed(x[k:k + batch]))[0] for k in range(0, len(x), batch)])


# ------------------------------------------------------------------------------------ KV cache
#: A KV block unit's inputs (:class:`KVBlockUnit`).
KV_UNIT_INPUTS = ("hidden", "attention_mask", "position_ids", "past_key", "past_value")


@dataclass
class _KV:
    """A KV run's cache geometry and the facts its manifest records (``source["kv_cache"]``)."""

    layers: int
    kv_heads: int
    head_dim: int
    facts: dict[str, Any]


def _kv_geometry(config) -> _KV:
    from graphpress.frontends.hf_kv import cache_geometry, decoder_facts

    layers, kv_heads, head_dim = cache_geometry(config)
    return _KV(layers, kv_heads, head_dim, {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, **decoder_facts(config)})


def _feeder(kv: _KV | None) -> Callable[[torch.Tensor], tuple]:
    """Hidden states ``(batch, seq, hidden)`` -> a unit's inputs: themselves, or a KV block's
    prefill (a mask of ones, positions ``0 .. seq-1``, caches of length 0)."""
    if kv is None:
        return lambda h: (h,)

    def feed(h: torch.Tensor) -> tuple:
        b, s = h.shape[0], h.shape[1]
        empty = torch.zeros(b, kv.kv_heads, 0, kv.head_dim, dtype=h.dtype)
        return (h, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(b, s).contiguous(), empty, empty.clone())

    return feed


def _kv_trace_inputs(calib: torch.Tensor, kv: _KV) -> tuple:
    """What a KV block is traced on: cached inputs whose sizes export specializes none of (a
    past of 4 random rows, 12 new tokens; see :mod:`graphpress.frontends.hf_kv`)."""
    from graphpress.frontends.hf_kv import EXAMPLE_PAST, EXAMPLE_SEQ

    gen = torch.Generator().manual_seed(0)
    h = calib[:2, :EXAMPLE_SEQ]
    if h.shape[0] < 2 or h.shape[1] < EXAMPLE_SEQ:
        h = torch.randn(2, EXAMPLE_SEQ, calib.shape[-1], generator=gen)
    past = [torch.randn(2, kv.kv_heads, EXAMPLE_PAST, kv.head_dim, generator=gen) for _ in range(2)]
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    return (h, torch.ones(2, total, dtype=torch.long), torch.arange(EXAMPLE_PAST, total).expand(2, EXAMPLE_SEQ).contiguous(), *past)


def _decode_block(graph: Graph, decode: tuple[torch.Tensor, torch.Tensor], feed) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry the held-out decode check through one compressed KV block: the prefix as a prefill
    (its caches), then the last token as one step over them."""
    prefix, last = decode
    hidden, past_k, past_v = graph.run(*feed(prefix))
    b, p = prefix.shape[0], prefix.shape[1]
    step = graph.run(last, torch.ones(b, p + 1, dtype=torch.long), torch.full((b, 1), p, dtype=torch.long), past_k, past_v)[0]
    return hidden, step


def _check_kv(folder, recipe: Recipe) -> None:
    """What a streamed KV artifact cannot be, refused in one line before any weight is read."""
    from graphpress.frontends.hf_kv import sliding_window
    from graphpress.frontends.huggingface import read_hf_config

    config = read_hf_config(folder)
    window = sliding_window(config)
    if window is not None:
        raise FrontendError(
            f"{folder}: sliding-window attention ({window} tokens) drops old cache entries; a KV-cache export supports full attention "
            f"only (set sliding_window to null in config.json if the model is used within {window} tokens)"
        )
    rope = (getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type in ("dynamic", "longrope"):
        raise FrontendError(f"{folder}: rope type {rope_type!r} changes its angles with the sequence length at run time; a KV-cache "
                            f"export supports position-only rope types")
    if any(name == "quantize-kv-cache" for name, _ in recipe.passes):
        raise FrontendError(f"recipe {recipe.name!r}: quantize-kv-cache measures the decode KL of the whole model and cannot run per "
                            f"block; use --stream off for it")


def _genai_files(facts: dict[str, Any], folder) -> dict[str, Any]:
    """``genai_config.json`` (bytes) and the source folder's tokenizer files (paths)."""
    import json

    from graphpress.backends.onnxruntime.genai import GENAI_CONFIG, TOKENIZER_FILES, genai_config_for

    files: dict[str, Any] = {GENAI_CONFIG: (json.dumps(genai_config_for(facts, "model.onnx"), indent=2) + "\n").encode()}
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).is_file():
            files[name] = Path(folder) / name
    return files


def _kv_io(layout, kv: _KV) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's inputs and outputs of a streamed KV artifact."""
    cache = ["batch", kv.kv_heads, "past", kv.head_dim]
    inputs = [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"},
              {"name": "attention_mask", "shape": ["batch", "total"], "dtype": "int64"},
              {"name": "position_ids", "shape": ["batch", "seq"], "dtype": "int64"}]
    outputs = [{"name": "logits", "shape": ["batch", "seq", layout.vocab_size], "dtype": "float32"}]
    for i in range(kv.layers):
        for part in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{part}", "shape": cache, "dtype": "float32"})
            outputs.append({"name": f"present.{i}.{part}", "shape": ["batch", kv.kv_heads, "total", kv.head_dim], "dtype": "float32"})
    return inputs, outputs


def _json(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _add(stitcher, lower, graph: Graph, scratch: Path, prefix: str, inputs: dict[str, str],
         templates: OnnxTemplates, check: tuple[dict[str, torch.Tensor], torch.Tensor]) -> dict[str, str]:
    """Lower one unit to ONNX (or re-bind an earlier unit's ONNX to its tensors, see
    :class:`OnnxTemplates`; ``check``: the unit's check inputs and outputs), append it to the
    artifact."""
    model = templates.lower(graph, lambda g: export_unit(lower, g, scratch), check)
    return stitcher.add_unit(model, prefix=prefix, inputs=inputs)


def _ort_check(model: Path, ids: torch.Tensor, expected: torch.Tensor, kv: _KV | None = None,
               decoded: torch.Tensor | None = None, rounds_activations: bool = False) -> dict[str, Any]:
    """Load the stitched model in ONNX Runtime, run the held-out ids, compare with the streamed
    compressed logits. A KV artifact runs them as a prefill, and also decodes the last token from
    the prefix's presents, compared with the streamed blocks' own decode step (``decoded``).

    Logits agree when the max abs error is within ``1e-3 x max(1, max |expected|)`` and the KL
    below 1e-4; where a unit rounds its activations (int8), ONNX Runtime breaks rounding ties
    otherwise than torch and the deep stack amplifies one int8 step, so there the rule of
    :func:`~graphpress.backends.onnxruntime.lower.check_onnx` holds instead: an SQNR of at least
    ``QUANT_CHECK_MIN_SQNR_DB`` (top-1 agreement is recorded, not required: the near-flat logits
    of a random-weight model flip their argmax on the smallest difference)."""
    t0 = time.perf_counter()
    sess = check_session(str(model))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kv is None:
        (got,) = sess.run(["logits"], {"input_ids": ids.numpy()})
    else:
        got = sess.run(["logits"], _kv_feeds(ids, kv))[0]
    run_s = time.perf_counter() - t0
    got_t = torch.from_numpy(got)
    diff, kl, ok, agree = _agree(expected, got_t, rounds_activations)
    out = {"ok": bool(ok), "max_abs": diff, "kl_vs_streamed": kl, "sqnr_db": _json(sqnr_db(expected, got_t)), "top1_vs_streamed": agree,
           "load_s": round(load_s, 3), "run_s": round(run_s, 3)}
    if rounds_activations:
        out["rule"] = f"activations rounded: SQNR >= {_QUANT_SQNR_DB:g} dB"
    if kv is not None and decoded is not None:
        names = [o.name for o in sess.get_outputs()]
        prefix = dict(zip(names, sess.run(names, _kv_feeds(ids[:, :-1], kv))))
        b, p = ids.shape[0], ids.shape[1] - 1
        feeds = {"input_ids": ids[:, -1:].numpy(), "attention_mask": torch.ones(b, p + 1, dtype=torch.long).numpy(),
                 "position_ids": torch.full((b, 1), p, dtype=torch.long).numpy()}
        feeds.update({f"past_key_values.{n[len('present.'):]}": v for n, v in prefix.items() if n.startswith("present.")})
        step = torch.from_numpy(sess.run(["logits"], feeds)[0])
        d_diff, d_kl, d_ok, d_agree = _agree(decoded, step, rounds_activations)
        out["decode_step"] = {"max_abs": d_diff, "kl_vs_streamed": d_kl, "sqnr_db": _json(sqnr_db(decoded, step)), "top1_vs_streamed": d_agree,
                              "past": p}
        out["ok"] = bool(out["ok"] and d_ok)
        out["max_abs"] = max(diff, d_diff)
    return out


def _check_text(check: dict[str, Any]) -> str:
    parts = [f"prefill: max abs {check['max_abs']:.3g}, SQNR {check['sqnr_db']} dB, top-1 {check['top1_vs_streamed']:.3f}"]
    if "decode_step" in check:
        d = check["decode_step"]
        parts.append(f"decode step: max abs {d['max_abs']:.3g}, SQNR {d['sqnr_db']} dB, top-1 {d['top1_vs_streamed']:.3f}")
    return "; ".join(parts)


#: The SQNR floor of logits where activations are rounded (check_onnx's QUANT_CHECK_MIN_SQNR_DB).
_QUANT_SQNR_DB = 15.0


def _agree(expected: torch.Tensor, got: torch.Tensor, rounds_activations: bool) -> tuple[float, float, bool, float]:
    """``(max abs, KL, agree, top-1 agreement)`` of ONNX Runtime's logits against the streamed ones
    (the rule: :func:`_ort_check`)."""
    diff = float((got - expected).abs().max())
    kl = kl_divergence(expected, got)
    agree = top1_agreement(expected, got)
    ok = diff <= 1e-3 * max(1.0, float(expected.abs().max())) and kl < 1e-4
    if rounds_activations and not ok:
        ok = sqnr_db(expected, got) >= _QUANT_SQNR_DB
    return diff, kl, ok, agree


def _kv_feeds(ids: torch.Tensor, kv: _KV) -> dict[str, Any]:
    """A KV artifact's feeds for a prefill of ``ids``."""
    import numpy as np

    b, s = ids.shape
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), dtype=np.int64),
             "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()}
    empty = np.zeros((b, kv.kv_heads, 0, kv.head_dim), dtype=np.float32)
    for i in range(kv.layers):
        feeds[f"past_key_values.{i}.key"] = feeds[f"past_key_values.{i}.value"] = empty
    return feeds


def _manifest(folder, layout, recipe: Recipe, options: StreamOptions, records: list[UnitRecord], end_to_end: dict,
              calib_ids: torch.Tensor, wall: float, kv: _KV | None = None) -> dict[str, Any]:
    import graphpress

    blocks = [r for r in records if r.unit.startswith("block.")]
    worst = min((r.sqnr_db for r in blocks if r.sqnr_db is not None), default=None)
    manifest = {
        "graphpress_version": graphpress.__version__,
        "backend": "onnxruntime",
        "model_file": "model.onnx",
        "inputs": [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"}],
        "outputs": [{"name": "logits", "shape": ["batch", "seq", layout.vocab_size], "dtype": "float32"}],
        "source": {"name": Path(folder).name, "frontend": "huggingface-stream", "path": str(folder),
                   "family": layout.family, "layers": layout.num_layers, "dynamic_batch": True},
        "recipe": recipe.to_dict(),
        "passes": [],
        "stream": {
            "options": asdict(options),
            "calibration_tokens": int(calib_ids.numel()),
            "units": [r.to_dict() for r in records],
            "worst_block_sqnr_db": _json(round(worst, 2)) if worst is not None else None,
            "end_to_end": end_to_end,
            "wall_s": round(wall, 2),
        },
        "metrics": {"params_before": int(sum(r.params for r in records)), "kl_heldout": end_to_end["kl"],
                    "top1_agreement_heldout": end_to_end["top1_agreement"]},
        "example_shapes": {"input_ids": [int(options.heldout_sequences), int(options.heldout_seq_len)]},
        "lowering": {"info": {"streamed": True, "units": len(records)}, "check": end_to_end["onnxruntime"]},
    }
    if kv is not None:
        manifest["inputs"], manifest["outputs"] = _kv_io(layout, kv)
        # the concrete sizes 'compress bench' fills the symbolic dims with: a held-out prefill
        b, s = int(options.heldout_sequences), int(options.heldout_seq_len)
        manifest["example_shapes"] = {spec["name"]: ([b, kv.kv_heads, 0, kv.head_dim] if spec["name"].startswith("past_key_values.") else [b, s])
                                      for spec in manifest["inputs"]}
        manifest["source"]["kv_cache"] = dict(kv.facts)
        manifest["lowering"]["info"].update({"kv_cache": True, "genai_config": "genai_config.json"})
    return manifest


def _report(manifest: dict[str, Any]) -> str:
    s = manifest["stream"]
    e2e = s["end_to_end"]
    lines = [
        f"# {manifest['source']['name']} (streamed, {manifest['source']['family']}, {manifest['source']['layers']} blocks)",
        "",
        f"- recipe: {manifest['recipe'].get('name')}",
        f"- held-out KL {e2e['kl']:.4g} nats, top-1 agreement {e2e['top1_agreement']:.3f} ({e2e['heldout_tokens']} tokens)",
        f"- worst block SQNR {s['worst_block_sqnr_db']} dB; ONNX Runtime check: {'passed' if e2e['onnxruntime']['ok'] else 'FAILED'} "
        f"(max abs {e2e['onnxruntime']['max_abs']:.3g})",
        f"- wall {s['wall_s']} s",
    ]
    kv = (manifest["source"].get("kv_cache") or {})
    if kv:
        step = e2e["onnxruntime"].get("decode_step") or {}
        lines.append(f"- KV cache: {kv['layers']} layers x (key, value) of {kv['kv_heads']} heads x {kv['head_dim']}, attention {kv['attention']}; "
                     f"a decode step after {step.get('past')} cached tokens checked in ONNX Runtime (max abs {step.get('max_abs', float('nan')):.3g})")
    lines += [
        "",
        "| unit | time (s) | RSS after (MB) | peak RSS (MB) | SQNR (dB) |",
        "|---|---|---|---|---|",
    ]
    for u in s["units"]:
        sq = u["sqnr_db"]
        lines.append(f"| {u['unit']} | {u['time_s']:.2f} | {u['rss_mb']} | {u.get('peak_rss_mb')} | {sq if isinstance(sq, str) else (round(sq, 1) if sq is not None else '')} |")
    return "\n".join(lines) + "\n"


__all__ = ["StreamOptions", "StreamResult", "UnitRecord", "compress_stream", "is_streamable", "run_rank"]
