"""Rich rendering for the CLI: progress for pipelines, tables for reports."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# Pipes and CI logs get 80 columns from rich by default, which folds every table cell.
console = Console(width=None if Console().is_terminal else 140)
err_console = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 200)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def fmt_db(x: Any) -> str:
    if isinstance(x, str):
        return x
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def progress() -> Progress:
    """A progress bar with a spinner, used for pipelines and other long work."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        # In logs and pipes a spinner is noise, and it would precede a one-line error.
        disable=not console.is_terminal,
    )


# The stderr a command started with. The CLI swallows what libraries print on sys.stderr while a
# command runs (torch.export dumps partial graphs there); plain progress lines still reach the user.
_STDERR: dict[str, IO[str] | None] = {"stream": None}


def set_user_stderr(stream: IO[str] | None) -> None:
    """Where plain progress lines go while ``sys.stderr`` is redirected (None: ``sys.stderr``)."""
    _STDERR["stream"] = stream


def fmt_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$GRAPHPRESS_PROGRESS_INTERVAL``, else 20 s."""
    raw = os.environ.get("GRAPHPRESS_PROGRESS_INTERVAL", "")
    try:
        value = float(raw) if raw.strip() else 20.0
    except ValueError:
        value = 20.0
    return value if value > 0 else 20.0


class _Counter:
    """``done/total`` of one level (stage steps, or layers inside a pass) and when it started."""

    def __init__(self, done: int, total: int | None, what: str):
        self.done, self.total, self.what = done, total, what
        self.start = time.perf_counter()

    def text(self, unit: str = "") -> str:
        """``layer 3/12 conv1`` with a unit, ``epoch 3/10`` (``what`` first) without."""
        count = f"{self.done}/{self.total}" if self.total else (str(self.done) if self.done else "")
        if unit:
            return " ".join(x for x in (unit + count if count else unit.strip(), self.what) if x)
        return " ".join(x for x in (self.what, count) if x)

    def eta(self) -> float | None:
        if not self.total or self.done <= 0 or self.done >= self.total:
            return None
        return (time.perf_counter() - self.start) / self.done * (self.total - self.done)


def _advance(counter: "_Counter | None", done: int, total: int, what: str) -> "_Counter":
    """The counter after a report: a new one when the count restarts or its total changes."""
    if counter is None or done < counter.done or counter.total != total:
        return _Counter(done, total, what)
    counter.done, counter.what = done, what
    return counter


class StageProgress:
    """Progress of a long command: a rich bar on a terminal, plain lines in logs and pipes.

    Three levels: a *stage* (``capture``, ``passes``, ``fine-tune``, ``bench``...), a step
    inside it (``pass 2/4 quantize-layerwise``, ``epoch 3/10``) and an inner count (``layer
    7/20 conv3`` inside a pass). On a terminal each stage is one rich bar. Otherwise (stdout
    is a file or a pipe) a background thread prints one plain line to stderr every
    ``interval`` seconds (:func:`progress_interval`, 20 s by default): stage, counts, elapsed
    time and ETA, so a 15-minute run in a CI log is never silent for more than that.

    Parameters
    ----------
    terminal : bool, optional
        Force the mode (default: whether :data:`console` is a terminal).
    interval : float, optional
        Seconds between plain lines (default :func:`progress_interval`).
    stream : text stream, optional
        Where plain lines go (default: the command's stderr).
    """

    def __init__(self, *, terminal: bool | None = None, interval: float | None = None, stream: IO[str] | None = None):
        self.terminal = console.is_terminal if terminal is None else terminal
        self.interval = interval or progress_interval()
        self._stream = stream
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Progress | None = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._stage = ""
        self._stage_t0 = self._t0
        self._step: _Counter | None = None
        self._inner: _Counter | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "StageProgress":
        if self.terminal:
            self._bar = progress()
            self._bar.__enter__()
        else:
            self._thread = threading.Thread(target=self._tick, name="graphpress-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            if self._task is not None and exc[0] is None:
                task = self._bar.tasks[-1]
                self._bar.update(self._task, total=task.total or 1, completed=task.total or 1)
            self._bar.__exit__(*exc)

    # ------------------------------------------------------------------ updates
    def stage(self, name: str, total: int | None = None) -> None:
        """Start stage ``name`` (the previous one is done); ``total`` steps when known."""
        with self._lock:
            self._stage, self._stage_t0 = name, time.perf_counter()
            self._step = _Counter(0, total, "") if total else None
            self._inner = None
        if self._bar is not None:
            if self._task is not None:
                done = self._bar.tasks[-1].total or 1
                self._bar.update(self._task, total=done, completed=done)
            self._task = self._bar.add_task(name, total=total)

    def step(self, done: int, total: int | None = None, what: str = "") -> None:
        """Step ``done`` of ``total`` in the current stage (e.g. ``pass 2/4``, ``epoch 3/10``)."""
        with self._lock:
            if self._step is None or (total and self._step.total != total) or done < self._step.done:
                self._step = _Counter(done, total, what)
            else:
                self._step.done, self._step.what = done, what
            self._inner = None
        self._refresh()

    def inner(self, done: int, total: int, what: str = "") -> None:
        """A count inside the current step (``layer 7/20 conv3`` inside a pass); without a step
        (``verify``, ``bench``), the stage's own count."""
        with self._lock:
            if self._step is None or not self._step.total:
                self._step = _advance(self._step, done, total, what)
            else:
                self._inner = _advance(self._inner, done, total, what)
        self._refresh()

    # ------------------------------------------------------------------ rendering
    def line(self) -> str:
        """The current state in one plain line: stage, counts, elapsed, ETA."""
        with self._lock:
            now = time.perf_counter()
            parts = [self._stage or "working"]
            if self._step is not None:
                parts.append(self._step.text())
            if self._inner is not None:
                parts.append(self._inner.text("layer "))
            eta = (self._inner or self._step).eta() if (self._inner or self._step) else None
            timing = f"elapsed {fmt_seconds(now - self._stage_t0)}"
            timing += f", ETA {fmt_seconds(eta)}" if eta is not None else ""
            return f"[{fmt_seconds(now - self._t0)}] " + ": ".join(p for p in parts if p) + f" ({timing})"

    def _refresh(self) -> None:
        if self._bar is None or self._task is None:
            return
        with self._lock:
            step, inner = self._step, self._inner
            desc = ": ".join(x for x in (self._stage, step.what if step else "", inner.text("layer ") if inner else "") if x)
        self._bar.update(self._task, description=desc, total=step.total if step else None, completed=step.done if step else 0)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            stream = self._stream or _STDERR["stream"] or sys.stderr
            try:
                stream.write(f"progress {self.line()}\n")
                stream.flush()
            except (OSError, ValueError):  # a closed pipe must not kill the command
                return


def passes_table(steps: list[dict[str, Any]]) -> Table:
    t = Table(title="Passes", title_justify="left")
    for col in ("pass", "kind", "changed", "time", "params", "step max err", "step SQNR dB", "stats"):
        t.add_column(col, overflow="fold")
    for s in steps:
        worst = max(s["step"], key=lambda d: d["max_abs"], default={"max_abs": 0.0, "sqnr_db": "inf"})
        stats = ", ".join(f"{k}={v}" for k, v in s["stats"].items() if v not in ({}, 0, None))
        t.add_row(
            s["name"],
            "exact" if s["exact"] else "lossy",
            "yes" if s["changed"] else "no",
            f"{s['time_s']:.2f}s",
            f"{s['params_before']:,} -> {s['params_after']:,}",
            f"{worst['max_abs']:.2e}",
            fmt_db(worst["sqnr_db"]),
            stats or "-",
        )
    return t


def result_table(manifest: dict[str, Any]) -> Table:
    """Before/after: params, sizes, error per output against the original model."""
    m = manifest["metrics"]
    name = manifest.get("source", {}).get("name", "model")
    t = Table(title=f"{name} -> {manifest['backend']} artifact", title_justify="left")
    t.add_column("metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("parameters", f"{m['params_before']:,}", f"{m['params_after']:,}")
    t.add_row("parameter bytes", fmt_bytes(m["param_bytes_before"]), fmt_bytes(m["param_bytes_after"]))
    t.add_row("model file", "", fmt_bytes(m["model_file_bytes"]))
    for d in m.get("vs_original", []):
        t.add_row(f"output '{d['name']}' vs original", "", f"max abs {d['max_abs']:.2e}, SQNR {fmt_db(d['sqnr_db'])} dB")
    return t


def latency_table(manifest: dict[str, Any]) -> Table | Text | None:
    """Latency per runtime: interleaved medians, p10-p90 spread, speed-up against the first row.

    A speed-up is replaced by ``-`` and the caption says why when it cannot be trusted: the
    machine was busy, or a figure's p90/p10 spread is wide
    (:func:`graphpress.runtime.bench.latency_warnings`).
    """
    from graphpress.api import latency_warnings

    m = manifest["metrics"]
    lat = m.get("latency_ms") or {}
    if not lat:
        if m.get("latency_error"):  # the artifact was written; only the figures are missing
            return Text(f"latency not measured: {m['latency_error']}", style="yellow")
        return None
    reasons, withheld = latency_warnings(m)
    spread = m.get("latency_spread_ms") or {}
    threads = f", {m['latency_threads']} threads" if m.get("latency_threads") else ""
    caption = None
    if reasons:
        caption = "[yellow]warning:[/yellow] speed-ups withheld: " + "; ".join(reasons) + ". Rerun 'compress bench' on a quiet machine."
    t = Table(
        title=f"latency, batch {m.get('latency_batch', 1)}{threads} (medians of interleaved runs)",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    t.add_column("runtime")
    t.add_column("median ms", justify="right")
    t.add_column("p10-p90 ms", justify="right")
    t.add_column("speed-up", justify="right")
    first = next(iter(lat.values()))
    for runtime, ms in lat.items():
        sp = f"{spread[runtime][0]:.3f}-{spread[runtime][1]:.3f}" if runtime in spread else "-"
        t.add_row(runtime, f"{ms:.3f}", sp, "-" if runtime in withheld else f"{first / ms:.2f}x")
    return t


def frontier_table(record: dict[str, Any]) -> Table:
    """``compress auto``'s Pareto frontier (and the chosen candidate), cheapest first."""
    from graphpress.api import auto_frontier as frontier_rows

    cfg = record["config"]
    unit = {"agreement": "disagree %", "accuracy": "acc lost pts", "kl": "KL", "sqnr": "-SQNR dB"}.get(cfg["metric"], "drop")
    t = Table(title=f"Pareto frontier (objective {cfg['objective']}, --max-drop {cfg['max_drop']:g} {cfg['metric']})", title_justify="left")
    for col in ("#", "origin", "choices", unit, "latency ms", "file KB", "in budget"):
        t.add_column(col, overflow="fold")
    for r in frontier_rows(record):
        style = "bold yellow" if r["chosen"] else None
        t.add_row(str(r["#"]), r["origin"], r["choices"], f"{r['drop']:.4g}", ("-" if r["latency_ms"] is None else f"{r['latency_ms']:.4f}"), f"{r['file_kb']:.1f}",
                  "yes" if r["within budget"] else "no", style=style)
    return t


def summary_table(summary, limit: int = 60) -> Table:
    t = Table(title=str(summary).splitlines()[0], title_justify="left")
    for col in ("node", "op", "module", "shape", "params", "FLOPs"):
        t.add_column(col, justify="right" if col in ("params", "FLOPs") else "left")
    rows = [r for r in summary.rows if r.params or r.flops]
    for r in rows[:limit]:
        t.add_row(r.name, r.op, r.module or "-", str(list(r.shape)), f"{r.params:,}", f"{r.flops:,}")
    if len(rows) > limit:
        t.add_row(f"... {len(rows) - limit} more", "", "", "", "", "")
    return t


def _ms(x: Any) -> str:
    return "-" if x is None else f"{1e3 * x:.2f}"


def he_layers_table(cost: dict[str, Any], title: str) -> Table:
    """Per encrypted layer: predicted (counts x cached per-op costs) vs measured time, op counts."""
    t = Table(title=title, title_justify="left")
    cols = ("layer", "shape", "b", "encoding", "N", "rows", "pred ms", "meas ms", "pred/meas", "mults", "adds", "rots", "cts sent/recv", "KB sent/recv")
    for col in cols:
        t.add_column(col, justify="left" if col in ("layer", "shape", "encoding") else "right")

    def ratio_str(r: Any) -> str:
        return "-" if r is None else (f"{r:.2f}" if 0.7 <= r <= 1.3 else f"[yellow]{r:.2f}[/yellow]")

    def io(c: dict[str, Any]) -> tuple[str, str]:
        return (
            f"{c.get('ciphertexts_sent', 0)}/{c.get('ciphertexts_received', 0)}",
            f"{c.get('bytes_sent', 0) / 1024:.0f}/{c.get('bytes_received', 0) / 1024:.0f}",
        )

    for r in cost["layers"]:
        c = r["counts"]
        t.add_row(
            r["name"], r["shape"], str(r["b"]), r["encoding"], str(r["poly_degree"]), str(r["rows"]),
            _ms(r.get("predicted_s")), _ms(r["measured_s"]), ratio_str(r.get("ratio")),
            str(c.get("plain_mults", 0)), str(c.get("ct_adds", 0)), str(c.get("rotations", 0)), *io(c),
        )
    pred, meas = cost.get("total_predicted_s"), cost.get("total_measured_s", 0.0)
    tot = {k: sum(r["counts"].get(k, 0) for r in cost["layers"]) for k in ("plain_mults", "ct_adds", "rotations", "ciphertexts_sent", "ciphertexts_received", "bytes_sent", "bytes_received")}
    t.add_row(
        "total", "", "", "", "", "", _ms(pred), _ms(meas), ratio_str(pred / meas if pred and meas else None),
        str(tot["plain_mults"]), str(tot["ct_adds"]), str(tot["rotations"]), *io(tot),
    )
    return t


def secure_costs_table(entries: dict[str, dict[str, float]], title: str) -> Table:
    """The secure protocol's per-operation costs (microseconds) per parameter set."""
    t = Table(title=title, title_justify="left", caption="read: per coefficient read one by one; read-all: one whole response", caption_justify="left")
    for col in ("parameters", "input", "product", "response", "read", "read-all", "input KB"):
        t.add_column(col, justify="left" if col == "parameters" else "right", no_wrap=True)
    for key, e in sorted(entries.items()):
        t.add_row(key, f"{1e6 * e['input']:.0f}", f"{1e6 * e['product']:.0f}", f"{1e6 * e['output']:.0f}", f"{1e6 * e['read']:.2f}",
                  f"{1e6 * e['read_bulk']:.0f}", f"{e['input_bytes'] / 1024:.0f}")
    return t


def he_costs_table(entries: dict[str, dict[str, Any]], title: str) -> Table:
    """Cached per-operation HE costs (microseconds) per parameter set."""
    ops = ("upload_coeffs", "upload_slots", "download", "download_slots", "decode_coeff", "ntt", "intt", "mul_plain", "add", "add_plain", "rotate")
    short = ("upload", "upload-s", "download", "download-s", "read/val", "ntt", "intt", "mul", "add", "add-pt", "rotate")
    t = Table(title=title, title_justify="left", caption="-s: batched slots; read/val: per decrypted coefficient read", caption_justify="left")
    for col in ("N", "primes (bits)", "t bits", *short):
        t.add_column(col, justify="left" if col == "primes (bits)" else "right", no_wrap=True)
    for e in sorted(entries.values(), key=lambda e: (e["poly_degree"], len(e["coeff_modulus_bits"]), e["coeff_modulus_bits"])):
        s = e["seconds"]
        t.add_row(
            str(e["poly_degree"]),
            "-".join(map(str, e["coeff_modulus_bits"])),
            str(int(e["plain_modulus"]).bit_length()),
            *("-" if op not in s else f"{1e6 * s[op]:.3g}" if op == "decode_coeff" else f"{1e6 * s[op]:.0f}" for op in ops),
        )
    return t
