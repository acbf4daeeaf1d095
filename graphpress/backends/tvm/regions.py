"""Compile each fused region of a graph (``fuse-blocks``) into one TVM kernel.

TVM's default Relax pipeline decides fusion itself: ``FuseOps`` groups an "out-elementwise"
op (conv, matmul) with the elementwise ops after it, and ``FuseTIR`` merges each group into one
TIR ``PrimFunc``. A Relax function marked ``"Primitive"`` is already a group: ``FuseOps`` leaves
it alone and ``FuseTIR`` merges every op in it into one ``PrimFunc``, called once by ``main``.
So honouring a region means turning its Relax bindings into such a function:

1. :class:`RegionRecorder` -- while the torch importer runs, every Relax binding it emits is
   attributed to the fx node being converted; that node's ``meta["custom"]`` carries the region
   (:mod:`graphpress.ir.regions`; ``torch.export`` keeps it through re-export and decompositions).
   Only ``ExportedProgramImporter._translate_fx_graph`` is wrapped, and only inside the ``with``.
2. :func:`apply_regions` -- for each region, its bindings in ``main`` (minus those computable
   from constants alone, which stay in ``main`` for ``FoldConstant``, e.g. a transposed weight)
   become a private function with ``{"Primitive": True}``; tensor constants become parameters
   (``FuseTIR`` accepts none inside) and symbolic shape variables are renamed per function
   (Relax defines each in one function only). ``main`` calls it where the region's output was.
   A region is left to the default fusion, with the reason recorded, when it has more than one
   value read outside it, spans several binding blocks, or calls an impure op.
3. :func:`count_kernels` -- the TIR kernels ``main`` launches: ``call_tir`` calls after the
   default legalization and fusion passes and ``RewriteDataflowReshape`` (a reshape becomes a
   view, not a kernel).

The math is unchanged: the same Relax ops, grouped differently; only the loop nests TVM
generates for a region differ (one ``PrimFunc`` with the intermediate tensors as local buffers).
"""

from __future__ import annotations

import threading
from typing import Any

from graphpress.ir.regions import region_of

_PATCH_LOCK = threading.Lock()


class RegionRecorder:
    """Attribute the Relax bindings that ``from_exported_program`` emits to graphpress regions.

    Use around the import::

        with RegionRecorder() as recorder:
            mod = from_exported_program(program)
        mod, report = apply_regions(mod, recorder)

    Any importer call inside the block is recorded (fix-ups such as a ``custom_convert_map``
    are fine: their converters are wrapped too).
    """

    def __init__(self) -> None:
        self._region: dict[Any, dict[str, Any]] = {}  # relax Var -> {"id", "kind"}
        self._original = None
        self._depth = 0

    def region(self, var: Any) -> dict[str, Any] | None:
        """``{"id", "kind"}`` of the region whose fx node emitted binding ``var``, else None."""
        return self._region.get(var)

    def __len__(self) -> int:
        return len(self._region)

    def __enter__(self) -> RegionRecorder:
        from tvm.relax.frontend.torch.exported_program_translator import (
            ExportedProgramImporter,
        )

        _PATCH_LOCK.acquire()
        self._original = ExportedProgramImporter.__dict__.get("_translate_fx_graph")
        original = ExportedProgramImporter._translate_fx_graph
        recorder = self

        def translate(importer, *args, **kwargs):
            if recorder._depth:  # a nested graph (a cond branch) is already being recorded
                return original(importer, *args, **kwargs)
            recorder._depth += 1
            restore = recorder._hook(importer)
            try:
                return original(importer, *args, **kwargs)
            finally:
                restore()
                recorder._depth -= 1

        ExportedProgramImporter._translate_fx_graph = translate
        return self

    def __exit__(self, *exc: object) -> None:
        from tvm.relax.frontend.torch.exported_program_translator import (
            ExportedProgramImporter,
        )

        try:
            if self._original is not None:
                ExportedProgramImporter._translate_fx_graph = self._original
            else:
                del ExportedProgramImporter._translate_fx_graph
        finally:
            _PATCH_LOCK.release()

    def _hook(self, importer: Any):
        """Wrap the importer's converters (which fx node is current) and its block builder's
        ``emit``/``match_cast`` (which bindings appear); returns the undo function."""
        current: list[Any] = []
        builder = importer.block_builder
        converters = importer.convert_map

        def convert(fn):
            def wrapped(node, *rest):
                current.append(node)
                try:
                    return fn(node, *rest)
                finally:
                    current.pop()

            return wrapped

        def emitting(fn):
            def wrapped(*args, **kwargs):
                var = fn(*args, **kwargs)
                if current:
                    region = region_of(current[-1])
                    if region is not None:
                        self._region[var] = {"id": int(region["id"]), "kind": str(region["kind"])}
                return var

            return wrapped

        importer.convert_map = {name: convert(fn) for name, fn in converters.items()}
        builder.emit = emitting(type(builder).emit.__get__(builder))
        builder.match_cast = emitting(type(builder).match_cast.__get__(builder))

        def undo() -> None:
            importer.convert_map = converters
            for attr in ("emit", "match_cast"):
                builder.__dict__.pop(attr, None)

        return undo


