"""Corpus-level contracts: personal data, script, duplicates, leakage, coverage, token length."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO, data_cfg, write_jsonl
from data_contracts.contracts import check_corpus
from data_contracts.dataset import in_eval
from data_contracts.rules import EMAIL, email_spans, find_pii, hangul_share, luhn_ok, mask_pii, near_duplicate_pairs


@pytest.mark.parametrize("text, kind", [
    ("메일은 kim.minsu@hanbit.co.kr 로 보내주세요", "email"),
    ("담당자 010-1234-5678 로 연락", "phone"),
    ("call 01012345678 now", "phone"),
    ("대표번호 02-123-4567", "phone"),
    ("call +82 10 1234 5678", "phone"),
    ("주민번호 900101-1234567", "rrn"),
    ("card 4111 1111 1111 1111 on file", "card"),
    ("card 5500-0000-0000-0004", "card"),
    # beside other digits, in brackets, with spaced or typographic separators, typed full-width
    ("4111 1111 1111 1111 123", "card"),
    ("주문 3 4111 1111 1111 1111", "card"),
    ("카드 4111 1111 1111 1111 12/25", "card"),
    ("(02) 1234-5678", "phone"),
    ("(010) 1234-5678", "phone"),
    ("010 - 1234 - 5678", "phone"),
    ("연락처-010-1234-5678", "phone"),
    ("주민번호 900101–1234567", "rrn"),
    ("주민번호 900101 - 1234567", "rrn"),
    ("주민번호 ９００１０１－１２３４５６７", "rrn"),
])
def test_personal_data_is_found(text, kind):
    assert [k for k, _, _ in find_pii(text)] == [kind]


def test_a_card_beside_other_digits_is_masked_and_the_other_digits_kept():
    assert mask_pii("카드 4111 1111 1111 1111 12/25")[0] == "카드 [CARD] 12/25"
    assert mask_pii("주민번호 ９００１０１－１２３４５６７ 입니다")[0] == "주민번호 [RRN] 입니다"  # spans of the original text


@pytest.mark.parametrize("text", [
    "결재 한도는 30,000,000원입니다",
    "PO-2024-000123 was posted on 2024-01-15",
    "창고 W100 에서 W900 으로 이동",
    "account 4111 1111 1111 1112 is not a card",  # fails Luhn
    "version 1.2.3 and 25%",
    "주문번호 2024-010-1234-5678",  # a phone-shaped tail of a longer hyphenated number
    "invoice 2024-11-30, 2024 12 31",
])
def test_ordinary_erp_numbers_are_not_personal_data(text):
    assert find_pii(text) == []


@pytest.mark.parametrize("text", ["a" * 200_000, "a@" + "b" * 200_000, "x@y.cc " * 30_000, "010-1234-5678 " * 15_000])
def test_personal_data_search_is_linear_on_long_fields(text):
    import time

    start = time.perf_counter()
    find_pii(text)
    assert time.perf_counter() - start < 2.0  # the regex search took 26 s on 160,000 letters, 23 s on 20,000 e-mails


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet="aZ9._%+-@ .x-", max_size=40))
def test_email_spans_are_the_email_pattern_matches(text):
    assert list(email_spans(text)) == [m.span() for m in EMAIL.finditer(text)]


def test_luhn_and_masking():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    masked, counts = mask_pii("mail a@b.io or call 010-9999-8888, card 4111111111111111")
    assert masked == "mail [EMAIL] or call [PHONE], card [CARD]"
    assert counts == {"email": 1, "phone": 1, "card": 1}


def test_hangul_share():
    assert hangul_share("재무관리 메뉴") == 1.0
    assert hangul_share("Open the menu") == 0.0
    assert hangul_share("1234 !!") is None


def _rows(corpus):
    return [json.loads(line) for line in (corpus / "qa_pairs.jsonl").read_text(encoding="utf-8").splitlines()]


def test_pii_mask_policy_masks_and_warns(corpus):
    rows = _rows(corpus)
    rows[3]["response"] = "담당자에게 010-1234-5678 로 전화하거나 kim@hanbit.co.kr 로 메일하세요."
    write_jsonl(corpus / "qa_pairs.jsonl", rows)
    report, c, ds = check_corpus(data_cfg(corpus, pii_policy="mask"))
    assert report.ok and ds is not None
    (warn,) = [v for v in report.violations if v.rule == "pii.masked"]
    assert warn.line == 4 and warn.severity == "warning" and "1 email" in warn.detail and "1 phone" in warn.detail
    text = json.dumps(ds.train + ds.eval, ensure_ascii=False)
    assert "010-1234-5678" not in text and "[PHONE]" in text and "[EMAIL]" in text


def test_pii_reject_policy_blocks_with_line(corpus):
    rows = _rows(corpus)
    rows[6]["instruction"] = "주민번호 900101-1234567 은 어디에 입력하나요?"
    write_jsonl(corpus / "qa_pairs.jsonl", rows)
    report, _, ds = check_corpus(data_cfg(corpus, pii_policy="reject"))
    assert ds is None
    assert [(v.rule, v.line) for v in report.errors] == [("pii.found", 7)]
    assert "rrn" in report.errors[0].detail


def test_language_must_match_script(corpus):
    rows = _rows(corpus)
    rows[0]["lang"] = "ko"
    rows[0]["instruction"], rows[0]["response"] = "How do I post an invoice?", "Open the invoice screen and post it."
    rows[1]["lang"] = "en"  # row 2 is written in English already; make row 3 Korean text labelled en
    rows[2]["lang"] = "en"
    write_jsonl(corpus / "qa_pairs.jsonl", rows)
    report, _, _ = check_corpus(data_cfg(corpus))
    assert {(v.rule, v.line) for v in report.errors} == {("lang.script", 1), ("lang.script", 3)}


def test_exact_and_near_duplicates_are_warnings(corpus):
    rows = _rows(corpus)
    train_ids = [r["id"] for r in rows if not in_eval(r["id"], 42, 0.15) and r["lang"] == "ko"]
    a, b, c = [next(r for r in rows if r["id"] == i) for i in train_ids[:3]]
    b["instruction"] = a["instruction"].upper() + " "  # same after normalisation
    c["instruction"] = a["instruction"].replace("하나요", "하죠")  # near
    write_jsonl(corpus / "qa_pairs.jsonl", rows)
    report, _, ds = check_corpus(data_cfg(corpus, near_duplicate_threshold=0.8))
    assert ds is not None  # warnings do not block
    rules = {(v.rule, v.line) for v in report.violations}
    line = {r["id"]: i + 1 for i, r in enumerate(rows)}
    assert ("duplicate.exact", line[b["id"]]) in rules
    assert ("duplicate.near", line[c["id"]]) in rules


def test_train_eval_overlap_is_leakage(corpus):
    rows = _rows(corpus)
    eval_row = next(r for r in rows if in_eval(r["id"], 42, 0.15))
    train_row = next(r for r in rows if not in_eval(r["id"], 42, 0.15) and r["lang"] == eval_row["lang"])
    eval_row["instruction"] = train_row["instruction"]
    write_jsonl(corpus / "qa_pairs.jsonl", rows)
    report, _, ds = check_corpus(data_cfg(corpus))
    assert ds is None
    (err,) = [v for v in report.errors if v.rule == "leakage.train_eval"]
    assert err.line == rows.index(eval_row) + 1 and train_row["id"] in err.detail


def _located(rid: str, *turns: str, line: int = 1):
    from data_contracts.rules import Located

    roles = ["user", "assistant"] * len(turns)
    return Located(f"{rid}.jsonl", line, {"id": rid, "source": "qa", "messages": [
        {"role": "system", "content": "ERP assistant"}, *({"role": r, "content": t} for r, t in zip(roles, turns))]})


def test_a_middle_turn_of_a_training_chat_repeated_in_eval_is_leakage_and_small_talk_is_not():
    from data_contracts.rules import leakage_violations

    chat = _located("chat-0100", "재고 이동은 어디서 하나요?", "재고 관리 > 이동에서 합니다.",
                    "구매 요청은 어떻게 승인하나요?", "구매 > 요청 목록에서 승인 버튼을 누릅니다.", "감사합니다", "네, 좋은 하루 되세요.")
    middle = _located("qa-7", "구매 요청은 어떻게 승인하나요?", "승인 화면에서 처리합니다.", line=7)
    small_talk = _located("chat-0200", "휴가 신청은 어디서 하나요?", "인사 > 휴가에서 합니다.", "감사합니다", "천만에요.", line=9)
    (v,) = leakage_violations([chat], [middle, small_talk])
    assert (v.rule, v.file, v.line) == ("leakage.train_eval", "qa-7.jsonl", 7) and "chat-0100" in v.detail


def test_an_eval_question_near_a_training_question_is_shown_as_leakage():
    from data_contracts.rules import eval_overlap_violations, leakage_violations

    train = _located("qa-1", "How do I create a new purchase order in the procurement module?", "Open Procurement.")
    near = _located("qa-2", "How do I create a purchase order in the procurement module?", "Use Procurement > PO.", line=4)
    other = _located("qa-3", "How do I approve annual leave for my team?", "Open HR > Leave.", line=5)
    (v,) = leakage_violations([train], [near, other], threshold=0.85)
    assert (v.rule, v.severity, v.line) == ("leakage.near", "warning", 4) and "similar to training example qa-1" in v.detail
    assert leakage_violations([train], [near, other]) == []  # exact only, without a threshold
    (v,) = eval_overlap_violations([near], [train], threshold=0.85)  # curated feedback near an eval question
    assert (v.rule, v.severity) == ("leakage.near", "warning") and "qa-1" in v.detail


def test_near_duplicate_pairs_across_a_split_pair_only_across_it():
    texts = ["alpha beta gamma delta epsilon", "alpha beta gamma delta epsilon!", "zeta eta theta iota kappa",
             "alpha beta gamma delta epsilon?"]
    assert [(i, j) for i, j, _ in near_duplicate_pairs(texts, 0.8)] == [(0, 1), (0, 3)]
    assert [(i, j) for i, j, _ in near_duplicate_pairs(texts, 0.8, split=2)] == [(0, 3)]  # not 1-3 nor 0-1


def test_coverage_minimum_per_module(corpus):
    report, _, ds = check_corpus(data_cfg(corpus, min_examples_per_module=50))
    assert ds is None
    assert len([v for v in report.errors if v.rule == "coverage.module"]) == 8


def test_token_length_uses_the_real_tokenizer(corpus, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    report, _, _ = check_corpus(data_cfg(corpus, max_seq_len=60), tok)
    too_long = [v for v in report.errors if v.rule == "length.tokens"]
    assert too_long and all("would be truncated" in v.detail and v.line for v in too_long)
    report, _, ds = check_corpus(data_cfg(corpus, max_seq_len=512), tok)
    assert ds is not None and not [v for v in report.violations if v.rule == "length.tokens"]


def test_near_duplicate_search_finds_pairs_and_spares_distinct_texts():
    texts = ["How do I create a purchase order?", "How do I create a purchase order ?!", "Where is the leave calendar?",
             "How can I create a purchase order?"]
    pairs = {(i, j) for i, j, _ in near_duplicate_pairs(texts, 0.6)}
    assert (0, 1) in pairs and ((0, 3) in pairs or (1, 3) in pairs) and not any(2 in p for p in pairs)


def test_shipped_corpus_passes_every_contract_with_the_real_tokenizer():
    from erpops.config import load_recipe
    from training.base_model import MODELS_DIR, load_tokenizer

    recipe = load_recipe(REPO / "recipes" / "smollm2-135m" / "cpu.yaml")
    cfg = recipe.data.model_copy(update={"root": REPO / "data" / "erp"})
    report, _, ds = check_corpus(cfg, load_tokenizer(recipe.model, REPO / MODELS_DIR))
    assert ds is not None, report.table()
    assert report.counts["train"] > 300
