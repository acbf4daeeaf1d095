"""Graph -> HE program: which layers run encrypted, with which integers, and how the rest runs.

An :class:`HEProgram` is an ordered list of encrypted linear steps plus a *client graph*:

* every ``aten.linear`` / ``aten.conv2d`` / ``graphpress::circulant_linear`` /
  ``graphpress::circulant_conv2d`` / ``graphpress::linear_act`` node with a constant weight
  becomes one :class:`Step` (layer name, kind, encoding, shapes, block size, quantization
  scales, accumulator bound, BFV parameters); its integer weight goes to the server's weight
  file;
* the graph itself, with each of those nodes replaced by a call to the backend-private op
  ``graphpress_he::step(x, bias, index, out_tail)``, is the client graph: everything between two
  encrypted layers (ReLU, pooling, flatten, add, ...) runs there in plaintext torch. The
  server's weights are no longer in it (dead ``get_attr`` nodes and tensors are removed); the
  biases stay, because the client adds them after dequantizing. A fused ``linear_act`` becomes
  the step followed by its activation.

Running the program = running the client graph with an *executor* bound (:func:`bind`): the
``step`` op hands ``(index, x, bias)`` to it, and it quantizes ``x`` (:mod:`.quant`), computes
``y_int = W_int x_int`` -- under encryption (:class:`EncryptedExecutor`, the HE kernels of
:mod:`graphpress.backends.he.kernels`) or in plaintext integers (:class:`PlainExecutor`, the
exact reference: BFV is exact, so both must agree bit for bit) -- and returns
``y_int * s_x * s_w + bias``. The client graph is a ``torch.export`` program, so it is saved
and loaded like any other (``client_graph.pt2``).

Encodings (``encoding`` option): ``coeff-circulant`` runs block-circulant layers on their
compact vectors (CirEncode) and dense layers with ``coeff-dense``; ``coeff-dense`` and
``slot-dense`` run every layer on its dense integer matrix (circulant weights are expanded,
exactly, after quantization). See ``docs/backends/he-encodings.md``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

import graphpress.ir.ops  # noqa: F401 -- registers torch.ops.graphpress.* (circulant ops, linear_act)
from graphpress.backends.he.quant import HEInputQuant, QuantConfig, RangeObserver, accumulator_bound, act_quant, plain_bits_for, quantize_weight
from graphpress.errors import BackendError
from graphpress.ir.circulant import expand
from graphpress.ir.fakes import shape_function
from graphpress.ir.graph import Graph
from graphpress.ir.observe import observe
from graphpress.ir.names import layer_name, unique_names

aten = torch.ops.aten
gp = torch.ops.graphpress

ENCODINGS = ("coeff-circulant", "coeff-dense", "slot-dense")
PROGRAM_VERSION = 1

_LINEAR = {aten.linear.default, gp.circulant_linear.default, gp.linear_act.default}
_CONV = {aten.conv2d.default, gp.circulant_conv2d.default}
_CIRCULANT = {gp.circulant_linear.default, gp.circulant_conv2d.default}
# graphpress::linear_act activation -> the ATen call the client graph makes after the step
_ACTS: dict[str, tuple[Callable, dict[str, Any]]] = {
    "relu": (aten.relu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
    "silu": (aten.silu.default, {}),
    "sigmoid": (aten.sigmoid.default, {}),
    "tanh": (aten.tanh.default, {}),
}


# ---------------------------------------------------------------------------- the step op
_EXECUTOR: contextvars.ContextVar[Any] = contextvars.ContextVar("graphpress_he_executor", default=None)


@torch.library.custom_op(
    "graphpress_he::step",
    mutates_args=(),
    schema="(Tensor x, Tensor? bias, int index, SymInt[] out_tail) -> Tensor",
)
def he_step(x: torch.Tensor, bias: torch.Tensor | None, index: int, out_tail: Sequence[int]) -> torch.Tensor:
    """Encrypted layer ``index`` of the bound executor: ``(batch, ...) -> (batch, *out_tail)``."""
    executor = _EXECUTOR.get()
    if executor is None:
        raise BackendError(
            f"he: the client graph reached encrypted step {index} with no executor bound; "
            "run it through HERunner (graphpress.runtime.load) or graphpress.backends.he.program.bind"
        )
    return executor(index, x, bias)


@shape_function(he_step)
def _he_step_fake(x, bias, index, out_tail):
    return x.new_empty((x.shape[0], *out_tail))


@contextlib.contextmanager
def bind(executor: Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> Iterator[None]:
    """Route ``graphpress_he::step`` calls to ``executor`` inside the ``with`` block (per thread/task)."""
    token = _EXECUTOR.set(executor)
    try:
        yield
    finally:
        _EXECUTOR.reset(token)


# ---------------------------------------------------------------------------- program
@dataclass
class Step:
    """One encrypted linear/conv layer (the JSON form is ``asdict``).

    Attributes
    ----------
    index : int
    name : str
        Layer name (source module path, else the FX node name).
    node : str
        FX node name in the captured graph.
    kind : ``"linear"`` | ``"conv2d"``
    encoding : str
        The kernel that runs it (one of :data:`ENCODINGS`).
    circulant : bool
        The weight is stored compactly (block-circulant); ``b`` is its block size (1: dense).
    out_features, in_features : int
        ``m`` and ``n`` (output / input channels for a conv).
    kernel_size, stride, padding : list of int
        Conv geometry (``[1, 1]``, ``[1, 1]``, ``[0, 0]`` for a linear).
    in_shape, out_shape : list of int
        Per-sample shapes around the step (batch excluded).
    weight_key : str
        Name of the integer weight in the server's weight file.
    weight_shape : list of int
        Shape of that integer array: ``(p, q, b)`` / ``(kh, kw, p, q, b)`` for compact
        circulant weights under ``coeff-circulant``, else ``(m, n)`` / ``(C_out, C_in, kh, kw)``.
    act : dict
        The input quantizer (:class:`~graphpress.backends.he.quant.HEInputQuant`).
    weight_scales : list of float
        Per output channel (length ``m``).
    acc_bound : int
        ``max |y_int|`` over all admissible inputs.
    plain_bits : int
        Bits of ``t`` needed for ``acc_bound`` (``t > 2 * acc_bound``).
    params : dict
        The BFV parameters (:class:`graphpress.backends.he.bfv.BFVParams` as a dict).
    activation : str or None
        Activation of a fused ``linear_act`` (applied on the client after the step).
    """

    index: int
    name: str
    node: str
    kind: str
    encoding: str
    circulant: bool
    b: int
    out_features: int
    in_features: int
    kernel_size: list[int]
    stride: list[int]
    padding: list[int]
    in_shape: list[int]
    out_shape: list[int]
    weight_key: str
    weight_shape: list[int]
    act: dict[str, Any]
    weight_scales: list[float]
    acc_bound: int
    plain_bits: int
    params: dict[str, Any]
    activation: str | None = None

    @property
    def act_quant(self) -> HEInputQuant:
        return HEInputQuant.from_dict(self.act)

    @property
    def positions(self) -> int:
        """Output positions per sample: ``H' * W'`` for a conv, tokens for a linear."""
        return int(np.prod(self.out_shape[:-1])) if self.kind == "linear" else int(self.out_shape[1] * self.out_shape[2])

    def rows(self, batch: int) -> int:
        """Input vectors per call: ``batch * tokens`` for a linear, ``batch`` for a conv."""
        return batch * (int(np.prod(self.in_shape[:-1])) if self.kind == "linear" else 1)

    def describe(self) -> str:
        shape = f"{self.out_features}x{self.in_features}" + (f" k{self.kernel_size[0]}x{self.kernel_size[1]}" if self.kind == "conv2d" else "")
        return f"{self.name} ({self.kind} {shape}, b={self.b}, {self.encoding})"


@dataclass
class HEProgram:
    """The HE program: steps + protocol + quantization + file names (``he_program.json``)."""

    protocol: str
    encoding: str
    quant: dict[str, Any]
    steps: list[Step]
    input_names: list[str]
    output_names: list[str]
    client_graph: str = "client_graph.pt2"
    weights: str = "server_weights.npz"
    security: dict[str, Any] = field(default_factory=dict)
    version: int = PROGRAM_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "he_program.json") -> "HEProgram":
        try:
            d = json.loads(text)
            if d.get("version") != PROGRAM_VERSION:
                raise BackendError(f"{where}: program version {d.get('version')!r}; this graphpress reads version {PROGRAM_VERSION}")
            d["steps"] = [Step(**s) for s in d["steps"]]
            return cls(**d)
        except BackendError:
            raise
        except (ValueError, TypeError, KeyError) as err:
            raise BackendError(f"{where}: not a valid HE program ({type(err).__name__}: {err})") from err

    def params_groups(self) -> dict[str, list[int]]:
        """Step indices per distinct parameter set (one key pair serves each group)."""
        groups: dict[str, list[int]] = {}
        for s in self.steps:
            groups.setdefault(json.dumps(s.params, sort_keys=True), []).append(s.index)
        return groups


# ---------------------------------------------------------------------------- graph analysis
@dataclass
class _Layer:
    node: fx.Node
    name: str
    kind: str
    circulant: bool
    weight: torch.Tensor  # compact for circulant ops
    stride: list[int]
    padding: list[int]
    activation: str | None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def _pair(v: Any, default: int) -> list[int]:
    if v is None:
        return [default, default]
    v = [int(a) for a in (v if isinstance(v, (list, tuple)) else [v])]
    return v * 2 if len(v) == 1 else v


def find_layers(graph: Graph) -> list[_Layer]:
    """The encrypted layers in graph order; a layer the kernels cannot run is a :class:`BackendError`."""
    nodes: list[fx.Node] = []
    for node in graph.call_nodes():
        if node.target in _LINEAR | _CONV:
            nodes.append(node)
        elif getattr(node.target, "overloadpacket", None) is aten.conv2d:  # aten.conv2d.padding ('same'/'valid')
            raise BackendError(f"he: layer {layer_name(graph, node)!r}: conv2d with string padding is not supported; re-export with integer padding")
    # named as the passes name them (graphpress.ir.names), so a recipe's layer names hold here too
    layers: list[_Layer] = []
    for node, name in zip(nodes, unique_names(layer_name(graph, n) for n in nodes)):
        w = graph.tensor_of(node.args[1]) if isinstance(node.args[1], fx.Node) else None
        if w is None or not w.dtype.is_floating_point:
            raise BackendError(f"he: layer {name!r} ({node.name}): the weight is not a constant float tensor; the server needs it in plaintext")
        circ = node.target in _CIRCULANT
        if node.target in _LINEAR:
            act = _arg(node, 3, "act") if node.target is gp.linear_act.default else None
            layers.append(_Layer(node, name, "linear", circ, w, [1, 1], [0, 0], act))
            continue
        if circ:
            stride, padding, dilation, groups = _arg(node, 3, "stride"), _arg(node, 4, "padding"), _arg(node, 5, "dilation"), 1
        else:
            stride, padding, dilation, groups = (_arg(node, i, n) for i, n in ((3, "stride"), (4, "padding"), (5, "dilation"), (6, "groups")))
        if _pair(dilation, 1) != [1, 1]:
            raise BackendError(f"he: layer {name!r}: dilated conv (dilation={_pair(dilation, 1)}) is not supported by the HE kernels")
        if (groups or 1) != 1:
            raise BackendError(f"he: layer {name!r}: grouped conv (groups={groups}) is not supported by the HE kernels; only groups=1")
        layers.append(_Layer(node, name, "conv2d", circ, w, _pair(stride, 1), _pair(padding, 0), None))
    return layers


def calibrate(graph: Graph, layers: list[_Layer], quant: QuantConfig) -> dict[str, RangeObserver]:
    """Input range of every layer on ``graph.calibration_batches()`` (float graph, not quantized)."""
    observers = {l.node.name: RangeObserver(quant.percentile) for l in layers}
    readers: dict[str, list[str]] = {}  # input node -> the layers that read it
    for l in layers:
        readers.setdefault(l.node.args[0].name, []).append(l.node.name)

    def see(node: fx.Node, value: torch.Tensor) -> None:
        x = value.double().numpy()
        for name in readers[node.name]:
            observers[name].update(x)

    observe(graph, [l.node.args[0] for l in layers], see)
    return observers


# ---------------------------------------------------------------------------- weights
def _integer_weight(layer: _Layer, encoding: str, bits: int) -> tuple[np.ndarray, np.ndarray, int, str]:
    """``(w_int as the kernel takes it, per-channel scales (m,), b, kernel name)``.

    Quantization happens on the compact vectors of a circulant weight (per block-row scales,
    repeated ``b`` times), *then* a dense kernel gets the exact integer expansion.
    """
    w = layer.weight.detach().double()
    if layer.circulant:
        b = int(w.shape[-1])
        rows_axis = 0 if layer.kind == "linear" else 2
        c_int, s = quantize_weight(w.numpy(), bits, rows_axis)
        scales = np.repeat(s, b)
        if encoding == "coeff-circulant":
            return c_int, scales, b, "coeff-circulant"
        dense = expand(torch.from_numpy(c_int)).numpy()  # integer expansion: exact
        if layer.kind == "conv2d":
            dense = np.ascontiguousarray(dense.transpose(2, 3, 0, 1))  # (C_out, C_in, kh, kw)
        return dense.astype(np.int64), scales, b, encoding
    w_int, scales = quantize_weight(w.numpy(), bits, 0)
    kernel = "coeff-dense" if encoding == "coeff-circulant" else encoding
    return w_int, scales, 1, kernel


def _rows_axis(w_int: np.ndarray, kind: str, kernel: str) -> int:
    return 2 if (kernel == "coeff-circulant" and kind == "conv2d") else 0


def _static_tail(node: fx.Node, what: str) -> list[int]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise BackendError(f"he: layer {what}: no shape metadata on node {node.name}; run graph.verify() first")
    tail = list(val.shape[1:])
    if not all(isinstance(d, int) or (hasattr(d, "node") and d.node.is_constant()) for d in tail):
        raise BackendError(f"he: layer {what}: only the batch dimension may be dynamic; shape {list(val.shape)}")
    return [int(d) for d in tail]


def build_program(
    graph: Graph,
    *,
    encoding: str = "coeff-circulant",
    protocol: str = "interactive",
    quant: QuantConfig = QuantConfig(),
    poly_degree: int | None = None,
) -> tuple[HEProgram, dict[str, np.ndarray], Graph]:
    """Analyse ``graph`` into an :class:`HEProgram`, its integer weights and the client graph.

    Parameters
    ----------
    graph : Graph
        The (compressed) graph; its calibration batches (else its example inputs) set the
        activation scales. Not modified.
    encoding : str
        One of :data:`ENCODINGS` (see module docstring).
    protocol : str
        Recorded in the program (``"interactive"``).
    quant : QuantConfig
    poly_degree : int, optional
        Force the BFV polynomial degree ``N`` of every layer; default: the smallest ``N`` that
        fits each layer's plaintext modulus at 128-bit security.

    Returns
    -------
    program : HEProgram
    weights : dict of str to int64 array
        The server's integer weights by :attr:`Step.weight_key`.
    client : Graph
        A clone of ``graph`` whose encrypted layers call ``graphpress_he::step``.

    Raises
    ------
    BackendError
        Unknown encoding; a layer without a constant weight, grouped/dilated convs, non-batch
        dynamic dims; a layer whose accumulator does not fit any 128-bit parameter set (named).
    """
    from graphpress.backends.he.bfv import choose_params
    from graphpress.backends.he.protocol import get_protocol

    if encoding not in ENCODINGS:
        raise BackendError(f"he: option 'encoding': unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
    proto = get_protocol(protocol)
    graph.verify()  # shape metadata on every node
    layers = find_layers(graph)
    if not layers:
        raise BackendError(f"he: {graph.name!r} has no linear or conv layer to run encrypted")
    observers = calibrate(graph, layers, quant)
    steps: list[Step] = []
    weights: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        w_int, scales, b, kernel = _integer_weight(layer, encoding, quant.weight_bits)
        aq = act_quant(observers[layer.node.name], quant.act_bits)
        bound = accumulator_bound(w_int, _rows_axis(w_int, layer.kind, kernel), aq.bound)
        bits = plain_bits_for(bound)
        try:
            params = choose_params(bits, poly_degree, batching=(kernel == "slot-dense"), what=layer.name)
        except BackendError as err:
            msg = str(err)
            raise BackendError(msg if layer.name in msg else f"he: layer {layer.name!r}: {msg}") from err
        in_tail = _static_tail(layer.node.args[0], layer.name)
        out_tail = _static_tail(layer.node, layer.name)
        m = int(scales.shape[0])
        n = in_tail[-1] if layer.kind == "linear" else in_tail[0]
        ksize = [1, 1] if layer.kind == "linear" else [int(layer.weight.shape[0 if layer.circulant else 2]), int(layer.weight.shape[1 if layer.circulant else 3])]
        key = f"w{i}"
        weights[key] = w_int
        steps.append(
            Step(
                index=i,
                name=layer.name,
                node=layer.node.name,
                kind=layer.kind,
                encoding=kernel,
                circulant=layer.circulant,
                b=b,
                out_features=m,
                in_features=int(n),
                kernel_size=ksize,
                stride=layer.stride,
                padding=layer.padding,
                in_shape=in_tail,
                out_shape=out_tail,
                weight_key=key,
                weight_shape=list(w_int.shape),
                act=aq.to_dict(),
                weight_scales=[float(s) for s in scales],
                acc_bound=int(bound),
                plain_bits=int(bits),
                params=params.to_dict(),
                activation=layer.activation,
            )
        )
    program = HEProgram(
        protocol=proto.name,
        encoding=encoding,
        quant=quant.to_dict(),
        steps=steps,
        input_names=list(graph.input_names),
        output_names=list(graph.output_names),
        security=proto.to_dict(),
    )
    return program, weights, client_graph(graph, layers, steps)


def client_graph(graph: Graph, layers: list[_Layer], steps: list[Step]) -> Graph:
    """A clone of ``graph`` whose encrypted layers call ``graphpress_he::step`` (weights removed)."""
    client = graph.clone()
    by_name = {n.name: n for n in client.nodes}
    g = client.gm.graph
    for layer, step in zip(layers, steps):
        node = by_name[layer.node.name]
        bias = _arg(node, 2, "bias")
        with g.inserting_before(node):
            new = g.call_function(torch.ops.graphpress_he.step.default, (node.args[0], bias, step.index, list(step.out_shape)))
            new.meta = dict(node.meta)
            out = new
            if step.activation is not None:
                fn, kw = _ACTS[step.activation]
                out = g.call_function(fn, (new,), dict(kw))
                out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        g.erase_node(node)
    g.eliminate_dead_code()
    client.recompile()
    client.remove_unused_tensors()
    return client


# ---------------------------------------------------------------------------- executors
@dataclass
class StepRecord:
    """One executed step: which, on how many input rows, its wall seconds, the kernel's op counts
    and the seconds per ``side/op`` of the context's counter."""

    index: int
    rows: int
    seconds: float
    counts: dict[str, Any] = field(default_factory=dict)
    op_seconds: dict[str, float] = field(default_factory=dict)


