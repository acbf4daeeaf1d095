"""The ``he`` backend: lower a graph to an HE program, check it encrypted, report its cost.

``secure`` protocol (the default; :mod:`graphpress.backends.he.secure`): the artifact folder
gets ``he_program.json`` (protocol, threat model, options), ``secure_program.json`` (the public
two-party program), ``secure_server.npz`` (the server's integers) and ``secure_check.json``; the
check runs the example inputs between a client and a server process and requires the revealed
integers to equal the fixed-point simulation (:class:`SecureRunner` runs it later).

``interactive`` protocol (BFV, a debugging mode; :mod:`.program`, :mod:`.protocol`): the artifact folder gets

* ``he_program.json`` -- the steps (layer, kind, encoding, shapes, block size, scales,
  accumulator bound, BFV parameters), the protocol and its threat-model summary;
* ``server_weights.npz`` -- the server's integer weights (int8 for 8-bit weights; compact
  ``(p, q, b)`` vectors for block-circulant layers under ``coeff-circulant``);
* ``client_graph.pt2`` -- the plaintext parts (a ``torch.export`` program without the server's
  weights, see :func:`graphpress.backends.he.program.client_graph`);
* ``he_cost.json`` -- per layer: predicted (counts x cached per-op seconds,
  :mod:`.costmodel`) vs measured seconds of the check run, op counts, and the totals.

The check (``check=True``) loads those files back (:class:`~.runner.HERunner`, fresh keys),
runs the example inputs plus one seeded random batch *encrypted*, and

* compares every layer's decrypted integers with the plaintext integer product on the same
  input -- they must be identical (BFV is exact; a difference means the parameters do not hold
  the layer): a :class:`BackendError` naming the layer otherwise;
* records the error against the float graph (max abs, SQNR, top-1 agreement): the
  fixed-point cost, reported, not refused.

``polynomial`` protocol (CKKS, :mod:`graphpress.backends.he.polynomial`): the graph must be a
polynomial of its input (run the ``polynomial-activations`` pass first). The artifact holds
``he_program.json`` (protocol, parameters of the check run) and ``polynomial_graph.pt2`` plus
``example_input.npy``; :class:`PolynomialRunner` runs it with ``run_polynomial``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphpress.backends.base import LoweredModel
from graphpress.backends.check import check_sets
from graphpress.backends.he.options import HEOptions
from graphpress.backends.he.program import ENCODINGS, HEProgram, build_program
from graphpress.backends.he.protocol import get_protocol
from graphpress.backends.he.quant import QuantConfig
from graphpress.backends.he.runner import COST_FILE, PROGRAM_FILE, HERun, HERunner
from graphpress.errors import BackendError
from graphpress.ir.compare import compare_outputs
from graphpress.ir.graph import Graph

POLY_GRAPH_FILE = "polynomial_graph.pt2"
SECURE_RUN_FILE = "secure_check.json"
POLY_EXAMPLE_FILE = "example_input.npy"


def _int_dtype(a: np.ndarray) -> np.dtype:
    """Smallest signed integer dtype holding ``a`` (weights are stored compactly)."""
    m = int(np.abs(a).max(initial=0))
    for dt in (np.int8, np.int16, np.int32):
        if m <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def write_program(folder: Path, program: HEProgram, weights: dict[str, np.ndarray], client: Graph) -> list[str]:
    """Write the interactive program's files into ``folder``; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.export.save(client.export_program(), str(folder / program.client_graph))
    np.savez_compressed(folder / program.weights, **{k: v.astype(_int_dtype(v)) for k, v in weights.items()})
    (folder / PROGRAM_FILE).write_text(program.to_json(), encoding="utf-8")
    return [PROGRAM_FILE, program.weights, program.client_graph]


def _agreement(ref: torch.Tensor, got: torch.Tensor) -> float | None:
    if ref.dim() < 2 or ref.shape[-1] < 2 or not ref.is_floating_point():
        return None
    return float((ref.argmax(-1) == got.argmax(-1)).double().mean())


