"""Drift of live traffic against the training data, per release: pure statistics and an HTML report.

    erpops drift --env staging --since 7d       # serving/traffic.py reads the traces; this module judges them

Four views of a question stream: its length (characters), its language mix, the best retrieval score of each
question, and the share of questions that found no knowledge-base chunk above the threshold (unanswered). The
reference is the training data's questions, put through the same retriever on the same release's collection. Length
and score are compared with the population stability index (PSI, bins at the reference's deciles; 0.1 is a shift,
0.25 a large one, by the usual rule of thumb), the language mix with the total variation distance, and the
unanswered share by its difference. A figure beyond its threshold marks the release as drifted, with the reason.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path

from matplotlib.figure import Figure

from evaluation.gate_report import CSS, png_img


@dataclass
class Sample:
    """One question stream: per question, its length, language, best retrieval score (None: no collection hit at
    all) and whether it went unanswered (no chunk above the threshold)."""

    lengths: list[int] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    top_scores: list[float | None] = field(default_factory=list)
    unanswered: list[bool] = field(default_factory=list)

    def add(self, question: str, language: str | None, top_score: float | None, answered: bool) -> None:
        self.lengths.append(len(question))
        self.languages.append(language or "other")
        self.top_scores.append(top_score)
        self.unanswered.append(not answered)

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass(frozen=True)
class DriftThresholds:
    psi: float = 0.25
    """PSI of question length or of the best retrieval score beyond which the traffic has drifted."""
    language_tvd: float = 0.2
    """Total variation distance of the language mix beyond which it has drifted."""
    unanswered_delta: float = 0.2
    """Rise of the unanswered share over the training questions' beyond which it has drifted."""
    min_questions: int = 30
    """Fewest live questions for a verdict (fewer: not judged)."""


@dataclass
class DriftReport:
    questions: int
    reference_questions: int
    metrics: dict[str, float]
    drifted: list[str]
    """Why the release has drifted (empty: it has not, or too few questions to say)."""
    judged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10) -> float:
    """Population stability index of `current` against `reference`, bins at the reference's quantiles (ties
    merged), each share floored at 1e-4 so an empty bin does not divide by zero. 0 for identical distributions."""
    ref = sorted(reference)
    if not ref or not current:
        return float("nan")
    edges = sorted({ref[min(len(ref) - 1, int(len(ref) * q / bins))] for q in range(1, bins)})

    def shares(values: Sequence[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[sum(1 for e in edges if v >= e)] += 1
        return [max(c / len(values), 1e-4) for c in counts]

    r, c = shares(ref), shares(current)
    return float(sum((ci - ri) * math.log(ci / ri) for ri, ci in zip(r, c)))


def language_tvd(reference: Sequence[str], current: Sequence[str]) -> float:
    """Half the L1 distance of the two language mixes (0: the same mix, 1: disjoint)."""
    if not reference or not current:
        return float("nan")
    r, c = Counter(reference), Counter(current)
    return 0.5 * sum(abs(r[k] / len(reference) - c[k] / len(current)) for k in set(r) | set(c))


def compare(reference: Sample, current: Sample, thresholds: DriftThresholds = DriftThresholds()) -> DriftReport:
    """The four figures and the verdict. Pure."""
    scores = lambda s: [x for x in s.top_scores if x is not None]  # noqa: E731
    rate = lambda s: sum(s.unanswered) / len(s) if len(s) else float("nan")  # noqa: E731
    metrics = {"psi_length": psi(reference.lengths, current.lengths),
               "psi_top_score": psi(scores(reference), scores(current)),
               "language_tvd": language_tvd(reference.languages, current.languages),
               "unanswered_rate": rate(current), "reference_unanswered_rate": rate(reference)}
    metrics["unanswered_delta"] = metrics["unanswered_rate"] - metrics["reference_unanswered_rate"]
    judged = len(current) >= thresholds.min_questions
    drifted = []
    if judged:
        for name, bound, what in (("psi_length", thresholds.psi, "question length"),
                                  ("psi_top_score", thresholds.psi, "best retrieval score"),
                                  ("language_tvd", thresholds.language_tvd, "language mix"),
                                  ("unanswered_delta", thresholds.unanswered_delta, "unanswered share")):
            value = metrics[name]
            if value == value and value > bound:
                drifted.append(f"{what}: {name} {value:.3f} > {bound}")
    return DriftReport(len(current), len(reference), {k: round(v, 4) for k, v in metrics.items()}, drifted, judged)


def _histograms(reference: Sample, current: Sample) -> Figure:
    fig = Figure(figsize=(11, 3.2))
    panels = [("question length (chars)", reference.lengths, current.lengths),
              ("best retrieval score", [x for x in reference.top_scores if x is not None],
               [x for x in current.top_scores if x is not None])]
    for i, (title, ref, cur) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        if ref or cur:
            ax.hist([ref, cur], bins=20, density=True, label=["training", "live"], color=["#8c959f", "#0969da"])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    langs = sorted(set(reference.languages) | set(current.languages))
    for j, (name, s, color) in enumerate((("training", reference, "#8c959f"), ("live", current, "#0969da"))):
        n = max(1, len(s))
        ax.bar([k + j * 0.4 for k in range(len(langs))], [s.languages.count(x) / n for x in langs], 0.4,
               label=name, color=color)
    ax.set_xticks([k + 0.2 for k in range(len(langs))], langs)
    ax.set_title("language mix", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def render_drift_html(report: DriftReport, reference: Sample, current: Sample, path: Path, title: str) -> Path:
    """One self-contained HTML file (inline PNG, no scripts), for the MLflow UI's artifact view."""
    verdict = ("drifted: " + "; ".join(report.drifted)) if report.drifted else \
        "no drift beyond the thresholds" if report.judged else f"too few questions to judge ({report.questions})"
    rows = "".join(f"<tr><td>{escape(k)}</td><td class='num'>{v:.4f}</td></tr>" for k, v in report.metrics.items())
    html = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{escape(title)}</h1><p><b>{escape(verdict)}</b></p>"
            f"<p>{report.questions} live questions against {report.reference_questions} training questions.</p>"
            f"<table><tr><th>figure</th><th>value</th></tr>{rows}</table>"
            f"<h2>Distributions</h2>{png_img(_histograms(reference, current), 'training vs live')}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
