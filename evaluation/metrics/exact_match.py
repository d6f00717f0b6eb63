"""Exact match after normalisation, as a local `evaluate` module (loaded by path; offline).

An answer matches its reference when both are equal after: Unicode NFKC, casefold, every punctuation
or symbol character replaced by a space (Unicode categories P* and S*: `.,?!'"()[]>·` and the like),
and whitespace collapsed. "재무관리 > 전표 > 전표입력." and "재무관리 전표 전표입력" match; a
different word or particle ("전표를" vs "전표") does not. Per example 1.0 or 0.0; two empty strings match.
"""

import unicodedata

import datasets
import evaluate


def normalise(text: str) -> str:
    """NFKC, casefold, punctuation and symbols to spaces, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(kept.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Exact match after NFKC, casefold, punctuation removal and whitespace collapsing.",
            citation="",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [exact_match(p, r) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / max(1, len(scores)), "exact_match_per_example": scores}