# ---------------------------------------------------------------------------- grouping
def apply_regions(mod: Any, recorder: RegionRecorder) -> tuple[Any, dict[str, Any]]:
    """``mod`` with each recorded region of ``main`` turned into one ``"Primitive"`` function.

    Returns
    -------
    mod : tvm.IRModule
        A new module (the input is not changed); the input itself when no region applies.
    report : dict
        ``functions`` (regions grouped), ``by_kind`` (grouped regions per kind) and ``skipped``
        (``reason -> count`` of regions left to the default fusion).
    """
    from tvm import relax

    report: dict[str, Any] = {"functions": 0, "by_kind": {}, "skipped": {}}

    def skip(reason: str) -> None:
        report["skipped"][reason] = report["skipped"].get(reason, 0) + 1

    main = mod["main"]
    body = main.body
    static = set(relax.analysis.computable_at_compile_time(main))
    blocks = list(body.blocks)
    groups: dict[int, list[tuple[int, int]]] = {}
    kinds: dict[int, str] = {}
    for bi, block in enumerate(blocks):
        for i, binding in enumerate(block.bindings):
            region = recorder.region(binding.var)
            if region is None or binding.var in static:
                continue
            groups.setdefault(region["id"], []).append((bi, i))
            kinds[region["id"]] = region["kind"]
    if not groups:
        return mod, report

    reads = _reads(blocks, body.body)
    # free_vars also lists symbolic shape variables (``s0``): only Relax-bound ones are inputs
    bound = set(main.params) | {b.var for block in blocks for b in block.bindings}
    builder = relax.BlockBuilder(mod)
    replace: dict[tuple[int, int], Any] = {}
    drop: set[tuple[int, int]] = set()
    for rid, where in sorted(groups.items()):
        kind = kinds[rid]
        if len({bi for bi, _ in where}) > 1:
            skip("region spans several binding blocks")
            continue
        if len(where) < 2:
            continue  # a single op is one kernel either way
        bi = where[0][0]
        if not isinstance(blocks[bi], relax.DataflowBlock):
            skip("region is outside a dataflow block")
            continue
        bindings = [blocks[bi].bindings[i] for _, i in where]
        inside = {b.var for b in bindings}
        outputs = [b.var for b in bindings if any(r not in where for r in reads.get(b.var, ()))]
        if len(outputs) != 1 or not outputs[0].same_as(bindings[-1].var):
            skip(f"region has {len(outputs)} values read outside it" if len(outputs) != 1 else "region output is not its last op")
            continue
        if any(relax.analysis.contains_impure_call(b.value) for b in bindings):
            skip("region calls an impure op")
            continue
        func, inputs = _region_function(bindings, inside, bound)
        if func is None:
            skip("region function is not well-formed (shapes not definable from its inputs)")
            continue
        gv = builder.add_func(func, f"region{rid}_{kind}")
        replace[where[-1]] = relax.VarBinding(bindings[-1].var, builder.normalize(relax.Call(gv, inputs)))
        drop.update(where[:-1])
        report["functions"] += 1
        report["by_kind"][kind] = report["by_kind"].get(kind, 0) + 1
    if not replace:
        return mod, report
    new_blocks = []
    for bi, block in enumerate(blocks):
        kept = [replace.get((bi, i), b) for i, b in enumerate(block.bindings) if (bi, i) not in drop]
        new_blocks.append(relax.DataflowBlock(kept) if isinstance(block, relax.DataflowBlock) else relax.BindingBlock(kept))
    out = builder.get()
    out["main"] = relax.Function(main.params, relax.SeqExpr(new_blocks, body.body), main.ret_ty, main.is_pure, main.attrs)
    try:
        out = relax.transform.Normalize()(out)
        relax.analysis.well_formed(out)
    except Exception as err:  # noqa: BLE001 -- a grouping bug must not cost the build: default fusion
        text = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        return mod, {"functions": 0, "by_kind": {}, "skipped": {f"grouped module ill-formed ({text[-1] if text else type(err).__name__})": len(groups)}}
    return out, report


