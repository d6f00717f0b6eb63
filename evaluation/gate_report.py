"""An HTML report of one gate decision, for people: why the candidate was promoted, held or rejected.

    render_gate_report(verdict, metrics, champion_metrics, rows, champion_rows, run_dir / "gate_report.html")

One self-contained file: figures are inline PNGs, no scripts, no external assets, every string from the data
HTML-escaped. Logged as an MLflow artifact, it opens in the MLflow UI. It holds the verdict and its reasons, the
aggregate metrics against the champion's, each compared metric's interval against its tolerance (a forest plot),
per-module scores, and a few answers side by side.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from evaluation.gates import DIRECTION, Comparison, GateVerdict

PLOTTED_MODULE_METRICS = ("rouge_l", "keyword_coverage")
"""Per-example metrics averaged per ERP module in the module figure."""
MAX_EXAMPLES = 5
"""Examples shown side by side."""
COLORS = {"promote": "#1a7f37", "hold": "#9a6700", "reject": "#cf222e",
          "better": "#1a7f37", "same": "#57606a", "worse": "#cf222e", "candidate": "#0969da", "champion": "#8c959f"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1f2328; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.badge { display: inline-block; padding: .2rem .7rem; border-radius: .3rem; color: #fff; font-weight: 600; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 22rem; }
li.fail, li.worse { color: #cf222e; } li.better { color: #1a7f37; }
img { max-width: 100%; }
"""


def render_gate_report(verdict: GateVerdict, candidate_metrics: dict, champion_metrics: dict | None,
                       candidate_rows: list[dict], champion_rows: list[dict] | None, path: Path,
                       title: str = "erpops gate report") -> Path:
    """Write the report to `path` (parents created) and return it."""
    body = "".join([
        f"<h1>{escape(title)}</h1>",
        headline_html(verdict),
        "<h2>Aggregate metrics</h2>", metrics_table(candidate_metrics, champion_metrics),
        "<h2>Candidate - champion, per metric</h2>", forest_html(verdict),
        "<h2>Per module</h2>", modules_html(candidate_rows, champion_rows),
        f"<h2>Examples (first {MAX_EXAMPLES})</h2>", examples_table(candidate_rows, champion_rows),
    ])
    html = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def headline_html(verdict: GateVerdict) -> str:
    """The verdict as a badge, the headline, then every check and comparison with its reason."""
    color = COLORS.get(verdict.verdict, "#57606a")
    items = [f'<li class="{"pass" if c.passed else "fail"}">{"&#10003;" if c.passed else "&#10007;"} '
             f"{escape(c.reason)}</li>" for c in verdict.checks]
    items += [f'<li class="{escape(c.outcome)}">{escape(c.reason)}</li>' for c in verdict.comparisons]
    return (f'<p><span class="badge" style="background:{color}">{escape(verdict.verdict.upper())}</span> '
            f"{escape(verdict.headline or verdict.verdict)}</p>"
            f"<p>Paired eval examples: {verdict.paired_examples}</p><ul>{''.join(items)}</ul>")