def cost_report(program: HEProgram, run: HERun, *, label: str = "example inputs") -> dict[str, Any]:
    """``he_cost.json``: per layer predicted vs measured seconds and counts, plus totals."""
    layers = []
    for row in run.layers:
        pred = row.get("predicted_s")
        layers.append(
            {
                **{k: row[k] for k in ("index", "name", "kind", "encoding", "b", "shape", "poly_degree", "plain_bits", "rows")},
                "measured_s": row["measured_s"],
                "predicted_s": pred,
                "ratio": (pred / row["measured_s"]) if pred and row["measured_s"] > 0 else None,
                "counts": row["counts"],
                "predicted_counts": row.get("predicted_counts"),
                "op_seconds": row.get("op_seconds", {}),
                "predicted_terms": row.get("predicted_terms"),
            }
        )
    measured = sum(r["measured_s"] for r in layers)
    predicted = sum(r["predicted_s"] for r in layers) if all(r["predicted_s"] is not None for r in layers) else None
    return {
        "inputs": label,
        "batch": int(run.outputs[0].shape[0]) if run.outputs and run.outputs[0].ndim else 1,
        "wall_s": run.seconds,
        "layers": layers,
        "total_measured_s": measured,
        "total_predicted_s": predicted,
        "bytes_sent": sum(int(r["counts"].get("bytes_sent", 0)) for r in layers),
        "bytes_received": sum(int(r["counts"].get("bytes_received", 0)) for r in layers),
        "note": "measured: wall time of each encrypted layer call (client encrypt + server products + decrypt, serialization "
        "included, no network); predicted: analytic op counts x per-op seconds cached by `compress he-calibrate`",
    }


