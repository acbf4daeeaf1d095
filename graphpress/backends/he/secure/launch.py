"""Start the two parties as processes, relay and count SPU's traffic, collect their records.

SPU 0.9.5 (the 2PC engine) pins ``numpy < 2`` and ``jax <= 0.4.34``, which the main
environment does not satisfy, so the parties run in their own virtual environment: the
interpreter named by ``$GRAPHPRESS_SPU_PYTHON``, else ``$GRAPHPRESS_CACHE/spu-venv`` (default
``~/.cache/graphpress/spu-venv``), created by :func:`setup_venv` (``compress secure-setup``).
The parties import graphpress from this checkout (a one-entry ``PYTHONPATH``) and never torch.

Bytes: each party counts its own channel (:mod:`.wire`); SPU's link between the parties goes
through two relays in this process (:class:`_Relay`), which count every byte each way and
the direction changes (rounds).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphpress.errors import BackendError

#: What the parties' environment needs (SPU and tenseal pinned together: both wheels for 3.11).
SPU_REQUIREMENTS = ("spu==0.9.5", "tenseal==0.3.16", "zstandard>=0.22")


def cache_dir() -> Path:
    return Path(os.environ.get("GRAPHPRESS_CACHE", Path.home() / ".cache" / "graphpress"))


def spu_python() -> Path | None:
    """The parties' interpreter, or None when it is not set up: ``$GRAPHPRESS_SPU_PYTHON``, else
    the venv in ``$GRAPHPRESS_CACHE``, else the one in the default cache (a cache redirected for
    cost tables, as tests do, still finds the parties' environment)."""
    env = os.environ.get("GRAPHPRESS_SPU_PYTHON")
    if env:
        return Path(env)
    for root in (cache_dir(), Path.home() / ".cache" / "graphpress"):
        p = root / "spu-venv" / "bin" / "python"
        if p.exists():
            return p
    return None


def require_spu_python() -> Path:
    p = spu_python()
    if p is None or not p.exists():
        raise BackendError(
            "he secure: the 2PC engine (SPU) is not set up: run 'compress secure-setup' once "
            "(a separate virtual environment with spu 0.9.5, which needs numpy<2), or set GRAPHPRESS_SPU_PYTHON"
        )
    return p


def setup_venv(folder: Path | None = None, python: str = sys.executable, quiet: bool = True) -> Path:
    """Create the parties' virtual environment (SPU, tenseal, zstandard); returns its python."""
    folder = Path(folder) if folder else cache_dir() / "spu-venv"
    exe = folder / "bin" / "python"
    if not exe.exists():
        subprocess.run([python, "-m", "venv", str(folder)], check=True)
    cmd = [str(exe), "-m", "pip", "install", *(["-q"] if quiet else []), *SPU_REQUIREMENTS]
    done = subprocess.run(cmd, capture_output=quiet, text=True)
    if done.returncode:
        tail = (done.stderr or "").strip().splitlines()[-1:] if quiet else []
        raise BackendError(f"he secure: installing {', '.join(SPU_REQUIREMENTS)} into {folder} failed {tail}")
    check = subprocess.run([str(exe), "-c", "import spu, tenseal.sealapi, zstandard, jax"], capture_output=True, text=True)
    if check.returncode:
        raise BackendError(f"he secure: {folder}: spu does not import ({check.stderr.strip().splitlines()[-1:]})")
    return exe


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class _Relay(threading.Thread):
    """Listen on ``port``, forward every connection to ``target``, count bytes both ways."""

    def __init__(self, port: int, target: int):
        super().__init__(daemon=True)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.target = target
        self.forward = self.backward = 0  # bytes toward target / back from it
        self.rounds = 0
        self._last = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                if key.data is None:
                    client, _ = self.listener.accept()
                    try:
                        upstream = socket.create_connection(("127.0.0.1", self.target), timeout=30)
                    except OSError:
                        client.close()
                        continue
                    for s in (client, upstream):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(client, selectors.EVENT_READ, (upstream, "f"))
                    sel.register(upstream, selectors.EVENT_READ, (client, "b"))
                    continue
                other, way = key.data
                try:
                    data = key.fileobj.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    for s in (key.fileobj, other):
                        try:
                            sel.unregister(s)
                        except (KeyError, ValueError):
                            pass
                        s.close()
                    continue
                other.sendall(data)
                with self._lock:
                    if way == "f":
                        self.forward += len(data)
                    else:
                        self.backward += len(data)
                    if way != self._last:
                        self.rounds += 1
                        self._last = way
        sel.close()

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()


@dataclass
class SecureRun:
    """Outputs and the measured costs of one secure inference run (both parties)."""

    outputs: dict[str, np.ndarray]
    output_ints: dict[str, np.ndarray]
    client: dict[str, Any]
    server: dict[str, Any]
    spu_bytes: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        c, s = self.client["channel"], self.server["channel"]
        return {
            "wall_s": self.wall_s,
            "client_cpu_s": self.client["cpu_s"],
            "server_cpu_s": self.server["cpu_s"],
            "he_bytes_client_to_server": c["bytes_sent"],
            "he_bytes_server_to_client": s["bytes_sent"],
            "spu_bytes_client_to_server": self.spu_bytes.get("client_to_server", 0),
            "spu_bytes_server_to_client": self.spu_bytes.get("server_to_client", 0),
            "messages": c["messages_sent"] + s["messages_sent"],
            "spu_rounds": self.spu_bytes.get("rounds", 0),
        }


def _shim() -> Path:
    """A folder holding only a link to this graphpress package (the parties' PYTHONPATH)."""
    import graphpress

    pkg = Path(graphpress.__file__).resolve().parent
    digest = hashlib.sha256(str(pkg).encode()).hexdigest()[:12]  # stable across processes (str hash is salted)
    shim = Path(tempfile.gettempdir()) / f"graphpress-shim-{os.getuid()}-{digest}"
    shim.mkdir(exist_ok=True)
    link = shim / "graphpress"
    if not link.exists():
        try:
            link.symlink_to(pkg, target_is_directory=True)
        except FileExistsError:
            pass
    return shim


def party_env() -> dict[str, str]:
    """The parties' environment: this graphpress alone on ``PYTHONPATH``, one OpenMP thread
    unless the caller set another count."""
    env = dict(os.environ, PYTHONPATH=str(_shim()), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("PYTHONHOME", None)
    return env


def _error_line(stderr: str, role: str, rc: int) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith("error: ")]
    if lines:
        return lines[-1][len("error: ") :]
    tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
    return f"he secure: the {role} process exited with status {rc} ({tail[0][:200]})"


def run(folder: str | Path, inputs: np.ndarray, *, timeout: float = 300.0, seed: int | None = None, python: str | Path | None = None) -> SecureRun:
    """Run the secure protocol on ``inputs`` (float, batch first) between two fresh processes.

    Parameters
    ----------
    folder : path
        Holds ``secure_program.json`` (both) and ``secure_server.npz`` (server).
    inputs : array
        The client's samples, ``(n, *input_shape)``.
    timeout : float
        Seconds either party waits for a message before giving up (and the whole run's bound
        is a multiple of it); a silent or dead peer is an error, never a hang.
    seed : int, optional
        Seed the server's randomness (tests; default: OS entropy).
    python : path, optional
        The parties' interpreter (default :func:`require_spu_python`).

    Returns
    -------
    SecureRun
    """
    exe = Path(python) if python else require_spu_python()
    folder = Path(folder)
    port, r0, r1, p0, p1 = _free_ports(5)
    relays = [_Relay(p1, r1), _Relay(p0, r0)]  # client -> server's SPU, server -> client's SPU
    for r in relays:
        r.start()
    env = party_env()
    with tempfile.TemporaryDirectory(prefix="graphpress-secure-run-") as tmp:
        xin = Path(tmp, "inputs.npy")
        np.save(xin, np.asarray(inputs, dtype=np.float64))
        outs = {role: Path(tmp, f"{role}.json") for role in ("client", "server")}
        common = ["-m", "graphpress.backends.he.secure.party", "--program", str(folder), "--port", str(port), "--timeout", str(timeout)]
        cmds = {
            "server": [str(exe), *common, "--role", "server", "--spu", f"127.0.0.1:{p0},127.0.0.1:{r1}", "--out", str(outs["server"])]
            + ([] if seed is None else ["--seed", str(seed)]),
            "client": [str(exe), *common, "--role", "client", "--spu", f"127.0.0.1:{r0},127.0.0.1:{p1}", "--inputs", str(xin), "--out", str(outs["client"])],
        }
        t0 = time.perf_counter()
        procs = {role: subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for role, cmd in cmds.items()}
        errs: dict[str, str] = {}
        readers = {role: threading.Thread(target=lambda r=role: errs.__setitem__(r, procs[r].stderr.read()), daemon=True) for role in procs}
        for t in readers.values():
            t.start()
        deadline = time.monotonic() + timeout * 20
        failed = None
        while any(p.poll() is None for p in procs.values()):
            for role, p in procs.items():
                if p.poll() not in (None, 0) and failed is None:
                    failed = role
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        for p in procs.values():
            if p.poll() is None:
                time.sleep(0.5 if failed else 0)
                p.kill()
        for role, p in procs.items():
            p.wait()
            readers[role].join(timeout=5)
        for r in relays:
            r.stop()
        for role in ("server", "client") if failed != "client" else ("client", "server"):
            if procs[role].returncode:
                raise BackendError(_error_line(errs.get(role, ""), role, procs[role].returncode))
        if time.monotonic() > deadline:
            raise BackendError(f"he secure: the parties did not finish within {timeout * 20:.0f} s")
        client = json.loads(outs["client"].read_text())
        server = json.loads(outs["server"].read_text())
    outputs = {k: np.asarray(v) for k, v in client.pop("outputs").items()}
    ints = {k: np.asarray(v, dtype=np.int64) for k, v in client.pop("output_ints").items()}
    spu = {
        "client_to_server": relays[0].forward + relays[1].backward,
        "server_to_client": relays[1].forward + relays[0].backward,
        "rounds": max(relays[0].rounds, relays[1].rounds),
    }
    return SecureRun(outputs, ints, client, server, spu, wall)


def calibrate_spu(*, python: str | Path | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Time SPU's op kinds between two party processes and cache the fitted per-element costs
    (:func:`graphpress.backends.he.secure.costmodel.fit_spu`); returns them."""
    from graphpress.backends.he.secure import costmodel

    exe = Path(python) if python else require_spu_python()
    r0, r1 = _free_ports(2)
    env = party_env()
    with tempfile.TemporaryDirectory(prefix="graphpress-spu-cal-") as tmp:
        outs = [Path(tmp, f"{r}.json") for r in (0, 1)]
        procs = [
            subprocess.Popen([str(exe), "-m", "graphpress.backends.he.secure.party", "--role", f"spu-calibrate-{r}",
                              "--spu", f"127.0.0.1:{r0},127.0.0.1:{r1}", "--out", str(outs[r]), "--timeout", str(timeout)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for r in (0, 1)
        ]
        errs = [p.communicate(timeout=timeout * 10)[1] for p in procs]
        for r, p in enumerate(procs):
            if p.returncode:
                raise BackendError(_error_line(errs[r], f"calibration party {r}", p.returncode))
        rows = json.loads(outs[0].read_text())["rows"]
    costs = costmodel.fit_spu(rows)
    costs["rows"] = rows
    costmodel.store_spu_costs(costs)
    return costs


__all__ = ["SPU_REQUIREMENTS", "calibrate_spu", "party_env", "SecureRun", "cache_dir", "require_spu_python", "run", "setup_venv", "spu_python"]