def metrics_table(candidate: dict, champion: dict | None) -> str:
    """Candidate vs champion aggregates, with the difference where both are numbers."""
    names = list(candidate) + [k for k in (champion or {}) if k not in candidate]
    head = "<tr><th>metric</th><th>candidate</th>"
    head += "<th>champion</th><th>difference</th></tr>" if champion is not None else "</tr>"
    rows = []
    for name in names:
        cells = [f"<td>{escape(str(name))}</td>", _num_cell(candidate.get(name))]
        if champion is not None:
            a, b = candidate.get(name), champion.get(name)
            diff = a - b if _is_number(a) and _is_number(b) else None
            cells += [_num_cell(b), _num_cell(diff, signed=True)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def forest_html(verdict: GateVerdict) -> str:
    if not verdict.comparisons:
        return f"<p>No comparison with a champion: {escape(verdict.headline or verdict.verdict)}</p>"
    return png_img(forest_plot(verdict.comparisons), "bootstrap interval of candidate - champion per metric")


def forest_plot(comparisons: list[Comparison]) -> Figure:
    """One row per metric: delta and its interval, oriented so that right is better, with the -tolerance mark."""
    fig = Figure(figsize=(8, 1.2 + 0.55 * len(comparisons)))
    ax = fig.subplots()
    labels = []
    for y, c in enumerate(comparisons):
        sign = -1 if DIRECTION.get(c.metric) == "lower" else 1
        low, high = sorted((sign * c.low, sign * c.high))
        color = COLORS.get(c.outcome, "#57606a")
        ax.plot([low, high], [y, y], color=color, lw=2.5)
        ax.plot(sign * c.delta, y, "o", color=color, ms=7)
        ax.plot([-c.tolerance] * 2, [y - 0.35, y + 0.35], color=COLORS["worse"], ls="--", lw=1.2)
        labels.append(f"{c.metric} (sign flipped: lower is better)" if sign < 0 else c.metric)
    ax.axvline(0, color="#1f2328", lw=0.8)
    ax.set_yticks(range(len(comparisons)), labels=labels)
    ax.set_ylim(len(comparisons) - 0.5, -0.5)
    ax.set_xlabel("candidate - champion (right is better): mean and bootstrap interval")
    ax.legend(handles=[Line2D([], [], color=COLORS["worse"], ls="--", label="-tolerance"),
                       *(Line2D([], [], color=COLORS[o], lw=2.5, label=o) for o in ("better", "same", "worse"))],
              loc="lower right", fontsize="small", ncols=4, bbox_to_anchor=(1, 1), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


def module_means(rows: list[dict], metric: str) -> dict[str, float]:
    """Mean of a per-example metric per ERP module (rows lacking the module or a finite value left out)."""
    from evaluation.breakdown import per_module

    return {m: s[metric] for m, s in per_module(rows, [metric]).items() if math.isfinite(s[metric])}


def modules_html(candidate_rows: list[dict], champion_rows: list[dict] | None) -> str:
    panels = [(m, module_means(candidate_rows, m), module_means(champion_rows or [], m)) for m in PLOTTED_MODULE_METRICS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return "<p>No per-module scores in the candidate's rows.</p>"
    return png_img(module_plot(panels), "mean score per ERP module")


def module_plot(panels: list[tuple[str, dict[str, float], dict[str, float]]]) -> Figure:
    """Grouped bars per module, one panel per metric: candidate, and champion where it has the module."""
    fig = Figure(figsize=(5.5 * len(panels), 3.8), layout="constrained")
    for ax, (metric, cand, champ) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        modules = list(cand)
        xs = range(len(modules))
        width = 0.4 if champ else 0.7
        ax.bar([x - width / 2 if champ else x for x in xs], [cand[m] for m in modules], width,
               color=COLORS["candidate"], label="candidate")
        if champ:
            ax.bar([x + width / 2 for x in xs], [champ.get(m, math.nan) for m in modules], width,
                   color=COLORS["champion"], label="champion")
        ax.set_xticks(list(xs), labels=modules, rotation=30, ha="right")
        ax.set_title(metric)
        ax.set_ylim(0, max(1.0, *cand.values(), *champ.values()))
        ax.legend(fontsize="small")
    return fig


def examples_table(candidate_rows: list[dict], champion_rows: list[dict] | None) -> str:
    """The first examples side by side: question, reference, candidate answer and the champion's on the same id."""
    champ = {r.get("id"): r for r in champion_rows or []}
    cols = ["id", "module", "question", "reference", "candidate answer"]
    if champion_rows is not None:
        cols.append("champion answer")
    cols.append("rouge_l")
    rows = []
    for r in candidate_rows[:MAX_EXAMPLES]:
        other = champ.get(r.get("id"), {})
        cells = [_text_cell(r.get(k)) for k in ("id", "module", "question", "reference", "answer")]
        if champion_rows is not None:
            cells.append(_text_cell(other.get("answer")))
        score = _fmt(r.get("rouge_l")) + (f" vs {_fmt(other.get('rouge_l'))}" if champion_rows is not None else "")
        cells.append(f'<td class="num">{escape(score)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>" if rows else "<p>No examples.</p>"


def png_img(fig: Figure, alt: str) -> str:
    """The figure as an inline base64 PNG <img> (Agg canvas, no display)."""
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: object, signed: bool = False) -> str:
    if not _is_number(value):
        return "-" if value is None else str(value)
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _num_cell(value: object, signed: bool = False) -> str:
    return f'<td class="num">{escape(_fmt(value, signed))}</td>'


def _text_cell(value: object) -> str:
    return f'<td class="text">{escape("" if value is None else str(value))}</td>'
