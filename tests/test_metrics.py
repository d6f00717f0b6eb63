"""Answer metrics (local `evaluate` modules) on hand-written Korean and English cases, the breakdowns,
and score_model on the tiny model returning every metric and row field the gate and the report read."""

import math

import pytest

from evaluation.breakdown import MODULE_METRICS, per_module, percentiles
from evaluation.evaluate import load_metric


@pytest.fixture(scope="module")
def em():
    metric = load_metric("exact_match")
    return lambda p, r: metric.compute(predictions=[p], references=[r])["exact_match"]


@pytest.fixture(scope="module")
def kc():
    metric = load_metric("keyword_coverage")

    def score(answer: str, reference: str, glossary: list[str] | None = None) -> float:
        kw = {} if glossary is None else {"glossary": glossary}
        return metric.compute(predictions=[answer], references=[reference], **kw)["keyword_coverage"]
    return score


@pytest.fixture(scope="module")
def la():
    metric = load_metric("language_agreement")
    return lambda answer, question: metric.compute(predictions=[answer], questions=[question])["language_agreement"]


# --- exact match -----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, reference", [
    ("재무관리 > 전표 > 전표입력.", "재무관리  전표 전표입력"),    # punctuation and spacing
    ("Finance > Journal, Journal Entry!", "finance journal journal entry"),  # case
    ("ＰＯ　발주", "PO 발주"),                                         # NFKC: full-width letters and space
    ("", ""),
], ids=["ko-punctuation", "en-case", "nfkc-width", "both-empty"])
def test_exact_match_ignores_case_punctuation_spacing_and_width(em, answer, reference):
    assert em(answer, reference) == 1.0


@pytest.mark.parametrize("answer, reference", [
    ("전표를 입력하세요", "전표 입력하세요"),                 # a particle is a different answer
    ("Open the PO.", "Open the PO and save."),
    ("", "전표입력"),
], ids=["ko-particle", "en-missing-words", "empty-answer"])
def test_exact_match_rejects_different_words(em, answer, reference):
    assert em(answer, reference) == 0.0


def test_exact_match_mean_and_per_example():
    out = load_metric("exact_match").compute(predictions=["네.", "No", ""], references=["네", "Yes", ""])
    assert out["exact_match_per_example"] == [1.0, 0.0, 1.0]
    assert out["exact_match"] == pytest.approx(2 / 3)


# --- keyword coverage ------------------------------------------------------------------------------

def test_korean_glossary_terms_are_found_behind_particles(kc):
    reference = "재무관리 > 전표 > 전표입력에서 작성합니다."      # key terms: 재무관리, 전표, 전표입력
    assert kc("재무관리의 전표입력 화면을 여세요.", reference) == 1.0
    assert kc("전표입력에서 작성하세요.", reference) == pytest.approx(2 / 3)   # 재무관리 missing
    assert kc("전표를 저장하세요.", reference) == pytest.approx(1 / 3)


def test_korean_terms_match_whatever_the_spacing(kc):
    assert kc("구매 요청을 먼저 등록하세요.", "구매요청이 승인되어야 합니다.", glossary=["구매요청"]) == 1.0


def test_english_glossary_terms_are_whole_words_with_plurals(kc):
    reference = "Create the PO in Procurement."                  # key terms: po, procurement
    assert kc("Open the report.", reference) == 0.0             # "po" inside "report" does not count
    assert kc("Create POs under procurement.", reference) == 1.0
    assert kc("Go to Finance > Journal > Reverse Entry", "Finance > Journal > Reverse Entry") == 1.0
    assert kc("Use Reverse Entry in Finance.", "Finance > Journal > Reverse Entry") == pytest.approx(2 / 3)


def test_codes_in_mixed_language_answers(kc):
    reference = "검사대기 W300 창고로 입고됩니다."                # key terms: w300, 입고
    assert kc("W300으로 입고 처리됩니다.", reference) == 1.0
    assert kc("W3000 창고로 입고", reference) == 0.5             # a longer code is a different code
    assert kc("Goods go to W300 first.", reference) == 0.5


