import math

from hypothesis import given
from hypothesis import strategies as st

from erpops.config import GateConfig
from evaluation.gates import decide

CFG = GateConfig(min_rouge_l=0.1, max_perplexity=100, rouge_l_tolerance=0.02, perplexity_tolerance=0.1)


def test_first_model_passes_on_floors_alone():
    v = decide({"rouge_l": 0.2, "perplexity": 50}, None, CFG)
    assert v.passed and v.verdict == "promote"
    assert any("no champion" in r for r in v.reasons)


def test_floor_failures_are_named():
    v = decide({"rouge_l": 0.05, "perplexity": 150}, None, CFG)
    assert not v.passed and v.verdict == "reject"
    failed = {c.metric for c in v.checks if not c.passed}
    assert failed == {"rouge_l", "perplexity"}


def test_regression_against_champion_beyond_tolerance_rejects():
    champion = {"rouge_l": 0.30, "perplexity": 40}
    assert decide({"rouge_l": 0.29, "perplexity": 43}, champion, CFG).passed  # within tolerance
    v = decide({"rouge_l": 0.27, "perplexity": 40}, champion, CFG)
    assert not v.passed and [c.metric for c in v.checks if not c.passed] == ["rouge_l_vs_champion"]
    v = decide({"rouge_l": 0.30, "perplexity": 45}, champion, CFG)
    assert not v.passed and [c.metric for c in v.checks if not c.passed] == ["perplexity_vs_champion"]


def test_nan_metrics_never_pass():
    assert not decide({"rouge_l": math.nan, "perplexity": 10}, None, CFG).passed
    assert not decide({"rouge_l": 0.5, "perplexity": math.nan}, None, CFG).passed


@given(st.floats(0, 1), st.floats(1, 1000), st.floats(0, 1), st.floats(1, 1000))
def test_better_or_equal_than_champion_never_fails_the_comparison(rl, ppl, c_rl, c_ppl):
    v = decide({"rouge_l": max(rl, c_rl), "perplexity": min(ppl, c_ppl)}, {"rouge_l": c_rl, "perplexity": c_ppl}, CFG)
    assert all(c.passed for c in v.checks if c.metric.endswith("_vs_champion"))


@given(st.floats(0, 1), st.floats(1, 1000))
def test_verdict_is_pure(rl, ppl):
    a = decide({"rouge_l": rl, "perplexity": ppl}, None, CFG)
    b = decide({"rouge_l": rl, "perplexity": ppl}, None, CFG)
    assert a == b
