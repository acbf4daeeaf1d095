"""The graphpress IR: an ATen-level ``torch.fx.GraphModule`` from ``torch.export``, plus context.

A :class:`Graph` holds

* ``gm`` -- the *unlifted* module of an ``ExportedProgram`` (``ep.module()``), the same form
  PT2E quantization rewrites: parameters and buffers are ``get_attr`` nodes, operators are
  ``call_function`` nodes on ``torch.ops.aten`` (training IR: ``aten.conv2d``, ``aten.linear``,
  ``aten.batch_norm`` ...) or on graphpress custom ops;
* the example inputs it was captured with, and names/specs of its inputs and outputs;
* per-node annotations under ``node.meta["graphpress"]`` (source module, compression state).

Passes mutate ``gm`` in place; the pipeline keeps a :meth:`Graph.snapshot` (the structure, sharing
every tensor) to roll back to, which stays intact because passes *replace* tensors
(:meth:`Graph.set_tensor`) instead of writing into them. Backends re-export the graph with
:meth:`Graph.export_program`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from graphpress.errors import FrontendError

ANNOTATION_KEY = "graphpress"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input or output.

    ``shape`` holds ints, or ``"batch"`` for the dynamic batch dimension.
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _flatten_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    leaves, _ = pytree.tree_flatten(out)
    return tuple(x for x in leaves if isinstance(x, torch.Tensor))


def _sanitize(name: str) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    return name if name and not name[0].isdigit() else f"t_{name}"


class Graph:
    """A captured model: FX graph module + example inputs + annotations.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The unlifted module of an ``ExportedProgram``.
    example_inputs : tuple of Tensor
        Inputs used for capture, verification and calibration.
    input_names, output_names : list of str, optional
        Names used in reports and by backends (ONNX input/output names).
    name : str
        Model name for reports.
    dynamic_batch : bool
        Whether dim 0 of every input was exported as a dynamic dimension (shorthand for
        ``dynamic_dims={0: "batch"}``).
    dynamic_dims : dict of int to str, optional
        Dynamic dimensions shared by every input, by position, with their names (e.g.
        ``{0: "batch", 1: "seq"}`` for language models).
    input_dims : list of dict of int to str, optional
        Dynamic dimensions per input, for graphs whose inputs do not share positions (a decoder
        with a KV cache: ``past`` is dim 2 of a cached key, ``seq`` dim 1 of the token ids);
        a name used by several inputs is one size. Default: ``dynamic_dims`` for every input.
        Dim 0, where dynamic, must be the batch of every input (the pipeline stacks input sets
        along it).
    source : dict
        Where the model came from (frontend, path), stored in the artifact manifest.
    trace_inputs : tuple of Tensor, optional
        Inputs to re-export with (:meth:`export_program`) when the examples have sizes export
        would specialize: a KV decoder's examples are a prefill, with caches of length 0.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        name: str = "model",
        dynamic_batch: bool = True,
        dynamic_dims: dict[int, str] | None = None,
        input_dims: Sequence[dict[int, str]] | None = None,
        source: dict[str, Any] | None = None,
        trace_inputs: Sequence[torch.Tensor] | None = None,
    ):
        self.gm = gm
        self.example_inputs = tuple(example_inputs)
        self.trace_inputs = tuple(trace_inputs) if trace_inputs is not None else None
        self.name = name
        self.dynamic_dims = dict(dynamic_dims) if dynamic_dims is not None else ({0: "batch"} if dynamic_batch else {})
        self.input_dims = [dict(d) for d in input_dims] if input_dims is not None else None
        if self.input_dims is not None and len(self.input_dims) != len(self.example_inputs):
            raise FrontendError(f"{name}: {len(self.input_dims)} input_dims for {len(self.example_inputs)} example inputs")
        self.source = dict(source or {})
        # Representative inputs for data-driven passes (Fisher, calibration); None -> examples.
        self.calibration: list[tuple[torch.Tensor, ...]] | None = None
        # a snapshot's record of the tensors it shared: {path: (tensor, version)}
        self._versions: dict[str, tuple[torch.Tensor, int]] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_names = list(input_names or [n.name for n in placeholders])
        if len(self.input_names) != len(self.example_inputs):
            raise FrontendError(
                f"{name}: {len(self.input_names)} input names for {len(self.example_inputs)} example inputs"
            )
        outs = self.run(*self.example_inputs)
        self.output_names = list(output_names or ([f"output_{i}" for i in range(len(outs))] if len(outs) > 1 else ["output"]))
        symbols = _symbol_names(gm, [self.dims_of(i) for i in range(len(self.example_inputs))])
        self.input_specs = [self._spec(n, t, dims=self.dims_of(i)) for i, (n, t) in enumerate(zip(self.input_names, self.example_inputs))]
        out_vals = _output_vals(gm)
        if len(out_vals) != len(outs):
            out_vals = [None] * len(outs)
        self.output_specs = [self._spec(n, t, v, symbols) for n, t, v in zip(self.output_names, outs, out_vals)]
        for node in gm.graph.nodes:
            self._init_annotations(node)

    # ------------------------------------------------------------------ capture
    @classmethod
    def capture(
        cls,
        module: torch.nn.Module,
        example_inputs: Sequence[torch.Tensor],
        *,
        name: str | None = None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dynamic_batch: bool = True,
        dynamic_dims: dict[int, str] | None = None,
        input_dims: Sequence[dict[int, str]] | None = None,
        source: dict[str, Any] | None = None,
        trace_inputs: Sequence[torch.Tensor] | None = None,
    ) -> "Graph":
        """Capture ``module`` with ``torch.export`` and return its unlifted graph.

        The module is put in eval mode. ``dynamic_dims`` (default ``{0: "batch"}`` when
        ``dynamic_batch``) are exported as dynamic on every tensor input that has them; a
        dimension torch specializes anyway (the model needs a fixed size) is dropped and
        recorded in ``source["specialized_dims"]``. An example size of 1 is traced at 2 (export
        specializes size-1 dims) while the given examples are kept. When no dynamic export
        works the capture falls back to static shapes and records why. ``input_dims`` gives the
        dynamic dims per input instead (see the class); they are all kept or, when one is
        specialized, the capture fails with the reason (a decoder's cache length cannot be fixed).
        ``trace_inputs`` are traced instead of the examples (kept on the graph for re-export):
        for examples with a size export specializes, such as a cache of length 0.
        """
        module = module.eval()
        example_inputs = tuple(example_inputs)
        traced = tuple(trace_inputs) if trace_inputs is not None else example_inputs
        name = name or type(module).__name__
        source = dict(source or {})
        dims = dict(dynamic_dims) if dynamic_dims is not None else ({0: "batch"} if dynamic_batch else {})
        ep, kept = None, {}
        if input_dims is not None:
            input_dims = [dict(d) for d in input_dims]
            try:
                ep = _export_dynamic(module, traced, dims, input_dims)
            except Exception as err:  # noqa: BLE001
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise FrontendError(f"{name}: torch.export with dynamic {_dims_text(input_dims)} failed: {first[:300]}") from err
            lost = _specialized(ep, input_dims)
            if lost:
                raise FrontendError(f"{name}: torch.export fixed the size of {', '.join(lost)}; these dims must stay dynamic")
            kept = {0: dims[0]} if 0 in dims else {}
        elif dims and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in traced):
            try:
                ep = _export_dynamic(module, traced, dims)
                kept = _dynamic_positions(ep, dims)
                if dims.keys() - kept.keys():
                    source["specialized_dims"] = sorted(dims[d] for d in dims.keys() - kept.keys())
            except Exception as err:  # noqa: BLE001 -- any export failure falls back to static
                ep = None
                source["dynamic_export_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
        if ep is None:
            try:
                ep = torch.export.export(module, traced)
            except Exception as err:  # noqa: BLE001
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise FrontendError(f"{name}: torch.export failed: {first[:300]}") from err
        # per-input dims (a KV decoder): export's guards restate the examples' sizes (every
        # AUTO dim >= 2, so a mask >= 4), but a prefill has past 0 and a decode step seq 1 --
        # the graph's main uses, checked against the source model by the frontend's tests
        gm = ep.module(check_guards=input_dims is None)
        if input_dims is not None:
            _drop_input_range_checks(gm)
        graph = cls(
            gm,
            example_inputs,
            input_names=input_names,
            output_names=output_names,
            name=name,
            dynamic_dims=kept,
            input_dims=input_dims,
            source=source,
            trace_inputs=trace_inputs,
        )
        from graphpress.ir.verify import stamp

        stamp(graph.gm, graph.example_inputs)  # export's values hold for this graph: the first verify() re-uses them
        return graph

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph and return its outputs flattened to a tuple of tensors."""
        return _flatten_outputs(self.gm(*inputs))

    __call__ = run

    def clone(self) -> "Graph":
        """Deep copy, tensors included: a graph whose weights may then be written in place."""
        return self._copy(share_tensors=False)

    def snapshot(self) -> "Graph":
        """Copy of the structure (nodes, modules, annotations) that shares every tensor.

        Costs the graph's size, not the model's: the pipeline takes one before each pass to
        roll back to. It stays the graph it was as long as whoever changes the other copy
        *replaces* tensors (:meth:`set_tensor`, :meth:`swap_tensors`) rather than writing into
        them; :meth:`written_in_place` tells whether someone did.
        """
        return self._copy(share_tensors=True)

    def _copy(self, *, share_tensors: bool) -> "Graph":
        new = copy.copy(self)
        memo: dict[int, Any] = {}
        if share_tensors:
            tensors = self._owned_tensors()
            memo = {id(t): t for _name, t in tensors}
            # recorded fake values are replaced, never changed, by a propagation: shared too
            for node in self.gm.graph.nodes:
                val = node.meta.get("val")
                for v in val if isinstance(val, (list, tuple)) else (val,):
                    if isinstance(v, torch.Tensor):
                        memo[id(v)] = v
            new._versions = {name: (t, t._version) for name, t in tensors}
        else:
            new._versions = {}
        if share_tensors:
            from graphpress.ir.gmcopy import structure_copy

            new.gm = structure_copy(self.gm, ANNOTATION_KEY, memo)
        else:
            with warnings.catch_warnings():
                # deep-copying the module's pytree specs trips a torch-internal FutureWarning
                warnings.simplefilter("ignore", FutureWarning)
                new.gm = copy.deepcopy(self.gm, memo)
        new.source = dict(self.source)
        new.input_dims = None if self.input_dims is None else [dict(d) for d in self.input_dims]
        new.input_specs = list(self.input_specs)
        new.output_specs = list(self.output_specs)
        return new

    def _tensor_slots(self) -> Iterator[tuple[str, torch.nn.Module, str, torch.Tensor]]:
        """``(module path, module, attribute, tensor)`` for every tensor the module tree holds:
        parameters, buffers and plain tensor attributes (``_tensor_constant0``)."""
        for path, module in self.gm.named_modules(remove_duplicate=False):
            items = list(module._parameters.items()) + list(module._buffers.items())
            items += [(a, v) for a, v in vars(module).items() if isinstance(v, torch.Tensor)]
            for attr, value in items:
                if isinstance(value, torch.Tensor):
                    yield path, module, attr, value

    def _owned_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every tensor of :meth:`_tensor_slots` by dotted path, each object once."""
        out, seen = [], set()
        for path, _module, attr, value in self._tensor_slots():
            if id(value) not in seen:
                seen.add(id(value))
                out.append((f"{path}.{attr}" if path else attr, value))
        return out

    def _owner(self, target: str) -> tuple[torch.nn.Module, str]:
        """The module holding the tensor at a dotted ``target``, and its attribute name."""
        owner_path, _, attr = target.rpartition(".")
        return (self.gm.get_submodule(owner_path) if owner_path else self.gm), attr

    def written_in_place(self, *, forget: bool = False) -> list[str]:
        """Tensors this :meth:`snapshot` shared when it was taken that were written in place
        since (their version counter moved): the graph it was taken from no longer holds the
        values it had. Empty for a graph that is not a snapshot. ``forget=True`` drops the
        record after answering (it holds every tensor the graph had, the replaced ones too)."""
        written = [name for name, (t, version) in self._versions.items() if t._version != version]
        if forget:
            self._versions = {}
        return written

    def release(self) -> None:
        """Drop this graph's references to its tensors now, without waiting for the garbage
        collector (an FX module and its graph point at each other, so a dropped graph is freed
        only by a collection). The graph cannot run afterwards; tensors another graph shares
        stay alive there."""
        for _path, module, attr, _value in list(self._tensor_slots()):
            if attr in module._parameters or attr in module._buffers or attr in vars(module):
                delattr(module, attr)
        self._versions = {}
        self.example_inputs = ()
        self.trace_inputs = None
        self.calibration = None

    @contextlib.contextmanager
    def swap_tensors(self, values: dict[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, the tensors at the given targets are ``values``; the original
        objects are put back afterwards, even on an error.

        For measuring what a change would do (run the graph with one layer quantized) without
        writing into a weight that a snapshot or the caller's graph shares, and without a copy.
        """
        saved: list[tuple[dict | None, torch.nn.Module, str, Any]] = []
        try:
            for target, value in values.items():
                owner, attr = self._owner(target)
                table = owner._parameters if attr in owner._parameters else owner._buffers if attr in owner._buffers else None
                old = table[attr] if table is not None else getattr(owner, attr)
                saved.append((table, owner, attr, old))
                value = value.detach()
                if table is owner._parameters:
                    table[attr] = torch.nn.Parameter(value, requires_grad=False)
                elif table is not None:
                    table[attr] = value
                else:
                    setattr(owner, attr, value)
            yield
        finally:
            for table, owner, attr, old in reversed(saved):
                if table is not None:
                    table[attr] = old
                else:
                    setattr(owner, attr, old)

    def calibration_batches(self) -> list[tuple[torch.Tensor, ...]]:
        """User-given calibration batches, else the example inputs as one batch."""
        return list(self.calibration) if self.calibration else [self.example_inputs]

    def random_inputs(self, seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
        """Seeded random inputs shaped like the examples.

        Floats are ~ N(0,1) scaled to the examples' mean and std, except where negative values
        would leave an op's domain: an input that reaches ``sqrt``, ``rsqrt``, ``log*`` or a
        fractional ``pow`` through views, slices, copies, reductions and positive scaling only
        is drawn from ``|N(0,1)|`` scaled to the examples' spread and shifted to their minimum
        (floored at 0). Integers are uniform in the examples' observed range (e.g. token ids).
        """
        gen = torch.Generator().manual_seed(seed)
        positive = self._positive_inputs()
        out = []
        for i, x in enumerate(self.example_inputs):
            shape = list(x.shape)
            if batch is not None and 0 in self.dynamic_dims and shape:
                shape[0] = batch
            if x.dtype.is_floating_point:
                xf = x.float()
                finite = xf[torch.isfinite(xf)]
                std = float(finite.std()) if finite.numel() > 1 else 1.0
                mean = float(finite.mean()) if finite.numel() else 0.0
                if i in positive:
                    low = max(float(finite.min()), 0.0) if finite.numel() else 0.0
                    draw = torch.randn(shape, generator=gen).abs() * (std or 1.0) + low
                else:
                    draw = torch.randn(shape, generator=gen) * (std or 1.0) + mean
                out.append(draw.to(x.dtype))
            elif x.dtype == torch.bool:
                out.append(torch.randint(0, 2, shape, generator=gen).bool())
            else:
                lo, hi = int(x.min()), int(x.max())
                out.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype))
        return tuple(out)

    def _positive_inputs(self) -> set[int]:
        """Positions of floating inputs that reach a domain-restricted op (``sqrt``, ``rsqrt``,
        ``log*``, fractional ``pow``) through sign-keeping ops only, so that drawing them
        non-negative keeps that op's argument non-negative (see :meth:`random_inputs`)."""
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        return {
            i
            for i, (node, x) in enumerate(zip(placeholders, self.example_inputs))
            if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and _reaches_domain_op(node)
        }

    # ------------------------------------------------------------------ nodes
    @property
    def nodes(self) -> Iterable[fx.Node]:
        return self.gm.graph.nodes

    def call_nodes(self, *targets: Any) -> Iterator[fx.Node]:
        """``call_function`` nodes, optionally only those whose target is one of ``targets``
        (an ``OpOverload`` or an ``OpOverloadPacket`` such as ``torch.ops.aten.conv2d``)."""
        for node in list(self.gm.graph.nodes):
            if node.op != "call_function":
                continue
            if not targets or node.target in targets or getattr(node.target, "overloadpacket", None) in targets:
                yield node

    def _init_annotations(self, node: fx.Node) -> None:
        ann = node.meta.setdefault(ANNOTATION_KEY, {})
        if "module" not in ann:
            ann["module"] = self._source_module(node)

    @staticmethod
    def _source_module(node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [path for path, _cls in stack.values() if path]
        if paths:
            return paths[-1]
        if node.op == "get_attr":
            return str(node.target).rpartition(".")[0]
        return ""

    def annotations(self, node: fx.Node) -> dict[str, Any]:
        """Mutable per-node annotations: ``module`` (source nn.Module path) and pass state."""
        return node.meta.setdefault(ANNOTATION_KEY, {})

    def source_module(self, node: fx.Node) -> str:
        """Dotted path of the nn.Module that produced ``node`` ('' at top level)."""
        return self.annotations(node).get("module") or self._source_module(node)

    # ------------------------------------------------------------------ tensors
    def get_tensor(self, target: str) -> torch.Tensor:
        """The parameter/buffer/constant at a ``get_attr`` target such as ``'layer1.0.conv1.weight'``."""
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor):
            raise KeyError(f"{target} is not a tensor attribute")
        return obj

    def tensor_of(self, node: fx.Node) -> torch.Tensor | None:
        """The constant tensor behind a ``get_attr`` node, else None."""
        if isinstance(node, fx.Node) and node.op == "get_attr":
            try:
                return self.get_tensor(str(node.target))
            except (AttributeError, KeyError):
                return None
        return None

    def set_tensor(self, target: str, value: torch.Tensor, *, parameter: bool | None = None) -> None:
        """Replace (or create) the tensor at ``target``; keeps parameter-vs-buffer unless told."""
        owner, attr = self._owner(target)
        old = getattr(owner, attr, None)
        if parameter is None:
            parameter = isinstance(old, torch.nn.Parameter)
        value = value.detach()
        if hasattr(owner, attr):
            delattr(owner, attr)
        if parameter:
            owner.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
        else:
            owner.register_buffer(attr, value)

    def add_tensor(self, hint: str, value: torch.Tensor, *, parameter: bool = True) -> str:
        """Register a new tensor on the root module under a unique name derived from ``hint``."""
        base = _sanitize(hint)
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.set_tensor(name, value, parameter=parameter)
        return name

    def tensor_users(self, target: str) -> list[fx.Node]:
        """All nodes that read tensor ``target`` (through any get_attr node for it)."""
        return [u for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == target for u in n.users]

    def remove_unused_tensors(self) -> tuple[int, int]:
        """Delete the parameters, buffers and plain tensor constants (``lifted_tensor_0``) that no
        ``get_attr`` reads; returns ``(count, bytes actually freed)``.

        Tensors of modules called by ``call_module`` nodes (``_guards_fn``) are left alone (their
        code reads them without a ``get_attr``), and a deleted name whose storage a kept name
        still holds (tied weights: ``output.weight is tok_embeddings.weight``) frees no bytes.
        """
        used = {str(n.target) for n in self.nodes if n.op == "get_attr"}
        called = [str(n.target) for n in self.nodes if n.op == "call_module"]
        entries = [
            (module, attr, f"{path}.{attr}" if path else attr, value)
            for path, module, attr, value in self._tensor_slots()
            if not any(path == c or path.startswith(c + ".") for c in called)
        ]

        def storage(t: torch.Tensor) -> int:
            try:
                return t.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001 -- e.g. tensors without storage
                return id(t)

        kept = {storage(v) for _m, _a, target, v in entries if target in used}
        count = nbytes = 0
        freed: set[int] = set()
        for module, attr, target, value in entries:
            if target in used or not hasattr(module, attr):
                continue
            delattr(module, attr)
            count += 1
            key = storage(value)
            if key not in kept and key not in freed:
                freed.add(key)
                nbytes += value.untyped_storage().nbytes() if value.device.type != "meta" else 0
        return count, nbytes

    def recompile(self) -> None:
        """Lint and regenerate code after a rewrite."""
        self.gm.graph.lint()
        self.gm.recompile()

    # ------------------------------------------------------------------ stats
    def _read_tensors(self) -> list[torch.Tensor]:
        """Every tensor a ``get_attr`` reads, once per storage: a tied weight read under two
        names (an LM head sharing the embedding) counts once."""
        seen, out = set(), []
        for n in self.gm.graph.nodes:
            t = self.tensor_of(n) if n.op == "get_attr" else None
            if t is None:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                out.append(t)
        return out

    def parameter_count(self) -> int:
        """Floating-point elements the graph reads (weights and float buffers such as BN statistics)."""
        return sum(t.numel() for t in self._read_tensors() if t.dtype.is_floating_point)

    def parameter_bytes(self) -> int:
        """Bytes of every tensor the graph reads."""
        return sum(t.numel() * t.element_size() for t in self._read_tensors())

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.call_nodes():
            key = op_name(n)
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    # ------------------------------------------------------------------ views
    def verify(self, inputs: Sequence[torch.Tensor] | None = None, *, propagate: bool = True) -> None:
        """Structural check; raises :class:`VerificationError`. See :mod:`graphpress.ir.verify`
        (``propagate=False``: for a graph whose output cone equals a verified graph's)."""
        from graphpress.ir.verify import verify_structure

        verify_structure(self, inputs, propagate=propagate)

    def summary(self):
        """Per-layer table (op, module, shape, params, FLOPs). See :mod:`graphpress.ir.summary`."""
        from graphpress.ir.summary import summarize

        return summarize(self)

    def to_networkx(self):
        """Data-flow view as a ``networkx.DiGraph``. See :mod:`graphpress.ir.nxview`."""
        from graphpress.ir.nxview import to_networkx

        return to_networkx(self)

    # ------------------------------------------------------------------ export
    @property
    def dynamic_batch(self) -> bool:
        """Dim 0 of the inputs is dynamic."""
        return 0 in self.dynamic_dims

    def dims_of(self, index: int) -> dict[int, str]:
        """The dynamic dims of input ``index`` (``{position: name}``)."""
        if self.input_dims is not None:
            return dict(self.input_dims[index])
        x = self.example_inputs[index] if index < len(self.example_inputs) else None
        rank = x.dim() if isinstance(x, torch.Tensor) else None
        return {d: n for d, n in self.dynamic_dims.items() if rank is None or d < rank}

    def export_program(self, example_inputs: Sequence[torch.Tensor] | None = None) -> torch.export.ExportedProgram:
        """Re-export the (possibly rewritten) graph with its dynamic dimensions.

        Backends call this; an example size of 1 on a dynamic dim is traced at 2 (see :meth:`capture`).
        """
        inputs = tuple(example_inputs or self.trace_inputs or self.example_inputs)
        if self.input_dims is not None:
            return _export_dynamic(self.gm, inputs, self.dynamic_dims, self.input_dims)
        if self.dynamic_dims:
            return _export_dynamic(self.gm, inputs, self.dynamic_dims)
        return torch.export.export(self.gm, inputs)

    def __repr__(self) -> str:
        n_ops = sum(1 for _ in self.call_nodes())
        return f"Graph({self.name!r}, {n_ops} ops, {self.parameter_count():,} params, inputs={[s.shape for s in self.input_specs]})"

    def _spec(self, name: str, t: torch.Tensor, val: Any = None, symbols: dict[str, str] | None = None,
              dims: dict[int, str] | None = None) -> TensorSpec:
        """Spec of an input (its dynamic ``dims`` by position) or an output (dynamic dims from its
        symbolic shape when known, else dim 0 when the batch is dynamic)."""
        shape: list[int | str] = list(t.shape)
        if symbols is None:
            for d, dim_name in (dims if dims is not None else self.dynamic_dims).items():
                if d < len(shape):
                    shape[d] = dim_name
        elif isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    shape[d] = _rename_symbols(str(size.node.expr), symbols)
        elif self.dynamic_batch and shape:
            shape[0] = self.dynamic_dims[0]
        return TensorSpec(name, tuple(shape), dtype_name(t.dtype))


# Ops undefined (NaN) for negative arguments: the first argument must stay >= 0.
_DOMAIN_OPS = {"sqrt", "rsqrt", "log", "log2", "log10"}
# Ops whose result is >= 0 wherever their input is (views, slicing, copies, concatenation,
# dtype/layout changes, max/avg pooling, sums and means).
_SIGN_KEEPING = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
    "expand", "slice", "select", "narrow", "clone", "contiguous", "alias", "detach", "_to_copy", "to",
    "cat", "stack", "getitem", "index_select", "repeat", "unflatten", "split", "split_with_sizes",
    "chunk", "unbind", "type_as", "max_pool2d", "max_pool1d", "adaptive_max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "mean", "sum",
}


def _aten_name(node: fx.Node) -> str:
    """``"sqrt"`` for ``aten.sqrt.default`` / ``torch.sqrt`` / ``Tensor.sqrt``; ``""`` otherwise."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return ""
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", "")
    return str(name).split(".")[-1].rstrip("_")


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _domain_use(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` needs ``value`` (an argument of it) to be non-negative."""
    name = _aten_name(user)
    first = user.args[0] if user.args else None
    if name in _DOMAIN_OPS:
        return first is value
    if name == "pow" and first is value and len(user.args) > 1:
        exponent = user.args[1]
        # A fractional power of a negative number is NaN; integer powers are defined everywhere.
        return not isinstance(exponent, fx.Node) and float(exponent) != round(float(exponent))
    return False


def _passes_sign(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user``'s result has the sign of ``value`` wherever it depends on it."""
    name = _aten_name(user)
    if name in _SIGN_KEEPING:
        return True
    if name in ("mul", "div") and len(user.args) == 2:
        other = user.args[1] if user.args[0] is value else user.args[0]
        return _positive_number(other) and (name == "mul" or user.args[0] is value)
    if name == "add" and len(user.args) == 2:
        other = user.args[1] if user.args[0] is value else user.args[0]
        return _positive_number(other) or (isinstance(other, (int, float)) and other == 0)
    return False


def _reaches_domain_op(start: fx.Node, limit: int = 10_000) -> bool:
    """Whether ``start``'s value flows into a domain-restricted op (see :data:`_DOMAIN_OPS`)
    through sign-keeping ops only (a LayerNorm's ``rsqrt(var + eps)`` does not count: the
    variance is non-negative whatever the input)."""
    stack, seen = [start], {start}
    while stack and len(seen) < limit:
        node = stack.pop()
        for user in node.users:
            if _domain_use(user, node):
                return True
            if user in seen or user.op == "output":
                continue
            if not _passes_sign(user, node):
                continue
            seen.add(user)
            stack.append(user)
    return False


def _export_dynamic(module: torch.nn.Module, inputs: tuple, dims: dict[int, str],
                    input_dims: Sequence[dict[int, str]] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` with ``dims`` of every input dynamic, or ``input_dims`` per input
    (size-1 dims traced at 2)."""
    per_input = [dict(d) for d in input_dims] if input_dims is not None else [
        {d: n for d, n in dims.items() if d < x.dim()} for x in inputs]
    trace = []
    for x, own in zip(inputs, per_input):
        for d in own:
            if d < x.dim() and x.shape[d] == 1:
                x = torch.cat([x, x], dim=d)
        trace.append(x)
    # The batch gets a named Dim (export must prove it free, or fail and we fall back); other
    # dims such as a sequence length get AUTO, since models bound them (RoPE tables, positions)
    # and relate them (a mask spans past + seq).
    named = {d: torch.export.Dim(name, min=1, max=1 << 16) for d, name in dims.items() if d == 0}
    spec = tuple({d: named.get(d, torch.export.Dim.AUTO) for d in own if d < x.dim()} for x, own in zip(trace, per_input))
    return torch.export.export(module, tuple(trace), dynamic_shapes=_by_signature(module, spec))


def _by_signature(module: torch.nn.Module, spec: tuple) -> tuple:
    """``spec`` (one entry per flat input) grouped as ``forward`` takes its arguments: export
    wants the inputs a ``*args`` parameter collects as one tuple."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return spec
    fixed = 0
    for param in params:
        if param.kind == inspect.Parameter.VAR_POSITIONAL:
            return (*spec[:fixed], tuple(spec[fixed:]))
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            fixed += 1
    return spec


def _drop_input_range_checks(gm: fx.GraphModule) -> None:
    """Remove the pre-call hook of an unlifted module that checks its inputs against export's
    range constraints (see :meth:`Graph.capture`: they restate the examples' sizes)."""
    for key, hook in list(gm._forward_pre_hooks.items()):
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]


def _dims_text(input_dims: Sequence[dict[int, str]]) -> str:
    names = sorted({n for d in input_dims for n in d.values()})
    return "/".join(names) or "(none)"


def _specialized(ep: torch.export.ExportedProgram, input_dims: Sequence[dict[int, str]]) -> list[str]:
    """``"name (input i, dim d)"`` for every requested dim that export made static."""
    lost = []
    for i, (v, own) in enumerate(zip(_user_input_vals(ep), input_dims)):
        for d, name in own.items():
            if not (isinstance(v, torch.Tensor) and d < v.dim() and isinstance(v.shape[d], torch.SymInt)):
                lost.append(f"{name} (input {i}, dim {d})")
    return lost


def _user_input_vals(ep: torch.export.ExportedProgram) -> list[Any]:
    """The recorded values of an exported program's user inputs, in order."""
    user = set(ep.graph_signature.user_inputs)
    return [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def _placeholder_vals(gm: fx.GraphModule) -> list[Any]:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _dynamic_positions(ep: torch.export.ExportedProgram, dims: dict[int, str]) -> dict[int, str]:
    """The requested dims that stayed symbolic on every input that has them."""
    vals = [v for v in _user_input_vals(ep) if isinstance(v, torch.Tensor)]
    kept = {}
    for d, name in dims.items():
        having = [v for v in vals if d < v.dim()]
        if having and all(isinstance(v.shape[d], torch.SymInt) for v in having):
            kept[d] = name
    return kept


def _symbol_names(gm: fx.GraphModule, dims: Sequence[dict[int, str]]) -> dict[str, str]:
    """Map torch's shape symbols (``s77``) to our dim names (``batch``) via the inputs
    (``dims``: the dynamic dims of each input)."""
    names: dict[str, str] = {}
    for v, own in zip(_placeholder_vals(gm), dims):
        if isinstance(v, torch.Tensor):
            for d, name in own.items():
                if d < v.dim() and isinstance(v.shape[d], torch.SymInt):
                    names[str(v.shape[d].node.expr)] = name
    return names


def _rename_symbols(expr: str, names: dict[str, str]) -> str:
    if not names:
        return expr
    return re.sub(r"\b(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True))) + r")\b", lambda m: names[m.group(1)], expr)


def _output_vals(gm: fx.GraphModule) -> list[Any]:
    out = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if out is None:
        return []
    leaves = pytree.tree_leaves(out.args[0])
    return [a.meta.get("val") if isinstance(a, fx.Node) else None for a in leaves if isinstance(a, fx.Node)]


def op_name(node: fx.Node) -> str:
    """Short readable op name: ``aten.conv2d`` for ``torch.ops.aten.conv2d.default``."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return str(packet).replace("torch.ops.", "")
    return getattr(target, "__name__", str(target))


def replace_all_uses(old: fx.Node, new: fx.Node, *, keep: Callable[[fx.Node], bool] | None = None) -> None:
    """Redirect users of ``old`` to ``new`` (except the users ``keep`` excludes)."""
    old.replace_all_uses_with(new, delete_user_cb=(lambda u: not keep(u)) if keep else (lambda u: True))


__all__ = ["Graph", "TensorSpec", "op_name", "dtype_name", "ANNOTATION_KEY", "replace_all_uses"]
