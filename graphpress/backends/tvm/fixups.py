"""Exact repairs of the Relax module that TVM 0.27's PyTorch importer produces.

TVM (apache-tvm 0.27.0.post1) fails to build what ``tvm.relax.frontend.torch.from_exported_program``
makes of the code with which transformers decoders (Llama, GPT-2) build their causal mask from
``position_ids`` (``torch.diff`` along the last dim, ``!= 1``, ``cumsum``, ``==``); with a dynamic
sequence length (as the Hugging Face frontend captures) BERT's position table fails too. Each
fix-up below keeps torch's values and dtypes exactly; ``apply_fixups`` reports which fired.

1. **Negative ``strided_slice`` axis.** ``torch.diff(x, dim=-1)`` decomposes (the importer runs
   ``run_decompositions`` first) into ``aten.slice(x, -1, ...)``; the importer copies the ``-1``
   into ``R.strided_slice(x, axes=(-1,), ...)``. Shape inference accepts it, but when the input
   has a symbolic dim (the dynamic batch) TOPI takes its dynamic slicing path, which does not
   normalise the axis. Symptom: ``Check failed: axis < src_tensor_dim (-1 vs. 2)``.
   Fix: ``axis -> axis + ndim`` (``ndim`` from the input's tensor type): the same slice.
2. **Bool / integer ``cumsum`` and ``cumprod`` keep the input dtype.** Torch accumulates a bool
   or integer input in int64 when the call gives no ``dtype`` (``(a != 1).cumsum(-1)`` counts);
   the importer emits ``R.cumsum(x, dtype=None)``, whose result stays bool (so the mask would
   compare saturated bools, not counts). Symptom: LLVM code generation of the bool scan fails,
   ``Check failed: (t.MatchesCode(DLDataTypeCode::kDLFloat)) is false``.
   Fix: ``R.cumsum(R.astype(x, "int64"))``, torch's result. Calls with a ``dtype`` (the
   importer sets it exactly when the torch call had one) and int64 / float inputs are left alone.
3. **Clamped slice shapes hide a symbolic sequence length.** With a dynamic sequence dim ``s``,
   ``x[:, 0:1]`` gets the shape ``min(1, s)``: Relax infers shapes without the function's
   ``tir_var_lower_bound`` (``s >= 2``, from torch.export). ``diff``'s two slices of the
   ``min(1, s) + s``-long concat then have shapes Relax cannot prove equal, their difference
   loses its shape, and the scan dispatch refuses it. Symptom:
   ``ValueError: non-symbolic shape is not supported for now`` (``dispatch_sort_scan``).
   Fix: a unit-stride slice whose ``0 <= begin <= end <= extent`` an arithmetic analyzer proves
   under the function's symbolic-variable bounds gets ``assume_inbound=True``, so its shape is
   ``end - begin``. Clamping a slice proven in bounds is the identity; slices not proven
   (``x[:, 1:]`` ends at 2**63 - 1, ``x[:, :-1]`` at -1) or fully static are left alone.
4. **Shape arguments baked in with the clamp.** The importer writes the clamped size into later
   ``R.reshape`` / ``R.broadcast_to`` targets (BERT: ``position_ids[:, :s]`` of a 128-long
   table, then ``R.reshape(..., R.shape([min(s, 128)]))``), so the embedding sum has shapes
   ``(b, s, 64)`` and ``(1, min(s, 128), 64)`` that Relax cannot prove broadcastable. Symptom:
   the ``R.add`` is never legalized, ``CodeGenVM cannot emit this Relax operator directly``.
   Fix: simplify a call's ``R.shape`` arguments under the same bounds (``s <= 128`` from
   torch.export) where the bounds change them; the same sizes for every allowed ``s``.
5. **Comparisons and arithmetic on two bool tensors.** TVM's LLVM code generator has no bool
   path for them: ``R.equal`` / ``R.not_equal`` emit an invalid ``fcmp ... i1``, and
   ``less``/``greater``(``_equal``), ``maximum``, ``minimum``, ``add`` and ``multiply`` fail with
   ``Check failed: (t.MatchesCode(DLDataTypeCode::kDLFloat)) is false``. Torch allows all of them
   (``add`` is OR, ``multiply`` AND). Fix: compute on ``R.astype(x, "uint8")`` and cast the
   arithmetic results back to bool (non-zero -> True): the same truth values, OR and AND kept.
   Ops with a non-bool operand, and the logical / bitwise ops (which have a bool path), are
   left alone.

Why here, on the Relax module, and not elsewhere:

* An ATen-level rewrite before export (cast the cumsum input, make ``dim`` non-negative on the fx
  graph) fixed the cumsum but not the slice: the importer's own ``run_decompositions`` creates
  the negative axis again (``diff`` -> ``slice(dim=-1)``).
* ``run_ep_decomposition=False`` keeps ``aten.diff`` whole, which the importer cannot translate,
  and changes the import of every other model.
* A ``custom_convert_map`` for ``slice.Tensor`` would copy the importer's private slice logic
  (identity-slice skipping for symbolic ends) and still miss the other converters that emit
  ``strided_slice`` with the user's axis (``narrow``, ``split``); gaps 3-5 are about shapes and
  code generation, which only the Relax module shows.

The rewrite is one ``PyExprMutator`` pass over the ops that fail, using public Relax API (op
constructors, tensor types, the ``tvm.sym`` analyzer); rewritten calls are re-inferred, so the
shapes and dtypes downstream follow. A module without the gaps is returned as it is.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from graphpress.backends.tvm.runner import require_tvm

#: Short names of the fix-ups, as they appear in ``LoweredModel.info["fixups"]``.
SLICE_AXIS = "strided_slice negative axis"
SCAN_INT64 = "bool/int cumsum/cumprod in int64"
SLICE_INBOUND = "strided_slice proven in bounds"
BOOL_UINT8 = "bool binary op in uint8"
SHAPE_BOUNDS = "shape simplified under dim bounds"

# Torch accumulates these in int64 when the call has no dtype (int64 itself needs nothing).
_PROMOTED = {"bool", "int8", "int16", "int32", "uint8", "uint16", "uint32"}
# Binary ops without an LLVM bool path: comparisons (bool result) and arithmetic (cast back to bool).
_BOOL_COMPARE = {"relax.equal", "relax.not_equal", "relax.less", "relax.less_equal", "relax.greater", "relax.greater_equal"}
_BOOL_ARITH = {"relax.maximum", "relax.minimum", "relax.add", "relax.multiply"}


def _const(expr: Any) -> int | None:
    value = getattr(expr, "value", None)
    return int(value) if isinstance(value, int) else None


def _mutator_class() -> type:
    """Build the mutator class lazily: ``tvm`` is an optional dependency."""
    require_tvm()
    import tvm
    import tvm.sym
    import tvm_ffi
    from tvm import relax
    from tvm.relax import expr_functor

    @expr_functor.mutator
    class FrontendFixups(relax.PyExprMutator):
        def __init__(self, mod: Any):
            super().__init__(mod)
            self.applied: Counter[str] = Counter()
            self.analyzer = tvm.sym.Analyzer()

        def bound_symbols(self, func: Any) -> None:
            """A fresh analyzer that knows ``func``'s symbolic-variable bounds (from torch.export)."""
            self.analyzer = tvm.sym.Analyzer()
            attrs = func.attrs or {}
            lower = dict(attrs["tir_var_lower_bound"]) if "tir_var_lower_bound" in attrs else {}
            upper = dict(attrs["tir_var_upper_bound"]) if "tir_var_upper_bound" in attrs else {}
            for var in relax.analysis.defined_symbolic_vars(func):
                lo, hi = lower.get(var.name), upper.get(var.name)
                if lo is not None or hi is not None:
                    self.analyzer.update(var, tvm.sym.ConstIntBound(int(lo) if lo is not None else 0,
                                                                    int(hi) if hi is not None else tvm.sym.ConstIntBound.POS_INF))

        def _dtype(self, expr: Any) -> str | None:
            """The element dtype of a tensor-typed expression, else None."""
            return str(expr.ty.dtype) if isinstance(expr.ty, relax.TensorType) else None

        def visit_call_(self, call: Any) -> Any:
            # The default visit first: its arguments are the remapped (possibly retyped) vars.
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.strided_slice":
                return self._slice(call)
            if call.op.name in ("relax.cumsum", "relax.cumprod"):
                return self._scan(call)
            if call.op.name in _BOOL_COMPARE or call.op.name in _BOOL_ARITH:
                return self._bool_binary(call)
            return self._bounded_shapes(call)

        def _bounded_shapes(self, call: Any) -> Any:
            args, changed = [], False
            for arg in call.args:
                if isinstance(arg, relax.ShapeExpr):
                    # Only where the bounds matter (min(s, 128) -> s), not mere re-canonicalisation.
                    bounded = [self.analyzer.simplify(v) for v in arg.values]
                    plain = [tvm.sym.Analyzer().simplify(v) for v in arg.values]
                    if not all(tvm_ffi.structural_equal(b, q) for b, q in zip(bounded, plain)):
                        arg, changed = relax.ShapeExpr(bounded), True
                args.append(arg)
            if not changed:
                return call
            self.applied[SHAPE_BOUNDS] += 1
            return relax.Call(call.op, args, call.attrs, call.ty_args)

        def _slice(self, call: Any) -> Any:
            data, axes, begin, end = call.args[:4]
            strides = call.args[4] if len(call.args) > 4 else None
            ndim = getattr(data.ty, "ndim", -1)
            if ndim < 0 or not all(isinstance(t, relax.Tuple) for t in (axes, begin, end)):
                return call
            values = [int(a.value) for a in axes.fields]
            fixed = [a + ndim if a < 0 else a for a in values]
            inbound = bool(call.attrs.assume_inbound)
            if not inbound and self._proven_inbound(data, fixed, begin, end, strides):
                inbound = True
                self.applied[SLICE_INBOUND] += 1
            if fixed != values:
                self.applied[SLICE_AXIS] += 1
            elif inbound == bool(call.attrs.assume_inbound):
                return call
            return relax.op.strided_slice(data, fixed, begin, end, strides, assume_inbound=inbound)

        def _proven_inbound(self, data: Any, axes: list[int], begin: Any, end: Any, strides: Any) -> bool:
            shape = getattr(data.ty, "shape", None)
            if not isinstance(shape, relax.ShapeExpr):
                return False
            if strides is not None and (not isinstance(strides, relax.Tuple) or any(_const(s) != 1 for s in strides.fields)):
                return False
            bounds = [(shape.values[a], b, e) for a, b, e in zip(axes, begin.fields, end.fields)]
            # Static bounds already give an exact static shape; only symbolic ones get clamped.
            if all(_const(x) is not None for triple in bounds for x in triple):
                return False
            prove = self.analyzer.can_prove
            return all(prove(b >= 0) and prove(b <= e) and prove(e <= extent) for extent, b, e in bounds)

        def _scan(self, call: Any) -> Any:
            data = call.args[0]
            if call.attrs.dtype is not None or self._dtype(data) not in _PROMOTED:
                return call
            self.applied[SCAN_INT64] += 1
            wide = self.builder_.emit(relax.op.astype(data, "int64"))
            op = relax.op.cumsum if call.op.name == "relax.cumsum" else relax.op.cumprod
            return op(wide, call.attrs.axis, None, bool(call.attrs.exclusive))

        def _bool_binary(self, call: Any) -> Any:
            if len(call.args) != 2 or any(self._dtype(a) != "bool" for a in call.args):
                return call
            self.applied[BOOL_UINT8] += 1
            lhs, rhs = (self.builder_.emit(relax.op.astype(a, "uint8")) for a in call.args)
            result = relax.Call(call.op, [lhs, rhs], call.attrs)
            if call.op.name in _BOOL_COMPARE:
                return result
            return relax.op.astype(self.builder_.emit(result), "bool")

    return FrontendFixups


def apply_fixups(mod: Any) -> tuple[Any, list[str]]:
    """Repair the importer gaps listed in the module docstring in every Relax function of ``mod``.

    Parameters
    ----------
    mod : tvm.IRModule
        The module from ``from_exported_program``.

    Returns
    -------
    mod : tvm.IRModule
        The repaired module (``mod`` itself when nothing applied).
    applied : list of str
        One ``"<fix-up> x<count>"`` entry per fix-up that fired, e.g.
        ``["bool/int cumsum/cumprod in int64 x1", "strided_slice negative axis x2"]``; empty when the
        module has none of the gaps.
    """
    tvm = require_tvm()
    from tvm import relax

    mutator = _mutator_class()(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.bound_symbols(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    if not mutator.applied:
        return mod, []
    fixed = mutator.builder_.get()
    tvm.relax.analysis.well_formed(fixed)  # raises on a malformed rewrite instead of failing later in the build
    return fixed, [f"{name} x{count}" for name, count in sorted(mutator.applied.items())]


__all__ = ["BOOL_UINT8", "SCAN_INT64", "SHAPE_BOUNDS", "SLICE_AXIS", "SLICE_INBOUND", "apply_fixups"]