def test_without_glossary_terms_korean_content_words_lose_their_particles(kc):
    reference = "담당자가 서류를 검토합니다."                     # content words: 담당자, 서류, 검토
    assert kc("담당자에게 서류 검토를 요청하세요.", reference, glossary=[]) == 1.0
    assert kc("서류를 보내세요.", reference, glossary=[]) == pytest.approx(1 / 3)
    # a one-syllable particle is kept when stripping it would leave a single syllable: 평가 stays 평가
    assert kc("평가 결과", "평가", glossary=[]) == 1.0
    assert kc("평일", "평가", glossary=[]) == 0.0


def test_without_glossary_terms_english_content_words_skip_stopwords_and_short_words(kc):
    reference = "Attach the receipts before you submit."         # content words: attach, receipts, submit
    assert kc("Receipts must be attached.", reference, glossary=[]) == pytest.approx(2 / 3)
    assert kc("Submit it before Friday.", reference, glossary=[]) == pytest.approx(1 / 3)


def test_glossary_terms_take_precedence_over_content_words(kc):
    # the reference has a glossary term, so only it counts, not the other words
    assert kc("BOM 화면", "승인된 BOM은 설계 담당자만 고칩니다.", glossary=["BOM"]) == 1.0


def test_empty_answers_and_references(kc):
    assert kc("", "재무관리 > 전표") == 0.0
    assert kc("", "") == 1.0
    assert kc("anything", "") == 1.0
    assert kc("", "?!") == 1.0                                   # no word to cover
    assert kc("", "네") == 0.0                                   # words but no key term: every word counts
    assert kc("네, 맞습니다", "네") == 1.0


def test_every_shipped_reference_covers_itself_and_not_another_answer():
    from conftest import REPO
    from data_contracts.dataset import read_examples

    references = [r["response"] for r in read_examples(REPO / "data" / "erp" / "qa_pairs.jsonl")]
    metric = load_metric("keyword_coverage")
    assert metric.compute(predictions=references, references=references)["keyword_coverage"] == 1.0
    shifted = references[1:] + references[:1]   # each reference against its neighbour's answer
    assert metric.compute(predictions=shifted, references=references)["keyword_coverage"] < 0.4


def test_keyword_coverage_mean_and_per_example():
    out = load_metric("keyword_coverage").compute(predictions=["W300", ""], references=["W300 창고", "W300 창고"])
    assert out["keyword_coverage_per_example"] == [1.0, 0.0]
    assert out["keyword_coverage"] == 0.5


# --- language agreement ----------------------------------------------------------------------------

@pytest.mark.parametrize("answer, question, expected", [
    ("재무관리 > 전표에서 입력하세요.", "전표는 어디서 입력하나요?", 1.0),
    ("Use Finance > Journal.", "전표는 어디서 입력하나요?", 0.0),
    ("Use Finance > Journal.", "Where do I post a journal entry?", 1.0),
    ("전표입력에서 입력하세요.", "Where do I post a journal entry?", 0.0),
    # mixed: a Korean sentence around a Latin code is Korean; an English sentence around a Korean term is English
    ("Z_FIN_JE_POST 권한을 신청하세요.", "전표 전기 권한은?", 1.0),
    ("Open 전표입력 and save.", "Where do I post a journal entry?", 1.0),
    ("Open 전표입력 and save.", "전표는 어디서 입력하나요?", 0.0),
    # a Korean answer made of English menu names falls below the threshold (0.21 Hangul share)
    ("Finance > Journal > Journal Entry에서 입력하세요", "전표는 어디서 입력하나요?", 0.0),
    # no letters: an empty or digits-only answer disagrees; a letterless question agrees with any answer
    ("", "전표는 어디서 입력하나요?", 0.0),
    ("", "Where?", 0.0),
    ("10,000,000", "How much?", 0.0),
    ("네", "???", 1.0),
], ids=["ko-ko", "ko-en", "en-en", "en-ko", "ko-with-code", "en-with-ko-term", "en-with-ko-term-to-ko",
        "ko-of-en-menus", "empty-ko", "empty-en", "digits", "letterless-question"])
def test_language_agreement(la, answer, question, expected):
    assert la(answer, question) == expected


