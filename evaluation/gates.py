"""The promotion gate: a pure function from candidate (and champion) eval results to a verdict with reasons.

The rule:

1. Absolute bounds on the candidate's aggregate metrics: ROUGE-L, keyword coverage and language agreement floors,
   a perplexity ceiling. Any bound failing rejects, champion or not. NaN never passes.
2. No champion: the bounds alone decide (promote).
3. Against a champion, every metric in `GateConfig.tolerances` is compared on the eval examples both models
   answered, paired by id. The paired bootstrap gives an interval for mean(candidate - champion); oriented so that
   positive is better, the metric is
   - worse  when the whole interval lies below -tolerance (a regression larger than we accept, beyond noise),
   - better when the whole interval lies above 0 (an improvement beyond noise),
   - same   otherwise.
   Any metric worse rejects; else any metric better promotes; else the gate holds and the champion stays.
   The intervals are Bonferroni-adjusted (each at 1 - (1 - confidence) / m for m compared metrics), so the
   chance that an equally good model reads better (or worse) on any metric by luck stays within 1 - confidence.
   `nll` here is the mean over examples of each one's per-token NLL (every example weighs the same), not the
   token-weighted log perplexity reported as the aggregate `nll`.
   Fewer than MIN_PAIRED paired examples also holds: the gate never promotes without evidence.

Why: the eval set is small (tens of examples) and a retrained model's greedy answers change example by example, so
an aggregate moves by a few points between two equally good models. A fixed threshold on aggregates ("no drop over
0.02") then flip-flops: the same model passes or fails with the luck of the sample, and a lucky retrain replaces a
better champion. Pairing by example cancels the difficulty the two models share, and the bootstrap interval says
how large the difference is given the noise left: a candidate is promoted only on evidence that it is better, and
rejected only on evidence that it is worse by more than the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from erpops.config import GateConfig

DIRECTION: dict[str, str] = {"rouge_l": "higher", "exact_match": "higher", "keyword_coverage": "higher",
                             "language_agreement": "higher", "nll": "lower"}
"""Which way is better, per metric the gate can compare."""

MIN_PAIRED = 5
"""Fewest paired examples (per metric) a champion comparison needs; below it the gate holds."""

_CHUNK = 1 << 20  # resampled values drawn at once: bounds bootstrap memory (~8 MB) whatever the eval size


@dataclass(frozen=True)
class Check:
    """An absolute bound (floor or ceiling) on one of the candidate's aggregate metrics."""

    metric: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class Comparison:
    """Candidate vs champion on one metric, paired over the eval examples both answered."""

    metric: str
    candidate: float
    """Candidate mean over the paired examples."""
    champion: float
    """Champion mean over the same examples."""
    delta: float
    """mean(candidate - champion), raw: for a lower-is-better metric a negative delta is an improvement."""
    low: float
    """Lower end of the bootstrap interval of delta (raw)."""
    high: float
    """Upper end of the bootstrap interval of delta (raw)."""
    tolerance: float
    """Regression allowed before the metric counts as worse, in the metric's units."""
    outcome: str
    """"better" | "same" | "worse"."""
    reason: str


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided, and everything it decided on."""

    verdict: str
    """"promote" | "hold" (the champion stays) | "reject"."""
    checks: list[Check]
    comparisons: list[Comparison]
    paired_examples: int = 0
    """Eval examples found in both the candidate's and the champion's rows."""
    headline: str = ""
    """One sentence: the verdict and the reason for it."""

    @property
    def passed(self) -> bool:
        return self.verdict == "promote"

    @property
    def reasons(self) -> list[str]:
        """The headline, then every check's and every comparison's reason."""
        reasons = [self.headline, *(c.reason for c in self.checks), *(c.reason for c in self.comparisons)]
        return [r for r in reasons if r]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "passed": self.passed, "headline": self.headline, "reasons": self.reasons,
                "paired_examples": self.paired_examples, "checks": [asdict(c) for c in self.checks],
                "comparisons": [asdict(c) for c in self.comparisons]}


def paired_bootstrap(candidate: Sequence[float], champion: Sequence[float], samples: int, confidence: float,
                     seed: int) -> tuple[float, float, float]:
    """Mean of the paired differences candidate - champion, and its two-sided percentile bootstrap interval.

    Example indices are resampled with replacement, the same indices for both models (which keeps the pairing).
    The interval ends are order statistics of the resampled means, so swapping candidate and champion mirrors the
    result exactly: (delta, low, high) -> (-delta, -high, -low).
    """
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(champion, dtype=np.float64)
    if diff.ndim != 1 or len(candidate) != len(champion) or diff.size == 0:
        raise ValueError(f"need two equally long, non-empty score lists, got {len(candidate)} and {len(champion)}")
    if samples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need samples >= 1 and 0 < confidence < 1, got {samples} and {confidence}")
    n = diff.size
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK // n)
    means = np.sort(np.concatenate([diff[rng.integers(0, n, size=(min(per_chunk, samples - start), n))].mean(axis=1)
                                    for start in range(0, samples, per_chunk)]))
    k = math.floor((1 - confidence) / 2 * samples + 1e-9)  # the epsilon absorbs 1 - 0.95 = 0.0500...04
    return float(diff.mean()), float(means[k]), float(means[samples - 1 - k])


def bound_checks(candidate: dict[str, float], cfg: GateConfig) -> list[Check]:
    """The absolute floors (and the perplexity ceiling) on the candidate's aggregate metrics.

    A floor of 0 on a metric that was not measured is no constraint and is skipped; any other bound on a metric that
    was not measured fails.
    """
    bounds = [("rouge_l", ">=", cfg.min_rouge_l), ("perplexity", "<=", cfg.max_perplexity),
              ("keyword_coverage", ">=", cfg.min_keyword_coverage),
              ("language_agreement", ">=", cfg.min_language_agreement)]
    checks = []
    for metric, op, bound in bounds:
        kind = "floor" if op == ">=" else "ceiling"
        value = candidate.get(metric)
        if value is None:
            if not (kind == "floor" and bound == 0):
                checks.append(Check(metric, False, f"{metric} not measured ({kind} {bound:g})"))
            continue
        value = float(value)
        if math.isnan(value):
            checks.append(Check(metric, False, f"{metric} is NaN ({kind} {bound:g})"))
            continue
        ok = value >= bound if op == ">=" else value <= bound
        shown = op if ok else {">=": "<", "<=": ">"}[op]
        checks.append(Check(metric, ok, f"{metric} {value:.4g} {shown} {kind} {bound:g}"))
    return checks


def pair_rows(candidate_rows: list[dict], champion_rows: list[dict]) -> list[tuple[dict, dict]]:
    """Both models' rows for the examples both answered, matched by "id" and ordered by id (input order is moot)."""
    cand, champ = _by_id(candidate_rows, "candidate"), _by_id(champion_rows, "champion")
    return [(cand[i], champ[i]) for i in sorted(cand.keys() & champ.keys(), key=str)]


