"""Answer scores shared by the gate (evaluation/evaluate.py) and the service's batch-test and compare: the local
`evaluate` modules in evaluation/metrics/ (hub loading fails offline), per example and on average.

    from evaluation.answer_scores import score_answers
    means, per_example = score_answers(answers, references, questions)
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metrics"

ANSWER_METRICS = ("rouge_l", "exact_match", "keyword_coverage", "language_agreement")
"""Metrics that need only the answer text (and the reference / question): no model likelihoods."""


def load_metric(name: str):
    """A local evaluate module by path (evaluation/metrics/<name>.py)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / f"{name}.py"))


def score_answers(answers: list[str], references: list[str], questions: list[str]) -> tuple[dict[str, float], list[dict]]:
    """(mean of each ANSWER_METRICS metric, [{metric: score} per example]); the gate's code, on any answers."""
    results = {
        "rouge_l": load_metric("rouge_l").compute(predictions=answers, references=references),
        "exact_match": load_metric("exact_match").compute(predictions=answers, references=references),
        "keyword_coverage": load_metric("keyword_coverage").compute(predictions=answers, references=references),
        "language_agreement": load_metric("language_agreement").compute(predictions=answers, questions=questions),
    }
    rows = [{} for _ in answers]
    for name, result in results.items():
        for row, value in zip(rows, result[f"{name}_per_example"]):
            row[name] = value
    return {name: result[name] for name, result in results.items()}, rows