def test_language_threshold_separates_the_corpus():
    from evaluation.evaluate import METRICS_DIR
    import importlib.util

    spec = importlib.util.spec_from_file_location("language_agreement", METRICS_DIR / "language_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.detect_language("MES 실적이 ERP로 안 넘어올 때 어디서 확인하나요?") == "ko"
    assert module.detect_language("shop floor system sends pieces but ERP expects boxes") == "en"
    assert module.detect_language("12:00") is None


# --- breakdowns ------------------------------------------------------------------------------------

def test_per_module_means_and_counts_skip_nan():
    rows = [{"module": "finance", "rouge_l": 0.2, "nll": 1.0},
            {"module": "finance", "rouge_l": 0.4, "nll": float("nan")},
            {"module": "hr", "rouge_l": 1.0, "nll": float("nan")}]
    out = per_module(rows, ["rouge_l", "nll"])
    assert list(out) == ["finance", "hr"]
    assert out["finance"] == {"n": 2.0, "rouge_l": pytest.approx(0.3), "nll": 1.0}
    assert out["hr"]["n"] == 1.0 and out["hr"]["rouge_l"] == 1.0 and math.isnan(out["hr"]["nll"])
    assert per_module([], ["rouge_l"]) == {}


def test_percentiles_interpolate_linearly():
    assert percentiles([4.0, 1.0, 3.0, 2.0]) == {"p50": 2.5, "p95": pytest.approx(3.85)}
    assert percentiles([0.7]) == {"p50": 0.7, "p95": 0.7}
    assert percentiles([1.0, 2.0], qs=(0, 100)) == {"p0": 1.0, "p100": 2.0}
    assert all(math.isnan(v) for v in percentiles([]).values())


# --- score_model on the tiny model -----------------------------------------------------------------

def test_score_model_returns_every_metric_and_row_field(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts.dataset import chat_to_example, qa_to_example
    from erpops.config import GateConfig
    from erpops.device import Runtime
    from evaluation.evaluate import score_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [
        qa_to_example({"id": "qa-1", "module": "finance", "lang": "ko", "instruction": "전표는 어디서 입력하나요?",
                       "response": "재무관리 > 전표 > 전표입력에서 작성합니다."}),
        qa_to_example({"id": "qa-2", "module": "finance", "lang": "en", "instruction": "Where do I reverse an entry?",
                       "response": "Use Finance > Journal > Reverse Entry."}),
        chat_to_example({"id": "chat-1", "module": "hr", "lang": "en", "messages": [
            {"role": "system", "content": "You are the ERP assistant."},
            {"role": "user", "content": "How do I request leave?"},
            {"role": "assistant", "content": "Submit HR > Time > Leave Request."},
            {"role": "user", "content": "Who approves it?"},
            {"role": "assistant", "content": "Your team lead."}]}),
    ]
    cfg = GateConfig(max_new_tokens=4, batch_size=2, latency_samples=2)
    metrics, rows = score_model(model, tokenizer, examples, cfg, Runtime("cpu", "float32"))

    expected = {"rouge_l", "exact_match", "keyword_coverage", "language_agreement", "perplexity", "nll",
                "answer_tokens_per_s", "latency_p50_s", "latency_p95_s", "examples"}
    expected |= {f"module/{m}/{k}" for m in ("finance", "hr") for k in (*MODULE_METRICS, "n")}
    assert set(metrics) == expected
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["examples"] == 3.0 and metrics["module/finance/n"] == 2.0 and metrics["module/hr/n"] == 1.0
    assert metrics["nll"] == pytest.approx(math.log(metrics["perplexity"]))
    assert 0 < metrics["latency_p50_s"] <= metrics["latency_p95_s"]
    for name in MODULE_METRICS:
        assert 0.0 <= metrics[name] <= 1.0
        assert metrics[f"module/hr/{name}"] == rows[2][name]

    fields = {"id", "module", "lang", "question", "answer", "reference", "rouge_l", "exact_match",
              "keyword_coverage", "language_agreement", "perplexity", "nll"}
    assert [r["id"] for r in rows] == ["qa-1", "qa-2", "chat-1"]
    assert all(set(r) == fields for r in rows)
    assert rows[2]["question"] == "Who approves it?" and rows[2]["reference"] == "Your team lead."
    assert rows[0]["question"] == "전표는 어디서 입력하나요?"
    for r in rows:
        assert r["nll"] > 0 and r["perplexity"] == pytest.approx(math.exp(r["nll"]))
    # the metric is token-weighted over all examples, the rows are per example: the metric lies within them
    assert min(r["nll"] for r in rows) <= metrics["nll"] <= max(r["nll"] for r in rows)
