"""The two parties of the secure protocol, each its own process (``python -m ...party``).

Client (rank 0): owns the input and the BFV secret keys; learns the outputs. Server (rank 1):
owns ``secure_server.npz`` (weights, biases, multipliers); learns nothing. They share the public
``secure_program.json`` (checked by digest in the first message) and run its schedule
(:func:`~.program.plan_segments`) in lockstep, per sample:

* offline: the server prepares this sample's flooded encryptions of zero (input-independent)
  and says ``ready``; the client waits for it;
* ``input``: the client quantizes its sample; the shares are ``(X, 0)``;
* ``he``: the value is brought to shares modulo the step's ``t`` -- for a value shared over
  ``Z_2^64`` (an SPU output) the server draws ``r < 2^62`` and sends ``s_server - r``, the client
  adds its share: it holds ``X - r`` (statistically hiding ``X``, distance ``< 2^-50``), the
  server ``r``; then :mod:`.hestep` (one message each way);
* ``spu``: the segment on both parties' shares (:mod:`.nonlinear`, SPU's own link);
* ``output``: the server sends its share; the client adds and scales.

Each party writes a JSON record: wall and CPU seconds per layer and segment, bytes and messages
on this channel. Errors end the process with one ``error:`` line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphpress.backends.he.secure.program import PROGRAM_FILE, SecureProgram, load_server_arrays, plan_segments, quantize_input, split_share
from graphpress.backends.he.secure.wire import Channel, pack_array, pack_blobs, unpack_array, unpack_blobs
from graphpress.errors import BackendError

MIN_STAT_BITS = 40


def digest(folder: str | Path) -> bytes:
    return hashlib.sha256(Path(folder, PROGRAM_FILE).read_bytes()).digest()


def _contexts(program: SecureProgram) -> tuple[dict[str, Any], dict[int, str]]:
    from graphpress.backends.he.bfv import BFVContext, BFVParams

    groups: dict[str, Any] = {}
    of_step: dict[int, str] = {}
    for s in program.steps:
        key = json.dumps(s["params"], sort_keys=True)
        of_step[int(s["index"])] = key
        if key not in groups:
            params = BFVParams.from_dict(s["params"])
            params.check(s["name"])  # 128-bit table, SEAL limits: refuse a weakened program
            groups[key] = BFVContext(params, what=s["name"])
    return groups, of_step


class _Clock:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def start(self) -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def stop(self, t: tuple[float, float], **row: Any) -> None:
        row.update(wall_s=time.perf_counter() - t[0], cpu_s=time.process_time() - t[1])
        self.rows.append(row)


def run_client(folder: Path, x: np.ndarray, port: int, spu_addrs: list[str], timeout: float) -> dict[str, Any]:
    import tenseal.sealapi as seal

    from graphpress.backends.he import rawct
    from graphpress.backends.he.secure.hestep import ClientStep
    from graphpress.backends.he.secure.nonlinear import SPUParty

    t_all = (time.perf_counter(), time.process_time())
    program = SecureProgram.load(folder)
    x = np.asarray(x, dtype=np.float64)
    if tuple(x.shape[1:]) != tuple(program.input_shape):
        raise BackendError(f"he secure: input shape {list(x.shape[1:])} per sample, the program takes {program.input_shape}")
    schedule = plan_segments(program)
    ch = Channel.connect(port, timeout, "server")
    clock = _Clock()
    t = clock.start()
    ch.send("hello", digest(folder) + np.array([x.shape[0]], dtype="<u8").tobytes())
    groups, of_step = _contexts(program)
    keys = []
    path = os.path.join(next(iter(groups.values()))._dir, "pk")
    for ctx in groups.values():
        pk = seal.PublicKey()
        ctx._keygen.create_public_key(pk)
        keys.append(rawct.save_bytes(pk, path))
    ch.send("keys", pack_blobs(keys))
    steps = {i: ClientStep(program.step(i), groups[of_step[i]]) for i in of_step}
    spu = SPUParty(0, spu_addrs, program, [s for k, s in schedule if k == "spu"], timeout)
    clock.stop(t, kind="setup", spu_link_s=spu.link_s, spu_compile_s=spu.compile_s)
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in program.output_names}
    ints: dict[str, list[np.ndarray]] = {name: [] for name in program.output_names}
    for n in range(x.shape[0]):
        t = clock.start()
        ch.recv("ready")  # the server's offline phase for this sample is done
        clock.stop(t, kind="offline", sample=n)
        env: dict[str, tuple] = {}
        for kind, item in schedule:
            t = clock.start()
            if kind == "input":
                env[item["out"]] = ("clear", quantize_input(item, x[n]))
                continue
            if kind == "he":
                i = int(item["step"])
                st = steps[i]
                sent0, recv0 = ch.sent, ch.received
                a = _client_to_he(env[item["in"][0]], st.shape.t, ch, item["in"][0])
                enc = st.encrypt(a)
                ch.send("cts_in", pack_blobs(enc))
                resp = unpack_blobs(ch.recv("cts_out"), f"layer {st.shape.name!r} response")
                env[item["out"]] = ("he", i, st.decrypt(resp))
                clock.stop(t, kind="he", sample=n, step=i, name=st.shape.name, b=st.shape.b, bytes_up=ch.sent - sent0, bytes_down=ch.received - recv0,
                           cts_in=len(enc), responses=len(resp))
            elif kind == "spu":
                args = []
                for name, source in item.inputs:
                    if source.startswith("split:"):
                        args.extend(split_share(env[name][1], int(source[6:]), 0))
                    else:
                        args.append(_client_share(env, name, source, program))
                for name, value in zip(item.outputs, spu.run(item, args)):
                    env[name] = ("ring", value)
                clock.stop(t, kind="spu", sample=n, segment=item.index, ops=[o["op"] for o in item.ops])
            elif kind == "output":
                mine = env[item["in"][0]]
                other = unpack_array(ch.recv("reveal"), int(np.prod(program.shapes[item["in"][0]])), f"output {item['name']!r}")
                value = (mine[1].reshape(-1) + other).astype(np.int64).reshape(mine[1].shape)
                ints[item["name"]].append(value)
                outputs[item["name"]].append(value.astype(np.float64) * float(item["scale"]))
    ch.send("done", b"")
    spu.close()
    rec = {
        "role": "client",
        "wall_s": time.perf_counter() - t_all[0],
        "cpu_s": time.process_time() - t_all[1],
        "channel": ch.stats(),
        "rows": clock.rows,
    }
    ch.close()
    rec["outputs"] = {k: np.stack(v).tolist() for k, v in outputs.items()}
    rec["output_ints"] = {k: np.stack(v).tolist() for k, v in ints.items()}
    return rec


def _client_to_he(value: tuple, t: int, ch: Channel, name: str) -> np.ndarray:
    if value[0] == "clear":
        return value[1] % t
    if value[0] == "he":
        raise BackendError(f"he secure: value {name!r} feeds two encrypted layers without a nonlinearity between them")
    s0 = value[1]
    masked = unpack_array(ch.recv("share"), s0.size, f"share of {name!r}").reshape(s0.shape)
    return (s0 + masked).astype(np.int64) % t


def _client_share(env: dict[str, tuple], name: str, source: str, program: SecureProgram) -> np.ndarray:
    if source.startswith("const:"):
        return np.zeros(program.const_shapes[source[6:]], dtype=np.int64)
    value = env[name]
    return value[2] if value[0] == "he" else value[1]


def run_server(folder: Path, port: int, spu_addrs: list[str], timeout: float, seed: int | None) -> dict[str, Any]:
    import tenseal.sealapi as seal

    from graphpress.backends.he import rawct
    from graphpress.backends.he.secure.hestep import ServerStep, noise_bound_bits
    from graphpress.backends.he.secure.nonlinear import SPUParty

    t_all = (time.perf_counter(), time.process_time())
    program = SecureProgram.load(folder)
    arrays = load_server_arrays(folder)
    if program.stat_bits < MIN_STAT_BITS:
        raise BackendError(f"he secure: stat_bits {program.stat_bits} is below {MIN_STAT_BITS}: the flooding would not hide the weights; recompile")
    rng = np.random.default_rng(seed)  # None: fresh OS entropy for every run
    schedule = plan_segments(program)
    ch = Channel.listen(port, timeout, "client")
    clock = _Clock()
    t = clock.start()
    hello = ch.recv("hello")
    if len(hello) != 40 or hello[:32] != digest(folder):
        ch.send("error", b"the client runs a different secure program (digest mismatch)")
        raise BackendError("he secure: the client runs a different secure program (digest mismatch in 'hello')")
    samples = int(np.frombuffer(hello[32:], dtype="<u8")[0])
    groups, of_step = _contexts(program)
    keys = unpack_blobs(ch.recv("keys"), "public keys")
    if len(keys) != len(groups):
        raise BackendError(f"he secure: expected {len(groups)} public keys, got {len(keys)}")
    path = os.path.join(next(iter(groups.values()))._dir, "pk")
    for (key, ctx), blob in zip(groups.items(), keys):
        pk = rawct.load_bytes(seal.PublicKey(), ctx.context, blob, path, "public key")
        ctx._encryptor = seal.Encryptor(ctx.context, pk)  # the server encrypts zeros under the client's key
    steps = {}
    for i in of_step:
        shape = program.step(i)
        w = arrays[f"w{i}"]
        need = noise_bound_bits(w, shape, shape.t) + program.stat_bits
        if shape.flood_bits < need:
            raise BackendError(f"he secure: layer {shape.name!r}: flooding of {shape.flood_bits} bits is below the {need} its weights need; recompile")
        steps[i] = ServerStep(shape, groups[of_step[i]], w, arrays.get(f"bias{i}"), rng)
    spu = SPUParty(1, spu_addrs, program, [s for k, s in schedule if k == "spu"], timeout)
    clock.stop(t, kind="setup", spu_link_s=spu.link_s, spu_compile_s=spu.compile_s)
    for n in range(samples):
        t = clock.start()
        for st in steps.values():  # offline: flooded encryptions of zero for this sample's responses
            st.refill()
        ch.send("ready", b"")
        clock.stop(t, kind="offline", sample=n)
        env: dict[str, tuple] = {}
        for kind, item in schedule:
            t = clock.start()
            if kind == "input":
                env[item["out"]] = ("clear", np.zeros(program.shapes[item["out"]], dtype=np.int64))
                continue
            if kind == "he":
                i = int(item["step"])
                st = steps[i]
                value = env[item["in"][0]]
                if value[0] == "clear":
                    s = value[1]
                elif value[0] == "ring":
                    r = rng.integers(0, 1 << 62, size=value[1].shape, dtype=np.int64).astype(np.uint64)
                    ch.send("share", pack_array(value[1] - r))
                    s = (r % np.uint64(st.shape.t)).astype(np.int64)
                else:
                    raise BackendError(f"he secure: value {item['in'][0]!r} feeds two encrypted layers without a nonlinearity between them")
                blobs = unpack_blobs(ch.recv("cts_in"), f"layer {st.shape.name!r} input")
                resp, mask = st.respond(blobs, s)
                ch.send("cts_out", pack_blobs(resp))
                env[item["out"]] = ("he", i, mask)
                clock.stop(t, kind="he", sample=n, step=i, name=st.shape.name)
            elif kind == "spu":
                args = []
                for name, source in item.inputs:
                    if source.startswith("split:"):
                        args.extend(split_share(env[name][1], int(source[6:]), 1))
                    elif source.startswith("const:"):
                        args.append(arrays[source[6:]])
                    else:
                        v = env[name]
                        args.append(v[2] if v[0] == "he" else v[1])
                for name, value in zip(item.outputs, spu.run(item, args)):
                    env[name] = ("ring", value)
                clock.stop(t, kind="spu", sample=n, segment=item.index)
            elif kind == "output":
                ch.send("reveal", pack_array(env[item["in"][0]][1].reshape(-1)))
    ch.recv("done")
    spu.close()
    rec = {"role": "server", "wall_s": time.perf_counter() - t_all[0], "cpu_s": time.process_time() - t_all[1], "channel": ch.stats(), "rows": clock.rows}
    ch.close()
    return rec


def run_spu_calibration(rank: int, spu_addrs: list[str], timeout: float, sizes: tuple[int, ...] = (4096, 16384)) -> dict[str, Any]:
    """Both parties time each op kind of the cost model (:mod:`.costmodel`) on SPU at two sizes
    (random shares: the cost does not depend on the values); rows ``{"op", "n", "wall_s"}``."""
    from graphpress.backends.he.secure.nonlinear import SPUParty
    from graphpress.backends.he.secure.program import Segment

    step = {"index": 0, "name": "calibration", "kind": "linear", "b": 1, "out_features": 1, "in_features": 1, "kernel_size": [1, 1],
            "stride": [1, 1], "padding": [0, 0], "in_shape": [1], "out_shape": [1], "flood_bits": 0,
            "params": {"poly_degree": 4096, "coeff_modulus_bits": [60], "plain_modulus": (1 << 24) + 43}}
    segments, shapes, consts, cases = [], {}, {}, []
    for n in sizes:
        c = max(1, n // 256)
        sh = {"unwrap": [n], "relu": [n], "mul": [n], "shift": [n], "clamp": [n], "maxpool": [c, 16, 16]}
        for op, shape in sh.items():
            i = len(segments)
            x, y = f"x{i}", f"y{i}"
            shapes[x] = shape
            if op == "unwrap":
                seg_ops, inputs = [{"op": "reshape", "in": [x], "out": y, "shape": shape}], [(x, "he:0")]
            elif op == "mul":
                consts[f"k{i}"] = shape
                seg_ops, inputs = [{"op": "mul", "in": [x], "out": y, "const": f"k{i}"}], [(x, "ring"), (f"const:k{i}", f"const:k{i}")]
            elif op == "shift":
                seg_ops, inputs = [{"op": "shift", "in": [x], "out": y, "bits": 16}], [(x, "split:16")]
            elif op == "clamp":
                seg_ops, inputs = [{"op": "clamp", "in": [x], "out": y, "lo": None, "hi": 255}], [(x, "ring")]
            elif op == "maxpool":
                seg_ops, inputs = [{"op": "maxpool", "in": [x], "out": y, "k": [2, 2]}], [(x, "ring")]
            else:
                seg_ops, inputs = [{"op": "relu", "in": [x], "out": y}], [(x, "ring")]
            shapes[y] = [shape[0], shape[1] // 2, shape[2] // 2] if op == "maxpool" else shape
            segments.append(Segment(i, seg_ops, inputs, [y]))
            cases.append((op, int(np.prod(shape))))
    program = SecureProgram([step], [], shapes, [1], [], 40, consts)
    spu = SPUParty(rank, spu_addrs, program, segments, timeout)
    rng = np.random.default_rng(rank)
    rows = []
    first = None
    for seg, (op, n) in zip(segments, cases):
        args = []
        for name, source in seg.inputs:
            shape = program.const_shapes[source[6:]] if source.startswith("const:") else shapes[name]
            value = rng.integers(0, 1 << 62, size=shape, dtype=np.int64).astype(np.uint64)
            args.extend(split_share(value, 16, rank) if source.startswith("split:") else [value])
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            spu.run(seg, args)
            times.append(time.perf_counter() - t0)
        if first is None:  # the first call of a session also sets up SPU's OT (once per run)
            first = {"op": "_first_call", "n": 0, "wall_s": max(times[0] - times[1], 0.0)}
        rows.append({"op": op, "n": n, "wall_s": min(times)})
    rows.append(first)
    spu.close()
    return {"role": f"spu-calibrate-{rank}", "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="graphpress.backends.he.secure.party")
    ap.add_argument("--role", choices=("client", "server", "spu-calibrate-0", "spu-calibrate-1"), required=True)
    ap.add_argument("--program", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--spu", required=True, help="client and server SPU link addresses as this party sees them, comma separated")
    ap.add_argument("--inputs", help="client: .npy of float inputs (batch first)")
    ap.add_argument("--out", required=True, help="JSON record written here")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=None, help="server: seed its randomness (tests only)")
    a = ap.parse_args(argv)
    try:
        folder = Path(a.program)
        addrs = a.spu.split(",")
        if a.role.startswith("spu-calibrate-"):
            rec = run_spu_calibration(int(a.role[-1]), addrs, a.timeout)
        elif a.role == "client":
            rec = run_client(folder, np.load(a.inputs), a.port, addrs, a.timeout)
        else:
            rec = run_server(folder, a.port, addrs, a.timeout, a.seed)
        tmp = a.out + ".tmp"
        Path(tmp).write_text(json.dumps(rec))
        os.replace(tmp, a.out)
    except BackendError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
