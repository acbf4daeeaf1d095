"""Rich rendering for the CLI: progress for pipelines, tables for reports."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def latency_table(manifest: dict[str, Any]) -> Table | None:
    """Latency per runtime, interleaved medians, with speed-up against the first row."""
    m = manifest["metrics"]
    lat = m.get("latency_ms") or {}
    if not lat:
        return None
    t = Table(title=f"latency, batch {m.get('latency_batch', 1)} (medians of interleaved runs)", title_justify="left")
    t.add_column("runtime")
    t.add_column("median ms", justify="right")
    t.add_column("speed-up", justify="right")
    first = next(iter(lat.values()))
    for runtime, ms in lat.items():
        t.add_row(runtime, f"{ms:.3f}", f"{first / ms:.2f}x")
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
