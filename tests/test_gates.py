"""The promotion gate: absolute bounds, and the paired bootstrap comparison with the champion."""

import json
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erpops.config import GateConfig
from evaluation.gates import DIRECTION, MIN_PAIRED, decide, paired_bootstrap

CFG = GateConfig(min_rouge_l=0.1, max_perplexity=100, bootstrap_samples=200)
PASSING = {"rouge_l": 0.4, "perplexity": 20.0}
RANK = {"reject": 0, "hold": 1, "promote": 2}
HIGHER = [m for m, d in DIRECTION.items() if d == "higher"]
few = settings(max_examples=50, deadline=None)


def make_rows(scores: dict[str, list[float]], ids: list[str] | None = None) -> list[dict]:
    """Per-example rows, one per position in the score lists."""
    n = len(next(iter(scores.values())))
    ids = ids or [f"ex-{i:03d}" for i in range(n)]
    return [{"id": ids[i], **{m: v[i] for m, v in scores.items()}} for i in range(n)]


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Aggregate metrics as the evaluate stage reports them (means; perplexity from the mean nll)."""
    agg = {m: float(np.mean([r[m] for r in rows])) for m in rows[0] if m in DIRECTION}
    agg["perplexity"] = math.exp(agg.get("nll", 3.0))
    return agg


def gate(cand: list[dict], champ: list[dict], cfg: GateConfig = CFG):
    return decide(aggregate(cand), aggregate(champ), cfg, cand, champ)


def champion_scores(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"rouge_l": rng.uniform(0.2, 0.6, n), "keyword_coverage": rng.uniform(0.3, 0.9, n),
            "nll": rng.uniform(1.5, 3.0, n)}


def shifted(scores: dict[str, np.ndarray], metric: str, shift: float, noise: float = 0.0, seed: int = 1):
    """The scores with `metric` moved by `shift` plus Gaussian noise of sd `noise` per example."""
    rng = np.random.default_rng(seed)
    out = dict(scores)
    out[metric] = scores[metric] + shift + rng.normal(0, noise, len(scores[metric]))
    return out


def rows_of(scores: dict[str, np.ndarray]) -> list[dict]:
    return make_rows({m: v.tolist() for m, v in scores.items()})


def outcomes(verdict) -> dict[str, str]:
    return {c.metric: c.outcome for c in verdict.comparisons}


# --- absolute bounds, no champion ---------------------------------------------------------------------------------

def test_first_model_is_promoted_on_bounds_alone():
    v = decide({"rouge_l": 0.2, "perplexity": 50}, None, CFG)
    assert v.verdict == "promote" and v.passed and v.comparisons == []
    assert any("no champion" in r for r in v.reasons)


def test_bound_failures_are_named():
    cfg = GateConfig(min_rouge_l=0.1, max_perplexity=100, min_keyword_coverage=0.3, bootstrap_samples=200)
    v = decide({"rouge_l": 0.05, "perplexity": 150, "language_agreement": 0.9}, None, cfg)
    assert v.verdict == "reject" and not v.passed
    failed = {c.metric: c.reason for c in v.checks if not c.passed}
    assert set(failed) == {"rouge_l", "perplexity", "keyword_coverage"}
    assert "not measured" in failed["keyword_coverage"]
    assert all(m in v.reasons[0] for m in failed)


def test_zero_floor_on_an_unmeasured_metric_is_skipped():
    v = decide({"rouge_l": 0.2, "perplexity": 50}, None, CFG)  # keyword/language floors default to 0
    assert {c.metric for c in v.checks} == {"rouge_l", "perplexity", "champion"}


def test_nan_metrics_never_pass():
    assert decide({"rouge_l": math.nan, "perplexity": 10}, None, CFG).verdict == "reject"
    assert decide({"rouge_l": 0.5, "perplexity": math.nan}, None, CFG).verdict == "reject"
    cfg = GateConfig(min_language_agreement=0.0, bootstrap_samples=200)
    assert decide({"rouge_l": 0.5, "perplexity": 10, "language_agreement": math.nan}, None, cfg).verdict == "reject"


def test_bounds_reject_even_a_candidate_better_than_the_champion():
    champ = champion_scores()
    cand = rows_of(shifted(champ, "rouge_l", 0.1))
    v = decide({**aggregate(cand), "perplexity": 1000.0}, aggregate(rows_of(champ)), CFG, cand, rows_of(champ))
    assert v.verdict == "reject" and outcomes(v)["rouge_l"] == "better"


# --- against a champion -------------------------------------------------------------------------------------------

def test_identical_results_hold():
    champ = rows_of(champion_scores())
    v = gate(champ, champ)
    assert v.verdict == "hold" and not v.passed
    assert set(outcomes(v).values()) == {"same"} and v.paired_examples == 40
    assert "champion stays" in v.reasons[0]


def test_clear_improvement_promotes():
    champ = champion_scores()
    v = gate(rows_of(shifted(champ, "rouge_l", 0.08, noise=0.05)), rows_of(champ))
    assert v.verdict == "promote" and outcomes(v) == {"rouge_l": "better", "keyword_coverage": "same", "nll": "same"}
    c = v.comparisons[0]
    assert c.low > 0 and c.low <= c.delta <= c.high
    # three compared metrics: each interval at 1 - 0.05/3 (Bonferroni)
    assert "rouge_l" in c.reason and "98.3% CI" in c.reason and c.reason.endswith("better")
    json.dumps(v.to_dict())  # the report is JSON


def test_clear_regression_beyond_tolerance_rejects():
    champ = champion_scores()
    v = gate(rows_of(shifted(champ, "keyword_coverage", -0.15, noise=0.05)), rows_of(champ))
    assert v.verdict == "reject" and outcomes(v)["keyword_coverage"] == "worse"
    c = next(c for c in v.comparisons if c.metric == "keyword_coverage")
    assert c.high < -c.tolerance and "worse beyond tolerance 0.05" in c.reason


def test_regression_within_tolerance_or_within_noise_holds():
    champ = champion_scores()
    small = gate(rows_of(shifted(champ, "rouge_l", -0.01, noise=0.005)), rows_of(champ))  # real but tolerated
    c = small.comparisons[0]
    assert c.high < 0 and c.low > -c.tolerance
    noisy = gate(rows_of(shifted(champ, "rouge_l", -0.03, noise=0.15)), rows_of(champ))  # beyond tolerance, in noise
    c = noisy.comparisons[0]
    assert c.delta < -c.tolerance < c.high
    assert small.verdict == noisy.verdict == "hold"
    assert outcomes(small)["rouge_l"] == outcomes(noisy)["rouge_l"] == "same"


def test_lower_nll_is_better_and_higher_nll_is_worse():
    champ = champion_scores()
    v = gate(rows_of(shifted(champ, "nll", -0.2, noise=0.05)), rows_of(champ))
    c = next(c for c in v.comparisons if c.metric == "nll")
    assert v.verdict == "promote" and c.outcome == "better" and c.high < 0  # raw delta: negative
    assert "(lower is better)" in c.reason
    v = gate(rows_of(shifted(champ, "nll", +0.2, noise=0.05)), rows_of(champ))
    assert v.verdict == "reject" and outcomes(v)["nll"] == "worse"


def test_too_few_paired_examples_hold():
    champ = champion_scores(n=MIN_PAIRED - 1)
    cand = rows_of(shifted(champ, "rouge_l", 0.3))
    v = gate(cand, rows_of(champ))
    assert v.verdict == "hold" and v.comparisons == [] and v.paired_examples == MIN_PAIRED - 1
    assert "cannot compare" in v.reasons[0]
    v = decide(aggregate(cand), aggregate(rows_of(champ)), CFG)  # a champion but no rows at all
    assert v.verdict == "hold" and "cannot compare" in v.reasons[0]


def test_champion_rows_without_a_gated_metric_hold():
    champ = rows_of(champion_scores())
    bare = [{"id": r["id"]} for r in champ]
    v = decide(aggregate(champ), aggregate(champ), CFG, champ, bare)
    assert v.verdict == "hold" and v.comparisons == [] and "no gated metric" in v.reasons[0]


def test_pairing_by_id_ignores_order_and_unmatched_ids():
    champ = champion_scores()
    cand_rows, champ_rows = rows_of(shifted(champ, "rouge_l", 0.05, noise=0.05)), rows_of(champ)
    aligned = gate(cand_rows, champ_rows)
    unmatched = [{"id": f"new-{i}", "rouge_l": 1.0, "keyword_coverage": 1.0, "nll": 0.0} for i in range(3)]
    shuffled = cand_rows[5:] + unmatched
    random.Random(0).shuffle(shuffled)
    extra_champ = champ_rows + [{"id": "old-0", "rouge_l": 0.0, "keyword_coverage": 0.0, "nll": 9.0}]
    v = decide(aggregate(cand_rows), aggregate(champ_rows), CFG, shuffled, extra_champ)
    assert v.paired_examples == 35
    trimmed = gate(cand_rows[5:], champ_rows[5:])
    assert v.comparisons == trimmed.comparisons and aligned.paired_examples == 40


def test_repeated_ids_are_refused():
    champ = rows_of(champion_scores())
    with pytest.raises(ValueError, match="repeat"):
        gate(champ + champ[:1], champ)


def test_paired_bootstrap_mirrors_exactly_when_swapped():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=30), rng.uniform(size=30)
    delta, low, high = paired_bootstrap(a, b, 500, 0.9, seed=7)
    assert low <= delta <= high
    assert paired_bootstrap(b, a, 500, 0.9, seed=7) == (-delta, -high, -low)


# --- properties ---------------------------------------------------------------------------------------------------

scores = st.lists(st.floats(0, 1), min_size=MIN_PAIRED, max_size=30)


@st.composite
def paired_scores(draw) -> tuple[list[float], list[float]]:
    """Two equally long score lists (champion, candidate)."""
    champ = draw(scores)
    cand = draw(st.lists(st.floats(0, 1), min_size=len(champ), max_size=len(champ)))
    return champ, cand


@few
@given(scores, scores)
def test_identical_results_never_reject_or_promote(rouge, coverage):
    n = min(len(rouge), len(coverage))
    rows = make_rows({"rouge_l": rouge[:n], "keyword_coverage": coverage[:n]})
    assert decide(PASSING, PASSING, CFG, rows, [dict(r) for r in rows]).verdict == "hold"


@few
@given(st.sampled_from(list(DIRECTION)), scores, st.floats(0.01, 0.5))
def test_a_constant_improvement_promotes(metric, base, c):
    sign = 1 if DIRECTION[metric] == "higher" else -1
    other = next(m for m in DIRECTION if m != metric)
    champ = make_rows({metric: base, other: base})
    cand = make_rows({metric: [x + sign * c for x in base], other: base})
    v = decide(PASSING, PASSING, CFG, cand, champ)
    assert v.verdict == "promote" and outcomes(v) == {metric: "better", other: "same"}


@few
@given(st.sampled_from(list(DIRECTION)), scores, st.floats(0.001, 0.5))
def test_a_constant_regression_beyond_tolerance_rejects(metric, base, extra):
    c = CFG.tolerances[metric] + extra
    sign = 1 if DIRECTION[metric] == "higher" else -1
    champ = make_rows({metric: base})
    cand = make_rows({metric: [x - sign * c for x in base]})
    v = decide(PASSING, PASSING, CFG, cand, champ)
    assert v.verdict == "reject" and outcomes(v) == {metric: "worse"}


@few
@given(st.sampled_from(HIGHER), paired_scores(), st.data())
def test_raising_candidate_scores_never_lowers_the_verdict(metric, pair, data):
    champ, cand = pair
    raise_by = data.draw(st.lists(st.floats(0, 0.5), min_size=len(cand), max_size=len(cand)))
    champ_rows = make_rows({metric: champ, "rouge_l": champ} if metric != "rouge_l" else {metric: champ})
    before_rows = make_rows({metric: cand, "rouge_l": cand} if metric != "rouge_l" else {metric: cand})
    after_rows = [{**r, metric: r[metric] + d} for r, d in zip(before_rows, raise_by)]
    before = decide(aggregate(before_rows), PASSING, CFG, before_rows, champ_rows)
    after = decide(aggregate(after_rows), PASSING, CFG, after_rows, champ_rows)
    assert RANK[after.verdict] >= RANK[before.verdict]


@few
@given(st.sampled_from(list(DIRECTION)), paired_scores(), st.floats(-0.3, 0.3))
def test_swapping_candidate_and_champion_mirrors_each_outcome(metric, pair, shift):
    cfg = GateConfig(min_rouge_l=0, bootstrap_samples=200, tolerances={metric: 0.0})
    champ, cand = pair
    a, b = make_rows({metric: champ}), make_rows({metric: [x + shift for x in cand]})
    forward, backward = decide(PASSING, PASSING, cfg, b, a), decide(PASSING, PASSING, cfg, a, b)
    mirror = {"better": "worse", "worse": "better", "same": "same"}
    assert outcomes(backward) == {m: mirror[o] for m, o in outcomes(forward).items()}
    (f,), (g,) = forward.comparisons, backward.comparisons
    assert (g.delta, g.low, g.high) == (-f.delta, -f.high, -f.low)


@few
@given(paired_scores(), st.integers(0, 2**32 - 1))
def test_same_seed_same_verdict_and_interval(pair, seed):
    champ, cand = pair
    cfg = GateConfig(bootstrap_samples=200, bootstrap_seed=seed)
    a, b = make_rows({"rouge_l": cand}), make_rows({"rouge_l": champ})
    assert decide(PASSING, PASSING, cfg, a, b) == decide(PASSING, PASSING, cfg, a, b)
