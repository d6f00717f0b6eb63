"""Token-weighted perplexity from per-example summed NLL and token counts, as a local `evaluate` module.

The hub `perplexity` metric loads a model by hub id; here the caller scores its own model (the one
that ships) and this module aggregates: exp(sum nll / sum tokens).
"""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity of reference responses under the model (token-weighted).",
            citation="",
            inputs_description="nll: summed negative log-likelihood per example; n_tokens: tokens scored per example",
            features=datasets.Features({"nll": datasets.Value("float64"), "n_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, n_tokens):
        total = sum(n_tokens)
        per_example = [math.exp(x / n) if n else float("nan") for x, n in zip(nll, n_tokens)]
        return {"perplexity": math.exp(sum(nll) / total) if total else float("nan"), "perplexity_per_example": per_example}