class _Executor:
    """Quantize -> integer product (subclass) -> dequantize + bias; records every call."""

    def __init__(self, program: HEProgram):
        self.program = program
        self.records: list[StepRecord] = []
        self._scale = {
            s.index: torch.tensor(np.asarray(s.weight_scales) * s.act_quant.scale, dtype=torch.float64) for s in program.steps
        }

    def integer(self, step: Step, x_int: np.ndarray) -> np.ndarray:  # pragma: no cover -- abstract
        raise NotImplementedError

    def __call__(self, index: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        step = self.program.steps[index]
        batch = int(x.shape[0])
        x_int = step.act_quant.quantize(x.detach().cpu().numpy())
        if step.kind == "linear":
            x_int = x_int.reshape(-1, step.in_features)
        y_int = self.integer(step, x_int)
        y = torch.from_numpy(np.asarray(y_int, dtype=np.float64))
        if step.kind == "linear":
            y = y.reshape(batch, *step.out_shape) * self._scale[index]
            if bias is not None:
                y = y + bias.double()
        else:
            y = y.reshape(batch, *step.out_shape) * self._scale[index][:, None, None]
            if bias is not None:
                y = y + bias.double()[:, None, None]
        return y.to(x.dtype)


class PlainExecutor(_Executor):
    """The exact plaintext reference: ``W_int x_int`` in float64 (exact below 2^53)."""

    def __init__(self, program: HEProgram, weights: dict[str, np.ndarray]):
        super().__init__(program)
        self._dense: dict[int, torch.Tensor] = {}
        for s in program.steps:
            w = torch.from_numpy(np.asarray(weights[s.weight_key], dtype=np.float64))
            if s.encoding == "coeff-circulant":
                w = expand(w)
                if s.kind == "conv2d":
                    w = w.permute(2, 3, 0, 1)
            self._dense[s.index] = w.contiguous()
            if s.acc_bound >= 1 << 53:
                raise BackendError(f"he: layer {s.name!r}: accumulator bound 2^{math.log2(s.acc_bound):.0f} is beyond exact float64 simulation")

    def integer(self, step: Step, x_int: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        x = torch.from_numpy(x_int.astype(np.float64))
        w = self._dense[step.index]
        y = F.linear(x, w) if step.kind == "linear" else F.conv2d(x, w, None, step.stride, step.padding)
        self.records.append(StepRecord(step.index, int(x.shape[0]), time.perf_counter() - t0))
        return np.rint(y.numpy()).astype(np.int64)


class EncryptedExecutor(_Executor):
    """``W_int x_int`` under BFV: the client encrypts, the server's kernel multiplies, the client decrypts.

    One :class:`~graphpress.backends.he.bfv.BFVContext` (key pair) per distinct parameter set;
    the server's weights are encoded into plaintexts once, here (offline work, not timed per
    inference). With ``verify`` every decrypted layer output is compared with
    :class:`PlainExecutor` on the same integer input: a mismatch (noise overflow, a wrapped
    value) is a :class:`BackendError` naming the layer.
    """

    def __init__(
        self,
        program: HEProgram,
        weights: dict[str, np.ndarray],
        *,
        on_prepare: Callable[[Step], None] | None = None,
        verify: bool = False,
    ):
        from graphpress.backends.he.bfv import BFVContext, BFVParams
        from graphpress.backends.he.kernels import get_kernel

        super().__init__(program)
        # with verify, every decrypted result is compared with the plaintext integer product
        self.reference = PlainExecutor(program, weights) if verify else None
        self.contexts: dict[str, Any] = {}
        self.prepared: dict[int, Any] = {}
        self.kernels: dict[int, Any] = {}
        self.prepare_seconds: dict[int, float] = {}
        for s in program.steps:
            key = json.dumps(s.params, sort_keys=True)
            if key not in self.contexts:
                self.contexts[key] = BFVContext(BFVParams.from_dict(s.params), what=s.name)
            ctx = self.contexts[key]
            k = get_kernel(s.encoding)
            t0 = time.perf_counter()
            w = np.asarray(weights[s.weight_key], dtype=np.int64)
            if s.kind == "linear":
                self.prepared[s.index] = k.prepare_linear(ctx, w, what=s.name)
            else:
                self.prepared[s.index] = k.prepare_conv(
                    ctx, w, stride=tuple(s.stride), padding=tuple(s.padding), what=s.name, input_hw=(s.in_shape[1], s.in_shape[2])
                )
            self.prepare_seconds[s.index] = time.perf_counter() - t0
            self.kernels[s.index] = k
            if on_prepare is not None:
                on_prepare(s)

    def context(self, step: Step) -> Any:
        return self.contexts[json.dumps(step.params, sort_keys=True)]

    def integer(self, step: Step, x_int: np.ndarray) -> np.ndarray:
        ctx = self.context(step)
        k = self.kernels[step.index]
        before, seconds = ctx.counter.snapshot(), dict(ctx.counter.seconds)
        t0 = time.perf_counter()
        if step.kind == "linear":
            y = k.run_linear(ctx, self.prepared[step.index], x_int)
        else:
            y = k.run_conv(ctx, self.prepared[step.index], x_int)
        dt = time.perf_counter() - t0
        counts = (ctx.counter.snapshot() - before).to_dict()
        op_seconds = {f"{side}/{op}": v - seconds.get((side, op), 0.0) for (side, op), v in ctx.counter.seconds.items()}
        rec = StepRecord(step.index, int(x_int.shape[0]), dt, counts, {k_: v for k_, v in op_seconds.items() if v > 0})
        self.records.append(rec)
        if self.reference is not None:
            want = self.reference.integer(step, x_int)
            self.reference.records.clear()
            if not np.array_equal(want, y):
                bad = int(np.count_nonzero(want != y))
                raise BackendError(
                    f"he: layer {step.name!r}: {bad} of {y.size} decrypted values differ from the plaintext integer product "
                    f"(N={step.params['poly_degree']}, t={step.params['plain_modulus']}); the parameters do not hold this layer"
                )
        return y


def run_client(module: torch.nn.Module, executor: Callable, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run the client graph module with ``executor`` bound; outputs flattened to a list."""
    from torch.utils import _pytree as pytree

    with bind(executor), torch.no_grad():
        out = module(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


__all__ = [
    "ENCODINGS",
    "EncryptedExecutor",
    "HEProgram",
    "PlainExecutor",
    "Step",
    "StepRecord",
    "bind",
    "build_program",
    "calibrate",
    "client_graph",
    "find_layers",
    "he_step",
    "run_client",
]