def _reads(blocks: list[Any], result: Any) -> dict[Any, list[Any]]:
    """Var -> positions ``(block, binding)`` that read it; the function result reads as ``(-1, -1)``."""
    from tvm import relax

    reads: dict[Any, list[Any]] = {}
    for bi, block in enumerate(blocks):
        for i, binding in enumerate(block.bindings):
            for v in relax.analysis.free_vars(binding.value):
                reads.setdefault(v, []).append((bi, i))
    for v in relax.analysis.free_vars(result):
        reads.setdefault(v, []).append((-1, -1))
    return reads


def _region_function(bindings: list[Any], inside: set[Any], bound: set[Any]) -> tuple[Any, list[Any]]:
    """A ``"Primitive"`` function computing ``bindings`` and the arguments ``main`` passes it
    (free variables and tensor constants, in first-use order); ``(None, [])`` when ill-formed."""
    import tvm
    from tvm import relax

    inputs: list[Any] = []
    for b in bindings:
        for v in relax.analysis.free_vars(b.value):
            if v in bound and v not in inside and not any(v.same_as(x) for x in inputs):
                inputs.append(v)
        for c in _constants(b.value):
            if not any(c.same_as(x) for x in inputs):
                inputs.append(c)
    params = [relax.Var(f"p{k}", x.ty) for k, x in enumerate(inputs)]
    subst = _Substitute(dict(zip(inputs, params)))
    bb = relax.BlockBuilder()
    out_var = bindings[-1].var
    with bb.function("region", params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            for b in bindings:
                value = subst.visit_expr(b.value)
                subst.vmap[b.var] = bb.emit_output(value) if b.var.same_as(out_var) else bb.emit(value)
        bb.emit_func_output(subst.vmap[out_var])
    func = bb.get()["region"]
    symbols = relax.analysis.defined_symbolic_vars(func)
    if symbols:
        func = func.bind_symbolic_vars({s: tvm.tirx.Var(s.name, "int64") for s in symbols})
    try:
        relax.analysis.well_formed(func)
    except Exception:  # noqa: BLE001 -- e.g. a shape expression no parameter defines
        return None, []
    return func, inputs


def _constants(expr: Any) -> list[Any]:
    """Tensor constants inside ``expr``."""
    import tvm
    from tvm import relax

    found: list[Any] = []
    relax.analysis.post_order_visit(expr, lambda e: found.append(e) if isinstance(e, tvm.ir.expr.GenericConst) else None)
    return found


def _make_substitute():
    from tvm import relax

    @relax.expr_functor.mutator
    class Substitute(relax.PyExprMutator):
        """Replace variables and constants by the region function's parameters."""

        def __init__(self, vmap: dict[Any, Any]):
            super().__init__()
            self.vmap = vmap

        def visit_var_(self, op):
            return self.vmap.get(op, op)

        def visit_dataflow_var_(self, op):
            return self.vmap.get(op, op)

        def visit_generic_const_(self, op):
            return self.vmap.get(op, op)

    return Substitute


def _Substitute(vmap: dict[Any, Any]) -> Any:  # the class is built on first use: tvm is optional
    global _SUBSTITUTE
    if _SUBSTITUTE is None:
        _SUBSTITUTE = _make_substitute()
    return _SUBSTITUTE(vmap)


_SUBSTITUTE = None


# ---------------------------------------------------------------------------- kernel counts
def kernel_calls(mod: Any, target: Any) -> list[str]:
    """Names of the TIR kernels the module's Relax functions call, in order: the ``call_tir``
    calls left after the default library-dispatch, legalization and fusion passes for ``target``
    and ``RewriteDataflowReshape``."""
    import tvm
    from tvm import relax

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    passes = relax.pipeline.library_dispatch_passes(target) + relax.pipeline.legalize_passes(target)
    with target:
        lowered = tvm.transform.Sequential([*passes, relax.transform.RewriteDataflowReshape()])(mod)
    call_tir = tvm.ir.Op.get("relax.call_tir")
    names: list[str] = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir):
            names.append(expr.args[0].name_hint)

    for func in lowered.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return names


def count_kernels(mod: Any, target: Any) -> int:
    """Number of TIR kernel calls of ``mod`` (see :func:`kernel_calls`)."""
    return len(kernel_calls(mod, target))


def group_regions(mod: Any, recorder: RegionRecorder, target: Any) -> tuple[Any, dict[str, Any], dict[str, int]]:
    """:func:`apply_regions`, plus the kernel counts ``{"default": ..., "regions": ...}`` of the
    module before and after (equal when no region applies)."""
    grouped, report = apply_regions(mod, recorder)
    try:
        default = count_kernels(mod, target)
        with_regions = count_kernels(grouped, target) if grouped is not mod else default
    except Exception as err:  # noqa: BLE001 -- the build reports the legalization failure itself
        return grouped, report, {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"}
    return grouped, report, {"default": default, "regions": with_regions}


__all__ = ["RegionRecorder", "apply_regions", "count_kernels", "group_regions", "kernel_calls"]
