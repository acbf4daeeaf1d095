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
