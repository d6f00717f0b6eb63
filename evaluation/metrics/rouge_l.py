"""ROUGE-L F1 as a local `evaluate` module (loaded by path; the hub copy cannot be fetched offline).

rouge_score's default tokenizer keeps only [a-z0-9], which turns Korean text into nothing; this module
tokenizes on Unicode word characters so Hangul answers are scored too.
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer


class _UnicodeWords:
    def tokenize(self, text):
        return re.findall(r"\w+", text.lower())


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-L F1 (longest common subsequence) over Unicode word tokens.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description="predictions: list of str; references: list of str",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
        scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
        return {"rouge_l": sum(scores) / max(1, len(scores)), "rouge_l_per_example": scores}
