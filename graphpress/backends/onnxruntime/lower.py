"""Lower a :class:`~graphpress.ir.graph.Graph` to ONNX and check it with ONNX Runtime.

Steps (see ``docs/backends/onnxruntime.md``):

1. ``graph.export_program()`` re-exports the (possibly rewritten) FX graph with ``torch.export``,
   keeping the graph's dynamic dims (the batch; a sequence length for language models).
2. ``torch.onnx.export(..., dynamo=True, opset_version=18)`` translates the ATen graph to ONNX;
   graphpress custom ops translate through :func:`graphpress.lowering.onnx.translation_table`.
   The exporter's progress prints and warnings are swallowed; on failure the innermost error
   line becomes a one-line :class:`BackendError`.
3. The symbolic dims (named by torch ``s22``, ``s77`` ...) are renamed after the graph's input
   specs (``batch``, ``seq``), and
   the model is saved as one ``model.onnx`` (weights inline below 2 GB, external data above).
4. Optionally ORT's *extended* graph optimizations are applied offline and stored
   (``optimize=True``; off by default: it did not make loading faster, see the docs).
5. The check: ORT (CPU EP) runs the example inputs plus two seeded random input sets (at batch 1
   and at example batch + 3 when the batch is dynamic) and every output is compared with
   ``graph.run`` by :func:`graphpress.ir.compare.compare_outputs` (fp32: rtol 1e-4,
   atol 1e-5 x max(1, max|ref|)). Any output outside tolerance raises :class:`BackendError`.
   Graphs whose ops round activations (:func:`graphpress.ir.ops_quant.quantizes_activations`)
   may instead meet an SQNR floor of :data:`QUANT_CHECK_MIN_SQNR_DB`: float differences of one
   ulp move values on rounding ties by a whole grid step, and deep models amplify that.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import torch

import graphpress
from graphpress.backends.base import LoweredModel
from graphpress.backends.onnxruntime.genai import GENAI_CONFIG, write_genai_files
from graphpress.backends.onnxruntime.options import DEFAULT_OPSET, OnnxRuntimeOptions
from graphpress.backends.onnxruntime.qdq_cleanup import clean_qdq
from graphpress.backends.onnxruntime.session import CPU, OrtRunner
from graphpress.errors import BackendError
from graphpress.ir.compare import compare_outputs
from graphpress.ir.graph import Graph
from graphpress.ir.ops_quant import quantizes_activations
from graphpress.lowering.onnx import translation_table
from graphpress.lowering.onnx.kv_cache import storage_of, store_quantized_caches

MODEL_FILE = "model.onnx"
# protobuf refuses messages of 2 GiB; keep headroom for the graph itself next to the weights.
_INLINE_WEIGHT_LIMIT = 2**31 - 2**26
#: SQNR floor (dB) of the check for graphs that quantize activations: ulp differences flip
#: rounding ties, which measured 26 dB on stories260K int8-dynamic (digits CNN: 55-66 dB); a
#: wrong lowering (weight layout, scale, zero point) lands near 0 dB.
QUANT_CHECK_MIN_SQNR_DB = 15.0

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow the exporter's stdout prints, warnings and log records (kept in the buffer).

    torch.onnx prints "[torch.onnx] Run decompositions..." to stdout and logs registry warnings
    through handlers bound to the real stderr, so redirecting the streams alone is not enough.
    """
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _error_line(err: BaseException) -> str:
    """The most useful single line of an exporter error.

    torch.onnx wraps the real cause (e.g. ``DispatchError: No ONNX function found for
    <OpOverload(op='graphpress.foo' ...)>``) in two layers of generic "Failed to convert ..."
    text; take the innermost cause and add the FX node being translated when one is named.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    node = None
    for e in chain:
        if m := re.search(r"translating node %(\S+)", str(e)):
            node = m.group(1)
            break
    inner = chain[-1]
    lines = [ln.strip() for ln in _ANSI.sub("", str(inner)).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("[torch.onnx]")]
    line = f"{type(inner).__name__}: {lines[0]}" if lines else type(inner).__name__
    if len(line) > 300:
        line = line[:297] + "..."
    return f"{line} (node %{node})" if node else line


def _name_dynamic_dims(model: Any, input_specs: Any) -> dict[str, str]:
    """Rename the symbols torch gave dynamic dims (``s77``) to the graph's names (``batch``,
    ``seq``) throughout ``model``, derived dims such as ``2*s77`` included.

    The mapping comes from the inputs: where an input spec names a dim, the ONNX input's
    symbol at that position gets the name. Returns ``{old symbol: name}`` (empty when static).
    """
    import onnx_ir as ir

    mapping: dict[str, str] = {}
    for value, spec in zip(model.graph.inputs, input_specs):
        if value.shape is None:
            continue
        for dim, want in zip(value.shape, spec.shape):
            if isinstance(want, str) and isinstance(dim, ir.SymbolicDim) and dim.value:
                mapping.setdefault(str(dim.value), want)
    if not mapping:
        return {}
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in sorted(mapping, key=len, reverse=True)) + r")\b")

    def rename(value: Any) -> None:
        shape = value.shape
        if shape is None or not any(isinstance(d, ir.SymbolicDim) and d.value for d in shape):
            return
        value.shape = ir.Shape(
            [
                ir.SymbolicDim(pattern.sub(lambda m: mapping[m.group(1)], d.value)) if isinstance(d, ir.SymbolicDim) and d.value else d
                for d in shape
            ]
        )

    values = list(model.graph.inputs) + list(model.graph.outputs)
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for fn in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(fn))
    values += [out for node in nodes for out in node.outputs]
    for value in values:
        rename(value)
    return mapping


def _initializer_bytes(model: Any) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _optimize_keeping_packed_weights(model: Any) -> None:
    """The exporter's own optimization (onnxscript constant folding and cleanup), except that no
    node reading a uint8 tensor is folded: those are the unpacking of k-bit stored weights
    (:mod:`graphpress.ir.ops_load`), which must reach the file packed. Folded at export they were
    written back as float32 (stories260K 8-bit: 752 KB instead of 551 KB); ONNX Runtime folds them
    when it loads the model instead."""
    import onnx_ir as ir
    import onnxscript.optimizer

    def should_fold(node: Any) -> bool | None:
        if any(v is not None and v.dtype == ir.DataType.UINT8 for v in node.inputs):
            return False
        return None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


#: ONNX ops that carry a layer's arithmetic; an elementwise op after one (its relu, its residual
#: sum) is charged to it, since ORT fuses them into one kernel named after the last op's output.
_HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "QLinearConv", "QLinearMatMul", "QGemm",
                        "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "GroupQueryAttention", "Attention"})
_ELEMENTWISE_OPS = frozenset({"Relu", "Add", "Sum", "Clip", "Sigmoid", "Tanh", "Mul", "LeakyRelu", "HardSigmoid", "HardSwish",
                              "Gelu", "FastGelu", "BatchNormalization", "QuantizeLinear", "DequantizeLinear"})


def node_layers(model: Any) -> dict[str, str]:
    """ONNX node and value name -> the graphpress layer it came from, read off the exporter's name scopes.

    The dynamo exporter records each node's module path (``pkg.torch.onnx.name_scopes``, e.g.
    ``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'qconv2d_1']``: the modules, then the fx node).
    The layer is the innermost module path -- what :func:`graphpress.ir.names.layer_name` calls a
    conv or linear -- or the fx node's name for an op outside any module. Every node a
    graphpress op expands into (a ``qconv2d``'s Quantize/Dequantize/Conv) carries its op's scope.

    ONNX Runtime renames what it rewrites: a fused kernel keeps a node name with a suffix, or
    (NCHWc layouts) takes the name of the value it writes. Both names are keys here, and an
    elementwise node right after a conv/matmul (its relu, the residual sum fused into it) takes
    that op's layer, so ORT's per-node profile
    (:mod:`graphpress.backends.onnxruntime.profile`) sums back to layers. Must run before
    :func:`_strip_debug_metadata`.
    """
    import ast

    import onnx_ir as ir

    layer: dict[Any, str] = {}
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for node in nodes:
        raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if not raw:
            continue
        try:
            scopes = [str(s) for s in ast.literal_eval(raw)]
        except (ValueError, SyntaxError):
            continue
        modules = [s for s in scopes[:-1] if s]
        layer[node] = modules[-1] if modules else scopes[-1]

    def heavy_upstream(node: Any, depth: int = 3) -> str | None:
        for value in node.inputs:
            src = value.producer() if value is not None else None
            if src is None or src not in layer:
                continue
            if src.op_type in _HEAVY_OPS:
                return layer[src]
            if depth > 1 and src.op_type in _ELEMENTWISE_OPS:
                found = heavy_upstream(src, depth - 1)
                if found is not None:
                    return found
        return None

    out: dict[str, str] = {}
    for node in nodes:
        if node not in layer:
            continue
        name = layer[node]
        if node.op_type in _ELEMENTWISE_OPS and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            name = heavy_upstream(node) or name
        if node.name:
            out[node.name] = name
        for value in node.outputs:
            if value.name:
                out.setdefault(value.name, name)
    return out


def _strip_debug_metadata(model: Any) -> int:
    """Drop the exporter's per-node and per-value metadata (source stack traces, module paths) and
    doc strings; returns how many entries went. They are debugging aids, not part of the model, and
    on a small quantized model they were half of the file (ResNet-20 int8: 249 KB of 565 KB)."""
    import onnx_ir as ir

    dropped = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        dropped += len(node.metadata_props)
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            dropped += len(value.metadata_props)
            value.metadata_props.clear()
    for value in (*model.graph.inputs, *model.graph.initializers.values()):
        dropped += len(value.metadata_props)
        value.metadata_props.clear()
    # model-level exporter notes (symbolic shapes' value ranges): they vary with the process's
    # symbol counter, so two lowerings of one graph would differ by them
    for props in (model.metadata_props, model.graph.metadata_props):
        for key in [k for k in props if k.startswith("pkg.torch")]:
            del props[key]
            dropped += 1
    return dropped


def lower_to_onnx(graph: Graph, folder: str | os.PathLike, *, opset: int = DEFAULT_OPSET, optimize: bool = False,
                  debug_metadata: bool = False) -> dict[str, Any]:
    """Export ``graph`` to ``folder/model.onnx`` (plus an external-data file above 2 GB).

    Parameters
    ----------
    graph : Graph
        The graph to lower; it is not modified.
    folder : path
        Existing or new folder; ``model.onnx`` in it is replaced.
    opset : int
        ONNX opset, at least 18 (the dynamo exporter's floor).
    optimize : bool
        Store the model after ORT's ``ORT_ENABLE_EXTENDED`` optimizations (CPU EP). Not
        ``ORT_ENABLE_ALL``: its NCHWc layouts are specific to this machine's CPU.
    debug_metadata : bool
        Keep the exporter's per-node metadata (source stack traces, module paths). Off by
        default: it is not part of the model and can be half of a small quantized file.

    Returns
    -------
    dict
        Facts for the manifest: ``files`` (names written), ``node_layers`` (:func:`node_layers`), ``opset``, ``dynamic_dims``,
        ``external_data``, ``model_bytes``, timings ``export_program_s``, ``onnx_export_s``,
        ``save_s``, ``optimize_s``, and versions.

    Raises
    ------
    BackendError
        When re-export or ONNX translation fails (one line naming the op/node) or ``opset < 18``.
    """
    if opset < DEFAULT_OPSET:
        raise BackendError(f"onnxruntime: opset {opset} is not supported; the dynamo exporter needs opset >= {DEFAULT_OPSET}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    before = {p.name for p in folder.iterdir()}
    info: dict[str, Any] = {"opset": opset, "torch_version": torch.__version__, "onnxruntime_version": ort.__version__}

    t0 = time.perf_counter()
    try:
        with _quiet():
            ep = graph.export_program()
    except Exception as err:  # noqa: BLE001 -- any torch.export failure becomes one line
        raise BackendError(f"onnxruntime: torch.export of {graph.name!r} failed: {_error_line(err)}") from err
    info["export_program_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    try:
        with _quiet():
            program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                opset_version=opset,
                input_names=list(graph.input_names),
                output_names=list(graph.output_names),
                custom_translation_table=translation_table(),
                optimize=False,
            )
            if program is not None:
                _optimize_keeping_packed_weights(program.model)
                info["qdq_cleanup"] = clean_qdq(program.model)
    except Exception as err:  # noqa: BLE001
        raise BackendError(f"onnxruntime: ONNX export of {graph.name!r} failed: {_error_line(err)}") from err
    info["onnx_export_s"] = round(time.perf_counter() - t0, 3)
    if program is None:  # only the legacy exporter returns None
        raise BackendError(f"onnxruntime: ONNX export of {graph.name!r} returned no program")

    model = program.model
    renamed = _name_dynamic_dims(model, graph.input_specs)
    info["dynamic_dims"] = sorted(set(renamed.values()))
    try:
        kv_bits = store_quantized_caches(model)  # quantize-kv-cache: the caches become packed codes
    except ValueError as err:
        raise BackendError(f"onnxruntime: {graph.name!r}: {err}") from None
    if kv_bits:
        info["kv_cache_bits"] = kv_bits
    info["node_layers"] = node_layers(model)
    if not debug_metadata:
        info["metadata_entries_dropped"] = _strip_debug_metadata(model)
    model.metadata_props["graphpress_version"] = graphpress.__version__
    model.metadata_props["graphpress_model"] = graph.name

    t0 = time.perf_counter()
    weight_bytes = _initializer_bytes(model)
    external = weight_bytes > _INLINE_WEIGHT_LIMIT
    with _quiet():
        program.save(path, external_data=external)
    info["save_s"] = round(time.perf_counter() - t0, 3)
    info["external_data"] = external

    info["optimized"] = False
    if optimize and not external:
        # Offline optimization of a >2 GB model needs an extra external-initializers file; the
        # gain does not justify the complexity (docs: stored optimization did not speed up loading).
        t0 = time.perf_counter()
        optimize_onnx(path)
        info["optimized"] = "ORT_ENABLE_EXTENDED"
        info["optimize_s"] = round(time.perf_counter() - t0, 3)

    info["files"] = sorted(p.name for p in folder.iterdir() if p.name not in before or p.name == MODEL_FILE)
    info["model_bytes"] = sum((folder / f).stat().st_size for f in info["files"])
    return info


def optimize_onnx(path: str | os.PathLike, level: str = "extended") -> None:
    """Replace ``path`` by ORT's offline-optimized version of it (CPU EP).

    ``level`` is ``"basic"`` or ``"extended"``. The extended level adds ``com.microsoft``
    fused ops (FusedConv, FusedGemm, ...), so the stored model then needs onnxruntime (not any
    ONNX runtime) to run. Constant folding is left to load time: stored, it would write back
    the dense float weights that ``store-sparse`` and ``dequantize-at-load`` keep packed (a 50 %
    sparse MLP went from 0.53x to 1.0x of the dense file).
    """
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise BackendError(f"onnxruntime: optimization level {level!r} not one of {', '.join(levels)}")
    path = Path(path)
    tmp = path.with_name(path.name + ".opt.tmp")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[level]
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=[CPU], disabled_optimizers=["ConstantFolding"])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_inputs(graph: Graph, seeds: Sequence[int]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
    """Example inputs plus seeded random ones; with a dynamic batch the random ones run at
    batch 1 (the size torch.export specializes) and at example batch + 3."""
    sets = [("example inputs", tuple(graph.example_inputs))]
    b = graph.example_inputs[0].shape[0] if graph.example_inputs and graph.example_inputs[0].dim() > 0 else 1
    batches = [1, b + 3] if graph.dynamic_batch else [None, None]
    for i, seed in enumerate(seeds):
        batch = batches[i % 2]
        label = f"random inputs (seed {seed}" + (f", batch {batch})" if batch is not None else ")")
        sets.append((label, graph.random_inputs(seed, batch=batch)))
    return sets


_DECODE_STEP = "a decode step after the example prefill"


def _decode_step(graph: Graph, outs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A KV-cache decoder's inputs for one new token after its example prefill, whose outputs
    are ``outs``: the prefill's presents as the past (``graphpress.frontends.hf_kv``'s layout:
    ids, mask, positions, caches)."""
    ids, mask = graph.example_inputs[0], graph.example_inputs[1]
    b, total = ids.shape[0], mask.shape[1] + 1
    nxt = outs[0][:, -1].argmax(-1, keepdim=True).to(ids.dtype)
    return (nxt, torch.ones(b, total, dtype=mask.dtype), torch.full((b, 1), total - 1, dtype=graph.example_inputs[2].dtype), *outs[1:])


def check_onnx(graph: Graph, model_path: str | os.PathLike, *, seeds: Sequence[int] = (0, 1), threads: int | None = None) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU EP) with ``graph.run`` on example and seeded random inputs.

    The check runs on the CPU EP whatever the deployment EP: it verifies the translation, not
    device numerics (the CUDA EP may use TF32 and would need a looser tolerance).

    Parameters
    ----------
    graph : Graph
        The reference.
    model_path : path
        The lowered ``.onnx`` file.
    seeds : sequence of int
        Seeds for :meth:`Graph.random_inputs`.
    threads : int, optional
        ORT intra-op threads for the check session.

    Returns
    -------
    dict
        ``{"passed": True, "providers": [...], "tolerance": str, "runs": [{"inputs": label,
        "outputs": [OutputDiff dicts]}], "worst": {"output", "inputs", "max_abs", "max_rel",
        "sqnr_db"}, "check_s": float}``.

    Raises
    ------
    BackendError
        Naming the first output (and input set) outside tolerance, or a run that failed.
    """
    t0 = time.perf_counter()
    runner = OrtRunner(model_path, providers=[CPU], threads=threads)
    quantized = quantizes_activations(graph.gm)
    # caches stored as codes (quantize-kv-cache): torch runs on the caches the codes stand for
    storage = storage_of(graph)
    runs, worst = [], None
    sets = _check_inputs(graph, seeds)
    for label, inputs in sets:
        feeds = storage.encode(graph.input_names, inputs) if storage.bits else inputs
        if storage.bits:  # the float caches the codes stand for
            inputs = tuple(storage.decode(graph.input_names, feeds))
        refs = graph.run(*inputs)
        if graph.source.get("kv_cache") and label == sets[0][0]:
            # a KV-cache decoder also decodes one token from the example prefill's caches
            sets.append((_DECODE_STEP, _decode_step(graph, refs)))
        try:
            outs = runner(*feeds)
        except BackendError as err:
            raise BackendError(f"onnxruntime: {graph.name!r} failed on {label}: {err}") from err
        tests = [torch.from_numpy(np.asarray(o)) for o in outs]
        if storage.bits:
            tests = storage.decode(graph.output_names, tests)
        if len(tests) != len(refs):
            raise BackendError(f"onnxruntime: {graph.name!r} has {len(outs)} ONNX outputs, torch has {len(refs)}")
        diffs = compare_outputs(refs, tests, graph.output_names)
        for d, r, t in zip(diffs, refs, tests):
            tie_rounding = quantized and r.shape == t.shape and r.dtype == t.dtype and d.sqnr_db >= QUANT_CHECK_MIN_SQNR_DB
            # a cache stored as codes: one grid step apart where a rounding tie fell the other way
            tie_rounding = tie_rounding or bool(storage.bits and storage.within_a_step(d.name, r, t, upstream=quantized))
            if not d.within_tol and not tie_rounding:
                if tuple(r.shape) != tuple(t.shape):
                    why = f"shape {tuple(t.shape)} vs torch {tuple(r.shape)}"
                elif r.dtype != t.dtype:
                    why = f"dtype {t.dtype} vs torch {r.dtype}, max abs err {d.max_abs:.3g}"
                else:
                    why = f"max abs err {d.max_abs:.3g} > atol {d.atol:.2g} + rtol {d.rtol:.2g}*|ref| (SQNR {d.sqnr_db:.1f} dB)"
                raise BackendError(f"onnxruntime: output {d.name!r} of {graph.name!r} differs from torch on {label}: {why}")
            if worst is None or d.max_abs > worst["max_abs"]:
                worst = {"output": d.name, "inputs": label, "max_abs": d.max_abs, "max_rel": d.max_rel, "sqnr_db": d.to_dict()["sqnr_db"]}
        runs.append({"inputs": label, "outputs": [d.to_dict() for d in diffs]})
    return {
        "passed": True,
        "providers": runner.providers,
        "tolerance": "graphpress.ir.compare.tolerance (fp32: rtol 1e-4, atol 1e-5 x max(1, max|ref|); ints exact)"
        + (f"; activation-quantizing ops: or SQNR >= {QUANT_CHECK_MIN_SQNR_DB:g} dB" if quantized else "")
        + ("; caches stored as codes: or within one grid step per row" + (" (and half a step upstream: int8 activations)" if quantized else "")
           if storage.bits else ""),
        "runs": runs,
        "worst": worst,
        "check_s": round(time.perf_counter() - t0, 3),
    }


class OnnxRuntimeBackend:
    """The ``"onnxruntime"`` backend (see module docstring).

    Parameters
    ----------
    opset : int
        ONNX opset to export, >= 18.
    optimize : bool
        Store ORT's offline ``ORT_ENABLE_EXTENDED`` optimizations in ``model.onnx``.
    check_seeds : sequence of int
        Seeds of the random input sets of the output check.
    """

    name = "onnxruntime"
    Options = OnnxRuntimeOptions

    def __init__(self, opset: int = DEFAULT_OPSET, optimize: bool = False, check_seeds: Sequence[int] = (0, 1)):
        if opset < DEFAULT_OPSET:
            raise BackendError(f"onnxruntime: opset {opset} is not supported; the dynamo exporter needs opset >= {DEFAULT_OPSET}")
        self.opset = opset
        self.optimize = optimize
        self.check_seeds = tuple(check_seeds)
        self.options = OnnxRuntimeOptions(opset=int(opset), optimize=bool(optimize), check_seeds=self.check_seeds)

    def lower(self, graph: Graph, folder: Path, *, check: bool = True) -> LoweredModel:
        """Write ``model.onnx`` into ``folder`` and, with ``check``, verify it against ``graph``.

        Parameters
        ----------
        graph : Graph
        folder : Path
            Created when missing.
        check : bool
            Run :func:`check_onnx`; its report lands in :attr:`LoweredModel.check`.

        Returns
        -------
        LoweredModel

        Raises
        ------
        BackendError
        """
        info = lower_to_onnx(graph, folder, opset=self.opset, optimize=self.optimize)
        files = info.pop("files")
        layers = info.pop("node_layers", {})
        genai = write_genai_files(graph, Path(folder), MODEL_FILE)  # KV-cache decoders: ONNX Runtime GenAI runs the artifact
        if genai:
            files = sorted(set(files) | set(genai))
        if GENAI_CONFIG in genai:
            info["genai_config"] = GENAI_CONFIG
        report = check_onnx(graph, Path(folder) / MODEL_FILE, seeds=self.check_seeds) if check else {"skipped": True}
        storage = storage_of(graph)
        io = {"inputs": storage.specs([s.to_dict() for s in graph.input_specs]),
              "outputs": storage.specs([s.to_dict() for s in graph.output_specs])} if storage.bits else None
        return LoweredModel(backend=self.name, model_file=MODEL_FILE, files=files, check=report, info=info, io=io,
                            node_layers=layers)

    def runner(self, model_path: Path, providers: Sequence[str] | None = None, threads: int | None = None) -> OrtRunner:
        """An :class:`OrtRunner` for a lowered model (CUDA EP when available)."""
        return OrtRunner(model_path, providers=providers, threads=threads)

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend(opset={self.opset}, optimize={self.optimize})"


__all__ = ["OnnxRuntimeBackend", "lower_to_onnx", "check_onnx", "optimize_onnx", "DEFAULT_OPSET", "MODEL_FILE"]