def _by_id(rows: list[dict], who: str) -> dict:
    by_id = {r["id"]: r for r in rows}
    if len(by_id) != len(rows):
        raise ValueError(f"the {who} rows repeat example ids: cannot pair them")
    return by_id


def _paired_scores(pairs: list[tuple[dict, dict]], metric: str) -> tuple[list[float], list[float]]:
    """The metric's scores on the pairs where both models have a finite value."""
    both = [(float(a[metric]), float(b[metric])) for a, b in pairs
            if a.get(metric) is not None and b.get(metric) is not None]
    both = [(x, y) for x, y in both if math.isfinite(x) and math.isfinite(y)]
    return [x for x, _ in both], [y for _, y in both]


def outcome(low: float, high: float, tolerance: float, direction: str) -> str:
    """better / same / worse from a raw interval of candidate - champion, oriented so that positive is better."""
    lo, hi = (low, high) if direction == "higher" else (-high, -low)
    if hi < -tolerance:
        return "worse"
    if lo > 0:
        return "better"
    return "same"


def compare(pairs: list[tuple[dict, dict]], cfg: GateConfig, directions: dict[str, str] | None = None) -> list[Comparison]:
    """One Comparison per tolerated metric with at least MIN_PAIRED paired values; the others are not gated.
    `directions`: which way is better per metric (default DIRECTION, the gate's metrics)."""
    directions = directions or DIRECTION
    comparable = []
    for metric, tolerance in cfg.tolerances.items():
        if metric not in directions:
            raise ValueError(f"gate tolerance on {metric!r}: unknown direction (known: {', '.join(directions)})")
        if tolerance < 0:
            raise ValueError(f"gate tolerance on {metric!r} is negative ({tolerance})")
        cand, champ = _paired_scores(pairs, metric)
        if len(cand) >= MIN_PAIRED:
            comparable.append((metric, tolerance, cand, champ))
    # Bonferroni: with m metrics each tested at 1 - a/m, the chance that any of them reads "better" (or "worse")
    # by luck alone stays at most a, so an equally good retrain is promoted at most that often
    confidence = 1 - (1 - cfg.confidence) / max(1, len(comparable))
    comparisons = []
    for metric, tolerance, cand, champ in comparable:
        delta, low, high = paired_bootstrap(cand, champ, cfg.bootstrap_samples, confidence, cfg.bootstrap_seed)
        result = outcome(low, high, tolerance, directions[metric])
        c_mean, ch_mean = float(np.mean(cand)), float(np.mean(champ))
        said = {"better": "better", "same": f"same within noise (tolerance {tolerance:g})",
                "worse": f"worse beyond tolerance {tolerance:g}"}[result]
        lower = " (lower is better)" if directions[metric] == "lower" else ""
        reason = (f"{metric} {c_mean:.3f} vs champion {ch_mean:.3f} (n={len(cand)}): {delta:+.3f} "
                  f"[{confidence * 100:.3g}% CI {low:+.3f}, {high:+.3f}]{lower}, {said}")
        comparisons.append(Comparison(metric, c_mean, ch_mean, delta, low, high, tolerance, result, reason))
    return comparisons


