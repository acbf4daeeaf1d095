"""The Pareto report of ``compress auto``: every measured candidate as quality vs latency and
quality vs size, the frontier marked, the chosen point highlighted.

:func:`plot_png` draws the two panels with matplotlib (the Agg backend: no screen needed);
:func:`page_html` writes a self-contained page (the PNG inlined, one table row per candidate,
frontier and chosen rows marked) that ``report.md`` links to; :func:`frontier_rows` gives the
frontier as rows for ``compress inspect``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

PNG = "pareto.png"
HTML = "pareto.html"
JSON = "auto.json"


def _drop_label(metric: str) -> str:
    return {"agreement": "top-1 disagreement with the float model (%)", "accuracy": "accuracy lost (points)",
            "kl": "KL to the float model (nats)", "sqnr": "-SQNR (dB)"}.get(metric, "drop")


def _drop_value(metric: str, q: Mapping[str, Any]) -> float:
    d = float(q.get("drop", 0.0))
    return 100 * d if metric in ("agreement", "accuracy") else d


def plot_png(report: Mapping[str, Any], path: Any) -> None:
    """Two panels (drop vs latency, drop vs file size); frontier joined, chosen starred, the
    budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metric = report["config"]["metric"]
    cands = report["candidates"]
    chosen = report["chosen"]
    colors = {"float": "black", "frontier": "tab:blue", "revert": "tab:orange", "peer": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lat_label = ("one encrypted inference (ms, median)" if report["config"]["objective"] == "he-latency"
                 else "batch-1 latency (ms, median)")
    for ax, key, xlabel in ((axes[0], "latency_ms", lat_label), (axes[1], "model_bytes", "model file (KB)")):
        pts = []
        for i, c in enumerate(cands):
            q = c["quality"]
            if "error" in q:
                continue
            x = c.get("latency_ms") if key == "latency_ms" else (q.get("model_bytes") or 0) / 1024
            if x is None:
                continue
            origin = c["origin"].split(":")[0]
            y = _drop_value(metric, q)
            pts.append((i, x, y))
            ax.scatter([x], [y], s=28, color=colors.get(origin, "tab:green"), alpha=0.8,
                       label=origin if origin not in ax.get_legend_handles_labels()[1] else None)
            if origin in ("uniform", "peer", "float"):
                ax.annotate(c["label"] if origin != "peer" else c["origin"].split(":", 1)[1], (x, y), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        # this panel's own frontier: the points no other beats on both axes
        fr = sorted((x, y) for i, x, y in pts if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for _j, x2, y2 in pts))
        if len(fr) > 1:
            ax.plot([p[0] for p in fr], [p[1] for p in fr], color="tab:blue", lw=1, alpha=0.6)
        for i, x, y in pts:
            if i == chosen:
                ax.scatter([x], [y], s=220, marker="*", color="gold", edgecolor="black", zorder=5, label="chosen")
        budget = float(report["config"]["max_drop"])
        line = 100 * budget if metric in ("agreement", "accuracy") else (-budget if metric == "sqnr" else budget)
        ax.axhline(line, ls="--", color="gray", lw=0.8)
        if metric != "sqnr" and line > 0:
            # linear up to the budget, logarithmic above: the candidates that matter sit near it,
            # the ones that broke the model (90% disagreement) stay on the plot without flattening them
            ax.set_yscale("symlog", linthresh=line)
            ax.set_ylim(bottom=-0.05 * line)
        if key == "latency_ms":
            ax.set_xscale("log")  # a peer 20x slower would squash every candidate into one column
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_drop_label(metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(f"compress auto: objective {report['config']['objective']}, --max-drop {report['config']['max_drop']:g} ({metric})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def page_html(report: Mapping[str, Any], png: bytes | None) -> str:
    """A self-contained HTML page: the plot and one row per candidate."""
    metric = report["config"]["metric"]
    front = set(report.get("pareto", []))
    rows = []
    for i, c in enumerate(report["candidates"]):
        q = c["quality"]
        mark = "chosen" if i == report["chosen"] else ("frontier" if i in front else "")
        drop = "error: " + html.escape(str(q["error"])) if "error" in q else f"{_drop_value(metric, q):.4g}"
        lat = f"{c['latency_ms']:.4f}" if c.get("latency_ms") is not None else "-"
        kb = f"{q.get('model_bytes', 0) / 1024:.1f}" if "model_bytes" in q else "-"
        rows.append(f"<tr class='{mark}'><td>{i}</td><td>{html.escape(c['origin'])}</td><td>{html.escape(c['label'])}</td>"
                    f"<td>{drop}</td><td>{lat}</td><td>{kb}</td><td>{'yes' if c['feasible'] else 'no'}</td><td>{mark}</td></tr>")
    img = f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' alt='Pareto plot'>" if png else "<p>(matplotlib not installed: no plot)</p>"
    cfg = report["config"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>compress auto: Pareto report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
tr.chosen{{background:#ffe680;font-weight:bold}}tr.frontier{{background:#e6f0ff}}</style></head><body>
<h1>compress auto: objective {html.escape(cfg['objective'])}, --max-drop {cfg['max_drop']:g} ({html.escape(metric)})</h1>
<p>Chosen: candidate {report['chosen']} ({html.escape(report['candidates'][report['chosen']]['label'])}), speed-up vs float {report.get('speedup')}.
Every candidate below was built, lowered and measured end to end; the frontier rows are those no other beats on both quality and cost.</p>
{img}
<table><tr><th>#</th><th>origin</th><th>choices</th><th>{html.escape(_drop_label(metric))}</th><th>latency ms</th><th>file KB</th><th>within budget</th><th></th></tr>
{''.join(rows)}
</table></body></html>
"""


def frontier_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The frontier candidates (and the chosen one), cheapest first, for a table."""
    metric = report["config"]["metric"]
    idx = sorted(set(report.get("pareto", [])) | {report["chosen"]},
                 key=lambda i: report["candidates"][i].get("latency_ms") or report["candidates"][i]["quality"].get("model_bytes") or 0)
    out = []
    for i in idx:
        c = report["candidates"][i]
        q = c["quality"]
        out.append({"#": i, "origin": c["origin"], "choices": c["label"], "drop": _drop_value(metric, q), "latency_ms": c.get("latency_ms"),
                    "file_kb": round(q.get("model_bytes", 0) / 1024, 1), "within budget": c["feasible"], "chosen": i == report["chosen"]})
    return out


__all__ = ["HTML", "JSON", "PNG", "frontier_rows", "page_html", "plot_png"]