class HEBackend:
    """The ``"he"`` backend (see module docstring).

    Parameters
    ----------
    encoding : str
        ``"coeff-circulant"`` (default: compact block-circulant layers, dense ones coefficient
        encoded), ``"coeff-dense"`` or ``"slot-dense"``.
    protocol : str
        ``"secure"`` (default: two processes, HE on secret shares + SPU 2PC, the client learns
        only the output; needs ``compress secure-setup``), ``"interactive"`` (debugging: the
        client sees every activation) or ``"polynomial"`` (CKKS, fully encrypted).
    stat_bits : int
        Statistical security of the secure protocol's noise flooding (at least 40).
    act_bits, weight_bits : int
        Fixed-point bits (interactive).
    percentile : float, optional
        Activation range from this percentile of ``|x|`` instead of the maximum.
    poly_degree : int, optional
        Force ``N`` (default: the smallest that fits each layer at 128-bit security).
    check_seeds : sequence of int
        Seeded random input sets encrypted by the check besides the example inputs.
    measure_costs : bool
        Measure the per-op costs the program's parameters need when the cache lacks them (a
        second or so per parameter set; cached) so that ``he_cost.json`` has predictions.
    """

    name = "he"
    Options = HEOptions

    def __init__(
        self,
        encoding: str = "coeff-circulant",
        protocol: str = "secure",
        act_bits: int = 8,
        weight_bits: int = 8,
        percentile: float | None = None,
        poly_degree: int | None = None,
        check_seeds: Sequence[int] = (0,),
        measure_costs: bool = True,
        stat_bits: int = 40,
    ):
        from graphpress.backends.he import require_tenseal

        require_tenseal()
        if encoding not in ENCODINGS:
            raise BackendError(f"he: option 'encoding': unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")
        self.protocol = get_protocol(protocol).name
        if self.protocol == "secure" and encoding == "slot-dense":
            raise BackendError("he: option 'encoding': the secure protocol runs coefficient encodings (coeff-circulant, coeff-dense), not slot-dense")
        if int(stat_bits) < 40:
            raise BackendError(f"he: option 'stat_bits': {stat_bits} is below 40 bits of statistical security; the flooding would not hide the weights")
        self.stat_bits = int(stat_bits)
        self.encoding = encoding
        self.quant = QuantConfig(act_bits, weight_bits, percentile)
        self.poly_degree = poly_degree
        self.check_seeds = tuple(check_seeds)
        self.measure_costs = measure_costs
        self.options = HEOptions(
            encoding=encoding,
            protocol=self.protocol,
            act_bits=int(act_bits),
            weight_bits=int(weight_bits),
            percentile=percentile,
            poly_degree=poly_degree,
            check_seeds=self.check_seeds,
            measure_costs=bool(measure_costs),
            stat_bits=self.stat_bits,
        )

    # ------------------------------------------------------------------ interactive
    def lower(self, graph: Graph, folder: Path, *, check: bool = True) -> LoweredModel:
        """Write the HE artifact files into ``folder`` and, with ``check``, run them encrypted.

        Raises
        ------
        BackendError
            A layer the kernels cannot run, a layer whose accumulator no 128-bit parameter set
            holds, or (check) decrypted integers that differ from the plaintext product.
        """
        if self.protocol == "polynomial":
            return self._lower_polynomial(graph, Path(folder), check=check)
        if self.protocol == "secure":
            return self._lower_secure(graph, Path(folder), check=check)
        folder = Path(folder)
        t0 = time.perf_counter()
        program, weights, client = build_program(graph, encoding=self.encoding, protocol=self.protocol, quant=self.quant, poly_degree=self.poly_degree)
        files = write_program(folder, program, weights, client)
        info: dict[str, Any] = {
            "protocol": program.protocol,
            "encoding": program.encoding,
            "quant": program.quant,
            "security": program.security,
            "layers": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "encoding": s.encoding,
                    "b": s.b,
                    "shape": [s.out_features, s.in_features, *s.kernel_size],
                    "poly_degree": s.params["poly_degree"],
                    "coeff_modulus_bits": s.params["coeff_modulus_bits"],
                    "plain_modulus": s.params["plain_modulus"],
                    "acc_bound": s.acc_bound,
                    "act_scale": s.act["scale"],
                }
                for s in program.steps
            ],
            "weight_bytes": int((folder / program.weights).stat().st_size),
            "build_s": round(time.perf_counter() - t0, 3),
        }
        if not check:
            return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check={"skipped": True}, info=info)
        if self.measure_costs:
            from graphpress.backends.he.costmodel import ensure_costs

            t0 = time.perf_counter()
            info["costs_measured"] = ensure_costs(program.steps)
            info["cost_calibration_s"] = round(time.perf_counter() - t0, 3)
        report, cost = self.check(graph, folder)
        (folder / COST_FILE).write_text(json.dumps(cost, indent=1) + "\n", encoding="utf-8")
        files.append(COST_FILE)
        info["cost"] = {k: cost[k] for k in ("batch", "total_measured_s", "total_predicted_s", "bytes_sent", "bytes_received")}
        return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check=report, info=info)

    def check(self, graph: Graph, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Encrypted runs of the written artifact vs the graph; returns ``(check report, cost report)``."""
        t0 = time.perf_counter()
        runner = HERunner(folder, verify=True)
        setup = runner.setup_seconds
        runs, worst, cost = [], None, None
        for label, inputs in check_sets(graph, self.check_seeds):
            run = runner.run(*inputs)  # raises naming the layer when a decrypted value is wrong
            if cost is None:
                cost = cost_report(runner.program, run, label=label)
            refs = graph.run(*inputs)
            tests = [torch.from_numpy(np.asarray(o)) for o in run.outputs]
            diffs = compare_outputs(refs, tests, graph.output_names)
            outs = []
            for d, r, t in zip(diffs, refs, tests):
                row = {**d.to_dict(), "top1_agreement": _agreement(r, t)}
                outs.append(row)
                if worst is None or d.max_abs > worst["max_abs"]:
                    worst = {"output": d.name, "inputs": label, "max_abs": d.max_abs, "sqnr_db": row["sqnr_db"], "top1_agreement": row["top1_agreement"]}
            runs.append({"inputs": label, "outputs": outs, "seconds": run.seconds})
        report = {
            "passed": True,
            "exact_integers": "every layer's decrypted integers equal the plaintext integer product (checked on every run)",
            "tolerance": "fixed-point: reported, not refused (max abs, SQNR, top-1 agreement vs the float graph)",
            "runs": runs,
            "worst": worst,
            "setup_s": round(setup, 3),
            "check_s": round(time.perf_counter() - t0, 3),
        }
        return report, cost or {}

    def runner(self, model_path: Path, **options: Any) -> Any:
        """An :class:`HERunner` (interactive) or :class:`PolynomialRunner` for a lowered folder."""
        return load_runner(Path(model_path), **options)

    # ------------------------------------------------------------------ secure
    def _lower_secure(self, graph: Graph, folder: Path, *, check: bool) -> LoweredModel:
        """Compile the two-party program; with ``check``, run it between two processes on the
        example inputs: the revealed integers must equal the fixed-point simulation."""
        from graphpress.backends.he.secure import launch
        from graphpress.backends.he.secure.compile import compile_secure
        from graphpress.backends.he.secure.program import SERVER_FILE, simulate
        from graphpress.backends.he.secure.program import PROGRAM_FILE as SECURE_FILE

        t0 = time.perf_counter()
        program, weights, client = build_program(graph, encoding=self.encoding, protocol="secure", quant=self.quant, poly_degree=self.poly_degree)
        sp, arrays = compile_secure(program, weights, client, stat_bits=self.stat_bits, poly_degree=self.poly_degree)
        folder.mkdir(parents=True, exist_ok=True)
        sp.save(folder)
        np.savez_compressed(folder / SERVER_FILE, **{k: v.astype(_int_dtype(v)) for k, v in arrays.items()})
        head = {
            "protocol": "secure",
            "program": SECURE_FILE,
            "server": SERVER_FILE,
            "encoding": self.encoding,
            "quant": program.quant,
            "stat_bits": self.stat_bits,
            "input_names": list(graph.input_names),
            "output_names": list(graph.output_names),
            "security": program.security,
        }
        (folder / PROGRAM_FILE).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")
        files = [PROGRAM_FILE, SECURE_FILE, SERVER_FILE]
        info: dict[str, Any] = {
            "protocol": "secure",
            "encoding": self.encoding,
            "security": program.security,
            "stat_bits": self.stat_bits,
            "layers": [
                {"name": s["name"], "kind": s["kind"], "b": s["b"], "poly_degree": s["params"]["poly_degree"],
                 "coeff_modulus_bits": s["params"]["coeff_modulus_bits"], "plain_modulus": s["params"]["plain_modulus"], "flood_bits": s["flood_bits"]}
                for s in sp.steps
            ],
            "ops": len(sp.ops),
            "build_s": round(time.perf_counter() - t0, 3),
        }
        if not check:
            return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check={"skipped": True}, info=info)
        t0 = time.perf_counter()
        label, inputs = check_sets(graph, ())[0]
        x = inputs[0].detach().double().numpy()
        run = launch.run(folder, x)
        for i in range(x.shape[0]):
            ref = simulate(sp, arrays, x[i])
            for name in sp.output_names:
                if not np.array_equal(run.output_ints[name][i], ref[f"{name}:int"]):
                    raise BackendError(f"he secure: output {name!r} of sample {i}: the two-party result differs from the fixed-point simulation")
        refs = graph.run(*inputs)
        tests = [torch.from_numpy(np.asarray(run.outputs[n])) for n in sp.output_names]
        diffs = compare_outputs(refs, tests, graph.output_names)
        outs = [{**d.to_dict(), "top1_agreement": _agreement(r, t)} for d, r, t in zip(diffs, refs, tests)]
        report = {
            "passed": True,
            "exact_integers": "the revealed output integers equal the numpy fixed-point simulation (two processes, every sample)",
            "tolerance": "fixed-point: reported, not refused (max abs, SQNR, top-1 agreement vs the float graph)",
            "runs": [{"inputs": label, "outputs": outs, "seconds": run.wall_s}],
            "secure": run.summary(),
            "check_s": round(time.perf_counter() - t0, 3),
        }
        info["secure_run"] = run.summary()
        record = {"inputs": label, "samples": int(x.shape[0]), "exact": True, **run.summary(),
                  "layers": [r for r in run.client["rows"] if r["kind"] == "he" and r.get("sample") == 0]}
        (folder / SECURE_RUN_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        files.append(SECURE_RUN_FILE)
        return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check=report, info=info)

    # ------------------------------------------------------------------ polynomial
    def _lower_polynomial(self, graph: Graph, folder: Path, *, check: bool) -> LoweredModel:
        poly = _polynomial_module()
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        prog = poly.compile_polynomial(graph)  # refuses a non-polynomial graph, naming the node
        params = poly.choose_params(prog, poly_degree=self.poly_degree)
        torch.export.save(graph.export_program(), str(folder / POLY_GRAPH_FILE))
        np.save(folder / POLY_EXAMPLE_FILE, graph.example_inputs[0].detach().cpu().numpy())
        program = {
            "version": 1,
            "protocol": "polynomial",
            "scheme": "CKKS",
            "graph": POLY_GRAPH_FILE,
            "example_input": POLY_EXAMPLE_FILE,
            "input_names": list(graph.input_names),
            "output_names": list(graph.output_names),
            "poly_degree": self.poly_degree,
            "params": params.to_dict(),
            "depth": prog.depth,
            "security": get_protocol("polynomial").to_dict(),
        }
        (folder / PROGRAM_FILE).write_text(json.dumps(program, indent=2) + "\n", encoding="utf-8")
        files = [PROGRAM_FILE, POLY_GRAPH_FILE, POLY_EXAMPLE_FILE]
        info = {"protocol": "polynomial", "params": params.to_dict(), "depth": prog.depth, "build_s": round(time.perf_counter() - t0, 3)}
        if not check:
            return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check={"skipped": True}, info=info)
        x = graph.example_inputs
        outs, rep = poly.run_polynomial(graph, x, poly_degree=self.poly_degree)
        outs = outs if isinstance(outs, list) else [outs]
        refs = graph.run(*x)
        diffs = compare_outputs(refs, [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in outs], graph.output_names)
        report = {
            "passed": True,
            "tolerance": "CKKS approximate arithmetic: reported, not refused",
            "runs": [{"inputs": "example inputs", "outputs": [d.to_dict() for d in diffs]}],
            "latency_s": rep.get("latency_s"),
            "ops_per_sample": rep.get("ops_per_sample"),
        }
        (folder / COST_FILE).write_text(json.dumps(rep, indent=1, default=str) + "\n", encoding="utf-8")
        files.append(COST_FILE)
        return LoweredModel(backend=self.name, model_file=PROGRAM_FILE, files=files, check=report, info=info)

    def __repr__(self) -> str:
        return f"HEBackend(encoding={self.encoding!r}, protocol={self.protocol!r}, quant={self.quant})"


def _polynomial_module() -> Any:
    try:
        from graphpress.backends.he import polynomial
    except ImportError as err:
        raise BackendError(f"he: polynomial mode needs graphpress.backends.he.polynomial ({err})") from err
    return polynomial


class PolynomialRunner:
    """Fully encrypted (CKKS) inference of a ``polynomial`` HE artifact: one ciphertext per sample;
    keys and encoded weights made once at load (:class:`graphpress.backends.he.polynomial.PolynomialSession`)."""

    def __init__(self, folder: Path, **_options: Any):
        folder = Path(folder)
        self.folder = folder
        self.program = json.loads((folder / PROGRAM_FILE).read_text(encoding="utf-8"))
        ep = torch.export.load(str(folder / self.program["graph"]))
        example = torch.from_numpy(np.load(folder / self.program["example_input"]))
        self.graph = Graph(ep.module(), (example,), input_names=self.program["input_names"], output_names=self.program["output_names"])
        self.input_names = list(self.program["input_names"])
        self.output_names = list(self.program["output_names"])
        self.session = _polynomial_module().PolynomialSession(self.graph, poly_degree=self.program.get("poly_degree"))
        self.last_report: dict[str, Any] = {}

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        outs, self.last_report = self.session.run(inputs, report=False)
        outs = outs if isinstance(outs, list) else [outs]
        return [np.asarray(o, dtype=np.float32) for o in outs]


class SecureRunner:
    """Two-party inference of a ``secure`` HE artifact: every call starts a client and a server
    process (:func:`graphpress.backends.he.secure.launch.run`); ``last_run`` keeps the costs."""

    def __init__(self, folder: Path, *, timeout: float = 300.0, **_options: Any):
        from graphpress.backends.he.secure import launch
        from graphpress.backends.he.secure.program import SecureProgram

        self.folder = Path(folder)
        head = json.loads((self.folder / PROGRAM_FILE).read_text(encoding="utf-8"))
        self.program = SecureProgram.load(self.folder)
        self.input_names = list(head.get("input_names", ["x"]))
        self.output_names = list(self.program.output_names)
        self.timeout = timeout
        self._launch = launch
        self.last_run: Any = None

    def __call__(self, *inputs: Any) -> list[np.ndarray]:
        if len(inputs) != 1:
            raise BackendError(f"he secure: the protocol takes one input tensor, got {len(inputs)}")
        x = inputs[0].detach().cpu().numpy() if isinstance(inputs[0], torch.Tensor) else np.asarray(inputs[0])
        self.last_run = self._launch.run(self.folder, x.astype(np.float64), timeout=self.timeout)
        return [np.asarray(self.last_run.outputs[n], dtype=np.float32) for n in self.output_names]


def load_runner(path: Path, **options: Any) -> Any:
    """The runner for an HE artifact folder (or its ``he_program.json``), by protocol."""
    folder = path.parent if path.is_file() else path
    try:
        protocol = json.loads((folder / PROGRAM_FILE).read_text(encoding="utf-8")).get("protocol")
    except (OSError, ValueError) as err:
        raise BackendError(f"{folder / PROGRAM_FILE}: cannot read the HE program ({err})") from err
    if protocol == "polynomial":
        return PolynomialRunner(folder, **options)
    if protocol == "secure":
        return SecureRunner(folder, **options)
    options.pop("providers", None)
    options.pop("threads", None)
    return HERunner(folder, **options)


__all__ = ["HEBackend", "PolynomialRunner", "SecureRunner", "cost_report", "load_runner", "write_program"]