def decide(candidate: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig,
           candidate_rows: list[dict] | None = None, champion_rows: list[dict] | None = None) -> GateVerdict:
    """Bounds always; against a champion, a paired bootstrap comparison per tolerated metric (module docstring).

    candidate/champion are aggregate metrics; the rows are per-example dicts with "id" and per-metric scores.
    """
    checks = bound_checks(candidate, cfg)
    failed = [c.metric for c in checks if not c.passed]
    if champion is None:
        checks.append(Check("champion", True, "no champion yet: absolute bounds only"))
        if failed:
            return GateVerdict("reject", checks, [], 0, _failed_bounds(failed))
        return GateVerdict("promote", checks, [], 0, "promote: first model, absolute bounds passed")

    pairs = pair_rows(candidate_rows or [], champion_rows or [])
    comparisons = compare(pairs, cfg) if len(pairs) >= MIN_PAIRED else []
    worse = [c.metric for c in comparisons if c.outcome == "worse"]
    better = [c.metric for c in comparisons if c.outcome == "better"]
    if failed:
        verdict, headline = "reject", _failed_bounds(failed)
    elif worse:
        verdict, headline = "reject", f"reject: worse than the champion beyond tolerance on {', '.join(worse)}"
    elif candidate_rows is None or champion_rows is None:
        verdict, headline = "hold", ("hold: no per-example results to pair with the champion's; cannot compare, "
                                     "the champion stays")
    elif len(pairs) < MIN_PAIRED:
        verdict, headline = "hold", (f"hold: only {len(pairs)} eval examples paired with the champion's (need "
                                     f"{MIN_PAIRED}); cannot compare, the champion stays")
    elif not comparisons:
        verdict, headline = "hold", "hold: no gated metric measured on both models; cannot compare, the champion stays"
    elif better:
        verdict, headline = "promote", (f"promote: better than the champion on {', '.join(better)}, "
                                        "nothing worse beyond tolerance")
    else:
        verdict, headline = "hold", "hold: no metric measurably better than the champion; the champion stays"
    return GateVerdict(verdict, checks, comparisons, len(pairs), headline)


def _failed_bounds(failed: list[str]) -> str:
    return f"reject: absolute bounds failed on {', '.join(failed)}"
